"""LoRA adapters (trainer.lora) and the exported files (trainer.export), on tiny SD1.x / SDXL models.

The round-trip tests apply the exported kohya file by hand to fresh copies of the base
models, with the formulas loaders use, and compare against the adapted models' outputs.
"""

from __future__ import annotations

import hashlib
import json

import pytest
import safetensors.torch
import torch
from peft.tuners.lora import LoraLayer
from safetensors import safe_open
from torch import nn

from comfyui_dreambooth_lora.trainer.config import TrainConfig
from comfyui_dreambooth_lora.trainer.export import export_lora, kohya_state_dict, lora_metadata
from comfyui_dreambooth_lora.trainer.fileio import DiskFullError
from comfyui_dreambooth_lora.trainer.lora import (add_lora, load_lora_state, lora_parameters, lora_state,
                                                  skip_lora_input_casts)
from comfyui_dreambooth_lora.trainer.tiny import build_tiny_components, sd_noise_scheduler_config, write_char_tokenizer

TOL = 1e-4


def make_config(**overrides) -> TrainConfig:
    """A valid config; rank and alpha differ so that an alpha = rank mistake shows."""
    values = dict(pretrained_model="base.safetensors", instance_dir="images", instance_prompt="a photo of sks dog",
                  rank=4, alpha=3.0, output_name="sks_dog", seed=7)
    values.update(overrides)
    return TrainConfig.from_dict(values)


def components(arch: str) -> tuple[nn.Module, list[nn.Module]]:
    """The tiny UNet and text encoders in eval mode (same seed, so the same weights every call)."""
    parts = build_tiny_components(arch, seed=0)
    text_encoders = [parts["text_encoder"]] + ([parts["text_encoder_2"]] if arch == "sdxl" else [])
    for module in [parts["unet"], *text_encoders]:
        module.eval()
    return parts["unet"], text_encoders


def lora_layer_names(model: nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if isinstance(module, LoraLayer)]


def perturb(models: list[nn.Module], seed: int = 1) -> None:
    """Random, non-zero LoRA weights (B starts at zero), as after some training."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for model in models:
            for name, param in model.named_parameters():
                if "lora_magnitude_vector" in name:
                    param.mul_(1 + 0.2 * torch.randn(param.shape, generator=generator))
                elif ".lora_" in name:
                    param.copy_(0.3 * torch.randn(param.shape, generator=generator))


def unet_inputs(arch: str) -> dict:
    generator = torch.Generator().manual_seed(3)
    context = 32 if arch == "sd1" else 64
    inputs = dict(sample=torch.randn(2, 4, 8, 8, generator=generator), timestep=torch.tensor([10, 500]),
                  encoder_hidden_states=torch.randn(2, 7, context, generator=generator))
    if arch == "sdxl":
        inputs["added_cond_kwargs"] = {"text_embeds": torch.randn(2, 32, generator=generator),
                                       "time_ids": torch.tensor([[32.0, 32, 0, 0, 32, 32]] * 2)}
    return inputs


TOKEN_IDS = torch.tensor([[512, 5, 17, 99, 3, 250, 513, 513], [512, 40, 41, 42, 513, 513, 513, 513]])


@torch.no_grad()
def outputs(unet: nn.Module, text_encoders: list[nn.Module], arch: str) -> list[torch.Tensor]:
    result = [unet(**unet_inputs(arch)).sample]
    result += [te(TOKEN_IDS).last_hidden_state for te in text_encoders]
    return result


def max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("arch, targets", [("sd1", "attention"), ("sdxl", "attention"), ("sdxl", "all_linear")])
def test_every_lora_parameter_gets_a_gradient(arch, targets):
    # Multi-GPU training (DDP, no find_unused_parameters) stops at the second step on a parameter
    # without a gradient: SDXL reads its first text encoder's penultimate layer, so its last layer gets no adapter.
    from comfyui_dreambooth_lora.trainer.conditioning import encode_prompts

    config = make_config(train_text_encoder=True, lora_targets=targets)
    unet, text_encoders = components(arch)
    add_lora(unet, text_encoders, config)
    embeds, pooled = encode_prompts(arch, text_encoders, [TOKEN_IDS] * len(text_encoders))
    inputs = {**unet_inputs(arch), "encoder_hidden_states": embeds}
    if arch == "sdxl":
        inputs["added_cond_kwargs"] = {**inputs["added_cond_kwargs"], "text_embeds": pooled}
    unet(**inputs).sample.square().mean().backward()
    for model in [unet, *text_encoders]:
        trained = [name for name, p in model.named_parameters() if p.requires_grad]
        assert trained and not [name for name, p in model.named_parameters() if p.requires_grad and p.grad is None]


def test_an_sdxl_state_with_the_unread_text_encoder_layer_is_refused():
    # SDXL does not read its first encoder's last layer, so no LoRA adapts it; a state that does is another config's.
    config = make_config(train_text_encoder=True)
    unet, text_encoders = components("sdxl")
    add_lora(unet, text_encoders, config)
    state = lora_state(unet, text_encoders)
    state.update({key.replace(".layers.0.", ".layers.1."): value for key, value in state.items()
                  if key.startswith("text_encoder.") and ".layers.0." in key})
    with pytest.raises(ValueError, match="does not match the adapted models.*unexpected"):
        load_lora_state(unet, text_encoders, state)


def kohya_names(model: nn.Module, prefix: str, text_encoder: bool) -> dict[str, nn.Linear]:
    """The kohya name of every linear layer, written out here independently of trainer.export."""
    names = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            if text_encoder and not name.startswith("text_model."):
                name = "text_model." + name
            names[f"{prefix}_{name.replace('.', '_')}"] = module
    return names


@torch.no_grad()
def apply_kohya_by_hand(state: dict[str, torch.Tensor], unet: nn.Module, text_encoders: list[nn.Module],
                        arch: str) -> None:
    """Merge a kohya LoRA into base models as ComfyUI does; every key must be used."""
    te_prefixes = ["lora_te"] if arch == "sd1" else ["lora_te1", "lora_te2"]
    layers = kohya_names(unet, "lora_unet", False)
    for prefix, te in zip(te_prefixes, text_encoders):
        layers.update(kohya_names(te, prefix, True))
    used = set()
    for key in state:
        if not key.endswith(".lora_down.weight"):
            continue
        module = key[: -len(".lora_down.weight")]
        down, up = state[key].float(), state[f"{module}.lora_up.weight"].float()
        scale = state[f"{module}.alpha"].item() / down.shape[0]
        weight = layers[module].weight
        merged = weight + scale * (up @ down)
        used |= {key, f"{module}.lora_up.weight", f"{module}.alpha"}
        if f"{module}.dora_scale" in state:
            # ComfyUI's weight_decompose for a dora_scale of shape (out, 1): it divides by the row
            # norm of the *base* weight (comfy/weight_adapter/base.py).
            dora_scale = state[f"{module}.dora_scale"].float()
            assert dora_scale.shape == (weight.shape[0], 1)
            base_norm = weight.norm(dim=1, keepdim=True) + torch.finfo(torch.float32).eps
            merged = merged * (dora_scale / base_norm)
            used.add(f"{module}.dora_scale")
        weight.copy_(merged)
    assert used == set(state), f"keys nobody applies: {sorted(set(state) - used)[:5]}"


def test_unet_lora_layers_skip_the_input_cast_autocast_undoes_with_the_same_result():
    # On a GPU a step is bound by the ops it dispatches; peft's cast of each LoRA layer's input
    # to the fp32 LoRA weights is undone by autocast at once.
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops += 1
            return func(*args, **(kwargs or {}))

    unet, text_encoders = components("sd1")
    add_lora(unet, text_encoders, make_config())
    perturb([unet])
    for name, param in unet.named_parameters():  # frozen weights in bf16, as placed for a bf16 run
        if ".lora_" not in name:
            param.data = param.data.to(torch.bfloat16)
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 8, 8, generator=generator).to(torch.bfloat16)
    embeds = torch.randn(2, 77, unet.config.cross_attention_dim, generator=generator).to(torch.bfloat16)

    def step():
        counter = Count()
        counter.ops = 0
        with counter, torch.autocast("cpu", dtype=torch.bfloat16):
            out = unet(latents, torch.tensor([10, 500]), embeds).sample
            out.float().pow(2).mean().backward()
        grads = {n: p.grad.clone() for n, p in unet.named_parameters() if p.grad is not None}
        unet.zero_grad(set_to_none=True)
        return counter.ops, out.detach(), grads

    casting = step()  # peft's default
    skip_lora_input_casts(unet)
    skipping = step()
    assert skipping[0] < casting[0]
    torch.testing.assert_close(skipping[1], casting[1], rtol=0, atol=0)
    assert skipping[2].keys() == casting[2].keys() and len(skipping[2]) > 0
    for name, grad in casting[2].items():
        torch.testing.assert_close(skipping[2][name], grad, rtol=0, atol=0)


# --------------------------------------------------------------------------------------------
# add_lora
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("use_dora", [False, True])
def test_only_lora_parameters_train_and_are_fp32(use_dora):
    unet, text_encoders = components("sdxl")
    unet.half()  # the base may be half precision; the adapters must not be
    add_lora(unet, text_encoders, make_config(train_text_encoder=True, use_dora=use_dora))
    for model in [unet, *text_encoders]:
        trainable = {name for name, p in model.named_parameters() if p.requires_grad}
        lora = {name for name, p in model.named_parameters() if ".lora_" in name}
        assert trainable == lora and lora
        assert all(p.dtype == torch.float32 for p in lora_parameters(model))
        assert len(lora_parameters(model)) == len(lora)
        assert any("lora_magnitude_vector" in name for name in lora) == use_dora
    assert all(p.dtype == torch.float16 for name, p in unet.named_parameters() if ".lora_" not in name)

    inputs = unet_inputs("sdxl")
    inputs = {**inputs, "sample": inputs["sample"].half(), "encoder_hidden_states": inputs["encoder_hidden_states"].half(),
              "added_cond_kwargs": {k: v.half() for k, v in inputs["added_cond_kwargs"].items()}}
    unet(**inputs).sample.float().square().mean().backward()
    assert all(p.grad is not None for p in lora_parameters(unet))
    assert all(p.grad is None for name, p in unet.named_parameters() if ".lora_" not in name)


@pytest.mark.parametrize("arch, use_dora", [("sd1", False), ("sdxl", True)])
def test_model_unchanged_at_init(arch, use_dora):
    unet, text_encoders = components(arch)
    before = outputs(unet, text_encoders, arch)
    add_lora(unet, text_encoders, make_config(train_text_encoder=True, lora_targets="all_linear", use_dora=use_dora))
    assert all(lora_layer_names(m) for m in [unet, *text_encoders])
    assert max_diff(outputs(unet, text_encoders, arch), before) <= 1e-6


# Tiny models: 4 transformer blocks (down, mid, 2 up); 2 CLIP layers, of which SDXL reads 1 of the first encoder.
@pytest.mark.parametrize("arch, targets, unet_count, te_counts", [
    ("sd1", "attention", 4 * 8, [2 * 4]),
    ("sd1", "all_linear", 4 * 10, [2 * 6]),  # + ff.net.0.proj, ff.net.2; proj_in/out are convolutions
    ("sdxl", "attention", 4 * 8, [1 * 4, 2 * 4]),
    ("sdxl", "all_linear", 4 * 10 + 4 * 2, [1 * 6, 2 * 6]),  # + linear proj_in / proj_out per transformer
])
def test_targets(arch, targets, unet_count, te_counts):
    unet, text_encoders = components(arch)
    add_lora(unet, text_encoders, make_config(train_text_encoder=True, lora_targets=targets))
    names = lora_layer_names(unet)
    assert len(names) == unet_count
    assert all(".attentions." in n for n in names)
    assert not any(part in n for n in names for part in ("time_emb", "add_embedding", "resnets", "conv"))
    if targets == "attention":
        assert all(n.rsplit(".", 1)[-1] in ("to_q", "to_k", "to_v") or n.endswith("to_out.0") for n in names)
    assert [len(lora_layer_names(te)) for te in text_encoders] == te_counts
    assert not any("text_projection" in n for te in text_encoders for n in lora_layer_names(te))


def test_text_encoders_only_when_asked():
    unet, text_encoders = components("sdxl")
    add_lora(unet, text_encoders, make_config(train_text_encoder=False))
    assert lora_layer_names(unet)
    for te in text_encoders:
        assert lora_layer_names(te) == []
        assert not any(p.requires_grad for p in te.parameters())


def test_rank_larger_than_a_layer_is_refused():
    unet, text_encoders = components("sd1")  # tiny layers are 32 wide
    with pytest.raises(ValueError, match=r"rank 33 .*'down_blocks\.0\.attentions\.0\..*' \(32 in, 32 out features\)"):
        add_lora(unet, text_encoders, make_config(rank=33))
    assert lora_layer_names(unet) == []  # refused before anything was changed


def test_lora_state_restores_adapters_exactly():
    config = make_config(train_text_encoder=True, use_dora=True)
    unet, text_encoders = components("sdxl")
    add_lora(unet, text_encoders, config)
    perturb([unet, *text_encoders])
    state = lora_state(unet, text_encoders)
    assert any(k.startswith("text_encoder_2.") for k in state)

    fresh_unet, fresh_tes = components("sdxl")
    add_lora(fresh_unet, fresh_tes, config)
    load_lora_state(fresh_unet, fresh_tes, state)
    assert max_diff(outputs(fresh_unet, fresh_tes, "sdxl"), outputs(unet, text_encoders, "sdxl")) == 0.0

    del state[next(iter(state))]
    with pytest.raises(ValueError, match="1 missing"):
        load_lora_state(fresh_unet, fresh_tes, state)


# --------------------------------------------------------------------------------------------
# kohya export
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch, targets, use_dora", [
    ("sd1", "attention", False), ("sdxl", "all_linear", False), ("sd1", "all_linear", True), ("sdxl", "attention", True),
])
def test_kohya_round_trip(arch, targets, use_dora, tmp_path):
    config = make_config(train_text_encoder=True, lora_targets=targets, use_dora=use_dora, save_dtype="fp32")
    unet, text_encoders = components(arch)
    base = outputs(unet, text_encoders, arch)
    add_lora(unet, text_encoders, config)
    perturb([unet, *text_encoders])
    adapted = outputs(unet, text_encoders, arch)
    assert all((a - b).abs().max() > 1e-2 for a, b in zip(adapted, base))  # the LoRA does something everywhere

    path = tmp_path / "lora.safetensors"
    assert export_lora(path, unet, text_encoders, arch, config, {}) == [path]
    state = safetensors.torch.load_file(path)

    fresh_unet, fresh_tes = components(arch)
    apply_kohya_by_hand(state, fresh_unet, fresh_tes, arch)
    assert max_diff(outputs(fresh_unet, fresh_tes, arch), adapted) <= TOL

    modules = {k.rsplit(".", 2)[0] for k in state if k.endswith(".lora_down.weight")}
    assert len(modules) == sum(len(lora_layer_names(m)) for m in [unet, *text_encoders])
    alphas = {state[k].item() for k in state if k.endswith(".alpha")}
    assert alphas == {3.0} and config.rank == 4
    assert any(k.endswith(".dora_scale") for k in state) == use_dora
    if arch == "sd1":
        assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight" in state
        assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_up.weight" in state
        assert all(k.startswith(("lora_unet_", "lora_te_")) for k in state)
    else:
        assert "lora_te1_text_model_encoder_layers_0_self_attn_out_proj.lora_down.weight" in state
        assert not any(k.startswith("lora_te1_text_model_encoder_layers_1_") for k in state)  # not read by SDXL
        assert "lora_te2_text_model_encoder_layers_0_self_attn_k_proj.alpha" in state
        assert "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_v.lora_down.weight" in state
        assert all(k.startswith(("lora_unet_", "lora_te1_", "lora_te2_")) for k in state)


def test_kohya_refuses_a_model_adapted_with_another_config():
    unet, text_encoders = components("sd1")
    add_lora(unet, text_encoders, make_config(alpha=3.0))
    with pytest.raises(ValueError, match="alpha 3.0.*alpha 5.0"):
        kohya_state_dict(unet, text_encoders, "sd1", make_config(alpha=5.0), torch.float32)


# --------------------------------------------------------------------------------------------
# diffusers export
# --------------------------------------------------------------------------------------------

def build_pipeline(arch: str, tmp_path):
    from diffusers import DDPMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline
    from transformers import CLIPTokenizer

    parts = build_tiny_components(arch, seed=0)
    tokenizer = CLIPTokenizer.from_pretrained(write_char_tokenizer(tmp_path / "tokenizer"))
    scheduler = DDPMScheduler(**sd_noise_scheduler_config())
    if arch == "sd1":
        pipeline = StableDiffusionPipeline(**parts, tokenizer=tokenizer, scheduler=scheduler, safety_checker=None,
                                           feature_extractor=None, requires_safety_checker=False)
        return pipeline, [pipeline.text_encoder]
    tokenizer_2 = CLIPTokenizer.from_pretrained(write_char_tokenizer(tmp_path / "tokenizer_2", pad_token="!"))
    pipeline = StableDiffusionXLPipeline(**parts, tokenizer=tokenizer, tokenizer_2=tokenizer_2, scheduler=scheduler)
    return pipeline, [pipeline.text_encoder, pipeline.text_encoder_2]


@pytest.mark.parametrize("arch, use_dora, train_text_encoder", [
    ("sd1", False, True), ("sd1", True, False), ("sdxl", False, True),
])
def test_diffusers_file_loads_in_a_pipeline(arch, use_dora, train_text_encoder, tmp_path):
    config = make_config(train_text_encoder=train_text_encoder, lora_targets="all_linear", use_dora=use_dora,
                         save_dtype="fp32", export_format="both", output_dir=str(tmp_path))
    unet, text_encoders = components(arch)
    add_lora(unet, text_encoders, config)
    perturb([unet, *text_encoders])
    adapted = outputs(unet, text_encoders, arch)

    # The kohya file goes where it was asked (ComfyUI's loras folder for the nodes), the diffusers
    # file (no alpha: a kohya loader would apply it at the wrong strength) into the run folder.
    loras = tmp_path / "loras"
    written = export_lora(loras / "sks_dog.safetensors", unet, text_encoders, arch, config, {"ss_steps": "5"})
    assert written == [loras / "sks_dog.safetensors", tmp_path / "sks_dog.diffusers.safetensors"]

    # Text-encoder keys carry `text_model.` as every transformers version and ComfyUI's map name them.
    with safe_open(written[1], "pt") as f:
        keys = set(f.keys())
    assert ("text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight" in keys) == train_text_encoder
    assert "unet.mid_block.attentions.0.transformer_blocks.0.ff.net.2.lora_B.weight" in keys

    pipeline, pipeline_tes = build_pipeline(arch, tmp_path)
    for module in [pipeline.unet, *pipeline_tes]:
        module.eval()
    base = outputs(pipeline.unet, pipeline_tes, arch)
    pipeline.load_lora_weights(tmp_path, weight_name="sks_dog.diffusers.safetensors")
    loaded = outputs(pipeline.unet, pipeline_tes, arch)

    assert max_diff(loaded, adapted) <= TOL
    assert (loaded[0] - base[0]).abs().max() > 1e-2
    for loaded_te, base_te in zip(loaded[1:], base[1:]):
        assert ((loaded_te - base_te).abs().max() > 1e-2) == train_text_encoder


# --------------------------------------------------------------------------------------------
# metadata and writing
# --------------------------------------------------------------------------------------------

def test_metadata_and_default_fp16(tmp_path):
    config = make_config(train_text_encoder=True, use_dora=True, text_encoder_lr=5e-5)
    assert config.save_dtype == "fp16" and config.export_format == "kohya"
    unet, text_encoders = components("sdxl")
    add_lora(unet, text_encoders, config)
    summary = {"num_images": 6, "masked_images": 0, "tag_frequency": {"6_sks": {"sks dog": 6}}, "dataset_dirs": {"6_sks": {"n_repeats": 6, "img_count": 6}}}
    metadata = lora_metadata(config, arch="sdxl", base_model_name="sd_xl_base_1.0.safetensors",
                             base_model_hash="abc123", steps=120, dataset_summary=summary)
    path = tmp_path / "sks_dog.safetensors"
    export_lora(path, unet, text_encoders, "sdxl", config, metadata)

    with safe_open(path, "pt") as f:
        header = f.metadata()
        dtypes = {key: f.get_tensor(key).dtype for key in f.keys()}
    assert all(isinstance(v, str) for v in header.values())
    assert all(dtype == torch.float16 for key, dtype in dtypes.items() if not key.endswith(".alpha"))
    expected = {
        "ss_network_module": "networks.lora", "ss_network_dim": "4", "ss_network_alpha": "3.0",
        "ss_base_model_version": "sdxl_base_v1-0", "ss_sd_model_name": "sd_xl_base_1.0.safetensors",
        "ss_sd_model_hash": "abc123", "ss_steps": "120", "ss_learning_rate": "0.0001", "ss_unet_lr": "0.0001",
        "ss_text_encoder_lr": "5e-05", "ss_resolution": "(512, 512)", "ss_training_comment": "a photo of sks dog",
        "ss_v2": "False", "ss_num_train_images": "6", "ss_masked_loss": "False", "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": "stable-diffusion-xl-v1-base/lora", "modelspec.title": "sks_dog",
        "modelspec.trigger_phrase": "a photo of sks dog", "modelspec.resolution": "512x512",
    }
    assert {k: header.get(k) for k in expected} == expected
    assert header["modelspec.implementation"] and header["modelspec.date"].startswith("20")
    assert json.loads(header["ss_tag_frequency"]) == {"6_sks": {"sks dog": 6}}
    assert json.loads(header["ss_network_args"])["dora_wd"] == "True"
    assert json.loads(header["dreambooth_lora.dataset"]) == summary
    assert TrainConfig.from_dict(json.loads(header["dreambooth_lora.config"])) == config

    # The hash is of the tensor data that follows the header, as A1111 computes it.
    data = path.read_bytes()
    header_size = int.from_bytes(data[:8], "little")
    sha = hashlib.sha256(data[8 + header_size:]).hexdigest()
    assert header["sshs_model_hash"] == sha and header["modelspec.hash_sha256"] == "0x" + sha

    sd1 = lora_metadata(make_config(), arch="sd1", base_model_name="v1-5.safetensors", base_model_hash="",
                        steps=1, dataset_summary={})
    assert sd1["ss_base_model_version"] == "sd_v1" and sd1["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert sd1["ss_text_encoder_lr"] == "0.0" and sd1["ss_network_args"] == "{}"


def test_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    config = make_config()
    unet, text_encoders = components("sd1")
    add_lora(unet, text_encoders, config)
    path = tmp_path / "sks_dog.safetensors"
    export_lora(path, unet, text_encoders, "sd1", config, {"ss_steps": "1"})
    old = path.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sks_dog.safetensors"]

    def broken_save_file(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half a file")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", broken_save_file)
    perturb([unet])
    with pytest.raises(DiskFullError, match=rf"out of disk space: writing the LoRA sks_dog.safetensors in {tmp_path} "
                                            r"needs about 0.\d MB"):
        export_lora(path, unet, text_encoders, "sd1", config, {"ss_steps": "2"})
    assert path.read_bytes() == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sks_dog.safetensors"]
