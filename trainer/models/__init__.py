"""Offline loading of SD1.x / SDXL base models: single-file checkpoints and diffusers folders.

Two kinds of input:

* a diffusers folder (`model_index.json` and one subfolder per part), loaded with
  `from_pretrained(..., local_files_only=True)`;
* a single-file checkpoint in the original layout (`model.diffusion_model.*`,
  `first_stage_model.*`, `cond_stage_model.*` / `conditioner.embedders.*`), as
  `.safetensors` or as a `.ckpt` read with `torch.load(weights_only=True)`.

Single files carry no config. Like ComfyUI, we read the architecture off the tensor
names and shapes (`detect_architecture`), build the diffusers configs from that and
convert the weights with diffusers' own ldm converters. Nothing is ever fetched from
the Hub: no config, no tokenizer, no weights.

Models we cannot train (SD2.x, SD3, Flux, a LoRA, a lone VAE...) fail early with a
`ModelError` that names the file, says what it is and what to do instead.

This package's public API is here (`inspect_model`, `load_base_model`); its modules:
`base` (BaseModel, ModelInfo, the training noise schedule), `files` (reading checkpoint
files), `architecture` (detection from shapes, diffusers configs), `tokenizers`,
`single_file` and `diffusers_folder` (the two loaders).
"""

from __future__ import annotations

from pathlib import Path

import torch

from .architecture import Architecture, UNetLayout, detect_architecture
from .base import PREDICTION_TYPES, BaseModel, ModelError, ModelInfo, check_prediction_type, resolve_prediction
from .diffusers_folder import inspect_diffusers_folder, load_diffusers_folder
from .files import check_path, read_shapes
from .single_file import load_single_file
from .tokenizers import TOKENIZER_FILES, comfyui_tokenizer_dir, holds_tokenizer, resolve_tokenizer_dirs

__all__ = ["PREDICTION_TYPES", "TOKENIZER_FILES", "Architecture", "BaseModel", "ModelError", "ModelInfo", "UNetLayout",
           "check_finite_weights", "comfyui_tokenizer_dir", "detect_architecture", "holds_tokenizer", "inspect_model",
           "load_base_model", "resolve_tokenizer_dirs"]


def inspect_model(path: str | Path, prediction_type: str = "auto") -> ModelInfo:
    """Say what a base model is without loading its weights.

    Reads only the safetensors header or the diffusers config files (a `.ckpt` has no
    header, so it is memory-mapped). Raises `ModelError` for anything we cannot train.
    """
    path = check_path(path)
    check_prediction_type(prediction_type)
    if path.is_dir():
        arch, variant, scheduler_prediction = inspect_diffusers_folder(path)
        return ModelInfo(arch, variant, resolve_prediction(prediction_type, scheduler_prediction))
    found = detect_architecture(read_shapes(path), source=path.name)
    return ModelInfo(found.arch, found.variant,
                     resolve_prediction(prediction_type, "v_prediction" if found.v_prediction else "epsilon"))


def load_base_model(path: str | Path, *, tokenizer_dir: str | Path | None = None,
                    prediction_type: str = "auto") -> BaseModel:
    """Load an SD1.x / SDXL model from a diffusers folder or a single-file checkpoint, offline.

    Args:
        path: a diffusers folder (with `model_index.json`) or a `.safetensors` / `.ckpt` file.
        tokenizer_dir: a folder with the CLIP tokenizer (`tokenizer.json`, or `vocab.json` and
            `merges.txt`), or a diffusers folder whose tokenizer to use. Default: the diffusers
            folder's own `tokenizer/`, else the one ComfyUI ships, when ComfyUI is importable.
        prediction_type: "auto" (read it from the model: a `v_pred` key in a checkpoint or the
            folder's scheduler config; epsilon when neither says), "epsilon" or "v_prediction"
            (overrides what the model says).

    Returns every part in fp32 on the CPU, in eval mode, with `requires_grad` off.
    """
    path = check_path(path)
    check_prediction_type(prediction_type)
    if path.is_dir():
        base = load_diffusers_folder(path, tokenizer_dir, prediction_type)
    else:
        base = load_single_file(path, tokenizer_dir, prediction_type)
    for module in (base.unet, base.vae, *base.text_encoders):
        if any(p.dtype != torch.float32 for p in module.parameters()):  # e.g. a folder of fp16 weights
            module.to(torch.float32)
        module.eval()
        module.requires_grad_(False)
    parts = {"unet": base.unet, "vae": base.vae,
             **{f"text_encoder{'' if i == 0 else f'_{i + 1}'}": e for i, e in enumerate(base.text_encoders)}}
    for part, module in parts.items():
        check_finite_weights(module, part, path if path.is_file() else path / part)
    return base


def check_finite_weights(module: torch.nn.Module, part: str, source: Path) -> None:
    """Refuse a model part with NaN or infinite weights, naming a few of them and the file they came from.

    Such weights make the first loss NaN whatever the settings; found here, the message can say
    that the checkpoint is at fault. One `isfinite` pass per tensor: small next to reading the file.
    """
    broken = [name for name, tensor in module.state_dict().items()
              if tensor.is_floating_point() and not torch.isfinite(tensor).all()]
    if broken:
        examples = ", ".join(broken[:3]) + (f" and {len(broken) - 3} more" if len(broken) > 3 else "")
        raise ModelError(f"{source}: the {part} weights are not all finite (NaN or infinity in {examples}). The "
                         "file is damaged or was saved from a broken model: re-download or re-export the "
                         "checkpoint.")

