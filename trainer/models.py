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
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import pickle
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

SINGLE_FILE_SUFFIXES = (".safetensors", ".sft")
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
PREDICTION_TYPES = ("auto", "epsilon", "v_prediction")

# The DDPM schedule SD1.x and SDXL were trained with.
TRAINING_SCHEDULE = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
                     "beta_schedule": "scaled_linear", "clip_sample": False, "steps_offset": 1,
                     "timestep_spacing": "leading"}
VAE_SCALING_FACTOR = {"sd1": 0.18215, "sdxl": 0.13025}

# Key prefixes of the original (ldm / sgm) single-file layout.
UNET_PREFIX = "model.diffusion_model."
VAE_PREFIXES = ("first_stage_model.", "vae.")
CLIP_L_PREFIX = {"sd1": "cond_stage_model.transformer.", "sdxl": "conditioner.embedders.0.transformer."}
OPEN_CLIP_G_PREFIX = "conditioner.embedders.1.model."
SD2_TEXT_PREFIXES = ("cond_stage_model.model.", "conditioner.embedders.0.model.")

# ldm's normalisation layers are GroupNorm(32, channels); the format cannot say otherwise.
NORM_GROUPS = 32


class ModelError(ValueError):
    """A base model that cannot be loaded or trained. The message names the file, says what it is and what to do."""


@dataclass
class ModelInfo:
    """What a base model is, as far as training cares."""

    arch: str             # "sd1" | "sdxl"
    variant: str          # human text: "SD1.x", "SDXL", "SSD-1B", ...
    prediction_type: str  # "epsilon" | "v_prediction"


@dataclass
class BaseModel:
    """A loaded base model: every part fp32, on the CPU, in eval mode, frozen."""

    info: ModelInfo
    unet: Any                 # diffusers UNet2DConditionModel
    vae: Any                  # diffusers AutoencoderKL
    text_encoders: list       # [CLIPTextModel] (sd1) or [CLIPTextModel, CLIPTextModelWithProjection] (sdxl)
    tokenizers: list          # matching CLIPTokenizer(s); SDXL's second pads with "!"
    noise_scheduler: Any      # diffusers DDPMScheduler: the training schedule, prediction_type set
    source: Path
    name: str                 # file or folder name without extension
    _sha256: str | None = field(default=None, init=False, repr=False)

    def sha256(self) -> str:
        """SHA-256 of the checkpoint file (for a diffusers folder: of its UNet weights). Computed once."""
        if self._sha256 is None:
            files = [self.source] if self.source.is_file() else _unet_weight_files(self.source)
            digest = hashlib.sha256()
            for file in files:
                with open(file, "rb") as f:
                    for chunk in iter(lambda: f.read(1 << 24), b""):
                        digest.update(chunk)
            self._sha256 = digest.hexdigest()
        return self._sha256


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


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------

def inspect_model(path: str | Path, prediction_type: str = "auto") -> ModelInfo:
    """Say what a base model is without loading its weights.

    Reads only the safetensors header or the diffusers config files (a `.ckpt` has no
    header, so it is memory-mapped). Raises `ModelError` for anything we cannot train.
    """
    path = _check_path(path)
    _check_prediction_type(prediction_type)
    if path.is_dir():
        arch, variant, scheduler_prediction = _inspect_diffusers_folder(path)
        return ModelInfo(arch, variant, _resolve_prediction(prediction_type, scheduler_prediction))
    found = detect_architecture(_read_shapes(path), source=path.name)
    return ModelInfo(found.arch, found.variant,
                     _resolve_prediction(prediction_type, "v_prediction" if found.v_prediction else "epsilon"))


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
    path = _check_path(path)
    _check_prediction_type(prediction_type)
    if path.is_dir():
        base = _load_diffusers_folder(path, tokenizer_dir, prediction_type)
    else:
        base = _load_single_file(path, tokenizer_dir, prediction_type)
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

    variant = _variant_name(arch, layout)
    if "ztsnr" in shapes:
        variant += " (zero terminal SNR)"
    return Architecture(arch=arch, variant=variant, layout=layout,
                        unet_config=_unet_config(layout, arch, addition_time_embed_dim, source),
                        vae_config=vae_config, text_encoder_configs=text_configs,
                        v_prediction="v_pred" in shapes, zero_terminal_snr="ztsnr" in shapes)


# --------------------------------------------------------------------------------------------
# Reading files
# --------------------------------------------------------------------------------------------

def _check_path(path: str | Path) -> Path:
    path = Path(path).expanduser()
    if not path.exists():
        raise ModelError(f"{path}: no such file or folder. Check the model path (a .safetensors / .ckpt "
                         "checkpoint, or a diffusers folder with model_index.json).")
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise ModelError(f"{path}: a folder without model_index.json, so not a diffusers model. Point to a "
                             "single .safetensors / .ckpt file, or to a diffusers model folder.")
    elif not path.name.lower().endswith(SINGLE_FILE_SUFFIXES + PICKLE_SUFFIXES):
        raise ModelError(f"{path.name}: unknown model file type {path.suffix!r}. Use a .safetensors (or .ckpt) "
                         "checkpoint or a diffusers folder.")
    return path


def _check_prediction_type(prediction_type: str) -> None:
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")


def _resolve_prediction(requested: str, detected: str) -> str:
    # An explicit choice wins: merges sometimes lose their marker key, and the user knows the model.
    return detected if requested == "auto" else requested


def _is_safetensors(path: Path) -> bool:
    return path.name.lower().endswith(SINGLE_FILE_SUFFIXES)


def _read_safetensors_header(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor shapes from a safetensors header, reading nothing else."""
    try:
        with open(path, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            if size > 200 * 1024 * 1024:  # no real header is this large: not a safetensors file
                raise ValueError("header too large")
            header = json.loads(f.read(size))
        return {k: tuple(v["shape"]) for k, v in header.items() if k != "__metadata__"}
    except (OSError, ValueError, struct.error, KeyError, TypeError, AttributeError) as e:
        raise ModelError(f"{path.name}: not a readable safetensors file ({e}). The download may be incomplete or "
                         "the file is something else renamed; download it again.") from e


def _load_pickle_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a `.ckpt` / `.pt`, loaded with `weights_only=True` so no code in the file can run."""
    try:
        try:
            # Memory-mapping keeps a multi-GB checkpoint out of RAM until its tensors are used.
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            obj = torch.load(path, map_location="cpu", weights_only=True)  # the legacy (non-zip) format
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        if found is None:  # the pickle stream itself is broken, not a refused object
            raise ModelError(f"{path.name}: cannot be read as a PyTorch checkpoint (the pickle data is invalid). "
                             "The file may be damaged or not a model; use a .safetensors checkpoint.") from e
        raise ModelError(f"{path.name}: this .ckpt contains pickled Python objects besides weights (such as "
                         f"{found.group(1)}), which are refused for safety: unpickling them could run code. Convert "
                         "it to .safetensors with a tool you trust, or download the .safetensors version of the "
                         "model.") from e
    except Exception as e:  # torch raises many kinds for truncated or foreign files
        raise ModelError(f"{path.name}: cannot be read as a PyTorch checkpoint ({type(e).__name__}: {e}). The file "
                         "may be damaged or not a model; use a .safetensors checkpoint.") from e
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise ModelError(f"{path.name}: holds a {type(obj).__name__}, not a dictionary of weights, so it is not a "
                         "model checkpoint.")
    return {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}


def _read_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    if _is_safetensors(path):
        return _read_safetensors_header(path)
    return {k: tuple(v.shape) for k, v in _load_pickle_checkpoint(path).items()}


def _load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not _is_safetensors(path):
        return _load_pickle_checkpoint(path)
    from safetensors.torch import load_file

    try:
        return load_file(path, device="cpu")
    except Exception as e:  # the header was fine but the data is not (truncated download)
        raise ModelError(f"{path.name}: the safetensors data cannot be read ({e}). The download may be "
                         "incomplete; download it again.") from e


# --------------------------------------------------------------------------------------------
# Architecture detection (shapes only)
# --------------------------------------------------------------------------------------------

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


def _layout_from_diffusers_config(config: dict) -> UNetLayout:
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


def _variant_name(arch: str, layout: UNetLayout) -> str:
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


# --------------------------------------------------------------------------------------------
# Tokenizers
# --------------------------------------------------------------------------------------------

TOKENIZER_FILES = "tokenizer.json, or vocab.json and merges.txt"


def holds_tokenizer(folder: Path) -> bool:
    """Whether a folder holds a CLIP tokenizer: `tokenizer.json` (as transformers 5 saves one) or the
    older `vocab.json` + `merges.txt`."""
    return (folder / "tokenizer.json").is_file() or ((folder / "vocab.json").is_file()
                                                     and (folder / "merges.txt").is_file())


def comfyui_tokenizer_dir() -> Path | None:
    """ComfyUI's bundled CLIP tokenizer (comfy/sd1_tokenizer), when ComfyUI is importable."""
    try:
        spec = importlib.util.find_spec("comfy")
    except (ImportError, ValueError):
        return None
    for location in (spec.submodule_search_locations or []) if spec else []:
        folder = Path(location) / "sd1_tokenizer"
        if holds_tokenizer(folder):
            return folder
    return None


def resolve_tokenizer_dirs(arch: str, tokenizer_dir: str | Path | None = None,
                           model_folder: Path | None = None, source: str = "this checkpoint") -> list[Path]:
    """The tokenizer folder(s) to use, one per text encoder, in this order of preference:

    1. `tokenizer_dir`, when given: a tokenizer folder (used for both of SDXL's encoders), or a
       diffusers model folder (its `tokenizer/` and `tokenizer_2/`);
    2. the diffusers folder's `tokenizer/` (and `tokenizer_2/`);
    3. ComfyUI's bundled `comfy/sd1_tokenizer/`, when ComfyUI is importable.

    A tokenizer folder holds `tokenizer.json` or `vocab.json` + `merges.txt`. `source` names the
    single-file checkpoint in the error when no tokenizer is found.
    """
    count = 2 if arch == "sdxl" else 1
    if tokenizer_dir:
        folder = Path(tokenizer_dir).expanduser()
        if not folder.is_dir():
            raise ModelError(f"tokenizer option: {folder} is not a folder. Set it to a folder with a CLIP tokenizer "
                             f"({TOKENIZER_FILES}), such as the tokenizer/ folder of an SD1.x / SDXL diffusers "
                             "model, or leave it empty.")
        if holds_tokenizer(folder):
            return [folder] * count
        if holds_tokenizer(folder / "tokenizer"):
            return _model_tokenizer_dirs(folder, count)
        raise ModelError(f"tokenizer option: {folder} holds no CLIP tokenizer (neither {TOKENIZER_FILES}, nor a "
                         "tokenizer/ folder with them). Set it to a folder that does, such as the tokenizer/ folder "
                         "of an SD1.x / SDXL diffusers model, or leave it empty.")
    if model_folder is not None and holds_tokenizer(model_folder / "tokenizer"):
        return _model_tokenizer_dirs(model_folder, count)
    comfy = comfyui_tokenizer_dir()
    if comfy is not None:
        return [comfy] * count
    if model_folder is not None:
        raise ModelError(f"{model_folder.name}: this diffusers folder has no usable CLIP tokenizer (tokenizer/ holds "
                         f"neither {TOKENIZER_FILES}), and ComfyUI (which ships one) is not importable here. Copy the "
                         "model's tokenizer/ folder back, or set the `tokenizer` option to a folder with "
                         f"{TOKENIZER_FILES}, such as the tokenizer/ folder of any SD1.x / SDXL diffusers model.")
    raise ModelError(f"{source}: a single-file checkpoint does not include a CLIP tokenizer, and ComfyUI (which "
                     "ships one) is not importable here. Set the `tokenizer` option to a folder with "
                     f"{TOKENIZER_FILES}, such as the tokenizer/ folder of any SD1.x / SDXL diffusers model.")


def _model_tokenizer_dirs(model_folder: Path, count: int) -> list[Path]:
    """A diffusers folder's `tokenizer/` and `tokenizer_2/` (the first again where the second is missing)."""
    first, second = model_folder / "tokenizer", model_folder / "tokenizer_2"
    return [first, second if holds_tokenizer(second) else first][:count]


def _load_tokenizers(folders: list[Path]) -> list:
    from transformers import CLIPTokenizer, CLIPTokenizerFast

    tokenizers = []
    for i, folder in enumerate(folders):
        # vocab.json + merges.txt: the tokenizer as before; tokenizer.json alone (transformers 5's
        # way of saving it) needs the fast tokenizer before transformers 5 (from 5 on, the same class).
        has_vocab = (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()
        tokenizer_class = CLIPTokenizer if has_vocab else CLIPTokenizerFast
        try:
            # SDXL's second encoder was trained with "!" as padding (OpenCLIP's convention).
            extra = {"pad_token": "!"} if i == 1 else {}
            tokenizers.append(tokenizer_class.from_pretrained(str(folder), local_files_only=True, **extra))
        except Exception as e:
            raise ModelError(f"tokenizer folder {folder}: cannot be loaded as a CLIP tokenizer ({type(e).__name__}: "
                             f"{e}). The files there ({TOKENIZER_FILES}) are damaged or of another kind of "
                             "tokenizer; set the `tokenizer` option to a folder with a working CLIP tokenizer, such "
                             "as the tokenizer/ folder of an SD1.x / SDXL diffusers model.") from e
    return tokenizers


def _check_tokenizers(tokenizers: list, encoder_sizes: list[tuple[int, int]], folders: list[Path],
                      source: str) -> None:
    """Each tokenizer must fit its text encoder, given as (vocab size, positions); cap its length at the positions."""
    for tokenizer, (vocab, positions), folder in zip(tokenizers, encoder_sizes, folders, strict=True):
        if len(tokenizer) > vocab:
            raise ModelError(f"{source}: the tokenizer from {folder} has {len(tokenizer)} tokens but the text encoder "
                             f"only knows {vocab}: they do not belong together. Set the tokenizer option to this "
                             "model's own tokenizer folder.")
        # ComfyUI's copy says 8192; the encoder only has its position embeddings (77).
        tokenizer.model_max_length = min(int(tokenizer.model_max_length), positions)


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------

def _noise_scheduler(prediction_type: str, config: dict | None = None, zero_terminal_snr: bool = False):
    from diffusers import DDPMScheduler

    # A folder's scheduler config (whatever its class) overrides the standard values it names.
    config = {**TRAINING_SCHEDULE, **(config or {}), "prediction_type": prediction_type}
    if zero_terminal_snr:
        config.update(rescale_betas_zero_snr=True)
    return DDPMScheduler.from_config(config)


def _load_weights(module: torch.nn.Module, state_dict: dict[str, torch.Tensor], part: str, source: str) -> None:
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


def _load_single_file(path: Path, tokenizer_dir: str | Path | None, prediction_type: str) -> BaseModel:
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (convert_ldm_clip_checkpoint, convert_ldm_unet_checkpoint,
                                                     convert_ldm_vae_checkpoint, convert_open_clip_checkpoint)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    source = path.name
    # Everything that can fail cheaply fails before gigabytes are read (a .ckpt has no header:
    # it is memory-mapped once and used for both).
    checkpoint = None if _is_safetensors(path) else _load_pickle_checkpoint(path)
    shapes = _read_safetensors_header(path) if checkpoint is None else {k: v.shape for k, v in checkpoint.items()}
    found = detect_architecture(shapes, source)
    folders = resolve_tokenizer_dirs(found.arch, tokenizer_dir, source=source)
    tokenizers = _load_tokenizers(folders)
    _check_tokenizers(tokenizers, [(c["vocab_size"], c["max_position_embeddings"]) for c in found.text_encoder_configs],
                      folders, source)
    if checkpoint is None:
        checkpoint = _load_state_dict(path)

    def drop(prefix: str) -> None:  # free each part's original tensors once converted
        for key in [k for k in checkpoint if k.startswith(prefix)]:
            del checkpoint[key]

    # Modules are built without allocating weights, then take the checkpoint's tensors.
    with init_empty_weights():
        unet = UNet2DConditionModel(**found.unet_config)
    _load_weights(unet, convert_ldm_unet_checkpoint(checkpoint, dict(unet.config)), "UNet", source)
    drop(UNET_PREFIX)

    with init_empty_weights():
        vae = AutoencoderKL(**found.vae_config)
    _load_weights(vae, convert_ldm_vae_checkpoint(checkpoint, dict(vae.config)), "VAE", source)
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
        _load_weights(encoder, weights, f"text encoder {i + 1}", source)
        text_encoders.append(encoder)
    checkpoint.clear()  # the original tensors are no longer needed

    predicted = _resolve_prediction(prediction_type, "v_prediction" if found.v_prediction else "epsilon")
    return BaseModel(info=ModelInfo(found.arch, found.variant, predicted), unet=unet, vae=vae,
                     text_encoders=text_encoders, tokenizers=tokenizers,
                     noise_scheduler=_noise_scheduler(predicted, zero_terminal_snr=found.zero_terminal_snr),
                     source=path, name=path.stem)


def _read_json(path: Path, folder: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ModelError(f"{folder.name}: cannot read {path.relative_to(folder)} ({e}); the diffusers folder is "
                         "incomplete or damaged.") from e


def _inspect_diffusers_folder(folder: Path) -> tuple[str, str, str]:
    """(arch, variant, prediction type of the scheduler) of a diffusers folder, from its config files."""
    index = _read_json(folder / "model_index.json", folder)
    pipeline = str(index.get("_class_name", "?"))
    if "unet" not in index:
        kind = ("a Stable Diffusion 3 model" if "StableDiffusion3" in pipeline else
                "a Flux model" if "Flux" in pipeline else f"a {pipeline} model without a UNet")
        raise ModelError(f"{folder.name}: this diffusers folder holds {kind}. Only SD1.x and SDXL models can be "
                         "trained here.")
    unet_config = _read_json(folder / "unet" / "config.json", folder)
    layout = _layout_from_diffusers_config(unet_config)
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
    return arch, _variant_name(arch, layout), scheduler.get("prediction_type", "epsilon")


def _weights_variant(part: Path) -> str | None:
    """diffusers' `variant` for a part folder that only has fp16 weight files."""
    names = [p.name for p in part.glob("*") if p.suffix in (".safetensors", ".bin")]
    if names and all(".fp16." in n for n in names):
        return "fp16"
    return None


def _unet_weight_files(folder: Path) -> list[Path]:
    files = sorted((folder / "unet").glob("diffusion_pytorch_model*.safetensors")) or \
        sorted((folder / "unet").glob("diffusion_pytorch_model*.bin"))
    if not files:
        raise ModelError(f"{folder.name}: no UNet weights in unet/; the diffusers folder is incomplete.")
    return files


def _load_diffusers_folder(folder: Path, tokenizer_dir: str | Path | None, prediction_type: str) -> BaseModel:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    arch, variant, scheduler_prediction = _inspect_diffusers_folder(folder)
    folders = resolve_tokenizer_dirs(arch, tokenizer_dir, folder)
    tokenizers = _load_tokenizers(folders)

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
    _check_tokenizers(tokenizers, [(e.config.vocab_size, e.config.max_position_embeddings) for e in text_encoders],
                      folders, folder.name)

    predicted = _resolve_prediction(prediction_type, scheduler_prediction)
    scheduler_file = folder / "scheduler" / "scheduler_config.json"
    # The folder's own betas (and zero-SNR setting) if it has a scheduler, whatever its class.
    scheduler_config = _read_json(scheduler_file, folder) if scheduler_file.is_file() else None
    return BaseModel(info=ModelInfo(arch, variant, predicted), unet=unet, vae=vae, text_encoders=text_encoders,
                     tokenizers=tokenizers, noise_scheduler=_noise_scheduler(predicted, scheduler_config),
                     source=folder, name=folder.name)
