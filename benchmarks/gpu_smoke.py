"""The trainer's GPU paths on the tiny models, in seconds: the first thing a lent GPU runs.

CI has no GPU, so these paths (bf16 autocast on CUDA, fused AdamW, class images generated
on the device, offloading the frozen models, SDXL text-encoder LoRA, LoHa and LoKr, masked
loss, sampling) are only exercised here. Each run must finish, write its LoRA and samples,
and keep its loss finite; the script exits non-zero if one does not (gpu_session.sh reports
it and benchmarks anyway: the benchmark's own cases show which paths work).

    python benchmarks/gpu_smoke.py [WORKDIR]
    python benchmarks/gpu_smoke.py --cpu     # the same runs on the CPU (to check this script itself)
    python benchmarks/gpu_smoke.py --graphs-only  # only cuda_graphs against eager training, and
                                                  # the steps' waits for the GPU (sync debug mode)
    python benchmarks/gpu_smoke.py --only "DoRA|dropout"  # only the checks whose name holds one of these
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from PIL import Image  # noqa: E402
from safetensors import safe_open  # noqa: E402

from comfyui_dreambooth_lora.trainer.config import TrainConfig  # noqa: E402
from comfyui_dreambooth_lora.trainer.events import EventWriter  # noqa: E402
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
    "sd1, LoHa on linear layers and convolutions": ("sd1", dict(network="loha", lora_targets="all_linear_and_conv")),
    "sdxl, LoKr with the text encoders": ("sdxl", dict(network="lokr", train_text_encoder=True)),
    # `masked`: the images with masks that keep their left half (the mask weights reach the loss on the GPU)
    "sd1, masked loss, latents cached": ("sd1", dict(masked=True, cache_latents="yes")),
    "sdxl, masked loss, random crops and flips": ("sdxl", dict(masked=True, crop="random", flip_p=0.5)),
}


def main(workdir: Path, expected_device: str = "cuda", graphs_only: bool = False, only: str = "") -> int:
    if expected_device == "cuda" and not torch.cuda.is_available():
        print("gpu_smoke: no CUDA device")
        return 2
    data = workdir / "data"
    make_demo_dataset(data, count=4, size=96)
    masked = with_half_masks(data, workdir / "data_masked")
    checks = {}
    for name, (arch, options) in RUNS.items() if not graphs_only else ():
        if options.get("mixed_precision") == "fp16" and expected_device == "cpu":
            continue  # the trainer refuses fp16 on the CPU
        options = dict(options)
        folder = masked if options.pop("masked", False) else data
        checks[name] = lambda arch=arch, folder=folder, options=options: check_run(workdir, folder, arch, options,
                                                                                  expected_device)
    if expected_device == "cuda":
        for name, (arch, options) in GRAPH_RUNS.items():
            checks[f"cuda_graphs, {name}"] = lambda arch=arch, options=options: compare_cuda_graphs(
                workdir, data, arch, options)
        checks["cuda_graphs, sd1, LoRA dropout: each replay draws new masks"] = check_dropout_masks_change_between_replays
        for name, (arch, options) in SYNC_FREE_RUNS.items():
            checks[f"no host wait, {name}"] = lambda arch=arch, options=options: check_steps_do_not_wait_for_the_gpu(
                workdir, data, arch, options)
    wanted = [w for w in only.split("|") if w]
    passed = [checked(name, check) for name, check in checks.items() if not wanted or any(w in name for w in wanted)]
    return 0 if all(passed) else 1


def checked(name: str, check) -> bool:
    """Run one check (it returns its problems and a line of figures), print its result; True if it passed."""
    try:
        problems, figures = check()
        line = f"{name}: {'FAIL ' + '; '.join(problems) if problems else 'ok'} ({figures})"
    except Exception as e:  # noqa: BLE001
        problems = [f"{type(e).__name__}: {e}"]
        line = f"{name}: FAIL {problems[0]}"
        import traceback
        traceback.print_exc()
    print("gpu_smoke:", line, flush=True)
    return not problems


def with_half_masks(data: Path, folder: Path) -> Path:
    """A copy of `data` in which every image has a mask (`<name>_mask.png`) that keeps its left half."""
    shutil.copytree(data, folder, dirs_exist_ok=True)
    for image in sorted(folder.glob("*.png")):
        if not image.stem.endswith("_mask"):
            with Image.open(image) as picture:
                mask = Image.new("L", picture.size, 0)
            mask.paste(255, (0, 0, mask.width // 2, mask.height))
            mask.save(folder / f"{image.stem}_mask.png")
    return folder


def train_tiny(workdir: Path, data: Path, arch: str, listener=None, **options):
    """Train the tiny `arch` model on `data` with `options` (`listener` hears each event as it
    is written); the result and the run's events."""
    model = workdir / f"model_{arch}"
    if not (model / "model_index.json").exists():
        save_tiny_diffusers_model(model, arch)
    out = workdir / "runs" / str(time.time_ns())
    values = dict(resolution=32, bucket_step=16, rank=4, alpha=4.0, learning_rate=1e-3,
                  validation_prompts=["a photo of sks disc"], seed=0)
    values.update(options)
    config = TrainConfig(pretrained_model=str(model), instance_dir=str(data), instance_prompt="a photo of sks disc",
                         class_dir=str(out / "class"), output_dir=str(out), output_name="smoke", **values)
    config.validate()
    events = EventWriter(out / "events.jsonl")
    if listener is not None:
        events.listeners.append(listener)
    result = train(config, events=events)
    return result, [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]


def check_run(workdir: Path, data: Path, arch: str, options: dict, expected_device: str) -> tuple[list[str], str]:
    """One RUNS case: it must finish, write its LoRA and samples, and keep its loss finite."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    started = time.time()
    result, events = train_tiny(workdir, data, arch, max_train_steps=12, sample_every=6, sample_steps=4,
                                checkpoint_every=6, **options)
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
    if result.lora_files:
        with safe_open(str(result.lora_files[0]), "pt") as lora:
            metadata = lora.metadata()
        masked = any(p.stem.endswith("_mask") for p in data.glob("*.png"))
        if metadata.get("ss_masked_loss") != str(masked):
            problems.append(f"ss_masked_loss {metadata.get('ss_masked_loss')!r}, masks: {masked}")
        if metadata.get("ss_network_module") != ("networks.lora" if options.get("network", "lora") == "lora"
                                                 else "lycoris.kohya"):
            problems.append(f"ss_network_module {metadata.get('ss_network_module')!r}")
    return problems, (f"{start['mixed_precision']}, loss {losses[0]:.4f} -> {losses[-1]:.4f}, "
                      f"{time.time() - started:.1f} s{peak_memory()}")


GRAPH_RUNS = {  # name -> (architecture, options); each trains with and without cuda_graphs
    "sd1, bf16, 96 px: three bucket shapes in turn (one memory pool)": ("sd1", dict(resolution=96)),
    "sd1, bf16, prior preservation, samples between": (
        "sd1", dict(with_prior_preservation=True, class_prompt="a photo of disc", num_class_images=2)),
    "sdxl, bf16, offload (the UNet moves for samples)": ("sdxl", dict(offload_frozen_models=True)),
    "sdxl, bf16, gradient checkpointing": ("sdxl", dict(gradient_checkpointing=True)),
    "sd1, fp16 with loss scaling": ("sd1", dict(mixed_precision="fp16")),
    "sd1, bf16, 2 micro-batches per step (gradients accumulate beside the graphs' buffers)": (
        "sd1", dict(gradient_accumulation_steps=2)),
    "sdxl, text-encoder LoRA (the embeddings need gradients)": ("sdxl", dict(train_text_encoder=True)),
    "sd1, DoRA": ("sd1", dict(use_dora=True)),
    # 'auto' leaves graphs off in fp32 until this passes on a GPU (not yet run there):
    "sd1, fp32 (mixed_precision 'no')": ("sd1", dict(mixed_precision="no")),
    # LoRA dropout cannot match eager training (a graph draws its masks from other RNG offsets):
    # check_dropout_masks_change_between_replays checks it instead.
}


def compare_cuda_graphs(workdir: Path, data: Path, arch: str, options: dict) -> tuple[list[str], str]:
    """Train eagerly and with cuda_graphs (same seed): the graphs must be captured (no
    fallback), and the losses and LoRA weights must match the eager run's."""
    from safetensors.torch import load_file

    runs = {}
    for graphs in ("no", "yes"):
        result, events = train_tiny(workdir, data, arch, **{"mixed_precision": "bf16", **options},
                                    max_train_steps=10, sample_every=5, sample_steps=2, checkpoint_every=0,
                                    cuda_graphs=graphs)
        runs[graphs] = dict(
            losses=[e["loss"] for e in events if e["event"] == "step"],
            steps=[e["seconds_per_step"] for e in events if e["event"] == "step"],
            logs=[e["message"] for e in events if e["event"] == "log" and "cuda_graphs" in e["message"]],
            lora=load_file(result.lora_files[0]))
    eager, graphed = runs["no"], runs["yes"]
    loss_diff = max(abs(a - b) / max(abs(a), 1e-8) for a, b in zip(eager["losses"], graphed["losses"]))
    weight_diff = max(((graphed["lora"][k].float() - v.float()).abs().max()
                       / v.float().abs().max().clamp(min=1e-12)).item() for k, v in eager["lora"].items())
    captures = sum("captured" in m for m in graphed["logs"])
    problems = [m for m in graphed["logs"] if "failed" in m or "not used" in m]
    if not captures:
        problems.append("nothing captured")
    if len(graphed["losses"]) != len(eager["losses"]) or loss_diff > 1e-2 or weight_diff > 5e-2:
        problems.append(f"differs from eager: losses {eager['losses']} vs {graphed['losses']}")

    def steady(run):  # the median step after the first two
        return sorted(run["steps"][2:])[len(run["steps"][2:]) // 2]
    return problems, (f"{captures} captures, largest loss difference {loss_diff:.2e}, LoRA weights "
                      f"{weight_diff:.2e}; s/step median eager {steady(eager):.4f}, graphed {steady(graphed):.4f}")


def check_dropout_masks_change_between_replays(capture=None) -> tuple[list[str], str]:
    """LoRA dropout inside a CUDA graph: each replay must draw new masks, as each eager step does,
    not repeat the capture's. The graphed tiny UNet (LoRA B made non-zero, so the LoRA branch
    counts) is called three times on the same inputs: with dropout its outputs must differ from
    call to call by about as much as eager calls do, and without dropout not at all.
    (`capture`: the tests' stand-in for torch's, to check this check on the CPU.)"""
    from comfyui_dreambooth_lora.trainer.cuda_graphs import GraphedUNet
    from comfyui_dreambooth_lora.trainer.lora import add_lora
    from comfyui_dreambooth_lora.trainer.tiny import build_tiny_components

    device = "cuda" if capture is None else "cpu"
    spread, messages = {}, []
    for dropout in (0.0, 0.5):
        unet = build_tiny_components("sd1", 0)["unet"].to(device).train()
        add_lora(unet, [], TrainConfig(rank=4, alpha=4.0, lora_dropout=dropout))
        with torch.no_grad():
            for name, p in unet.named_parameters():
                if ".lora_B." in name:
                    p.normal_(std=0.5)
        gen = torch.Generator().manual_seed(0)
        size, width = unet.config.sample_size, unet.config.cross_attention_dim
        inputs = (torch.randn(1, unet.config.in_channels, size, size, generator=gen).to(device),
                  torch.tensor([500], device=device), torch.randn(1, 8, width, generator=gen).to(device))
        graphed = GraphedUNet(unet, log=lambda message, **_: messages.append(message), **({"capture": capture} if capture else {}))
        for mode, call in (("graphed", graphed), ("eager", unet)):  # as in training: no eager call before the capture
            outputs = []
            for _ in range(3):
                with torch.autocast(device, dtype=torch.bfloat16, cache_enabled=False):  # the trainer's autocast
                    out = call(*inputs).sample
                out.float().square().mean().backward()
                outputs.append(out.detach().float().clone())
            spread[mode, dropout] = max((outputs[i] - outputs[i + 1]).abs().max().item() for i in (0, 1))
        if graphed.failed or not graphed.graphs:
            return [f"the UNet was not captured (dropout {dropout}): {' '.join(messages)}"], ""
    problems = []
    if spread["graphed", 0.0] != 0:
        problems.append(f"replays differ without dropout (by {spread['graphed', 0.0]:.2e})")
    if spread["graphed", 0.5] < 0.25 * spread["eager", 0.5]:
        problems.append("replays repeat the capture's dropout masks")
    return problems, (f"largest output change from one call to the next with dropout 0.5: eager "
                      f"{spread['eager', 0.5]:.3f}, graphed {spread['graphed', 0.5]:.3f}; without dropout "
                      f"eager {spread['eager', 0.0]:.1e}, graphed {spread['graphed', 0.0]:.1e}")


SYNC_FREE_RUNS = {  # name -> (architecture, options): the default GPU path, CUDA graphs included
    "sd1, bf16": ("sd1", {}),
    "sdxl, bf16, noise offset (its time ids and offset noise also come from the host)": (
        "sdxl", dict(noise_offset=0.05)),
}


def check_steps_do_not_wait_for_the_gpu(workdir: Path, data: Path, arch: str, options: dict) -> tuple[list[str], str]:
    """Steady-state steps queue their work without waiting for the GPU: from step 2's event to
    step 8's (steps 4-9 queued, the losses read one step late) torch's sync debug mode turns the
    synchronising calls it flags (`.item()`, a copy from pageable memory) into errors. Not the
    implicit ones (cudaMalloc, pinned-pool growth), nor a graph capture's, which at 32 px (one
    bucket shape) all come at step 1."""
    window = {"on": False}

    def listener(event):
        if event["event"] == "step" and event["step"] in (2, 8):
            window["on"] = event["step"] == 2
            torch.cuda.set_sync_debug_mode("error" if window["on"] else "default")
    try:
        result, events = train_tiny(workdir, data, arch, listener=listener, **{"mixed_precision": "bf16", **options},
                                    max_train_steps=10, checkpoint_every=0, sample_at_end=False)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    steps = [e["step"] for e in events if e["event"] == "step"]
    problems = [] if result.status == "done" and steps == list(range(1, 11)) else [f"{result.status}, steps {steps}"]
    return problems, "no synchronising call torch flags in steps 4-9"


def peak_memory() -> str:
    return f", peak {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB" if torch.cuda.is_available() else ""


if __name__ == "__main__":
    at = sys.argv.index("--only") + 1 if "--only" in sys.argv else 0  # --only's value is no work folder
    only = sys.argv[at] if 0 < at < len(sys.argv) else ""
    args = [a for i, a in enumerate(sys.argv[1:], 1) if not a.startswith("--") and i != at]
    if "--cpu" in sys.argv:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    target = Path(args[0]) if args else Path(tempfile.mkdtemp(prefix="gpu_smoke_"))
    sys.exit(main(target, "cpu" if "--cpu" in sys.argv else "cuda", graphs_only="--graphs-only" in sys.argv,
                  only=only))
