"""Architecture detection: what an original-layout (ldm / sgm) checkpoint is, from its tensor names
and shapes alone, and the diffusers configs to build it."""

from __future__ import annotations

import re
from dataclasses import dataclass

from .base import ModelError

VAE_SCALING_FACTOR = {"sd1": 0.18215, "sdxl": 0.13025}

# Key prefixes of the original (ldm / sgm) single-file layout.
UNET_PREFIX = "model.diffusion_model."
VAE_PREFIXES = ("first_stage_model.", "vae.")
CLIP_L_PREFIX = {"sd1": "cond_stage_model.transformer.", "sdxl": "conditioner.embedders.0.transformer."}
OPEN_CLIP_G_PREFIX = "conditioner.embedders.1.model."
SD2_TEXT_PREFIXES = ("cond_stage_model.model.", "conditioner.embedders.0.model.")

# ldm's normalisation layers are GroupNorm(32, channels); the format cannot say otherwise.
NORM_GROUPS = 32


@dataclass(frozen=True)
class UNetLayout:
    """The shape of an SD-style UNet, independent of the file format.

    Depths count transformer blocks per res block (0: that res block has no attention).
    `up_depths` runs like diffusers' `up_blocks`: deepest level first.
    """

    in_channels: int
    out_channels: int
    block_out_channels: tuple[int, ...]
    layers_per_block: int
    down_depths: tuple[tuple[int, ...], ...]
    up_depths: tuple[tuple[int, ...], ...]
    mid_depth: int | None          # None: no middle block; 0: a single res block; n: res-attention(n)-res
    context_dim: int
    use_linear_projection: bool
    adm_in_channels: int | None    # SDXL's extra conditioning (pooled text + size embeddings)


@dataclass
class Architecture:
    """What `detect_architecture` found in a single-file checkpoint, and the configs to build it."""

    arch: str
    variant: str
    layout: UNetLayout
    unet_config: dict
    vae_config: dict
    text_encoder_configs: list[dict]   # CLIPTextConfig keyword arguments, in text_encoders order
    v_prediction: bool                 # the file carries a `v_pred` marker key
    zero_terminal_snr: bool            # the file carries a `ztsnr` marker key


# Known UNet shapes (facts about published models), used to name what we found.
_SD15 = dict(block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
             down_depths=((1, 1), (1, 1), (1, 1), (0, 0)), up_depths=((0, 0, 0), (1, 1, 1), (1, 1, 1), (1, 1, 1)),
             mid_depth=1)
_SDXL_FAMILY = {
    "SDXL": dict(layers_per_block=2, down_depths=((0, 0), (2, 2), (10, 10)),
                 up_depths=((10, 10, 10), (2, 2, 2), (0, 0, 0)), mid_depth=10),
    "SSD-1B": dict(layers_per_block=2, down_depths=((0, 0), (2, 2), (4, 4)),
                   up_depths=((4, 4, 10), (2, 1, 1), (0, 0, 0)), mid_depth=0),
    "Segmind Vega": dict(layers_per_block=2, down_depths=((0, 0), (1, 1), (2, 2)),
                         up_depths=((2, 2, 2), (1, 1, 1), (0, 0, 0)), mid_depth=0),
    "KOALA-700M": dict(layers_per_block=1, down_depths=((0,), (2,), (5,)), up_depths=((5, 5), (2, 2), (0, 0)),
                       mid_depth=None),
    "KOALA-1B": dict(layers_per_block=1, down_depths=((0,), (2,), (6,)), up_depths=((6, 6), (2, 2), (0, 0)),
                     mid_depth=6),
}


def detect_architecture(shapes: dict[str, tuple[int, ...]], source: str = "this checkpoint") -> Architecture:
    """Work out the architecture of an original-layout checkpoint from its tensor names and shapes.

    `shapes` maps every key to its shape (a safetensors header gives this without reading
    the weights). Raises `ModelError` naming `source` for anything that is not an SD1.x /
    SDXL-family checkpoint we can train.
    """
    shapes = {k: tuple(v) for k, v in shapes.items()}
    keys = list(shapes)
    _reject_non_sd_models(keys, source)

    try:
        layout = _unet_layout(shapes, source)
    except KeyError as e:
        raise ModelError(f"{source}: the UNet weights are incomplete (no {e.args[0]}); the file is damaged.") from e
    if layout.adm_in_channels == 2560 or layout.context_dim == 1280:
        raise ModelError(f"{source}: this is the SDXL refiner, which only refines finished images. Train on the "
                         "SDXL base checkpoint instead.")
    if layout.context_dim == 1024 or any(k.startswith(SD2_TEXT_PREFIXES) for k in keys):
        raise ModelError(f"{source}: this is a Stable Diffusion 2.x model (OpenCLIP-H text encoder, 1024-wide "
                         "cross-attention). SD2 is not supported yet; pick an SD1.x or SDXL checkpoint.")
    if layout.in_channels != 4 or layout.out_channels != 4:
        kind = {9: "an inpainting model", 8: "an instruct-pix2pix model"}.get(layout.in_channels, "an unusual model")
        raise ModelError(f"{source}: the UNet takes {layout.in_channels} input channels: {kind}. Only plain "
                         "text-to-image SD1.x / SDXL checkpoints (4 latent channels) can be trained; pick the "
                         "plain version of the model.")
    arch = "sdxl" if layout.adm_in_channels is not None else "sd1"

    vae_prefix = next((p for p in VAE_PREFIXES if p + "encoder.conv_in.weight" in shapes), None)
    if vae_prefix is None:
        raise ModelError(f"{source}: the checkpoint has a UNet but no VAE (no first_stage_model.* weights). "
                         "Use a full checkpoint that includes the VAE, or the model's diffusers folder.")
    vae_config = _vae_config(shapes, vae_prefix, arch, source)

    try:
        clip_l = _clip_l_config(shapes, CLIP_L_PREFIX[arch])
        open_clip = _open_clip_config(shapes, OPEN_CLIP_G_PREFIX) if arch == "sdxl" else None
    except KeyError as e:
        raise ModelError(f"{source}: the text encoder weights are incomplete (no {e.args[0]}); the file is "
                         "damaged.") from e
    if clip_l is None:
        raise ModelError(f"{source}: the checkpoint has a UNet but no text encoder ({CLIP_L_PREFIX[arch]}* weights). "
                         "Use a full checkpoint that includes the text encoder(s), or the model's diffusers folder.")
    text_configs = [clip_l]
    addition_time_embed_dim = None
    if arch == "sdxl":
        if open_clip is None:
            raise ModelError(f"{source}: an SDXL-style UNet but no second text encoder ({OPEN_CLIP_G_PREFIX}* "
                             "weights). Use a full SDXL checkpoint or the model's diffusers folder.")
        text_configs.append(open_clip)
        context = clip_l["hidden_size"] + open_clip["hidden_size"]
        # SDXL's extra conditioning is the pooled text embedding plus six size/crop numbers,
        # each embedded with `addition_time_embed_dim` sinusoids (256 for SDXL).
        time_dims, remainder = divmod(layout.adm_in_channels - open_clip["projection_dim"], 6)
        if remainder or time_dims <= 0:
            raise ModelError(f"{source}: the UNet's extra conditioning ({layout.adm_in_channels} wide) does not fit "
                             f"the second text encoder's {open_clip['projection_dim']}-wide projection; the file "
                             "mixes parts of different models.")
        addition_time_embed_dim = time_dims
    else:
        context = clip_l["hidden_size"]
    if context != layout.context_dim:
        raise ModelError(f"{source}: the text encoder output ({context} wide) does not match the UNet's "
                         f"cross-attention ({layout.context_dim} wide); the file mixes parts of different models.")

    variant = variant_name(arch, layout)
    if "ztsnr" in shapes:
        variant += " (zero terminal SNR)"
    return Architecture(arch=arch, variant=variant, layout=layout,
                        unet_config=_unet_config(layout, arch, addition_time_embed_dim, source),
                        vae_config=vae_config, text_encoder_configs=text_configs,
                        v_prediction="v_pred" in shapes, zero_terminal_snr="ztsnr" in shapes)

def _reject_non_sd_models(keys: list[str], source: str) -> None:
    """ModelError for everything that is not a full SD-style checkpoint, saying what it is."""
    if not keys:
        raise ModelError(f"{source}: contains no tensors, so it is not a model. Pick a Stable Diffusion 1.x or "
                         "SDXL checkpoint.")
    if any("joint_blocks." in k for k in keys):
        raise ModelError(f"{source}: this is a Stable Diffusion 3 / 3.5 model (MMDiT). Only SD1.x and SDXL "
                         "models can be trained here; pick one of those.")
    if any("double_blocks." in k for k in keys):
        raise ModelError(f"{source}: this is a Flux model. Only SD1.x and SDXL models can be trained here; pick "
                         "one of those.")
    if UNET_PREFIX + "input_blocks.0.0.weight" in keys:
        if any("time_stack." in k or "time_mixer." in k for k in keys):
            raise ModelError(f"{source}: this is a video model (Stable Video Diffusion). Only SD1.x and SDXL "
                             "image models can be trained here.")
        return

    lora_markers = ("lora_unet_", "lora_te", "lora_down", "lora_up", "lora_A.", "lora_B.", ".lora.", "lora.down",
                    "lora.up", "hada_w1", "lokr_w1")
    if any(marker in k for k in keys for marker in lora_markers):
        raise ModelError(f"{source}: this is a LoRA (or LyCORIS) file, not a base model. Pick the Stable Diffusion "
                         "checkpoint to train on as the base model; a LoRA is applied with the Load LoRA node.")
    if "input_blocks.0.0.weight" in keys or ("conv_in.weight" in keys and any(k.startswith("down_blocks.")
                                                                             for k in keys)):
        raise ModelError(f"{source}: this is a UNet on its own (a diffusion_models / unet file), without the VAE "
                         "and text encoders. Use a full checkpoint (models/checkpoints) or a diffusers folder.")
    if any(k.startswith(("encoder.down.", "first_stage_model.", "encoder.down_blocks.", "vae.")) for k in keys):
        raise ModelError(f"{source}: this is a VAE on its own, not a full model. Pick a Stable Diffusion 1.x or "
                         "SDXL checkpoint as the base model.")
    text_markers = ("text_model.", "transformer.resblocks.", "encoder.block.", "cond_stage_model.",
                    "conditioner.embedders.", "encoder.layers.")
    if any(marker in k for k in keys for marker in text_markers):
        raise ModelError(f"{source}: this is a text encoder on its own (CLIP / T5 weights), not a full model. Pick a "
                         "Stable Diffusion 1.x or SDXL checkpoint as the base model.")
    raise ModelError(f"{source}: does not look like a Stable Diffusion model: none of its {len(keys)} tensors are "
                     f"UNet weights ({UNET_PREFIX}*; first keys: {', '.join(sorted(keys)[:3])}). Pick an SD1.x or "
                     "SDXL checkpoint.")


def _block_indices(keys, prefix: str) -> list[int]:
    """Sorted block numbers n of keys `prefix + "n." + ...`."""
    found = set()
    for key in keys:
        if key.startswith(prefix):
            head = key[len(prefix):].split(".", 1)[0]
            if head.isdigit():
                found.add(int(head))
    return sorted(found)


def _unet_layout(shapes: dict[str, tuple[int, ...]], source: str) -> UNetLayout:
    """Read the UNet's structure from ldm key names: levels, res blocks, transformer depths."""
    p = UNET_PREFIX
    keys = [k[len(p):] for k in shapes if k.startswith(p)]
    model_channels, in_channels = shapes[p + "input_blocks.0.0.weight"][:2]
    out_channels = shapes.get(p + "out.2.weight", (4,))[0]

    # Transformer depth of every attention block, keyed by its block prefix ("input_blocks.4.1").
    depths: dict[str, int] = {}
    pattern = re.compile(r"^((?:input_blocks|output_blocks)\.\d+\.1|middle_block\.1)\.transformer_blocks\.(\d+)\.")
    context_dim, linear = None, False
    for key in keys:
        m = pattern.match(key)
        if m:
            depths[m.group(1)] = max(depths.get(m.group(1), 0), int(m.group(2)) + 1)
            if context_dim is None and key.endswith("attn2.to_k.weight"):
                context_dim = shapes[p + key][1]
                linear = len(shapes[p + m.group(1) + ".proj_in.weight"]) == 2
    if context_dim is None:
        raise ModelError(f"{source}: the UNet has no cross-attention, so it cannot be prompted with text: not an "
                         "SD1.x / SDXL model.")

    # Down path: resnets grouped into levels; a downsampler ("N.0.op") closes a level.
    levels: list[list[tuple[int, int]]] = [[]]  # per level: (channels, depth) of each res block
    for n in _block_indices(keys, "input_blocks.")[1:]:
        if f"input_blocks.{n}.0.op.weight" in keys:
            levels.append([])
        elif f"input_blocks.{n}.0.in_layers.0.weight" in keys:
            channels = shapes[p + f"input_blocks.{n}.0.out_layers.3.weight"][0]
            levels[-1].append((channels, depths.get(f"input_blocks.{n}.1", 0)))
    res_counts = {len(level) for level in levels}
    if len(res_counts) != 1 or 0 in res_counts:
        raise ModelError(f"{source}: the UNet has a different number of res blocks per level "
                         f"({[len(level) for level in levels]}), which the diffusers UNet cannot represent.")
    layers = res_counts.pop()
    block_out = []
    for level in levels:
        if len({c for c, _ in level}) != 1:
            raise ModelError(f"{source}: the UNet's channel counts change inside a level; not an SD-style UNet.")
        block_out.append(level[0][0])

    # Up path: output blocks come deepest level first, one more res block per level than down.
    outputs = _block_indices(keys, "output_blocks.")
    if len(outputs) != len(levels) * (layers + 1):
        raise ModelError(f"{source}: the UNet has {len(outputs)} output blocks where {len(levels)} levels of "
                         f"{layers} res blocks need {len(levels) * (layers + 1)}; not an SD-style UNet.")
    up = [tuple(depths.get(f"output_blocks.{n}.1", 0) for n in outputs[i:i + layers + 1])
          for i in range(0, len(outputs), layers + 1)]

    if "middle_block.1" in depths:
        mid = depths["middle_block.1"]
    elif "middle_block.0.in_layers.0.weight" in keys:
        mid = 0
    else:
        mid = None
    adm = shapes.get(p + "label_emb.0.0.weight")
    for channels in block_out:
        if channels % NORM_GROUPS:
            raise ModelError(f"{source}: UNet channel count {channels} is not a multiple of {NORM_GROUPS}, which the "
                             "original SD layout requires; not an SD1.x / SDXL checkpoint.")
    if block_out[0] != model_channels:
        raise ModelError(f"{source}: the UNet's first level ({block_out[0]} channels) does not match its input "
                         f"convolution ({model_channels}); the file is damaged.")
    return UNetLayout(in_channels=in_channels, out_channels=out_channels, block_out_channels=tuple(block_out),
                      layers_per_block=layers, down_depths=tuple(tuple(d for _, d in level) for level in levels),
                      up_depths=tuple(up), mid_depth=mid, context_dim=context_dim, use_linear_projection=linear,
                      adm_in_channels=adm[1] if adm else None)


def layout_from_diffusers_config(config: dict) -> UNetLayout:
    """The same description for a diffusers UNet config (to name the variant of a folder)."""
    def per_layer(value, n: int) -> tuple[int, ...]:
        return tuple(value) if isinstance(value, (list, tuple)) else (int(value),) * n

    layers = config.get("layers_per_block", 2)
    if isinstance(layers, (list, tuple)):
        layers = layers[0] if len(set(layers)) == 1 else -1  # varying: never matches a known model
    n = len(config["down_block_types"])
    tlpb = config.get("transformer_layers_per_block", 1)
    tlpb = list(tlpb) if isinstance(tlpb, (list, tuple)) else [tlpb] * n
    down = tuple(per_layer(tlpb[i], layers) if "CrossAttn" in t else (0,) * layers
                 for i, t in enumerate(config["down_block_types"]))
    reverse = config.get("reverse_transformer_layers_per_block") or list(reversed(tlpb))
    up = tuple(per_layer(reverse[i], layers + 1) if "CrossAttn" in t else (0,) * (layers + 1)
               for i, t in enumerate(config["up_block_types"]))
    mid_type = config.get("mid_block_type", "UNetMidBlock2DCrossAttn")
    mid = None if mid_type is None else 0 if mid_type == "UNetMidBlock2D" else per_layer(tlpb[-1], 1)[0]
    cross = config.get("cross_attention_dim", 1280)
    sdxl_style = config.get("addition_embed_type") == "text_time"
    adm = config.get("projection_class_embeddings_input_dim") if sdxl_style else None
    return UNetLayout(in_channels=config.get("in_channels", 4), out_channels=config.get("out_channels", 4),
                      block_out_channels=tuple(config["block_out_channels"]), layers_per_block=layers,
                      down_depths=down, up_depths=up, mid_depth=mid,
                      context_dim=cross if isinstance(cross, int) else cross[0],
                      use_linear_projection=bool(config.get("use_linear_projection", False)), adm_in_channels=adm)


def variant_name(arch: str, layout: UNetLayout) -> str:
    """Human name of a layout: the published model it matches, else a description."""
    shape = dict(layers_per_block=layout.layers_per_block, down_depths=layout.down_depths,
                 up_depths=layout.up_depths, mid_depth=layout.mid_depth)
    if arch == "sd1":
        if layout.context_dim == 768 and layout.block_out_channels[0] == 320:
            if dict(shape, block_out_channels=layout.block_out_channels) == _SD15:
                return "SD1.x"
            return "BK-SDM (pruned SD1.x)"
        return "SD1.x-like (custom size)"
    if layout.context_dim == 2048 and layout.adm_in_channels == 2816 and layout.block_out_channels == (320, 640, 1280):
        for name, known in _SDXL_FAMILY.items():
            if shape == known:
                return name
        return "SDXL-family (pruned)"
    return "SDXL-like (custom size)"


def _unet_config(layout: UNetLayout, arch: str, addition_time_embed_dim: int | None, source: str) -> dict:
    """A diffusers UNet2DConditionModel config for a layout."""
    def has_attention(depths: tuple[int, ...], where: str) -> bool:
        if any(depths) and not all(depths):
            raise ModelError(f"{source}: a UNet level ({where}) has attention on some res blocks only, which the "
                             "diffusers UNet cannot represent.")
        return bool(any(depths))

    down_attention = [has_attention(d, f"down {i}") for i, d in enumerate(layout.down_depths)]
    up_attention = [has_attention(d, f"up {i}") for i, d in enumerate(layout.up_depths)]

    # transformer_layers_per_block: one int per level, or a list per res block when they differ.
    # Levels without attention ignore it; diffusers gives the last entry to the middle block too.
    per_level: list = [(d[0] if len(set(d)) == 1 else list(d)) if attn else 1
                       for d, attn in zip(layout.down_depths, down_attention, strict=True)]
    if layout.mid_depth:
        last = per_level[-1] if isinstance(per_level[-1], int) else per_level[-1][0]
        if not down_attention[-1]:
            per_level[-1] = layout.mid_depth
        elif last != layout.mid_depth:
            raise ModelError(f"{source}: the middle block's transformer depth ({layout.mid_depth}) differs from the "
                             f"deepest level's ({last}), which the diffusers UNet cannot represent.")
    # Up blocks default to the down values mirrored; spell them out when that is not what the file has.
    up_layers = layout.layers_per_block + 1
    mirrored = [(v,) * up_layers if isinstance(v, int) else None for v in reversed(per_level)]
    reverse = None
    differs = [attn and mirrored[i] != depths
               for i, (depths, attn) in enumerate(zip(layout.up_depths, up_attention, strict=True))]
    if any(isinstance(v, list) for v in per_level) or any(differs):
        reverse = [(d[0] if len(set(d)) == 1 else list(d)) if attn else 1
                   for d, attn in zip(layout.up_depths, up_attention, strict=True)]

    channels = layout.block_out_channels
    if layout.context_dim == 768:
        heads: int | tuple[int, ...] = 8  # SD1.x: 8 heads everywhere
    else:
        heads = tuple(max(1, c // 64) for c in channels)  # SD2 / SDXL style: 64-wide heads
    config = {
        "sample_size": 64 if arch == "sd1" else 128,
        "in_channels": layout.in_channels,
        "out_channels": layout.out_channels,
        "down_block_types": tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in down_attention),
        "up_block_types": tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in up_attention),
        "mid_block_type": (None if layout.mid_depth is None else
                           "UNetMidBlock2D" if layout.mid_depth == 0 else "UNetMidBlock2DCrossAttn"),
        "block_out_channels": tuple(channels),
        "layers_per_block": layout.layers_per_block,
        "norm_num_groups": NORM_GROUPS,
        "cross_attention_dim": layout.context_dim,
        "attention_head_dim": heads,  # diffusers' historical name for the number of heads
        "use_linear_projection": layout.use_linear_projection,
        "transformer_layers_per_block": tuple(per_level),
        "reverse_transformer_layers_per_block": reverse,
    }
    if arch == "sdxl":
        config.update(addition_embed_type="text_time", addition_time_embed_dim=addition_time_embed_dim,
                      projection_class_embeddings_input_dim=layout.adm_in_channels)
    return config


def _vae_config(shapes: dict[str, tuple[int, ...]], p: str, arch: str, source: str) -> dict:
    """A diffusers AutoencoderKL config read off ldm VAE keys."""
    levels = _block_indices(shapes, p + "encoder.down.")
    layers = _block_indices(shapes, p + "encoder.down.0.block.")
    try:
        channels = tuple(shapes[p + f"encoder.down.{i}.block.0.conv2.weight"][0] for i in levels)
        latent = shapes[p + "decoder.conv_in.weight"][1]
        in_channels = shapes[p + "encoder.conv_in.weight"][1]
        out_channels = shapes[p + "decoder.conv_out.weight"][0]
    except KeyError as e:
        raise ModelError(f"{source}: the VAE weights are incomplete (no {e.args[0]}); the file is damaged.") from e
    if not levels or any(c % NORM_GROUPS for c in channels):
        raise ModelError(f"{source}: the VAE (channels {channels}) is not in the SD layout; the file is damaged or "
                         "not an SD1.x / SDXL checkpoint.")
    return {
        "in_channels": in_channels, "out_channels": out_channels, "latent_channels": latent,
        "down_block_types": ("DownEncoderBlock2D",) * len(levels),
        "up_block_types": ("UpDecoderBlock2D",) * len(levels),
        "block_out_channels": channels, "layers_per_block": len(layers), "norm_num_groups": NORM_GROUPS,
        "sample_size": 512 if arch == "sd1" else 1024, "scaling_factor": VAE_SCALING_FACTOR[arch],
        "use_quant_conv": p + "quant_conv.weight" in shapes,
        "use_post_quant_conv": p + "post_quant_conv.weight" in shapes,
        "mid_block_add_attention": p + "encoder.mid.attn_1.q.weight" in shapes,
    }


def _clip_l_config(shapes: dict[str, tuple[int, ...]], prefix: str) -> dict | None:
    """CLIPTextConfig arguments for a CLIP-L-style encoder stored in Hugging Face layout under `prefix`."""
    p = prefix + "text_model." if prefix + "text_model.embeddings.token_embedding.weight" in shapes else prefix
    if p + "embeddings.token_embedding.weight" not in shapes:
        return None
    vocab, width = shapes[p + "embeddings.token_embedding.weight"]
    return {"hidden_size": width, "intermediate_size": shapes[p + "encoder.layers.0.mlp.fc1.weight"][0],
            "num_hidden_layers": len(_block_indices(shapes, p + "encoder.layers.")),
            "num_attention_heads": max(1, width // 64), "vocab_size": vocab,
            "max_position_embeddings": shapes[p + "embeddings.position_embedding.weight"][0],
            "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5, "projection_dim": width}


def _open_clip_config(shapes: dict[str, tuple[int, ...]], p: str) -> dict | None:
    """CLIPTextConfig arguments for an OpenCLIP (bigG-style) encoder stored in OpenCLIP layout under `p`."""
    if p + "token_embedding.weight" not in shapes or p + "text_projection" not in shapes:
        return None
    vocab, width = shapes[p + "token_embedding.weight"]
    return {"hidden_size": width, "intermediate_size": shapes[p + "transformer.resblocks.0.mlp.c_fc.weight"][0],
            "num_hidden_layers": len(_block_indices(shapes, p + "transformer.resblocks.")),
            "num_attention_heads": max(1, width // 64), "vocab_size": vocab,
            "max_position_embeddings": shapes[p + "positional_embedding"][0],
            "hidden_act": "gelu", "layer_norm_eps": 1e-5,
            "projection_dim": shapes[p + "text_projection"][1]}  # stored (width, projection)

