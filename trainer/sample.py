"""Images from the model being trained: validation samples and prior-preservation class images."""

from __future__ import annotations

import itertools

from contextlib import nullcontext
from pathlib import Path
from typing import Callable, ContextManager

import torch
from PIL import Image

from .fileio import atomic_write


def build_pipeline(base, unet=None, *, denoise_only: bool = False):
    """A diffusers text-to-image pipeline over the loaded components (no safety checker, no download).

    `unet` replaces the base UNet, e.g. the one carrying LoRA adapters. Sampling uses
    Euler with the model's own training schedule and prediction type. With `denoise_only`
    the text encoders and the VAE are taken out after building (prompt embeddings in, latents
    out): the pipeline then runs on the UNet's device wherever they are, which diffusers would
    otherwise take from any one of its models. (Built without them, diffusers < 0.33 fails.)
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
    if denoise_only:
        encoders = ["text_encoder", "text_encoder_2"][:len(base.text_encoders)]
        pipe.register_modules(vae=None, **dict.fromkeys(encoders))
    pipe.set_progress_bar_config(disable=True)
    return pipe


# Class images made between two moves of the models when they take turns on the GPU: each move
# of an SDXL UNet is ~5 GB over PCIe, and a stop waits for the images in hand to be finished.
CLASS_IMAGES_PER_MOVE = 4


def keep_models_in_place(stage: str) -> None:
    """The `place` that moves nothing: every model stays where it is."""


@torch.no_grad()
def generate_images(base, unet, prompts: list[str], seeds: list[int], *, size: int, steps: int, guidance: float,
                    autocast: Callable[[], ContextManager] = nullcontext,
                    place: Callable[[str], None] = keep_models_in_place,
                    interrupted: Callable[[], bool] = lambda: False) -> list[Image.Image]:
    """One image per (prompt, seed), each from its own seeded generator so it can be reproduced.

    Once `interrupted()` says so (checked before each image and each denoising step), it makes
    no more: the images finished by then are returned, the first ones of the list.

    Three stages, each needing only its own models: the text encoders encode every prompt,
    the UNet (`unet`, e.g. carrying the LoRA) denoises, the VAE decodes. `place(stage)` runs
    before each ("encode", "denoise", "decode"); a run that keeps frozen models in CPU memory gives one that brings
    only that stage's models to the GPU, so the three never need it together. Encoding and
    denoising run under `autocast` (the training precision: fp32 LoRA layers meet bf16/fp16
    weights); the VAE decodes outside it, in its own dtype, because SDXL's VAE (kept in fp32)
    overflows to black images in fp16.
    """
    place("encode")
    encoder = build_pipeline(base, unet)
    device = base.text_encoders[0].device
    with autocast():  # each prompt once: class images repeat theirs
        encoded = {prompt: _prompt_embeddings(encoder, prompt, device, guidance) for prompt in dict.fromkeys(prompts)}
    conditions = [encoded[prompt] for prompt in prompts]
    place("denoise")
    denoiser = build_pipeline(base, unet, denoise_only=True)
    latents = []

    def stop_when_interrupted(pipe, step, timestep, outputs: dict) -> dict:
        if step < pipe.num_timesteps - 1 and interrupted():
            pipe._interrupt = True  # diffusers' pipelines skip their remaining steps (reset by each call)
        return outputs

    for condition, seed in zip(conditions, seeds):
        if interrupted():
            break
        generator = torch.Generator(device="cpu").manual_seed(seed)
        with autocast():
            latent = denoiser(**condition, height=size, width=size, num_inference_steps=steps, guidance_scale=guidance,
                              generator=generator, output_type="latent", callback_on_step_end=stop_when_interrupted).images
        if denoiser.interrupt:  # cut short: a half-denoised image is not one
            break
        latents.append(latent)
    if not latents:
        return []
    place("decode")
    vae = base.vae
    images = []
    for latent in latents:
        pixels = vae.decode(latent.to(vae.device, vae.dtype) / vae.config.scaling_factor).sample
        images += encoder.image_processor.postprocess(pixels.float(), output_type="pil")
    return images


def _prompt_embeddings(pipe, prompt: str, device, guidance: float) -> dict[str, torch.Tensor]:
    """What the pipeline would encode from `prompt` itself (and from the empty negative prompt with guidance)."""
    from diffusers import StableDiffusionXLPipeline

    guided = guidance > 1
    if isinstance(pipe, StableDiffusionXLPipeline):
        embeds, negative, pooled, negative_pooled = pipe.encode_prompt(
            prompt, device=device, num_images_per_prompt=1, do_classifier_free_guidance=guided)
        return dict(prompt_embeds=embeds, negative_prompt_embeds=negative, pooled_prompt_embeds=pooled,
                    negative_pooled_prompt_embeds=negative_pooled)
    embeds, negative = pipe.encode_prompt(prompt, device, 1, guided)
    return dict(prompt_embeds=embeds, negative_prompt_embeds=negative)


def save_png(image: Image.Image, path: Path) -> Path:
    """Save a PNG atomically."""
    atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))
    return path


def ensure_class_images(base, class_dir: Path, prompt: str, count: int, *, size: int, steps: int,
                        guidance: float, seed: int, existing: int, on_progress=None,
                        autocast: Callable[[], ContextManager] = nullcontext,
                        place: Callable[[str], None] = keep_models_in_place, per_call: int = 1) -> list[Path]:
    """Generate the class images the folder lacks, with the base model, and write them there.

    Called before anything is trained (the new LoRA is still zero), so the images show what
    the base model knows of the class. Files are named `class_<seed>_<i>.png` and written atomically one by one:
    a stopped run keeps the ones it made and a later run makes only the rest. `per_call`
    images are made per call of `generate_images` (and per turn of models that `place` moves).
    """
    missing = count - existing
    if missing <= 0:
        return []
    def image_path(i: int) -> Path:
        return Path(class_dir) / f"class_{seed}_{i:05d}.png"

    # The first free names: after a user deleted one, `existing` no longer says which are taken.
    todo = list(itertools.islice((i for i in itertools.count() if not image_path(i).exists()), missing))
    written = []
    for first in range(0, missing, per_call):
        indices = todo[first:first + per_call]
        images = generate_images(base, base.unet, [prompt] * len(indices), [seed + i for i in indices], size=size,
                                 steps=steps, guidance=guidance, autocast=autocast, place=place)
        saved = [save_png(image, image_path(i)) for i, image in zip(indices, images)]
        for path in saved:  # all saved first: `on_progress` may stop the run
            written.append(path)
            if on_progress:
                on_progress(len(written), missing)
    return written
