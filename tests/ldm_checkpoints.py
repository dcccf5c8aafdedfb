"""Original-layout (ldm / sgm) single-file checkpoints made from diffusers models, for the tests.

The diffusers -> original key conversion is ComfyUI's own (`comfy.utils.unet_to_diffusers`,
`comfy.diffusers_convert`), so these files have the layout ComfyUI reads and writes: an
independent check on our loader, which converts the other way with diffusers' code.
Everything here needs ComfyUI's source on sys.path (the `comfyui` fixture).

Also here: the real SD1.5 / SDXL / SSD-1B / ... shapes, built on the meta device so no
weights are allocated, and a writer for header-only safetensors files.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import torch

# ---------------------------------------------------------------------------------------------
# Tiny models in the SD layout
# ---------------------------------------------------------------------------------------------


def build_sd_layout_components(arch: str, seed: int = 0) -> dict:
    """Tiny SD1.x / SDXL parts that the original single-file layout can describe.

    The original layout implies GroupNorm(32) everywhere (it stores no config), so these
    use 32 groups and channel counts that are multiples of 32; tiny.py's models use 8
    groups and an 8-channel VAE level, which no single-file checkpoint can express.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from comfyui_dreambooth_lora.trainer.tiny import build_tiny_components

    parts = build_tiny_components(arch, seed)  # text encoders as they are; UNet layout as tiny.py's
    torch.manual_seed(seed + 1)
    unet_config = {k: v for k, v in parts["unet"].config.items() if not k.startswith("_")}
    parts["unet"] = UNet2DConditionModel(**{**unet_config, "norm_num_groups": 32})
    parts["vae"] = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
                                 block_out_channels=(32, 32, 64, 64), norm_num_groups=32, sample_size=32,
                                 down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                                 scaling_factor=0.18215 if arch == "sd1" else 0.13025)
    for module in parts.values():
        module.eval()
    return parts


# ---------------------------------------------------------------------------------------------
# diffusers -> original layout, with ComfyUI's converters
# ---------------------------------------------------------------------------------------------


def comfy_unet_config(config: dict) -> dict:
    """ComfyUI's description of a diffusers UNet config (what `comfy.utils.unet_to_diffusers` takes)."""
    layers = config["layers_per_block"]
    channels = list(config["block_out_channels"])
    tlpb = config.get("transformer_layers_per_block", 1)
    tlpb = list(tlpb) if isinstance(tlpb, (list, tuple)) else [tlpb] * len(channels)

    def expand(value, n):
        return list(value) if isinstance(value, (list, tuple)) else [value] * n

    down = []
    for i, kind in enumerate(config["down_block_types"]):
        down += expand(tlpb[i], layers) if "CrossAttn" in kind else [0] * layers
    reverse = config.get("reverse_transformer_layers_per_block") or list(reversed(tlpb))
    up = []  # in output-block order: deepest level first
    for i, kind in enumerate(config["up_block_types"]):
        up += expand(reverse[i], layers + 1) if "CrossAttn" in kind else [0] * (layers + 1)
    mid_type = config.get("mid_block_type", "UNetMidBlock2DCrossAttn")
    mid = -2 if mid_type is None else -1 if mid_type == "UNetMidBlock2D" else expand(tlpb[-1], 1)[0]
    return {"num_res_blocks": [layers] * len(channels), "channel_mult": [c // channels[0] for c in channels],
            "transformer_depth": down, "transformer_depth_output": up[::-1], "transformer_depth_middle": mid}


def ldm_unet(unet_state_dict: dict, comfy_config: dict) -> dict:
    """`model.diffusion_model.*` keys for a diffusers UNet state dict."""
    import comfy.utils

    to_ldm = comfy.utils.unet_to_diffusers(comfy_config)  # diffusers key -> ldm key
    unmapped = [k for k in unet_state_dict if k not in to_ldm]
    assert not unmapped, f"ComfyUI's map has no ldm key for {unmapped[:5]}"
    return {"model.diffusion_model." + to_ldm[k]: v for k, v in unet_state_dict.items()}


def ldm_vae(vae_state_dict: dict) -> dict:
    """`first_stage_model.*` keys for a diffusers AutoencoderKL state dict."""
    from comfy.diffusers_convert import convert_vae_state_dict

    return {"first_stage_model." + k: v for k, v in convert_vae_state_dict(dict(vae_state_dict)).items()}


def ldm_clip_l(text_encoder_state_dict: dict, prefix: str) -> dict:
    """A CLIPTextModel in Hugging Face layout under `prefix` (ldm keeps HF names for CLIP-L).

    transformers 5 leaves `text_model.` out of CLIPTextModel's keys; the files have it.
    """
    out = {}
    for key, value in text_encoder_state_dict.items():
        key = key if key.startswith("text_model.") else "text_model." + key
        out[prefix + key] = value
    # Real files carry this buffer (ComfyUI writes it too); loaders must skip it.
    out[prefix + "text_model.embeddings.position_ids"] = torch.arange(77).expand((1, -1))
    return out


def ldm_open_clip(text_encoder_state_dict: dict, prefix: str = "conditioner.embedders.1.model.") -> dict:
    """A CLIPTextModelWithProjection in OpenCLIP layout (fused qkv, `resblocks`, `ln_final`...)."""
    import comfy.utils
    from comfy.diffusers_convert import convert_text_enc_state_dict_v20

    # ComfyUI keeps SDXL's second encoder as "clip_g.transformer.<HF keys>" and saves it like this.
    internal = {"clip_g.transformer." + k: v for k, v in text_encoder_state_dict.items()}
    converted = convert_text_enc_state_dict_v20(internal, "clip_g")
    out = comfy.utils.state_dict_prefix_replace(converted, {"clip_g.": prefix})
    out[prefix + "logit_scale"] = torch.tensor(4.6052)  # in real files, unused by the text model
    return out


def ldm_checkpoint(parts: dict, arch: str) -> dict:
    """A whole original-layout checkpoint (UNet, VAE, text encoders) from diffusers / transformers parts."""
    checkpoint = ldm_unet(parts["unet"].state_dict(), comfy_unet_config(parts["unet"].config))
    checkpoint.update(ldm_vae(parts["vae"].state_dict()))
    if arch == "sd1":
        checkpoint.update(ldm_clip_l(parts["text_encoder"].state_dict(), "cond_stage_model.transformer."))
    else:
        checkpoint.update(ldm_clip_l(parts["text_encoder"].state_dict(), "conditioner.embedders.0.transformer."))
        checkpoint.update(ldm_open_clip(parts["text_encoder_2"].state_dict()))
    return {k: v.detach().clone().contiguous() for k, v in checkpoint.items()}


def write_checkpoint(checkpoint: dict, path: Path) -> Path:
    """Write as .safetensors, or as a .ckpt holding {"state_dict": ...} like the original SD releases."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(checkpoint, str(path))
    else:
        torch.save({"state_dict": checkpoint, "global_step": 1}, path)
    return path


# ---------------------------------------------------------------------------------------------
# Full-size shapes without weights
# ---------------------------------------------------------------------------------------------

CA_DOWN, DOWN, CA_UP, UP = "CrossAttnDownBlock2D", "DownBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"

SD15_UNET = dict(sample_size=64, cross_attention_dim=768, attention_head_dim=8, layers_per_block=2,
                 block_out_channels=(320, 640, 1280, 1280), down_block_types=(CA_DOWN, CA_DOWN, CA_DOWN, DOWN),
                 up_block_types=(UP, CA_UP, CA_UP, CA_UP))
SD21_UNET = dict(SD15_UNET, cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20), use_linear_projection=True)
SDXL_UNET = dict(sample_size=128, cross_attention_dim=2048, attention_head_dim=(5, 10, 20), layers_per_block=2,
                 block_out_channels=(320, 640, 1280), down_block_types=(DOWN, CA_DOWN, CA_DOWN),
                 up_block_types=(CA_UP, CA_UP, UP), transformer_layers_per_block=(1, 2, 10),
                 use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816)
SDXL_REFINER_UNET = dict(SDXL_UNET, cross_attention_dim=1280, attention_head_dim=(6, 12, 24, 24),
                         block_out_channels=(384, 768, 1536, 1536), down_block_types=(DOWN, CA_DOWN, CA_DOWN, DOWN),
                         up_block_types=(UP, CA_UP, CA_UP, UP), transformer_layers_per_block=4,
                         projection_class_embeddings_input_dim=2560)
# Pruned models as their diffusers configs describe them (depths per block; mid block reduced or gone).
UNET_CONFIGS = {
    "SD1.x": SD15_UNET,
    "BK-SDM-Base": dict(SD15_UNET, layers_per_block=1),
    "BK-SDM-Small": dict(SD15_UNET, layers_per_block=1, mid_block_type=None),
    "SDXL": SDXL_UNET,
    "SSD-1B": dict(SDXL_UNET, transformer_layers_per_block=(1, 2, 4), mid_block_type="UNetMidBlock2D",
                   reverse_transformer_layers_per_block=((4, 4, 10), (2, 1, 1), 1)),
    "Segmind Vega": dict(SDXL_UNET, transformer_layers_per_block=(1, 1, 2), mid_block_type="UNetMidBlock2D",
                         reverse_transformer_layers_per_block=((2, 2, 2), (1, 1, 1), 1)),
    "KOALA-700M": dict(SDXL_UNET, layers_per_block=1, transformer_layers_per_block=(1, 2, 5), mid_block_type=None),
    "SD2.1": SD21_UNET,
    "SDXL refiner": SDXL_REFINER_UNET,
}
SD_VAE = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
              down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              vocab_size=49408, max_position_embeddings=77, hidden_act="quick_gelu")
CLIP_BIG_G = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                  vocab_size=49408, max_position_embeddings=77, hidden_act="gelu", projection_dim=1280)


def meta_unet(config: dict):
    """A diffusers UNet with no weights allocated."""
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    with init_empty_weights():
        return UNet2DConditionModel(**config)


def full_size_shapes(name: str) -> dict[str, tuple[int, ...]]:
    """Key -> shape of a whole original-layout checkpoint of a published architecture, built on meta."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = UNET_CONFIGS[name]
    unet = meta_unet(config)
    checkpoint = ldm_unet(unet.state_dict(), comfy_unet_config(dict(unet.config)))
    open_clip_h = dict(CLIP_BIG_G, hidden_size=1024, intermediate_size=4096, num_attention_heads=16,
                       num_hidden_layers=24, projection_dim=1024)
    with init_empty_weights():
        vae = AutoencoderKL(**SD_VAE)
        clip_l = CLIPTextModel(CLIPTextConfig(**CLIP_L))
        big_g = CLIPTextModelWithProjection(CLIPTextConfig(**(open_clip_h if name == "SD2.1" else CLIP_BIG_G)))
    checkpoint.update(ldm_vae(vae.state_dict()))
    if name == "SD2.1":  # OpenCLIP-H, in OpenCLIP layout
        checkpoint.update(ldm_open_clip(big_g.state_dict(), "cond_stage_model.model."))
    elif "projection_class_embeddings_input_dim" in config:
        checkpoint.update(ldm_clip_l(clip_l.state_dict(), "conditioner.embedders.0.transformer."))
        checkpoint.update(ldm_open_clip(big_g.state_dict()))
    else:
        checkpoint.update(ldm_clip_l(clip_l.state_dict(), "cond_stage_model.transformer."))
    return {k: tuple(v.shape) for k, v in checkpoint.items()}


def write_safetensors_header(path: Path, shapes: dict[str, tuple[int, ...]], dtype: str = "F16") -> Path:
    """A safetensors file with a header describing `shapes` and no tensor data (enough for inspection)."""
    header, offset = {}, 0
    for key, shape in shapes.items():
        size = 2 * math.prod(shape)
        header[key] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    data = json.dumps(header).encode()
    Path(path).write_bytes(struct.pack("<Q", len(data)) + data)
    return Path(path)
