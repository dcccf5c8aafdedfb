"""Sampling in stages (trainer/sample.py): the same images as diffusers' pipeline makes in one call."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from comfyui_dreambooth_lora.trainer.models import load_base_model
from comfyui_dreambooth_lora.trainer.sample import build_pipeline, generate_images


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
@pytest.mark.parametrize("guidance", [1.0, 5.0])
def test_staged_generation_makes_what_the_pipeline_makes_in_one_call(request, arch, guidance):
    base = load_base_model(request.getfixturevalue("tiny_sd1" if arch == "sd1" else "tiny_sdxl"))
    prompts, seeds = ["a photo of sks disc", "a red disc"], [3, 4]
    stages = []
    ours = generate_images(base, base.unet, prompts, seeds, size=48, steps=3, guidance=guidance,
                           place=stages.append)
    assert stages == ["encode", "denoise", "decode"]
    pipe = build_pipeline(base)
    with torch.no_grad():
        for prompt, seed, image in zip(prompts, seeds, ours):
            theirs = pipe(prompt, height=48, width=48, num_inference_steps=3, guidance_scale=guidance,
                          generator=torch.Generator().manual_seed(seed), output_type="pil").images[0]
            assert image.size == theirs.size == (48, 48)
            assert np.array_equal(np.asarray(image), np.asarray(theirs))


def test_an_interruption_stops_making_images_within_a_denoising_step(tiny_sd1):
    base = load_base_model(tiny_sd1)
    unet_calls = []
    base.unet.register_forward_hook(lambda *args: unet_calls.append(1))
    prompts, seeds = ["a photo of sks disc", "a red disc", "a blue disc"], [3, 4, 5]
    full = generate_images(base, base.unet, prompts, seeds, size=32, steps=4, guidance=1.0)
    per_image = len(unet_calls) // 3

    unet_calls.clear()  # asked during the second image's second step: it and the third are not made
    made = generate_images(base, base.unet, prompts, seeds, size=32, steps=4, guidance=1.0,
                           interrupted=lambda: len(unet_calls) > per_image + 1)
    assert len(made) == 1 and np.array_equal(np.asarray(made[0]), np.asarray(full[0]))
    assert len(unet_calls) == per_image + 2
