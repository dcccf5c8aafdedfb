"""Which modules get LoRA adapters, and how the adapters are added, listed, saved and restored.

Adapters are peft LoRA (or DoRA) layers named `default`, injected with peft's own
`inject_adapter_in_model`, which works on any `nn.Module`: neither diffusers' nor
transformers' PEFT integration is used (transformers' refuses some peft releases, and a
cap on either would make installing the pack downgrade what ComfyUI has). The target modules are listed
explicitly by their full names (not by peft's suffix matching), so that exactly the layers
named here are adapted, and `export` can name the same layers in the kohya format.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import TrainConfig

ADAPTER_NAME = "default"

# The attention projections of a diffusers `Attention` module inside the UNet's transformer blocks.
UNET_ATTENTION_LAYERS = ("to_q", "to_k", "to_v", "to_out.0")
# The CLIP encoder layers' attention projections and MLP.
TEXT_ATTENTION_LAYERS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj")
TEXT_MLP_LAYERS = ("mlp.fc1", "mlp.fc2")


def _ends_with_layer(name: str, layers: tuple[str, ...]) -> bool:
    """Whether a module name ends with one of `layers` at a name boundary (`attn1.to_q`, not `xto_q`)."""
    return any(name == layer or name.endswith("." + layer) for layer in layers)


def unet_target_modules(unet: nn.Module, lora_targets: str) -> list[str]:
    """Full names of the UNet's linear layers that get adapters.

    'attention': the q/k/v/out projections of every attention in the transformer blocks.
    'all_linear': every `nn.Linear` inside the transformer blocks - the attention projections,
    the feed-forward (`ff.net.0.proj`, `ff.net.2`) and `proj_in` / `proj_out` where they are
    linear (SDXL; SD1.x uses 1x1 convolutions there). Time and class embeddings and the
    ResNet blocks' `time_emb_proj` are never adapted: they are outside the transformer blocks.
    """
    from diffusers import Transformer2DModel

    if lora_targets not in ("attention", "all_linear"):
        raise ValueError(f"lora_targets must be 'attention' or 'all_linear', got {lora_targets!r}")
    names = []
    for block_name, block in unet.named_modules():
        if not isinstance(block, Transformer2DModel):
            continue
        for name, module in block.named_modules():
            if not isinstance(module, nn.Linear):
                continue
            if lora_targets == "all_linear" or _ends_with_layer(name, UNET_ATTENTION_LAYERS):
                names.append(f"{block_name}.{name}")
    return names


def text_encoder_target_modules(text_encoder: nn.Module, lora_targets: str, skip_last_layer: bool = False) -> list[str]:
    """Full names of a CLIP text encoder's linear layers that get adapters.

    'attention': q/k/v/out projections of every encoder layer; 'all_linear' adds the MLP's
    fc1 and fc2. The final `text_projection` of SDXL's second encoder is left alone. With
    `skip_last_layer` the last encoder layer is left out too: SDXL reads its first encoder's
    penultimate hidden state, so that layer never reaches the UNet, and an adapter there would
    get no gradient (multi-GPU training refuses parameters without one).
    """
    if lora_targets not in ("attention", "all_linear"):
        raise ValueError(f"lora_targets must be 'attention' or 'all_linear', got {lora_targets!r}")
    layers = TEXT_ATTENTION_LAYERS + (TEXT_MLP_LAYERS if lora_targets == "all_linear" else ())
    return [name for name, module in text_encoder.named_modules()
            if isinstance(module, nn.Linear) and _ends_with_layer(name, layers)
            and not (skip_last_layer and _last_layer(text_encoder) in name)]


def _last_layer(text_encoder: nn.Module) -> str:
    """The part of a module name that places it in the encoder's last layer."""
    return f".layers.{text_encoder.config.num_hidden_layers - 1}."


def _check_rank(model: nn.Module, names: list[str], rank: int) -> None:
    """Refuse a rank that a target layer cannot hold: such an adapter is not low-rank."""
    modules = dict(model.named_modules())
    for name in names:
        layer = modules[name]
        if rank > min(layer.in_features, layer.out_features):
            raise ValueError(
                f"LoRA rank {rank} is too large for {type(model).__name__} layer '{name}' "
                f"({layer.in_features} in, {layer.out_features} out features); "
                f"choose rank <= {min(layer.in_features, layer.out_features)}"
            )


def _lora_config(config: TrainConfig, target_modules: list[str]):
    from peft import LoraConfig

    # init_lora_weights=True: A random, B zero, so the adapted model equals the base at step 0.
    return LoraConfig(r=config.rank, lora_alpha=config.alpha, lora_dropout=config.lora_dropout,
                      target_modules=target_modules, init_lora_weights=True, use_dora=config.use_dora)


def _is_lora_parameter(name: str) -> bool:
    # peft names them `<layer>.lora_A.default.weight`, `<layer>.lora_B...`, `<layer>.lora_magnitude_vector...`.
    return ".lora_" in name


def add_lora(unet: nn.Module, text_encoders: list[nn.Module], config: TrainConfig) -> None:
    """Add LoRA adapters named 'default' to the UNet and, with `config.train_text_encoder`, the text encoders.

    Every other parameter is frozen; the LoRA parameters are fp32 (also on an fp16 / bf16 base
    model, so small updates are not rounded away) and the only ones with `requires_grad`.
    The initialisation is seeded with `config.seed` without disturbing the global RNG.
    Raises ValueError if the rank exceeds a target layer's smaller dimension.
    """
    models = [(unet, unet_target_modules(unet, config.lora_targets))]
    if config.train_text_encoder:
        sdxl = len(text_encoders) == 2  # whose first encoder is read at its penultimate layer
        models += [(te, text_encoder_target_modules(te, config.lora_targets, skip_last_layer=sdxl and i == 0))
                   for i, te in enumerate(text_encoders)]
    for model, names in models:
        _check_rank(model, names, config.rank)

    from peft import inject_adapter_in_model

    for model in [unet, *text_encoders]:
        model.requires_grad_(False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        for model, names in models:
            # Sets `model.peft_config[ADAPTER_NAME]` too, which export reads; the adapter is active.
            inject_adapter_in_model(_lora_config(config, names), model, adapter_name=ADAPTER_NAME)

    for model, _ in models:
        for name, param in model.named_parameters():
            is_lora = _is_lora_parameter(name)
            if is_lora:
                param.data = param.data.float()
            param.requires_grad_(is_lora)


def skip_lora_input_casts(unet: nn.Module) -> None:
    """Stop peft casting each UNet LoRA layer's input to the fp32 LoRA weights.

    Only for a UNet that runs under autocast whenever its frozen and LoRA weights differ in
    dtype, as the training loop's does with torch's own autocast (steps, samples, class
    images; not under DeepSpeed), and only for plain LoRA without dropout: autocast casts
    that input straight back to the compute dtype, so the maths is the same with two casts
    fewer per layer each way. That is 442 of the 8,018 ops one SD1.5 step dispatches, and on
    a GPU the step is bound by dispatching ops (benchmarks/README.md). Not so for DoRA (its
    weight norm would be taken in bf16) or dropout (its 1/(1-p) scale rounded to bf16); and
    without autocast a bf16 input would meet the fp32 LoRA weights: an error.
    """
    for module in unet.modules():
        if hasattr(module, "cast_input_dtype_enabled"):  # peft's LoRA layers (peft >= 0.15)
            module.cast_input_dtype_enabled = False


def lora_parameters(module: nn.Module) -> list[nn.Parameter]:
    """The trainable LoRA parameters of a module (empty if it has no adapters)."""
    return [p for name, p in module.named_parameters() if _is_lora_parameter(name) and p.requires_grad]


def _state_prefixes(text_encoders: list[nn.Module]) -> list[str]:
    """Names of the models in a LoRA state: diffusers' component names."""
    return ["text_encoder" if i == 0 else f"text_encoder_{i + 1}" for i in range(len(text_encoders))]


def _lora_named_parameters(unet: nn.Module, text_encoders: list[nn.Module]) -> dict[str, nn.Parameter]:
    models = zip(["unet", *_state_prefixes(text_encoders)], [unet, *text_encoders])
    return {f"{prefix}.{name}": param for prefix, model in models
            for name, param in model.named_parameters() if _is_lora_parameter(name)}


def lora_state(unet: nn.Module, text_encoders: list[nn.Module]) -> dict[str, torch.Tensor]:
    """Every LoRA parameter (full precision, on the CPU) keyed `unet.<name>` / `text_encoder[_N].<name>`.

    Restoring this state into models adapted with the same config (`load_lora_state`)
    reproduces the adapters bit for bit; it is what resumable checkpoints store.
    """
    return {key: param.detach().to("cpu", copy=True) for key, param in _lora_named_parameters(unet, text_encoders).items()}


def load_lora_state(unet: nn.Module, text_encoders: list[nn.Module], state: dict[str, torch.Tensor]) -> None:
    """Copy a `lora_state` back into adapted models; raises ValueError if it does not fit them exactly."""
    params = _lora_named_parameters(unet, text_encoders)
    missing = sorted(params.keys() - state.keys())
    unexpected = sorted(state.keys() - params.keys())
    wrong_shape = sorted(key for key in params.keys() & state.keys() if params[key].shape != state[key].shape)
    if missing or unexpected or wrong_shape:
        problems = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong_shape)):
            if keys:
                problems.append(f"{len(keys)} {label} (e.g. {keys[0]})")
        raise ValueError("the LoRA state does not match the adapted models (was the LoRA config changed?): "
                         + "; ".join(problems))
    with torch.no_grad():
        for key, param in params.items():
            param.copy_(state[key])
