"""Loading a diffusers model folder (`model_index.json` and one subfolder per part), offline."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .architecture import layout_from_diffusers_config, variant_name
from .base import BaseModel, ModelError, ModelInfo, resolve_prediction, training_noise_scheduler
from .tokenizers import check_tokenizers, load_tokenizers, resolve_tokenizer_dirs


def _read_json(path: Path, folder: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ModelError(f"{folder.name}: cannot read {path.relative_to(folder)} ({e}); the diffusers folder is "
                         "incomplete or damaged.") from e


def inspect_diffusers_folder(folder: Path) -> tuple[str, str, str]:
    """(arch, variant, prediction type of the scheduler) of a diffusers folder, from its config files."""
    index = _read_json(folder / "model_index.json", folder)
    pipeline = str(index.get("_class_name", "?"))
    if "unet" not in index:
        kind = ("a Stable Diffusion 3 model" if "StableDiffusion3" in pipeline else
                "a Flux model" if "Flux" in pipeline else f"a {pipeline} model without a UNet")
        raise ModelError(f"{folder.name}: this diffusers folder holds {kind}. Only SD1.x and SDXL models can be "
                         "trained here.")
    unet_config = _read_json(folder / "unet" / "config.json", folder)
    layout = layout_from_diffusers_config(unet_config)
    sdxl = layout.adm_in_channels is not None
    if not sdxl and layout.context_dim == 1024:
        raise ModelError(f"{folder.name}: this is a Stable Diffusion 2.x model (1024-wide cross-attention). SD2 is "
                         "not supported yet; pick an SD1.x or SDXL model.")
    if sdxl and "text_encoder" not in index:
        raise ModelError(f"{folder.name}: this is the SDXL refiner, which only refines finished images. Train on "
                         "the SDXL base model instead.")
    if layout.in_channels != 4:
        raise ModelError(f"{folder.name}: the UNet takes {layout.in_channels} input channels (an inpainting or "
                         "editing model). Only plain text-to-image SD1.x / SDXL models can be trained.")
    if sdxl and "text_encoder_2" not in index:
        raise ModelError(f"{folder.name}: an SDXL UNet without text_encoder_2; the diffusers folder is incomplete.")
    vae_file = folder / "vae" / "config.json"
    vae_config = _read_json(vae_file, folder) if vae_file.is_file() else {}
    if vae_config.get("latents_mean") is not None or vae_config.get("latents_std") is not None:
        raise ModelError(f"{folder.name}: its VAE normalises latents with a mean and standard deviation (as "
                         "Playground v2.5 does); training and sampling here use only the scaling factor, so the "
                         "LoRA would learn from wrongly scaled latents. Pick a standard SD1.x or SDXL model.")
    arch = "sdxl" if sdxl else "sd1"
    scheduler_file = folder / "scheduler" / "scheduler_config.json"
    scheduler = _read_json(scheduler_file, folder) if scheduler_file.is_file() else {}
    return arch, variant_name(arch, layout), scheduler.get("prediction_type", "epsilon")


def _weights_variant(part: Path) -> str | None:
    """diffusers' `variant` for a part folder that only has fp16 weight files."""
    names = [p.name for p in part.glob("*") if p.suffix in (".safetensors", ".bin")]
    if names and all(".fp16." in n for n in names):
        return "fp16"
    return None


def load_diffusers_folder(folder: Path, tokenizer_dir: str | Path | None, prediction_type: str) -> BaseModel:
    """Every part of a diffusers folder, in fp32 on the CPU."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    arch, variant, scheduler_prediction = inspect_diffusers_folder(folder)
    folders = resolve_tokenizer_dirs(arch, tokenizer_dir, folder)
    tokenizers = load_tokenizers(folders)

    def load(cls, subfolder: str, **kwargs):
        try:
            return cls.from_pretrained(str(folder), subfolder=subfolder, local_files_only=True,
                                       variant=_weights_variant(folder / subfolder), **kwargs)
        except Exception as e:  # missing files, broken json, wrong class: all say the folder is unusable
            raise ModelError(f"{folder.name}: cannot load {subfolder}/ ({type(e).__name__}: {e}). The diffusers "
                             "folder is incomplete or damaged.") from e

    # fp32 straight from diffusers; transformers renamed its dtype argument, so those are cast afterwards.
    unet = load(UNet2DConditionModel, "unet", torch_dtype=torch.float32)
    vae = load(AutoencoderKL, "vae", torch_dtype=torch.float32)
    text_encoders = [load(CLIPTextModel, "text_encoder")]
    if arch == "sdxl":
        text_encoders.append(load(CLIPTextModelWithProjection, "text_encoder_2"))
    check_tokenizers(tokenizers, [(e.config.vocab_size, e.config.max_position_embeddings) for e in text_encoders],
                      folders, folder.name)

    predicted = resolve_prediction(prediction_type, scheduler_prediction)
    scheduler_file = folder / "scheduler" / "scheduler_config.json"
    # The folder's own betas (and zero-SNR setting) if it has a scheduler, whatever its class.
    scheduler_config = _read_json(scheduler_file, folder) if scheduler_file.is_file() else None
    return BaseModel(info=ModelInfo(arch, variant, predicted), unet=unet, vae=vae, text_encoders=text_encoders,
                     tokenizers=tokenizers, noise_scheduler=training_noise_scheduler(predicted, scheduler_config),
                     source=folder, name=folder.name)
