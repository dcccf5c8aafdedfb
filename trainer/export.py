"""The LoRA file: kohya-format safetensors with `ss_*` / `modelspec.*` metadata, diffusers format on request.

Kohya format is what ComfyUI, A1111, Forge and diffusers all load:

    lora_unet_<diffusers module path, '.' -> '_'>.lora_down.weight   (rank, in)
    lora_unet_<...>.lora_up.weight                                   (out, rank)
    lora_unet_<...>.alpha                                            scalar; the update is up @ down * alpha / rank
    lora_unet_<...>.dora_scale                                       (out, 1), DoRA only

with `lora_te_` (SD1.x) or `lora_te1_` / `lora_te2_` (SDXL) for the text encoders, whose
module paths start with `text_model.`. The dict is built here from the peft layers
directly: diffusers' own converters write alpha = rank and `lora_te1_` for SD1.x.

LoHa and LoKr use the same module names with LyCORIS's tensor names, which ComfyUI, A1111/Forge
and kohya (through LyCORIS) read:

    <module>.hada_w1_a (out, rank), .hada_w1_b (rank, in), .hada_w2_a, .hada_w2_b, .alpha
        update = (w1_a @ w1_b) * (w2_a @ w2_b) * alpha / rank
    <module>.lokr_w1 or .lokr_w1_a / .lokr_w1_b, .lokr_w2 or .lokr_w2_a / .lokr_w2_b, .alpha
        update = kron(w1, w2) * alpha / rank, where w1 or w2 is decomposed; otherwise * 1

A convolution's `in` is its input channels times the kernel (peft and the loaders flatten it
alike); LoKr's full `lokr_w2` of a convolution keeps the kernel dimensions.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import math
from pathlib import Path

import safetensors.torch
import torch
from torch import nn

from .config import TrainConfig
from .fileio import atomic_write
from .lora import ADAPTER_ATTRIBUTES, ADAPTER_NAME

SAVE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}

KOHYA_UNET_PREFIX = "lora_unet"
KOHYA_TEXT_ENCODER_PREFIXES = {"sd1": ("lora_te",), "sdxl": ("lora_te1", "lora_te2")}
DIFFUSERS_TEXT_ENCODER_PREFIXES = ("text_encoder", "text_encoder_2")

BASE_MODEL_VERSIONS = {"sd1": "sd_v1", "sdxl": "sdxl_base_v1-0"}
MODELSPEC_ARCHITECTURES = {"sd1": "stable-diffusion-v1/lora", "sdxl": "stable-diffusion-xl-v1-base/lora"}
# The values kohya's sd-scripts writes for LoRAs of these architectures.
MODELSPEC_IMPLEMENTATIONS = {"sd1": "diffusers", "sdxl": "https://github.com/Stability-AI/generative-models"}


def _check_arch(arch: str) -> None:
    if arch not in KOHYA_TEXT_ENCODER_PREFIXES:
        raise ValueError(f"arch must be 'sd1' or 'sdxl', got {arch!r}")


def kohya_module_name(prefix: str, module_name: str, text_encoder: bool = False) -> str:
    """The kohya name of a module: `lora_unet_down_blocks_0_attentions_0_..._to_q`.

    transformers 5 dropped the `text_model.` level from `CLIPTextModel` (not from
    `CLIPTextModelWithProjection`); every loader expects it, so it is put back for text encoders.
    """
    if text_encoder and not module_name.startswith("text_model."):
        module_name = "text_model." + module_name
    return f"{prefix}_{module_name.replace('.', '_')}"


def _lora_layers(model: nn.Module):
    """(name, peft adapter layer) for every module of `model` that carries the adapter (LoRA, LoHa or LoKr)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, module in model.named_modules():
        if isinstance(module, BaseTunerLayer) and ADAPTER_NAME in getattr(module, "r", {}):
            yield name, module


def _layer_network(layer) -> str:
    """'lora', 'loha' or 'lokr': the kind of peft adapter layer."""
    from peft.tuners.loha import LoHaLayer
    from peft.tuners.lokr import LoKrLayer

    return "loha" if isinstance(layer, LoHaLayer) else "lokr" if isinstance(layer, LoKrLayer) else "lora"


def _check_layer_config(name: str, layer, config: TrainConfig) -> None:
    """The file states network, rank, alpha and DoRA from the config: refuse a model adapted differently."""
    network = _layer_network(layer)
    rank = layer.r[ADAPTER_NAME]
    alpha = layer.lora_alpha[ADAPTER_NAME] if network == "lora" else layer.alpha[ADAPTER_NAME]
    use_dora = network == "lora" and bool(layer.use_dora.get(ADAPTER_NAME, False))
    if (network != config.network or rank != config.rank or not math.isclose(alpha, config.alpha)
            or use_dora != config.use_dora):
        raise ValueError(f"layer '{name}' has network {network}, rank {rank}, alpha {alpha}, DoRA {use_dora}, but "
                         f"the config says network {config.network}, rank {config.rank}, alpha {config.alpha}, "
                         f"DoRA {config.use_dora}")


def _adapter_tensors(layer, config: TrainConfig) -> dict[str, torch.Tensor]:
    """One layer's tensors under their kohya / LyCORIS names (without the module name and `.alpha`)."""
    network = _layer_network(layer)
    if network == "lora":
        tensors = {"lora_down.weight": layer.lora_A[ADAPTER_NAME].weight,
                   "lora_up.weight": layer.lora_B[ADAPTER_NAME].weight}
        if config.use_dora:
            tensors["dora_scale"] = comfyui_dora_scale(layer)
        return tensors
    tensors = {attribute: getattr(layer, attribute)[ADAPTER_NAME] for attribute in ADAPTER_ATTRIBUTES[network]
               if ADAPTER_NAME in getattr(layer, attribute)}
    if network == "lokr" and "lokr_w1" in tensors and "lokr_w2" in tensors:
        # With neither factor decomposed the loaders take no rank to divide alpha by and apply scale 1;
        # peft scales by alpha / rank all the same, so that scale goes into w1.
        tensors["lokr_w1"] = tensors["lokr_w1"] * layer.scaling[ADAPTER_NAME]
    return tensors


def comfyui_dora_scale(layer) -> torch.Tensor:
    """The `dora_scale` (out, 1) that makes ComfyUI reproduce a peft DoRA layer exactly.

    peft computes W' = m * V / ||V|| with V = W + scale * up @ down and the norm taken per
    output row. ComfyUI (comfy/weight_adapter/base.py `weight_decompose`) treats a
    `dora_scale` of shape (out, 1) as that per-row magnitude, but divides by the row norm of
    the base weight W instead of V. Storing m * ||W|| / ||V|| cancels that, so the LoRA
    applied in ComfyUI gives the model that was trained. (Tools that divide by ||V|| see the
    magnitude scaled by ||W|| / ||V|| per row, which is close to 1 for a LoRA-sized update.)
    Should ComfyUI switch to ||V|| (a pull request proposes it), tests/test_comfyui_keys.py fails.
    """
    base = layer.get_base_layer().weight.detach().float()
    down = layer.lora_A[ADAPTER_NAME].weight.detach().float()
    up = layer.lora_B[ADAPTER_NAME].weight.detach().float()
    magnitude = layer.lora_magnitude_vector[ADAPTER_NAME].weight.detach().float()
    merged = base + layer.scaling[ADAPTER_NAME] * (up @ down)
    return (magnitude * base.norm(dim=1) / merged.norm(dim=1)).unsqueeze(1)


def _kohya_models(unet: nn.Module, text_encoders: list[nn.Module], arch: str):
    """(kohya prefix, model, is a text encoder) for the UNet and each text encoder given."""
    _check_arch(arch)
    prefixes = KOHYA_TEXT_ENCODER_PREFIXES[arch]
    if len(text_encoders) > len(prefixes):
        raise ValueError(f"{arch} has {len(prefixes)} text encoder(s), got {len(text_encoders)}")
    return [(KOHYA_UNET_PREFIX, unet, False)] + [(p, te, True) for p, te in zip(prefixes, text_encoders)]


def kohya_state_dict(unet: nn.Module, text_encoders: list[nn.Module], arch: str, config: TrainConfig,
                     dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The adapters of the UNet and text encoders as a kohya-format state dict (LyCORIS names for LoHa / LoKr).

    The adapter tensors are cast to `dtype` and stay on the models' device; each `.alpha` is
    a CPU fp32 scalar equal to `config.alpha`, kept in fp32 so that values such as 0.1 are
    stored exactly. Text encoders without adapters contribute nothing.
    """
    state: dict[str, torch.Tensor] = {}
    for prefix, model, is_text_encoder in _kohya_models(unet, text_encoders, arch):
        for name, layer in _lora_layers(model):
            _check_layer_config(name, layer, config)
            key = kohya_module_name(prefix, name, is_text_encoder)
            for suffix, tensor in _adapter_tensors(layer, config).items():
                state[f"{key}.{suffix}"] = tensor.detach().to(dtype).contiguous()
            state[f"{key}.alpha"] = torch.tensor(float(config.alpha), dtype=torch.float32, device="cpu")
    return state


def diffusers_state_dict(unet: nn.Module, text_encoders: list[nn.Module],
                         dtype: torch.dtype) -> tuple[dict[str, torch.Tensor], dict]:
    """The adapters in diffusers' layout (peft keys under `unet.` / `text_encoder[_2].`) and their LoraConfigs.

    The configs go into the file as `lora_adapter_metadata`, from which `load_lora_weights`
    restores alpha (without it diffusers assumes alpha = rank) and DoRA.
    """
    from peft.utils import get_peft_model_state_dict

    if len(text_encoders) > len(DIFFUSERS_TEXT_ENCODER_PREFIXES):
        raise ValueError(f"at most {len(DIFFUSERS_TEXT_ENCODER_PREFIXES)} text encoders, got {len(text_encoders)}")
    state: dict[str, torch.Tensor] = {}
    adapter_metadata: dict = {}
    models = [("unet", unet, False)] + [(p, te, True) for p, te in zip(DIFFUSERS_TEXT_ENCODER_PREFIXES, text_encoders)]
    for prefix, model, is_text_encoder in models:
        if ADAPTER_NAME not in getattr(model, "peft_config", {}):
            continue
        for key, tensor in get_peft_model_state_dict(model, adapter_name=ADAPTER_NAME).items():
            # Written with `text_model.` as older transformers name it; diffusers strips it where needed.
            if is_text_encoder and not key.startswith("text_model."):
                key = "text_model." + key
            state[f"{prefix}.{key}"] = tensor.detach().to(dtype).contiguous()
        for key, value in model.peft_config[ADAPTER_NAME].to_dict().items():
            adapter_metadata[f"{prefix}.{key}"] = sorted(value) if isinstance(value, set) else value
    return state, adapter_metadata


def _hash_metadata(sha256: str) -> dict[str, str]:
    """The hash keys A1111 (`sshs_model_hash`) and ModelSpec read, so they need not hash the file again."""
    return {"sshs_model_hash": sha256, "modelspec.hash_sha256": "0x" + sha256}


def tensor_data_sha256(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 of the tensor data of a safetensors file holding `state` (the header, metadata included, is skipped).

    This is the "addnet" model hash of kohya's scripts and A1111: it does not change when
    the metadata is edited.
    """
    data = safetensors.torch.save(state)
    header_size = int.from_bytes(data[:8], "little")
    return hashlib.sha256(memoryview(data)[8 + header_size:]).hexdigest()


def network_args(config: TrainConfig) -> dict[str, str]:
    """kohya's `ss_network_args`: what the network is beyond rank and alpha, as LyCORIS / kohya name it."""
    args: dict[str, str] = {}
    if config.network != "lora":
        args["algo"] = config.network
    if config.lora_targets == "all_linear_and_conv":  # LyCORIS and kohya's LoCon train convolutions with conv_dim
        args.update(conv_dim=str(config.rank), conv_alpha=str(config.alpha))
    if config.network == "lokr":
        args.update(factor=str(config.lokr_factor), decompose_both=str(config.lokr_decompose_both))
    if config.use_dora:
        args.update(dora_wd="True", wd_on_out="True")
    return args


def lora_metadata(config: TrainConfig, *, arch: str, base_model_name: str, base_model_hash: str, steps: int,
                  dataset_summary: dict, lora_sha256: str | None = None) -> dict[str, str]:
    """The safetensors header of the LoRA: kohya's `ss_*` keys, ModelSpec's `modelspec.*` keys and the full config.

    `dataset_summary` is any JSON-able dict; it is stored whole as `dreambooth_lora.dataset`,
    and its optional entries `tag_frequency` ({folder: {tag: count}}), `dataset_dirs`
    ({folder: {"n_repeats": n, "img_count": n}}), `num_images` and `masked_images` also fill
    kohya's `ss_tag_frequency`, `ss_dataset_dirs`, `ss_num_train_images` and `ss_masked_loss`,
    which UIs show.
    All values are strings, as the safetensors header requires.
    """
    _check_arch(arch)
    unet_lr = config.learning_rate
    text_encoder_lr = (config.text_encoder_lr or config.learning_rate) if config.train_text_encoder else 0.0
    metadata = {
        "ss_network_module": "networks.lora" if config.network == "lora" else "lycoris.kohya",
        "ss_network_dim": str(config.rank),
        "ss_network_alpha": str(config.alpha),
        "ss_network_dropout": str(config.lora_dropout),
        "ss_network_args": json.dumps(network_args(config)),
        "ss_network_train_unet_only": str(not config.train_text_encoder),
        "ss_base_model_version": BASE_MODEL_VERSIONS[arch],
        "ss_v2": "False",
        "ss_sd_model_name": base_model_name,
        "ss_sd_model_hash": base_model_hash,
        "ss_output_name": config.output_name,
        "ss_steps": str(steps),
        "ss_max_train_steps": str(config.max_train_steps),
        "ss_learning_rate": str(config.learning_rate),
        "ss_unet_lr": str(unet_lr),
        "ss_text_encoder_lr": str(text_encoder_lr),
        "ss_lr_scheduler": config.lr_scheduler,
        "ss_lr_warmup_steps": str(config.lr_warmup_steps),
        "ss_optimizer": config.optimizer,
        "ss_batch_size_per_device": str(config.batch_size),
        "ss_gradient_accumulation_steps": str(config.gradient_accumulation_steps),
        "ss_mixed_precision": config.mixed_precision,
        "ss_seed": str(config.seed),
        "ss_resolution": f"({config.resolution}, {config.resolution})",
        "ss_enable_bucket": str(config.buckets),
        "ss_prior_loss_weight": str(config.prior_loss_weight if config.with_prior_preservation else 0.0),
        "ss_min_snr_gamma": str(config.snr_gamma),
        "ss_noise_offset": str(config.noise_offset),
        "ss_training_comment": config.instance_prompt,
        "ss_tag_frequency": json.dumps(dataset_summary.get("tag_frequency", {})),
        "ss_dataset_dirs": json.dumps(dataset_summary.get("dataset_dirs", {})),
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": MODELSPEC_ARCHITECTURES[arch],
        "modelspec.implementation": MODELSPEC_IMPLEMENTATIONS[arch],
        "modelspec.title": config.output_name,
        "modelspec.trigger_phrase": config.instance_prompt,
        "modelspec.resolution": f"{config.resolution}x{config.resolution}",
        "modelspec.date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "dreambooth_lora.config": json.dumps(config.to_dict()),
        "dreambooth_lora.dataset": json.dumps(dataset_summary),
    }
    if config.prediction_type != "auto":  # 'auto' is resolved from the model, which the config does not record
        metadata["modelspec.prediction_type"] = "v" if config.prediction_type == "v_prediction" else "epsilon"
    if "masked_images" in dataset_summary:
        metadata["ss_masked_loss"] = str(dataset_summary["masked_images"] > 0)
    if "num_images" in dataset_summary:
        metadata["ss_num_train_images"] = str(dataset_summary["num_images"])
    if lora_sha256 is not None:
        metadata.update(_hash_metadata(lora_sha256))
    return metadata


def save_safetensors(path: Path, state: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write `state` to `path` atomically (on the CPU), with `metadata` plus the tensor-data hash in the header."""
    state = {key: tensor.to("cpu").contiguous() for key, tensor in state.items()}
    metadata = {**metadata, **_hash_metadata(tensor_data_sha256(state))}
    atomic_write(Path(path), lambda tmp: safetensors.torch.save_file(state, str(tmp), metadata=metadata),
                 size=safetensors_size(state, metadata), what=f"the LoRA {Path(path).name}")


def safetensors_size(state: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> int:
    """About the size of `state` as a safetensors file: the tensor data and a header (over-estimated)."""
    header = 200 * len(state) + len(json.dumps(metadata or {})) + 1024
    return sum(t.numel() * t.element_size() for t in state.values()) + header


def export_lora(path: Path, unet: nn.Module, text_encoders: list[nn.Module], arch: str, config: TrainConfig,
                metadata: dict[str, str]) -> list[Path]:
    """Write the LoRA in `config.export_format` and return the paths written.

    'kohya': `path`; 'diffusers': `<stem>.diffusers.safetensors` in the run folder
    (`config.output_dir`), which `pipeline.load_lora_weights(folder, weight_name=...)` loads;
    'both': both files. The diffusers file stays out of `lora_dir` (ComfyUI's loras folder
    for the nodes): it has no alpha, so a loader that expects kohya files would apply it
    at the wrong strength.
    Tensors are saved as `config.save_dtype`; each file is written atomically.
    """
    path = Path(path)
    dtype = SAVE_DTYPES[config.save_dtype]
    written = []
    if config.export_format in ("kohya", "both"):
        save_safetensors(path, kohya_state_dict(unet, text_encoders, arch, config, dtype), metadata)
        written.append(path)
    if config.export_format in ("diffusers", "both"):
        state, adapter_metadata = diffusers_state_dict(unet, text_encoders, dtype)
        diffusers_path = Path(config.output_dir) / f"{path.stem}.diffusers.safetensors"
        save_safetensors(diffusers_path, state, {**metadata, "format": "pt",
                                                 "lora_adapter_metadata": json.dumps(adapter_metadata, sort_keys=True)})
        written.append(diffusers_path)
    return written
