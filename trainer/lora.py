"""Which modules get adapters, and how the adapters are added, listed, saved and restored.

Adapters are peft LoRA (or DoRA), LoHa or LoKr layers (`config.network`) named `default`,
injected with peft's own `inject_adapter_in_model`, which works on any `nn.Module`: neither
diffusers' nor transformers' PEFT integration is used (transformers' refuses some peft releases,
and a cap on either would make installing the pack downgrade what ComfyUI has). The target
modules are listed explicitly by their full names (not by peft's suffix matching), so that
exactly the layers named here are adapted, and `export` can name the same layers in the kohya format.
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
TARGETS = ("attention", "all_linear", "all_linear_and_conv")
# Where peft keeps each network's trainable tensors: `<layer>.<attribute>.default[.weight]`.
ADAPTER_ATTRIBUTES = {
    "lora": ("lora_A", "lora_B", "lora_magnitude_vector"),
    "loha": ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"),
    "lokr": ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b"),
}


def _ends_with_layer(name: str, layers: tuple[str, ...]) -> bool:
    """Whether a module name ends with one of `layers` at a name boundary (`attn1.to_q`, not `xto_q`)."""
    return any(name == layer or name.endswith("." + layer) for layer in layers)


def unet_target_modules(unet: nn.Module, lora_targets: str) -> list[str]:
    """Full names of the UNet's layers that get adapters.

    'attention': the q/k/v/out projections of every attention in the transformer blocks.
    'all_linear': every `nn.Linear` inside the transformer blocks - the attention projections,
    the feed-forward (`ff.net.0.proj`, `ff.net.2`) and `proj_in` / `proj_out` where they are
    linear (SDXL; SD1.x uses 1x1 convolutions there).
    'all_linear_and_conv': those and every `nn.Conv2d` of the down, mid and up blocks (the ResNet
    blocks' convolutions and shortcuts, the down/up samplers, SD1.x's 1x1 `proj_in` / `proj_out`).
    Time and class embeddings, the ResNet blocks' `time_emb_proj` and the UNet's first and last
    convolutions are never adapted.
    """
    from diffusers import Transformer2DModel

    if lora_targets not in TARGETS:
        raise ValueError(f"lora_targets must be one of {', '.join(map(repr, TARGETS))}, got {lora_targets!r}")
    names = []
    for block_name, block in unet.named_modules():
        if not isinstance(block, Transformer2DModel):
            continue
        for name, module in block.named_modules():
            if not isinstance(module, nn.Linear):
                continue
            if lora_targets != "attention" or _ends_with_layer(name, UNET_ATTENTION_LAYERS):
                names.append(f"{block_name}.{name}")
    if lora_targets == "all_linear_and_conv":
        names += [name for name, module in unet.named_modules()
                  if isinstance(module, nn.Conv2d) and name.startswith(("down_blocks.", "mid_block.", "up_blocks."))]
    return names


def text_encoder_target_modules(text_encoder: nn.Module, lora_targets: str, skip_last_layer: bool = False) -> list[str]:
    """Full names of a CLIP text encoder's linear layers that get adapters.

    'attention': q/k/v/out projections of every encoder layer; 'all_linear' adds the MLP's
    fc1 and fc2 ('all_linear_and_conv' is the same here: a text encoder has no convolutions).
    The final `text_projection` of SDXL's second encoder is left alone. With `skip_last_layer`
    the last encoder layer is left out too: SDXL reads its first encoder's penultimate hidden
    state, so that layer never reaches the UNet, and an adapter there would get no gradient
    (multi-GPU training refuses parameters without one).
    """
    if lora_targets not in TARGETS:
        raise ValueError(f"lora_targets must be one of {', '.join(map(repr, TARGETS))}, got {lora_targets!r}")
    layers = TEXT_ATTENTION_LAYERS + (TEXT_MLP_LAYERS if lora_targets != "attention" else ())
    return [name for name, module in text_encoder.named_modules()
            if isinstance(module, nn.Linear) and _ends_with_layer(name, layers)
            and not (skip_last_layer and _last_layer(text_encoder) in name)]


def _last_layer(text_encoder: nn.Module) -> str:
    """The part of a module name that places it in the encoder's last layer."""
    return f".layers.{text_encoder.config.num_hidden_layers - 1}."


def _layer_sides(layer: nn.Module) -> tuple[int, int]:
    """(inputs, outputs) of the weight matrix a linear or conv layer multiplies by (a conv's kernel flattened)."""
    if isinstance(layer, nn.Conv2d):
        kernel_height, kernel_width = layer.kernel_size
        return layer.in_channels // layer.groups * kernel_height * kernel_width, layer.out_channels
    return layer.in_features, layer.out_features


def _check_rank(model: nn.Module, names: list[str], config: TrainConfig) -> None:
    """Refuse a rank that a target layer cannot hold: such an adapter is not low-rank.

    Not for LoKr, whose rank applies to the Kronecker factors, and which trains a factor too
    small for its rank as a full matrix.
    """
    if config.network == "lokr":
        return
    modules = dict(model.named_modules())
    for name in names:
        inputs, outputs = _layer_sides(modules[name])
        if config.rank > min(inputs, outputs):
            raise ValueError(
                f"rank {config.rank} is too large for {type(model).__name__} layer '{name}' "
                f"({inputs} in, {outputs} out features); choose rank <= {min(inputs, outputs)}"
            )


def _adapter_config(config: TrainConfig, target_modules: list[str]):
    """The peft config of `config.network` on `target_modules`; every adapter starts as a zero update."""
    if config.network == "loha":
        from peft import LoHaConfig

        # init_weights=True: hada_w2_b zero. No Tucker decomposition of convolutions (use_effective_conv2d
        # off): ComfyUI and A1111 read the plain (out, in * kernel) factors.
        return LoHaConfig(r=config.rank, alpha=config.alpha, target_modules=target_modules, init_weights=True,
                          use_effective_conv2d=False)
    if config.network == "lokr":
        from peft import LoKrConfig

        # init_weights=True: w1 (or w1_a) zero.
        return LoKrConfig(r=config.rank, alpha=config.alpha, target_modules=target_modules, init_weights=True,
                          use_effective_conv2d=False, decompose_both=config.lokr_decompose_both,
                          decompose_factor=config.lokr_factor)
    from peft import LoraConfig

    # init_lora_weights=True: A random, B zero, so the adapted model equals the base at step 0.
    return LoraConfig(r=config.rank, lora_alpha=config.alpha, lora_dropout=config.lora_dropout,
                      target_modules=target_modules, init_lora_weights=True, use_dora=config.use_dora)


def _is_lora_parameter(name: str) -> bool:
    """Whether a parameter name is an adapter's (LoRA, LoHa or LoKr), e.g. `<layer>.lora_A.default.weight`."""
    return any(f".{attribute}.{ADAPTER_NAME}" in name for attributes in ADAPTER_ATTRIBUTES.values()
               for attribute in attributes)


def add_lora(unet: nn.Module, text_encoders: list[nn.Module], config: TrainConfig) -> None:
    """Add adapters of `config.network` named 'default' to the UNet and, with `config.train_text_encoder`,
    the text encoders.

    Every other parameter is frozen; the adapter parameters are fp32 (also on an fp16 / bf16 base
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
        _check_rank(model, names, config)

    from peft import inject_adapter_in_model

    for model in [unet, *text_encoders]:
        model.requires_grad_(False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        for model, names in models:
            # Sets `model.peft_config[ADAPTER_NAME]` too, which export reads; the adapter is active.
            inject_adapter_in_model(_adapter_config(config, names), model, adapter_name=ADAPTER_NAME)

    for model, _ in models:
        for name, param in model.named_parameters():
            is_lora = _is_lora_parameter(name)
            if is_lora:
                param.data = param.data.float()
            param.requires_grad_(is_lora)


def skip_lora_input_casts(unet: nn.Module) -> None:
    """Stop peft casting each UNet LoRA layer's input to the fp32 LoRA weights.

    LoHa and LoKr layers have the same switch, and the same holds for them.
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
        if hasattr(module, "cast_input_dtype_enabled"):  # peft's LoRA, LoHa, LoKr layers (peft >= 0.15)
            module.cast_input_dtype_enabled = False


def lora_parameters(module: nn.Module) -> list[nn.Parameter]:
    """The trainable adapter parameters of a module (empty if it has no adapters)."""
    return [p for name, p in module.named_parameters() if _is_lora_parameter(name) and p.requires_grad]


def _state_prefixes(text_encoders: list[nn.Module]) -> list[str]:
    """Names of the models in a LoRA state: diffusers' component names."""
    return ["text_encoder" if i == 0 else f"text_encoder_{i + 1}" for i in range(len(text_encoders))]


def _lora_named_parameters(unet: nn.Module, text_encoders: list[nn.Module]) -> dict[str, nn.Parameter]:
    models = zip(["unet", *_state_prefixes(text_encoders)], [unet, *text_encoders])
    return {f"{prefix}.{name}": param for prefix, model in models
            for name, param in model.named_parameters() if _is_lora_parameter(name)}


def lora_state(unet: nn.Module, text_encoders: list[nn.Module]) -> dict[str, torch.Tensor]:
    """Every adapter parameter (full precision, on the CPU) keyed `unet.<name>` / `text_encoder[_N].<name>`.

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
