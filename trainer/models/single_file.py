"""Loading a single-file checkpoint: detect its architecture, build the diffusers modules empty and
fill them with its weights, converted by diffusers' own ldm converters."""

from __future__ import annotations

from pathlib import Path

import torch

from .architecture import CLIP_L_PREFIX, OPEN_CLIP_G_PREFIX, UNET_PREFIX, VAE_PREFIXES, detect_architecture
from .base import BaseModel, ModelError, ModelInfo, resolve_prediction, training_noise_scheduler
from .files import is_safetensors, load_pickle_checkpoint, load_state_dict, read_safetensors_header
from .tokenizers import check_tokenizers, load_tokenizers, resolve_tokenizer_dirs


def load_weights(module: torch.nn.Module, state_dict: dict[str, torch.Tensor], part: str, source: str) -> None:
    """Load converted weights into a module built on the meta device, strictly, in fp32.

    transformers 5 dropped the `text_model.` prefix from CLIPTextModel's state dict (not from
    CLIPTextModelWithProjection's), so keys are matched with or without it.
    """
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    matched = {}
    for key, value in state_dict.items():
        if key.endswith("position_ids"):  # a buffer the model rebuilds; old files store it
            continue
        if key not in expected:
            if key.startswith("text_model.") and key[len("text_model."):] in expected:
                key = key[len("text_model."):]
            elif "text_model." + key in expected:
                key = "text_model." + key
        matched[key] = value
    missing = sorted(set(expected) - set(matched))
    unexpected = sorted(set(matched) - set(expected))
    wrong = sorted(k for k in set(expected) & set(matched) if tuple(matched[k].shape) != expected[k])
    if missing or unexpected or wrong:
        details = []
        if missing:
            details.append(f"{len(missing)} missing (e.g. {', '.join(missing[:4])})")
        if unexpected:
            details.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:4])})")
        if wrong:
            details.append(f"{len(wrong)} with other shapes (e.g. {wrong[0]}: {tuple(matched[wrong[0]].shape)} "
                           f"instead of {expected[wrong[0]]})")
        raise ModelError(f"{source}: the {part} weights do not fit the detected architecture: {'; '.join(details)}. "
                         "The file may be damaged or an unusual variant; its diffusers folder may load instead.")
    module.load_state_dict({k: v.to(torch.float32).contiguous() for k, v in matched.items()}, strict=True,
                           assign=True)


def load_single_file(path: Path, tokenizer_dir: str | Path | None, prediction_type: str) -> BaseModel:
    """Every part of an original-layout checkpoint file, in fp32 on the CPU."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
        convert_open_clip_checkpoint,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    source = path.name
    # Everything that can fail cheaply fails before gigabytes are read (a .ckpt has no header:
    # it is memory-mapped once and used for both).
    checkpoint = None if is_safetensors(path) else load_pickle_checkpoint(path)
    shapes = read_safetensors_header(path) if checkpoint is None else {k: v.shape for k, v in checkpoint.items()}
    found = detect_architecture(shapes, source)
    folders = resolve_tokenizer_dirs(found.arch, tokenizer_dir, source=source)
    tokenizers = load_tokenizers(folders)
    check_tokenizers(tokenizers, [(c["vocab_size"], c["max_position_embeddings"]) for c in found.text_encoder_configs],
                      folders, source)
    if checkpoint is None:
        checkpoint = load_state_dict(path)

    def drop(prefix: str) -> None:  # free each part's original tensors once converted
        for key in [k for k in checkpoint if k.startswith(prefix)]:
            del checkpoint[key]

    # Modules are built without allocating weights, then take the checkpoint's tensors.
    with init_empty_weights():
        unet = UNet2DConditionModel(**found.unet_config)
    load_weights(unet, convert_ldm_unet_checkpoint(checkpoint, dict(unet.config)), "UNet", source)
    drop(UNET_PREFIX)

    with init_empty_weights():
        vae = AutoencoderKL(**found.vae_config)
    load_weights(vae, convert_ldm_vae_checkpoint(checkpoint, dict(vae.config)), "VAE", source)
    drop(VAE_PREFIXES[0])

    text_encoders = []
    for i, kwargs in enumerate(found.text_encoder_configs):
        tokenizer = tokenizers[i]
        config = CLIPTextConfig(**kwargs, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                pad_token_id=tokenizer.pad_token_id)
        with init_empty_weights():
            encoder = CLIPTextModel(config) if i == 0 else CLIPTextModelWithProjection(config)
        if i == 0:
            weights = convert_ldm_clip_checkpoint({k: v for k, v in checkpoint.items()
                                                   if k.startswith(CLIP_L_PREFIX[found.arch])})
        else:
            weights = convert_open_clip_checkpoint(encoder, checkpoint, prefix=OPEN_CLIP_G_PREFIX)
        load_weights(encoder, weights, f"text encoder {i + 1}", source)
        text_encoders.append(encoder)
    checkpoint.clear()  # the original tensors are no longer needed

    predicted = resolve_prediction(prediction_type, "v_prediction" if found.v_prediction else "epsilon")
    return BaseModel(info=ModelInfo(found.arch, found.variant, predicted), unet=unet, vae=vae,
                     text_encoders=text_encoders, tokenizers=tokenizers,
                     noise_scheduler=training_noise_scheduler(predicted, zero_terminal_snr=found.zero_terminal_snr),
                     source=path, name=path.stem)

