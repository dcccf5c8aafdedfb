"""The trainer's GPU paths on the tiny models, in seconds: the first thing a lent GPU runs.

CI has no GPU, so these paths (bf16 autocast on CUDA, fused AdamW, class images generated
on the device, offloading the frozen models, SDXL text-encoder LoRA, sampling) are only
exercised here. Each run must finish, write its LoRA and samples, and keep its loss finite;
the script exits non-zero if one does not (gpu_session.sh reports it and benchmarks anyway:
the benchmark's own cases show which paths work).

    python benchmarks/gpu_smoke.py [WORKDIR]
    python benchmarks/gpu_smoke.py --cpu     # the same runs on the CPU (to check this script itself)
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from comfyui_dreambooth_lora.trainer.config import TrainConfig  # noqa: E402
from comfyui_dreambooth_lora.trainer.loop import train  # noqa: E402
from comfyui_dreambooth_lora.trainer.tiny import make_demo_dataset, save_tiny_diffusers_model  # noqa: E402

RUNS = {  # name -> (architecture, options)
    "sd1, prior preservation (class images made on the GPU), offload": (
        "sd1", dict(with_prior_preservation=True, class_prompt="a photo of disc", num_class_images=4,
                    offload_frozen_models=True)),
    "sd1, fp16 with loss scaling": ("sd1", dict(mixed_precision="fp16")),
    "sdxl, text-encoder LoRA": ("sdxl", dict(train_text_encoder=True)),
    "sdxl, gradient checkpointing, offload, 5 class images (two turns of the models)": (
        "sdxl", dict(gradient_checkpointing=True, offload_frozen_models=True, with_prior_preservation=True,
                     class_prompt="a photo of disc", num_class_images=5)),
}


def main(workdir: Path, expected_device: str = "cuda") -> int:
    if expected_device == "cuda" and not torch.cuda.is_available():
        print("gpu_smoke: no CUDA device")
        return 2
    data = workdir / "data"
    make_demo_dataset(data, count=4, size=48)
    failures = []
    for name, (arch, options) in RUNS.items():
        if options.get("mixed_precision") == "fp16" and expected_device == "cpu":
            continue  # the trainer refuses fp16 on the CPU
        model = workdir / f"model_{arch}"
        if not (model / "model_index.json").exists():
            save_tiny_diffusers_model(model, arch)
        out = workdir / name.split(",")[0].replace(" ", "_") / str(len(failures)) / str(time.time_ns())
        config = TrainConfig(
            pretrained_model=str(model), instance_dir=str(data), instance_prompt="a photo of sks disc",
            resolution=32, bucket_step=16, rank=4, alpha=4.0, learning_rate=1e-3, max_train_steps=12,
            sample_every=6, sample_steps=4, validation_prompts=["a photo of sks disc"], checkpoint_every=6,
            class_dir=str(out / "class"), output_dir=str(out), output_name="smoke", seed=0, **options)
        config.validate()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        started = time.time()
        try:
            result = train(config)
            events = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]
            start = next(e for e in events if e["event"] == "start")
            losses = [e["loss"] for e in events if e["event"] == "step"]
            problems = []
            if result.status != "done" or result.step != 12:
                problems.append(f"status {result.status} at step {result.step}")
            if not result.lora_files or not all(Path(p).exists() for p in result.lora_files):
                problems.append("no LoRA written")
            if len(result.samples) < 2:
                problems.append(f"{len(result.samples)} samples")
            if not all(math.isfinite(x) for x in losses):
                problems.append(f"losses {losses}")
            if start["device"].split(":")[0] != expected_device:
                problems.append(f"trained on {start['device']}")
            line = (f"{name}: {'FAIL ' + '; '.join(problems) if problems else 'ok'} "
                    f"({start['mixed_precision']}, loss {losses[0]:.4f} -> {losses[-1]:.4f}, "
                    f"{time.time() - started:.1f} s{peak_memory()})")
        except Exception as e:  # noqa: BLE001
            problems = [f"{type(e).__name__}: {e}"]
            line = f"{name}: FAIL {problems[0]}"
            import traceback
            traceback.print_exc()
        print("gpu_smoke:", line, flush=True)
        if problems:
            failures.append(name)
    return 1 if failures else 0


def peak_memory() -> str:
    return f", peak {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB" if torch.cuda.is_available() else ""


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if a != "--cpu"]
    if "--cpu" in sys.argv:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    target = Path(args[0]) if args else Path(tempfile.mkdtemp(prefix="gpu_smoke_"))
    sys.exit(main(target, "cpu" if "--cpu" in sys.argv else "cuda"))
