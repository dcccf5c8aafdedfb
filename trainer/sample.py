"""Images from the model being trained: validation samples and prior-preservation class images."""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from typing import Callable, ContextManager

import torch
from PIL import Image

from .fileio import atomic_write


def build_pipeline(base, unet=None):
    """A diffusers text-to-image pipeline over the loaded components (no safety checker, no download).

    `unet` replaces the base UNet, e.g. the one carrying LoRA adapters. Sampling uses
    Euler with the model's own training schedule and prediction type.
    """
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    scheduler = EulerDiscreteScheduler.from_config(base.noise_scheduler.config)
    unet = unet if unet is not None else base.unet
    if base.info.arch == "sd1":
        pipe = StableDiffusionPipeline(vae=base.vae, text_encoder=base.text_encoders[0], tokenizer=base.tokenizers[0],
                                       unet=unet, scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    else:
        pipe = StableDiffusionXLPipeline(vae=base.vae, text_encoder=base.text_encoders[0],
                                         text_encoder_2=base.text_encoders[1], tokenizer=base.tokenizers[0],
                                         tokenizer_2=base.tokenizers[1], unet=unet, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def generate_images(pipe, prompts: list[str], seeds: list[int], *, size: int, steps: int, guidance: float,
                    autocast: Callable[[], ContextManager] = nullcontext) -> list[Image.Image]:
    """One image per (prompt, seed), each from its own seeded generator so it can be reproduced.

    Denoising runs under `autocast` (the training precision: fp32 LoRA layers meet bf16/fp16
    weights); the VAE decodes outside it, in its own dtype, because SDXL's VAE (kept in
    fp32) overflows to black images in fp16.
    """
    images = []
    for prompt, seed in zip(prompts, seeds):
        generator = torch.Generator(device="cpu").manual_seed(seed)
        with autocast():
            latents = pipe(prompt, height=size, width=size, num_inference_steps=steps, guidance_scale=guidance,
                           generator=generator, output_type="latent").images
        vae = pipe.vae
        pixels = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor).sample
        images += pipe.image_processor.postprocess(pixels.float(), output_type="pil")
    return images


def save_png(image: Image.Image, path: Path) -> Path:
    """Save a PNG atomically."""
    atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))
    return path


def ensure_class_images(base, class_dir: Path, prompt: str, count: int, *, size: int, steps: int,
                        guidance: float, seed: int, existing: int, on_progress=None,
                        autocast: Callable[[], ContextManager] = nullcontext) -> list[Path]:
    """Generate the class images the folder lacks, with the base model, and write them there.

    Called before anything is trained (the new LoRA is still zero), so the images show what
    the base model knows of the class. Files are named `class_<seed>_<i>.png` and written atomically one by one:
    a stopped run keeps the ones it made and a later run makes only the rest.
    """
    missing = count - existing
    if missing <= 0:
        return []
    pipe = build_pipeline(base)
    written = []
    for i in range(existing, count):
        image = generate_images(pipe, [prompt], [seed + i], size=size, steps=steps, guidance=guidance,
                                autocast=autocast)[0]
        written.append(save_png(image, Path(class_dir) / f"class_{seed}_{i:05d}.png"))
        if on_progress:
            on_progress(len(written), missing)
    return written
