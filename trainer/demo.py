"""`make demo`: a complete training run on a small local model and generated pictures.

Everything is made on the spot (once, then reused): a tiny SD1.x model as a diffusers
folder and six pictures of the demo subject. The run trains a LoRA on the CPU and
writes the LoRA, samples and a checkpoint under the output folder.
"""

from __future__ import annotations

import os
from pathlib import Path


def run_demo(output: Path, steps: int = 200) -> int:
    """Build the demo model and data if missing, train, and print where the results are."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from .cli import run_training
    from .config import TrainConfig
    from .run_folder import events_path, samples_dir
    from .tiny import make_demo_dataset, save_tiny_diffusers_model

    output = Path(output).resolve()
    model = output / "model"
    if not (model / "model_index.json").exists():
        save_tiny_diffusers_model(model, "sd1")
    data = output / "dataset"
    if not data.exists():
        make_demo_dataset(data, count=6, size=48)
    config = TrainConfig(
        pretrained_model=str(model), instance_dir=str(data), instance_prompt="a photo of sks disc",
        resolution=32, bucket_step=16, rank=4, alpha=4.0, learning_rate=5e-3, max_train_steps=steps,
        checkpoint_every=max(1, steps // 2), sample_every=max(1, steps // 2), sample_steps=10,
        validation_prompts=["a photo of sks disc", "a photo of sks disc on grass"],
        output_dir=str(output / "run"), output_name="demo_lora", overwrite=True, resume=False,
    )
    config.validate()
    code = run_training(config)
    if code == 0:
        print(f"samples: {samples_dir(config.output_dir)}")
        print(f"events:  {events_path(config.output_dir)}")
    return code
