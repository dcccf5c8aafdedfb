"""Host time from one step's loss read to the next step's UNet call, on the tiny models.

With the loss read at the end of its own step, a GPU idles for this long between steps (the
host emits the step event, checks for a stop, draws the next batch and its noise); the trainer
reads it one step late on a GPU instead (trainer/loss_readout.py). On the CPU the tiny models'
tensors are small, so what this measures is the host's Python and dispatch time.

    python benchmarks/host_gap.py [--arch sd1|sdxl] [--steps 60]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from comfyui_dreambooth_lora.trainer import loop  # noqa: E402
from comfyui_dreambooth_lora.trainer.config import TrainConfig  # noqa: E402
from comfyui_dreambooth_lora.trainer.loss_readout import LossReadout  # noqa: E402
from comfyui_dreambooth_lora.trainer.tiny import make_demo_dataset, save_tiny_diffusers_model  # noqa: E402


def measure(arch: str, steps: int, workdir: Path) -> list[float]:
    """Milliseconds from each loss read to the next UNet call, past the first 10 steps."""
    reads, calls = [], []
    push, loss = LossReadout.push, loop.diffusion_loss

    def timed_push(self, *args, **kwargs):
        out = push(self, *args, **kwargs)
        reads.append(time.perf_counter())
        return out

    def timed_loss(unet, *args, **kwargs):
        def call(*a, **k):
            calls.append(time.perf_counter())
            return unet(*a, **k)
        return loss(call, *args, **kwargs)

    LossReadout.push, loop.diffusion_loss = timed_push, timed_loss
    try:
        model = save_tiny_diffusers_model(workdir / "model", arch)
        photos = make_demo_dataset(workdir / "photos", count=4, size=64, captions=False)
        loop.train(TrainConfig(pretrained_model=str(model), instance_dir=str(photos),
                               instance_prompt="a photo of sks disc", resolution=64, max_train_steps=steps,
                               checkpoint_every=0, sample_at_end=False, output_dir=str(workdir / "run"),
                               mixed_precision="no"))
    finally:
        LossReadout.push, loop.diffusion_loss = push, loss
    return [(call - read) * 1e3 for read, call in zip(reads, calls[1:])][10:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", choices=("sd1", "sdxl"), default="sd1")
    parser.add_argument("--steps", type=int, default=60)
    args = parser.parse_args()
    gaps = measure(args.arch, args.steps, Path(tempfile.mkdtemp(prefix="host_gap_")))
    print(f"host_gap ({args.arch}, {len(gaps)} steps): median {statistics.median(gaps):.2f} ms "
          f"(min {min(gaps):.2f}, max {max(gaps):.2f}) from a loss read to the next UNet call")


if __name__ == "__main__":
    main()
