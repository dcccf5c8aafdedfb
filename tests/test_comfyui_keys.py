"""The exported kohya LoRA loads completely in ComfyUI: its own key maps, its own loader, its own math.

The full-size SD1.5 and SDXL models (ours in diffusers / transformers, ComfyUI's own) are
built on the meta device: only names and shapes exist, so this is fast and small. ComfyUI
recognises the architectures from our UNet's state dict with its own model detection.
"""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from comfyui_dreambooth_lora.trainer.config import TrainConfig
from comfyui_dreambooth_lora.trainer.export import kohya_state_dict
from comfyui_dreambooth_lora.trainer.lora import add_lora
from comfyui_dreambooth_lora.trainer.tiny import build_tiny_components

pytestmark = pytest.mark.comfyui

NOT_LOADED = "lora key not loaded"


def full_size_models(arch: str) -> tuple[nn.Module, list[nn.Module]]:
    """The UNet and text encoders of SD1.5 / SDXL base with their real configs, on the meta device."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    clip_l = CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
                            projection_dim=768, hidden_act="quick_gelu")
    with torch.device("meta"):
        if arch == "sd1":
            # UNet2DConditionModel's defaults are SD1.5's, but for the text width.
            return UNet2DConditionModel(sample_size=64, cross_attention_dim=768), [CLIPTextModel(clip_l)]
        clip_g = CLIPTextConfig(hidden_size=1280, intermediate_size=5120, num_attention_heads=20, num_hidden_layers=32,
                                projection_dim=1280, hidden_act="gelu")
        unet = UNet2DConditionModel(
            sample_size=128, block_out_channels=(320, 640, 1280), layers_per_block=2,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
            use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816)
        return unet, [CLIPTextModel(clip_l), CLIPTextModelWithProjection(clip_g)]


def comfyui_models(unet_state_dict: dict[str, torch.Tensor]):
    """ComfyUI's model and text-encoder module for the architecture it detects in a diffusers UNet, on meta."""
    import comfy.model_detection

    model_config = comfy.model_detection.model_config_from_diffusers_unet(unet_state_dict)
    model = model_config.get_model({}, device="meta")
    target = model_config.clip_target()
    clip_model = target.clip(**target.params, device="meta", dtype=torch.float16, model_options={})
    return model_config, model, clip_model


def comfyui_key_map(comfy_lora, model, clip_model) -> dict:
    """The key map ComfyUI's LoraLoader builds (comfy.sd.load_lora_for_models)."""
    key_map = comfy_lora.model_lora_keys_unet(model, {})
    return comfy_lora.model_lora_keys_clip(clip_model, key_map)


def load_in_comfyui(comfy_lora, lora: dict[str, torch.Tensor], key_map: dict, caplog) -> tuple[dict, list[str]]:
    """ComfyUI's loading of a LoRA dict: the patches and the keys it reports as not loaded."""
    import comfy.lora_convert

    caplog.clear()
    with caplog.at_level(logging.WARNING):
        patches = comfy_lora.load_lora(comfy.lora_convert.convert_lora(lora), key_map)
    return patches, [r.getMessage() for r in caplog.records if NOT_LOADED in r.getMessage()]


# Adapted modules of the full-size models: SD1.5 has 16 transformer blocks, SDXL 70 (+ 11
# linear proj_in/proj_out pairs); CLIP-L 12 layers (SDXL reads 11 of them), OpenCLIP-G 32.
# The UNet's convolutions in the down, mid and up blocks: SD1.5 has 22 ResNet blocks (2 convs each,
# 14 shortcuts), 3 down- and 3 upsamplers and 16 1x1 proj_in/proj_out pairs; SDXL 17 ResNet
# blocks (11 shortcuts), 2 down- and 2 upsamplers.
SD15_CONVS = 22 * 2 + 14 + 3 + 3 + 16 * 2
SDXL_CONVS = 17 * 2 + 11 + 2 + 2


@pytest.mark.parametrize("arch, targets, network, use_dora, unet_modules, te_modules", [
    ("sd1", "all_linear_and_conv", "lora", False, 16 * 10 + SD15_CONVS, [12 * 6]),
    ("sd1", "all_linear", "lora", True, 16 * 10, [12 * 6]),
    ("sd1", "all_linear_and_conv", "loha", False, 16 * 10 + SD15_CONVS, [12 * 6]),
    ("sd1", "attention", "lokr", False, 16 * 8, [12 * 4]),
    ("sdxl", "attention", "loha", False, 70 * 8, [11 * 4, 32 * 4]),
    ("sdxl", "all_linear_and_conv", "lokr", False, 70 * 10 + 11 * 2 + SDXL_CONVS, [11 * 6, 32 * 6]),
    ("sdxl", "all_linear", "lora", True, 70 * 10 + 11 * 2, [11 * 6, 32 * 6]),
])
def test_every_key_loads_in_comfyui(comfyui, caplog, arch, targets, network, use_dora, unet_modules, te_modules):
    import comfy.supported_models

    unet, text_encoders = full_size_models(arch)
    model_config, model, clip_model = comfyui_models(unet.state_dict())
    assert type(model_config) is {"sd1": comfy.supported_models.SD15, "sdxl": comfy.supported_models.SDXL}[arch]

    config = TrainConfig(network=network, rank=8, alpha=4.0, lora_targets=targets, train_text_encoder=True,
                         use_dora=use_dora)
    with torch.device("meta"):
        add_lora(unet, text_encoders, config)
    lora = kohya_state_dict(unet, text_encoders, arch, config, torch.float16)
    te_prefixes = ["lora_te_"] if arch == "sd1" else ["lora_te1_", "lora_te2_"]
    modules = {key.split(".")[0] for key in lora}
    assert len([m for m in modules if m.startswith("lora_unet_")]) == unet_modules
    assert [len([m for m in modules if m.startswith(p)]) for p in te_prefixes] == te_modules
    tensor_names = {key.split(".", 1)[1] for key in lora}
    assert tensor_names >= {"lora": {"lora_down.weight", "lora_up.weight"},
                            "loha": {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"},
                            "lokr": {"lokr_w1"}}[network] | {"alpha"}  # LoKr's w2: whole or _a/_b by size

    key_map = comfyui_key_map(comfyui, model, clip_model)
    patches, not_loaded = load_in_comfyui(comfyui, lora, key_map, caplog)
    assert not_loaded == []

    # Every trained module became one patch of the network's kind, and ComfyUI's own math turns it
    # into a weight of the target's shape (it logs an error, and leaves the weight alone, where not).
    assert len(patches) == len(modules)
    assert {adapter.name for adapter in patches.values()} == {network}
    comfy_weights = {**model.state_dict(), **clip_model.state_dict()}
    caplog.clear()
    with caplog.at_level(logging.ERROR):
        for target, adapter in patches.items():
            weight = comfy_weights[target]
            patched = comfyui.calculate_weight([(1.0, adapter, 1.0, None, None)], torch.empty_like(weight), target)
            assert patched.shape == weight.shape, target
            assert adapter.weights[2] == 4.0  # alpha
            if network == "lora":
                assert (adapter.weights[4] is not None) == use_dora  # dora_scale
    assert [r.getMessage() for r in caplog.records] == []
    on_text_encoders = [t for t in patches if not t.startswith("diffusion_model.")]
    assert len(on_text_encoders) == sum(te_modules)
    if arch == "sdxl":
        assert any(t.startswith("clip_g.") for t in on_text_encoders)
        assert any(t.startswith("clip_l.") for t in on_text_encoders)

    # The check can fail: a key ComfyUI does not know is reported.
    bogus = {**lora, "lora_unet_no_such_block_to_q.lora_down.weight": torch.zeros(8, 320)}
    _, not_loaded = load_in_comfyui(comfyui, bogus, key_map, caplog)
    assert not_loaded == ["lora key not loaded: lora_unet_no_such_block_to_q.lora_down.weight"]


# LoKr's factors on the tiny model (sides 32 = 4 x 8, 64 = 8 x 8, the text encoder's 37 = 1 x 37): rank 4
# trains both factors of most layers whole (the scale then goes into w1), rank 1 with decompose_both
# decomposes both, rank 2 with factor 8 and decompose_both decomposes w1 (8 x 8) and keeps w2 (4 x 4) whole.
@pytest.mark.parametrize("network, options, tensors", [
    ("lora", dict(lora_targets="all_linear_and_conv"), {"lora_up.weight", "lora_down.weight"}),
    ("lora", dict(lora_targets="all_linear", use_dora=True), {"lora_up.weight", "lora_down.weight", "dora_scale"}),
    ("loha", dict(lora_targets="all_linear_and_conv"), {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"}),
    ("lokr", dict(lora_targets="all_linear_and_conv"), {"lokr_w1", "lokr_w2"}),
    ("lokr", dict(lora_targets="all_linear_and_conv", rank=1, lokr_decompose_both=True),
     {"lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b"}),
    ("lokr", dict(lora_targets="all_linear_and_conv", rank=2, lokr_factor=8, lokr_decompose_both=True),
     {"lokr_w1_a", "lokr_w1_b", "lokr_w2"}),
])
def test_comfyui_math_reproduces_the_trained_model(comfyui, network, options, tensors):
    """ComfyUI's own weight patching (comfy.lora.calculate_weight) applied to our file gives the adapted
    model's merged weights, module by module (linear, convolution, text encoder), and so its outputs."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    config = TrainConfig(network=network, **{"rank": 4, "alpha": 3.0, **options}, train_text_encoder=True)
    parts = build_tiny_components("sd1", seed=0)
    unet, text_encoder = parts["unet"].eval(), parts["text_encoder"].eval()
    add_lora(unet, [text_encoder], config)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in [*unet.named_parameters(), *text_encoder.named_parameters()]:
            if "lora_magnitude_vector" in name:
                param.mul_(1 + 0.2 * torch.randn(param.shape, generator=generator))
            elif param.requires_grad:  # the adapter's tensors, some of which start at zero
                param.copy_(0.3 * torch.randn(param.shape, generator=generator))
    lora = kohya_state_dict(unet, [text_encoder], "sd1", config, torch.float32)
    assert {key.split(".", 1)[1] for key in lora} >= tensors | {"alpha"}

    fresh = build_tiny_components("sd1", seed=0)
    fresh_unet, fresh_te = fresh["unet"].eval(), fresh["text_encoder"].eval()
    # The tiny model is no architecture ComfyUI detects, so the key map is written out here:
    # kohya module name -> our parameter name (ComfyUI's map for SD1.5 is checked above).
    weights = {f"unet.{n}": p for n, p in fresh_unet.named_parameters()}
    weights.update({f"te.{n}": p for n, p in fresh_te.named_parameters()})
    key_map = {}
    for name, module in fresh_unet.named_modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            key_map["lora_unet_" + name.replace(".", "_")] = f"unet.{name}.weight"
    for name, module in fresh_te.named_modules():
        if isinstance(module, nn.Linear):  # transformers < 5 names them under `text_model.`
            kohya = "lora_te_text_model_" + name.removeprefix("text_model.").replace(".", "_")
            key_map[kohya] = f"te.{name}.weight"
    sample = torch.randn(1, 4, 8, 8, generator=generator)
    context = torch.randn(1, 7, 32, generator=generator)
    ids = torch.tensor([[512, 5, 17, 99, 513]])

    def run(unet_, text_encoder_):
        with torch.no_grad():
            return unet_(sample, 10, context).sample, text_encoder_(ids).last_hidden_state

    base = run(fresh_unet, fresh_te)
    patches = comfyui.load_lora(lora, key_map)
    # The tiny UNet's convolutions in its blocks: ResNet convs and shortcuts, samplers, proj_in/out.
    convs = 31 if config.lora_targets == "all_linear_and_conv" else 0
    assert len(patches) == 40 + convs + 12
    with torch.no_grad():
        for key, adapter in patches.items():
            # A ModelPatcher patch: (strength, adapter, strength_model, offset, function).
            weights[key].copy_(comfyui.calculate_weight([(1.0, adapter, 1.0, None, None)], weights[key].clone(), key))
    patched_outputs = run(fresh_unet, fresh_te)

    # The trained model's merged weights, as peft merges them.
    merged = {}
    for prefix, model in (("unet", unet), ("te", text_encoder)):
        for name, module in model.named_modules():
            if isinstance(module, BaseTunerLayer):
                module.merge(adapter_names=["default"])
                merged[f"{prefix}.{name}.weight"] = module.get_base_layer().weight.detach()
    assert merged.keys() == patches.keys()
    kinds = {("te" if key.startswith("te.") else "conv" if weights[key].dim() == 4 else "linear") for key in merged}
    assert kinds == ({"linear", "conv", "te"} if convs else {"linear", "te"})
    assert any(weights[key].shape[2:] == (3, 3) for key in merged) == bool(convs)
    for key, weight in merged.items():
        assert (weights[key] - weight).abs().max() <= 1e-4, key

    for patched, original in zip(patched_outputs, base):
        assert (patched - original).abs().max() > 1e-2
    for patched, adapted in zip(patched_outputs, run(unet, text_encoder)):  # the merged model
        assert (patched - adapted).abs().max() <= 1e-4
