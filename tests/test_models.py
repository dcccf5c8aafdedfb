"""Base model loading: diffusers folders, single-file checkpoints, architecture detection, clear refusals."""

from __future__ import annotations

import functools
import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch

from comfyui_dreambooth_lora.trainer import models
from comfyui_dreambooth_lora.trainer.models import (ModelError, ModelInfo, detect_architecture, inspect_model,
                                                    load_base_model, resolve_tokenizer_dirs)
from comfyui_dreambooth_lora.trainer.models.single_file import load_weights
from comfyui_dreambooth_lora.trainer.models import tokenizers
from comfyui_dreambooth_lora.trainer.models.tokenizers import check_tokenizers, load_tokenizers
from comfyui_dreambooth_lora.trainer.tiny import write_char_tokenizer

TOLERANCE = 1e-5


def file_sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def assert_frozen_fp32(base) -> None:
    for module in (base.unet, base.vae, *base.text_encoders):
        assert not module.training
        params = list(module.parameters())
        assert params and all(p.dtype == torch.float32 and p.device.type == "cpu" and not p.requires_grad
                              for p in params)


def tokenize(tokenizer, text: str) -> torch.Tensor:
    return tokenizer([text], padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


# ---------------------------------------------------------------------------------------------
# Diffusers folders
# ---------------------------------------------------------------------------------------------


def test_diffusers_folder_sd1(tiny_sd1):
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel

    base = load_base_model(tiny_sd1)
    assert base.info == ModelInfo("sd1", "SD1.x-like (custom size)", "epsilon") == inspect_model(tiny_sd1)
    assert isinstance(base.unet, UNet2DConditionModel) and isinstance(base.vae, AutoencoderKL)
    assert [type(e) for e in base.text_encoders] == [CLIPTextModel] and len(base.tokenizers) == 1
    assert isinstance(base.noise_scheduler, DDPMScheduler)
    assert base.noise_scheduler.config.prediction_type == "epsilon"
    assert base.noise_scheduler.config.num_train_timesteps == 1000
    assert_frozen_fp32(base)
    assert base.name == tiny_sd1.name and base.source == tiny_sd1

    ids = tokenize(base.tokenizers[0], "a photo of sks dog")
    assert ids.shape == (1, 77) and ids[0, 0] == base.tokenizers[0].bos_token_id
    with torch.no_grad():
        hidden = base.text_encoders[0](ids)[0]
        out = base.unet(torch.randn(1, 4, 8, 8), torch.tensor([10]), hidden).sample
    assert out.shape == (1, 4, 8, 8)

    assert base.sha256() == file_sha256(tiny_sd1 / "unet" / "diffusion_pytorch_model.safetensors")
    assert base.sha256() is base.sha256()  # computed once: the same string, not one made again


def test_diffusers_folder_sdxl(tiny_sdxl):
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    base = load_base_model(tiny_sdxl)
    assert base.info == ModelInfo("sdxl", "SDXL-like (custom size)", "epsilon") == inspect_model(tiny_sdxl)
    assert [type(e) for e in base.text_encoders] == [CLIPTextModel, CLIPTextModelWithProjection]
    assert base.tokenizers[1].pad_token == "!" and base.tokenizers[0].pad_token != "!"
    assert base.vae.config.scaling_factor == pytest.approx(0.13025)
    assert_frozen_fp32(base)

    ids = [tokenize(t, "a photo of sks dog") for t in base.tokenizers]
    with torch.no_grad():
        first = base.text_encoders[0](ids[0], output_hidden_states=True)
        second = base.text_encoders[1](ids[1], output_hidden_states=True)
        context = torch.cat([first.hidden_states[-2], second.hidden_states[-2]], dim=-1)
        added = {"text_embeds": second.text_embeds, "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]])}
        out = base.unet(torch.randn(1, 4, 8, 8), torch.tensor([10]), context, added_cond_kwargs=added).sample
    assert out.shape == (1, 4, 8, 8)


def test_diffusers_folder_with_normalised_latents_is_refused(tiny_sdxl, tmp_path):
    import shutil

    folder = shutil.copytree(tiny_sdxl, tmp_path / "playground_like")
    config = json.loads((folder / "vae" / "config.json").read_text())
    config.update(latents_mean=[0.0] * 4, latents_std=[1.0] * 4)
    (folder / "vae" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelError, match="mean and standard deviation.*Playground"):
        inspect_model(folder)


def test_diffusers_folder_prediction_type(tiny_sd1, tmp_path):
    folder = shutil.copytree(tiny_sd1, tmp_path / "vpred")
    config_file = folder / "scheduler" / "scheduler_config.json"
    config = json.loads(config_file.read_text())
    config["prediction_type"] = "v_prediction"
    config_file.write_text(json.dumps(config))

    assert inspect_model(folder).prediction_type == "v_prediction"
    assert load_base_model(folder).noise_scheduler.config.prediction_type == "v_prediction"
    # An explicit choice overrides what the folder says.
    assert inspect_model(folder, prediction_type="epsilon").prediction_type == "epsilon"
    assert load_base_model(folder, prediction_type="epsilon").noise_scheduler.config.prediction_type == "epsilon"
    with pytest.raises(ValueError, match="prediction_type"):
        inspect_model(folder, prediction_type="sample")


# ---------------------------------------------------------------------------------------------
# Single-file checkpoints: written in the original layout with ComfyUI's converters, read back
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ldm(comfyui):
    """tests/ldm_checkpoints.py, importable once ComfyUI's source is on sys.path."""
    import ldm_checkpoints

    return ldm_checkpoints


@functools.lru_cache(maxsize=None)
def _parts(arch: str) -> dict:
    import ldm_checkpoints

    return ldm_checkpoints.build_sd_layout_components(arch)


@pytest.fixture(scope="module")
def char_tokenizer(tmp_path_factory) -> Path:
    return write_char_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="module")
def single_files(ldm, tmp_path_factory) -> dict:
    """(arch, suffix) -> an original-layout checkpoint of the tiny SD-layout parts."""
    folder = tmp_path_factory.mktemp("single_files")
    files = {}
    for arch in ("sd1", "sdxl"):
        checkpoint = ldm.ldm_checkpoint(_parts(arch), arch)
        for suffix in (".safetensors", ".ckpt"):
            files[arch, suffix] = ldm.write_checkpoint(checkpoint, folder / f"tiny_{arch}{suffix}")
    return files


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    return (a - b).abs().max().item()


@pytest.mark.comfyui
@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_single_file_round_trip(single_files, char_tokenizer, arch, suffix):
    path = single_files[arch, suffix]
    original = _parts(arch)
    base = load_base_model(path, tokenizer_dir=char_tokenizer)

    variant = "SD1.x-like (custom size)" if arch == "sd1" else "SDXL-like (custom size)"
    assert base.info == ModelInfo(arch, variant, "epsilon") == inspect_model(path)
    assert base.name == f"tiny_{arch}" and base.source == path
    assert base.sha256() == file_sha256(path)
    assert_frozen_fp32(base)
    assert base.noise_scheduler.config.beta_schedule == "scaled_linear"
    assert base.noise_scheduler.config.beta_start == pytest.approx(0.00085)
    assert base.noise_scheduler.config.beta_end == pytest.approx(0.012)
    assert base.vae.config.scaling_factor == pytest.approx(0.18215 if arch == "sd1" else 0.13025)

    torch.manual_seed(0)
    context_dim = original["unet"].config.cross_attention_dim
    latents, timesteps, context = torch.randn(2, 4, 8, 8), torch.tensor([10, 900]), torch.randn(2, 77, context_dim)
    added = {}
    if arch == "sdxl":
        added = {"added_cond_kwargs": {"text_embeds": torch.randn(2, 32), "time_ids": torch.randn(2, 6) * 100}}
    image = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        assert _max_diff(base.unet(latents, timesteps, context, **added).sample,
                         original["unet"](latents, timesteps, context, **added).sample) < TOLERANCE
        ours, theirs = base.vae.encode(image).latent_dist, original["vae"].encode(image).latent_dist
        assert _max_diff(ours.mean, theirs.mean) < TOLERANCE and _max_diff(ours.logvar, theirs.logvar) < TOLERANCE
        assert _max_diff(base.vae.decode(ours.mean).sample, original["vae"].decode(ours.mean).sample) < TOLERANCE

        if arch == "sdxl":  # the second encoder pads with "!" whatever the tokenizer folder says
            assert base.tokenizers[1].pad_token == "!" and base.tokenizers[0].pad_token == "<|endoftext|>"
        names = ["text_encoder", "text_encoder_2"][:len(base.text_encoders)]
        for encoder, tokenizer, name in zip(base.text_encoders, base.tokenizers, names, strict=True):
            assert type(encoder) is type(original[name])
            assert tokenizer.model_max_length == 77
            ids = tokenize(tokenizer, "a photo of sks dog")
            ours, theirs = encoder(ids, output_hidden_states=True), original[name](ids, output_hidden_states=True)
            assert _max_diff(ours.last_hidden_state, theirs.last_hidden_state) < TOLERANCE
            assert _max_diff(ours.hidden_states[-2], theirs.hidden_states[-2]) < TOLERANCE
            assert _max_diff(ours[1], theirs[1]) < TOLERANCE  # pooled / projected text embedding


@pytest.mark.comfyui
def test_single_file_v_pred_marker(ldm, tmp_path, char_tokenizer):
    checkpoint = ldm.ldm_checkpoint(_parts("sd1"), "sd1")
    checkpoint["v_pred"] = torch.tensor([])  # how ComfyUI and kohya mark v-prediction checkpoints
    checkpoint["ztsnr"] = torch.tensor([])   # ... and a zero-terminal-SNR schedule
    path = ldm.write_checkpoint(checkpoint, tmp_path / "vpred.safetensors")
    assert inspect_model(path).prediction_type == "v_prediction"
    scheduler = load_base_model(path, tokenizer_dir=char_tokenizer).noise_scheduler
    assert scheduler.config.prediction_type == "v_prediction" and scheduler.config.rescale_betas_zero_snr
    assert scheduler.alphas_cumprod[-1] < 1e-6
    assert inspect_model(path, prediction_type="epsilon").prediction_type == "epsilon"  # an explicit choice wins

    del checkpoint["v_pred"], checkpoint["ztsnr"]
    path = ldm.write_checkpoint(checkpoint, tmp_path / "eps.ckpt")
    assert inspect_model(path).prediction_type == "epsilon"
    assert inspect_model(path, prediction_type="v_prediction").prediction_type == "v_prediction"


class NotJustWeights:
    """Stands for the training objects some old .ckpt files pickle beside their weights."""


def test_ckpt_with_pickled_objects_is_refused(tmp_path):
    path = tmp_path / "unsafe.ckpt"
    torch.save({"state_dict": {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1)},
                "hyper_parameters": NotJustWeights()}, path)
    for call in (inspect_model, load_base_model):
        with pytest.raises(ModelError, match=r"unsafe\.ckpt.*pickled Python objects.*NotJustWeights.*\.safetensors"):
            call(path)


@pytest.mark.comfyui
def test_tokenizer_that_does_not_fit_the_encoder(single_files, comfyui):
    # ComfyUI's CLIP tokenizer has 49408 tokens; the tiny encoder knows 514.
    with pytest.raises(ModelError, match=r"tiny_sd1\.safetensors.*49408 tokens.*514.*do not belong together"):
        load_base_model(single_files["sd1", ".safetensors"], tokenizer_dir=models.comfyui_tokenizer_dir())


# ---------------------------------------------------------------------------------------------
# Detection from shapes alone: real architectures on the meta device
# ---------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _full_size_shapes(name: str) -> dict:
    import ldm_checkpoints

    return ldm_checkpoints.full_size_shapes(name)


FULL_SIZE = [("SD1.x", "sd1", "SD1.x"), ("BK-SDM-Base", "sd1", "BK-SDM (pruned SD1.x)"),
             ("BK-SDM-Small", "sd1", "BK-SDM (pruned SD1.x)"), ("SDXL", "sdxl", "SDXL"), ("SSD-1B", "sdxl", "SSD-1B"),
             ("Segmind Vega", "sdxl", "Segmind Vega"), ("KOALA-700M", "sdxl", "KOALA-700M")]
COMFY_CLASS = {"SD1.x": "SD15", "SDXL": "SDXL", "SSD-1B": "SSD1B", "Segmind Vega": "Segmind_Vega",
               "KOALA-700M": "KOALA_700M"}


def _attention_heads(unet) -> dict[str, int]:
    from diffusers.models.attention_processor import Attention

    return {name: m.heads for name, m in unet.named_modules() if isinstance(m, Attention)}


@pytest.mark.comfyui
@pytest.mark.parametrize("name,arch,variant", FULL_SIZE, ids=[f[0] for f in FULL_SIZE])
def test_detects_full_size_architectures(ldm, name, arch, variant):
    import comfy.model_detection
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL

    shapes = _full_size_shapes(name)
    if name in COMFY_CLASS:  # ComfyUI itself sees these shapes as that model: the test data is right
        meta = {k: torch.empty(v, device="meta") for k, v in shapes.items()}
        assert type(comfy.model_detection.model_config_from_unet(meta, "model.diffusion_model.")).__name__ == \
            COMFY_CLASS[name]

    found = detect_architecture(shapes, name)
    assert (found.arch, found.variant, found.v_prediction) == (arch, variant, False)

    # The UNet built from the inferred config is the original, parameter for parameter and head for head.
    original, rebuilt = ldm.meta_unet(ldm.UNET_CONFIGS[name]), ldm.meta_unet(found.unet_config)
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == \
        {k: v.shape for k, v in original.state_dict().items()}
    assert _attention_heads(rebuilt) == _attention_heads(original)
    assert found.unet_config["use_linear_projection"] == (arch == "sdxl")
    if arch == "sdxl":
        assert found.unet_config["addition_time_embed_dim"] == 256
        assert found.unet_config["projection_class_embeddings_input_dim"] == 2816

    with init_empty_weights():
        vae = AutoencoderKL(**found.vae_config)
        original_vae = AutoencoderKL(**ldm.SD_VAE)
    assert {k: v.shape for k, v in vae.state_dict().items()} == \
        {k: v.shape for k, v in original_vae.state_dict().items()}
    assert found.vae_config["scaling_factor"] == (0.18215 if arch == "sd1" else 0.13025)

    expected_encoders = [ldm.CLIP_L] + ([ldm.CLIP_BIG_G] if arch == "sdxl" else [])
    assert len(found.text_encoder_configs) == len(expected_encoders)
    for config, expected in zip(found.text_encoder_configs, expected_encoders, strict=True):
        assert {k: config[k] for k in expected} == expected


@pytest.mark.comfyui
@pytest.mark.parametrize("name,variant", [("SD1.x", "SD1.x"), ("SDXL", "SDXL")])
def test_inspect_reads_only_the_header(ldm, tmp_path, name, variant):
    # A header without any tensor data: inspecting works, so it read nothing else.
    path = ldm.write_safetensors_header(tmp_path / "big.safetensors", _full_size_shapes(name))
    assert inspect_model(path).variant == variant
    vpred = ldm.write_safetensors_header(tmp_path / "big_v.safetensors", {**_full_size_shapes(name), "v_pred": (0,)})
    assert inspect_model(vpred).prediction_type == "v_prediction"
    # Loading needs the data, and says the file is incomplete.
    with pytest.raises(ModelError, match=r"big\.safetensors.*incomplete"):
        load_base_model(path)


def test_detection_from_tiny_shapes_matches_the_tiny_config():
    """Without ComfyUI: hand-written SD1 keys for a two-level UNet give back its config."""
    shapes = {
        "model.diffusion_model.input_blocks.0.0.weight": (32, 4, 3, 3),
        "model.diffusion_model.input_blocks.1.0.in_layers.0.weight": (32,),
        "model.diffusion_model.input_blocks.1.0.out_layers.3.weight": (32, 32, 3, 3),
        "model.diffusion_model.input_blocks.1.1.proj_in.weight": (32, 32, 1, 1),
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (32, 768),
        "model.diffusion_model.input_blocks.2.0.op.weight": (32, 32, 3, 3),
        "model.diffusion_model.input_blocks.3.0.in_layers.0.weight": (32,),
        "model.diffusion_model.input_blocks.3.0.out_layers.3.weight": (64, 64, 3, 3),
        "model.diffusion_model.middle_block.0.in_layers.0.weight": (64,),
        "model.diffusion_model.middle_block.1.proj_in.weight": (64, 64, 1, 1),
        "model.diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_k.weight": (64, 768),
        "model.diffusion_model.middle_block.2.in_layers.0.weight": (64,),
        **{f"model.diffusion_model.output_blocks.{n}.0.in_layers.0.weight": (128,) for n in range(4)},
        **{f"model.diffusion_model.output_blocks.{n}.1.transformer_blocks.0.attn2.to_k.weight": (32, 768)
           for n in (2, 3)},
        **{f"model.diffusion_model.output_blocks.{n}.1.proj_in.weight": (32, 32, 1, 1) for n in (2, 3)},
        "model.diffusion_model.output_blocks.1.1.conv.weight": (64, 64, 3, 3),
        "model.diffusion_model.out.2.weight": (4, 32, 3, 3),
        "first_stage_model.encoder.conv_in.weight": (32, 3, 3, 3),
        "first_stage_model.encoder.down.0.block.0.conv2.weight": (32, 32, 3, 3),
        "first_stage_model.decoder.conv_in.weight": (32, 4, 3, 3),
        "first_stage_model.decoder.conv_out.weight": (3, 32, 3, 3),
        "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": (49408, 768),
        "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight": (77, 768),
        "cond_stage_model.transformer.text_model.encoder.layers.0.mlp.fc1.weight": (3072, 768),
        "cond_stage_model.transformer.text_model.encoder.layers.1.mlp.fc1.weight": (3072, 768),
    }
    found = detect_architecture(shapes)
    assert found.arch == "sd1" and found.variant == "SD1.x-like (custom size)"
    config = found.unet_config
    assert config["block_out_channels"] == (32, 64) and config["layers_per_block"] == 1
    assert config["down_block_types"] == ("CrossAttnDownBlock2D", "DownBlock2D")
    assert config["up_block_types"] == ("UpBlock2D", "CrossAttnUpBlock2D")
    assert config["mid_block_type"] == "UNetMidBlock2DCrossAttn" and config["attention_head_dim"] == 8
    assert config["cross_attention_dim"] == 768 and config["use_linear_projection"] is False
    assert found.text_encoder_configs[0]["num_hidden_layers"] == 2
    assert found.text_encoder_configs[0]["num_attention_heads"] == 12
    assert found.text_encoder_configs[0]["hidden_act"] == "quick_gelu"
    assert found.vae_config["block_out_channels"] == (32,) and found.vae_config["latent_channels"] == 4

    # Remove the VAE or the text encoder: refused, saying what is missing.
    with pytest.raises(ModelError, match="no VAE"):
        detect_architecture({k: v for k, v in shapes.items() if not k.startswith("first_stage_model.")})
    with pytest.raises(ModelError, match="no text encoder"):
        detect_architecture({k: v for k, v in shapes.items() if not k.startswith("cond_stage_model.")})


# ---------------------------------------------------------------------------------------------
# What we cannot train: refused with a message that says what the file is
# ---------------------------------------------------------------------------------------------

NOT_TRAINABLE = {
    "sd3": ({"model.diffusion_model.joint_blocks.0.context_block.attn.qkv.weight": (4608, 1536),
             "model.diffusion_model.x_embedder.proj.weight": (1536, 16, 2, 2)}, "Stable Diffusion 3"),
    "flux": ({"double_blocks.0.img_attn.qkv.weight": (9216, 3072), "img_in.weight": (3072, 64)}, "Flux"),
    "lora_kohya": ({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": (4, 320, 1, 1),
                    "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": (320, 4, 1, 1),
                    "lora_unet_down_blocks_0_attentions_0_proj_in.alpha": ()}, "LoRA"),
    "lora_peft": ({"unet.down_blocks.0.attentions.0.proj_in.lora_A.weight": (4, 320),
                   "unet.down_blocks.0.attentions.0.proj_in.lora_B.weight": (320, 4)}, "LoRA"),
    "lora_diffusers": ({"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_q_lora.down.weight":
                        (4, 320)}, "LoRA"),
    "text_encoder": ({"text_model.embeddings.token_embedding.weight": (49408, 768),
                      "text_model.encoder.layers.0.self_attn.q_proj.weight": (768, 768)}, "text encoder on its own"),
    "unet_only": ({"input_blocks.0.0.weight": (320, 4, 3, 3), "out.2.weight": (4, 320, 3, 3)}, "UNet on its own"),
    "unrelated": ({"fc.weight": (10, 512), "conv1.weight": (64, 3, 7, 7)}, "does not look like a Stable Diffusion"),
    "empty": ({}, "no tensors"),
}


@pytest.mark.parametrize("kind", list(NOT_TRAINABLE))
def test_refuses_what_it_cannot_train(kind):
    shapes, message = NOT_TRAINABLE[kind]
    with pytest.raises(ModelError, match=message):
        detect_architecture(shapes, "some_file.safetensors")


@pytest.mark.comfyui
@pytest.mark.parametrize("kind,message", [
    ("sd2", "Stable Diffusion 2.x.*SD2 is not supported yet"),
    ("refiner", "SDXL refiner"),
    ("inpainting", "9 input channels.*inpainting"),
    ("vae", "VAE on its own"),
])
def test_refuses_full_size_models_it_cannot_train(ldm, tmp_path, kind, message):
    if kind == "sd2":
        shapes = _full_size_shapes("SD2.1")
    elif kind == "refiner":
        shapes = _full_size_shapes("SDXL refiner")
    elif kind == "inpainting":
        shapes = {**_full_size_shapes("SD1.x"), "model.diffusion_model.input_blocks.0.0.weight": (320, 9, 3, 3)}
    else:  # a standalone VAE file has the ldm VAE keys without a prefix
        shapes = {k[len("first_stage_model."):]: v for k, v in _full_size_shapes("SD1.x").items()
                  if k.startswith("first_stage_model.")}
    path = ldm.write_safetensors_header(tmp_path / f"{kind}_model.safetensors", shapes)
    with pytest.raises(ModelError, match=rf"{kind}_model\.safetensors: .*{message}"):
        inspect_model(path)


def test_lora_file_is_named_as_such(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "my_dog.safetensors"
    save_file({"lora_unet_mid_block_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 8),
               "lora_unet_mid_block_attentions_0_proj_in.lora_up.weight": torch.zeros(8, 4)}, str(path))
    for call in (inspect_model, load_base_model):
        with pytest.raises(ModelError, match=r"my_dog\.safetensors: this is a LoRA.*base model"):
            call(path)


def test_unusable_paths(tmp_path):
    with pytest.raises(ModelError, match="no such file"):
        load_base_model(tmp_path / "missing.safetensors")
    (tmp_path / "not_diffusers").mkdir()
    with pytest.raises(ModelError, match="model_index.json"):
        inspect_model(tmp_path / "not_diffusers")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ModelError, match="unknown model file type"):
        inspect_model(tmp_path / "notes.txt")
    (tmp_path / "renamed.safetensors").write_text("this is not a safetensors file at all")
    with pytest.raises(ModelError, match=r"renamed\.safetensors: not a readable safetensors file"):
        inspect_model(tmp_path / "renamed.safetensors")
    (tmp_path / "broken.ckpt").write_bytes(b"\x00garbage")
    with pytest.raises(ModelError, match=r"broken\.ckpt: cannot be read as a PyTorch checkpoint"):
        load_base_model(tmp_path / "broken.ckpt")
    torch.save([torch.zeros(2)], tmp_path / "list.ckpt")
    with pytest.raises(ModelError, match="not a dictionary of weights"):
        inspect_model(tmp_path / "list.ckpt")


def test_folder_with_sd3_pipeline(tmp_path):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusion3Pipeline",
                                                           "transformer": ["diffusers", "SD3Transformer2DModel"]}))
    with pytest.raises(ModelError, match="Stable Diffusion 3"):
        inspect_model(tmp_path)


# ---------------------------------------------------------------------------------------------
# Tokenizers
# ---------------------------------------------------------------------------------------------


def test_tokenizer_resolution_order(tiny_sd1, tiny_sdxl, char_tokenizer, tmp_path, monkeypatch):
    fake_comfy = write_char_tokenizer(tmp_path / "comfy" / "sd1_tokenizer")
    monkeypatch.setattr(tokenizers, "comfyui_tokenizer_dir", lambda: fake_comfy)

    # 1. the tokenizer option, for both SDXL encoders
    assert resolve_tokenizer_dirs("sdxl", char_tokenizer, tiny_sdxl) == [char_tokenizer, char_tokenizer]
    # 2. the diffusers folder's own
    assert resolve_tokenizer_dirs("sd1", None, tiny_sd1) == [tiny_sd1 / "tokenizer"]
    assert resolve_tokenizer_dirs("sdxl", None, tiny_sdxl) == [tiny_sdxl / "tokenizer", tiny_sdxl / "tokenizer_2"]
    # 3. ComfyUI's
    assert resolve_tokenizer_dirs("sd1") == [fake_comfy]
    assert resolve_tokenizer_dirs("sdxl", None, tmp_path) == [fake_comfy, fake_comfy]

    # none at all: each case says which it is and what to set
    monkeypatch.setattr(tokenizers, "comfyui_tokenizer_dir", lambda: None)
    with pytest.raises(ModelError, match=r"model\.safetensors: a single-file checkpoint does not include a CLIP "
                                         r"tokenizer.*`tokenizer` option.*tokenizer\.json, or vocab\.json"):
        resolve_tokenizer_dirs("sd1", source="model.safetensors")
    with pytest.raises(ModelError, match=r"tokenizer option: .*missing is not a folder"):
        resolve_tokenizer_dirs("sd1", tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match=r"tokenizer option: .*empty holds no CLIP tokenizer"):
        resolve_tokenizer_dirs("sd1", tmp_path / "empty")
    no_tokenizer = tmp_path / "no_tokenizer"
    shutil.copytree(tiny_sd1, no_tokenizer, ignore=shutil.ignore_patterns("tokenizer"))
    with pytest.raises(ModelError, match=r"no_tokenizer: this diffusers folder has no usable CLIP tokenizer"):
        resolve_tokenizer_dirs("sd1", None, no_tokenizer)
    # the tokenizer option may name a diffusers folder: its own tokenizer(s)
    assert resolve_tokenizer_dirs("sdxl", tiny_sdxl) == [tiny_sdxl / "tokenizer", tiny_sdxl / "tokenizer_2"]


def keep_only_tokenizer_json(folder: Path) -> Path:
    """Turn a tokenizer folder into what transformers 5 saves: tokenizer.json, no vocab.json / merges.txt.

    (transformers 4 also writes the two older files; they are deleted so the test is the same at every version.)
    """
    from transformers import CLIPTokenizerFast

    CLIPTokenizerFast.from_pretrained(str(folder), local_files_only=True).save_pretrained(str(folder))
    for name in ("vocab.json", "merges.txt"):
        (folder / name).unlink(missing_ok=True)
    assert (folder / "tokenizer.json").is_file()
    return folder


@pytest.fixture(scope="module")
def saved_today(tmp_path_factory) -> dict[str, Path]:
    """arch -> a tiny diffusers folder whose tokenizer(s) hold only tokenizer.json."""
    from comfyui_dreambooth_lora.trainer.tiny import save_tiny_diffusers_model

    folders = {}
    for arch in ("sd1", "sdxl"):
        folder = save_tiny_diffusers_model(tmp_path_factory.mktemp(f"saved_today_{arch}"), arch)
        for name in ("tokenizer", "tokenizer_2")[:2 if arch == "sdxl" else 1]:
            keep_only_tokenizer_json(folder / name)
        folders[arch] = folder
    return folders


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_diffusers_folder_with_only_tokenizer_json_trains_from_the_cli(saved_today, tiny_sd1, tiny_sdxl, arch,
                                                                         tmp_path, monkeypatch):
    from comfyui_dreambooth_lora.trainer import cli
    from comfyui_dreambooth_lora.trainer.tiny import make_demo_dataset

    monkeypatch.setattr(tokenizers, "comfyui_tokenizer_dir", lambda: None)  # no fallback: the folder's own is used
    folder, original = saved_today[arch], {"sd1": tiny_sd1, "sdxl": tiny_sdxl}[arch]
    base, reference = load_base_model(folder), load_base_model(original)
    for tokenizer, expected in zip(base.tokenizers, reference.tokenizers, strict=True):
        assert tokenize(tokenizer, "a photo of sks dog").tolist() == tokenize(expected, "a photo of sks dog").tolist()
        assert tokenizer.pad_token == expected.pad_token
    assert not list(folder.glob("tokenizer*/vocab.json"))

    photos = make_demo_dataset(tmp_path / "photos", count=2, size=32, captions=False)
    run = {"pretrained_model": str(folder), "instance_dir": str(photos), "instance_prompt": "a photo of sks disc",
           "resolution": 32, "bucket_step": 16, "rank": 2, "max_train_steps": 2, "sample_at_end": False,
           "mixed_precision": "no", "output_dir": str(tmp_path / "run"), "output_name": "today"}
    (tmp_path / "run.json").write_text(json.dumps(run))
    assert cli.main(["train", "--config", str(tmp_path / "run.json")]) == 0
    assert (tmp_path / "run" / "today.safetensors").is_file()


def test_tokenizer_option_takes_a_tokenizer_json_folder(saved_today, tmp_path, monkeypatch):
    monkeypatch.setattr(tokenizers, "comfyui_tokenizer_dir", lambda: None)
    bare = tmp_path / "bare"
    shutil.copytree(saved_today["sd1"], bare, ignore=shutil.ignore_patterns("tokenizer"))
    base = load_base_model(bare, tokenizer_dir=saved_today["sd1"] / "tokenizer")
    assert tokenize(base.tokenizers[0], "sks").shape == (1, 77)

    broken = tmp_path / "broken_tokenizer"
    broken.mkdir()
    (broken / "tokenizer.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(ModelError, match=r"tokenizer folder .*broken_tokenizer: cannot be loaded as a CLIP "
                                         r"tokenizer.*set the `tokenizer` option"):
        load_base_model(bare, tokenizer_dir=broken)


def tiny_sd1_shapes() -> dict:
    """Hand-written keys of a one-level SD1-style checkpoint (no ComfyUI needed)."""
    return {"model.diffusion_model.input_blocks.0.0.weight": (32, 4, 3, 3),
            "model.diffusion_model.input_blocks.1.0.in_layers.0.weight": (32,),
            "model.diffusion_model.input_blocks.1.0.out_layers.3.weight": (32, 32, 3, 3),
            "model.diffusion_model.input_blocks.1.1.proj_in.weight": (32, 32, 1, 1),
            "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (32, 32),
            **{f"model.diffusion_model.output_blocks.{n}.0.in_layers.0.weight": (64,) for n in range(2)},
            "model.diffusion_model.out.2.weight": (4, 32, 3, 3),
            "first_stage_model.encoder.conv_in.weight": (32, 3, 3, 3),
            "first_stage_model.encoder.down.0.block.0.conv2.weight": (32, 32, 3, 3),
            "first_stage_model.decoder.conv_in.weight": (32, 4, 3, 3),
            "first_stage_model.decoder.conv_out.weight": (3, 32, 3, 3),
            "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": (514, 32),
            "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight": (77, 32),
            "cond_stage_model.transformer.text_model.encoder.layers.0.mlp.fc1.weight": (64, 32)}


def test_no_tokenizer_fails_before_loading_weights(tmp_path, monkeypatch):
    from ldm_checkpoints import write_safetensors_header

    monkeypatch.setattr(tokenizers, "comfyui_tokenizer_dir", lambda: None)
    # A header without tensor data: reaching the weights would fail with another message.
    path = write_safetensors_header(tmp_path / "model.safetensors", tiny_sd1_shapes())
    assert inspect_model(path).variant == "SD1.x-like (custom size)"
    with pytest.raises(ModelError, match="model.safetensors: a single-file checkpoint does not include a CLIP"):
        load_base_model(path)


@pytest.mark.comfyui
def test_comfyui_tokenizer_is_found_and_capped(comfyui):
    folder = models.comfyui_tokenizer_dir()
    assert folder is not None and folder.name == "sd1_tokenizer" and folder.parent.name == "comfy"
    tokenizer = load_tokenizers([folder])[0]
    check_tokenizers([tokenizer], [(49408, 77)], [folder], "model.safetensors")
    assert tokenizer.model_max_length == 77  # ComfyUI's tokenizer_config says 8192
    assert tokenize(tokenizer, "a photo of sks dog").shape == (1, 77)


# ---------------------------------------------------------------------------------------------
# Weight loading details
# ---------------------------------------------------------------------------------------------


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    ours, theirs = a.state_dict(), b.state_dict()
    return ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_text_model_prefix_either_way():
    """transformers 5 dropped `text_model.` from CLIPTextModel's keys: files with and without it load."""
    from accelerate import init_empty_weights
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from comfyui_dreambooth_lora.trainer.tiny import tiny_text_encoder_config

    reference = CLIPTextModel(tiny_text_encoder_config())
    plain = {k.removeprefix("text_model."): v for k, v in reference.state_dict().items()}
    for weights in (plain, {"text_model." + k: v for k, v in plain.items()}):
        with init_empty_weights():
            model = CLIPTextModel(tiny_text_encoder_config())
        load_weights(model, dict(weights, **{"text_model.embeddings.position_ids": torch.arange(77)}),
                     "text encoder", "x.safetensors")
        assert same_weights(model, reference)

    # CLIPTextModelWithProjection keeps the prefix: files without it load too.
    reference = CLIPTextModelWithProjection(tiny_text_encoder_config())
    with init_empty_weights():
        model = CLIPTextModelWithProjection(tiny_text_encoder_config())
    load_weights(model, {k.removeprefix("text_model."): v for k, v in reference.state_dict().items()},
                 "text encoder 2", "x.safetensors")
    assert same_weights(model, reference)

    with init_empty_weights():
        model = CLIPTextModel(tiny_text_encoder_config())
    broken = dict(plain, extra_weight=torch.zeros(1))
    del broken["final_layer_norm.weight"]
    with pytest.raises(ModelError, match=r"x\.safetensors: the text encoder weights.*1 missing.*final_layer_norm"
                                         r".*1 unexpected.*extra_weight"):
        load_weights(model, broken, "text encoder", "x.safetensors")


# ---------------------------------------------------------------------------------------------
# Non-finite weights
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("part, key", [("vae", "decoder.conv_out.bias"), ("text_encoder", "final_layer_norm.weight"),
                                       ("unet", "conv_in.weight")])
def test_non_finite_weights_in_a_diffusers_folder_are_refused_at_load(tiny_sd1, tmp_path, part, key):
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "broken"
    shutil.copytree(tiny_sd1, folder)
    weights_file = next((folder / part).glob("*.safetensors"))
    weights = load_file(weights_file)
    key = next(k for k in weights if k.endswith(key))
    weights[key] = weights[key].clone()
    weights[key].view(-1)[0] = float("nan")
    save_file(weights, weights_file)
    with pytest.raises(ModelError, match=rf"broken/{part}: the {part} weights are not all finite \(NaN or infinity "
                                         rf"in [\w.]*{key}\).*re-download or re-export the checkpoint"):
        load_base_model(folder)


@pytest.mark.comfyui
def test_non_finite_weights_in_a_single_file_are_refused_with_exit_code_2(single_files, char_tokenizer, tmp_path,
                                                                          capsys):
    from safetensors.torch import load_file, save_file

    from comfyui_dreambooth_lora.trainer import cli
    from comfyui_dreambooth_lora.trainer.tiny import make_demo_dataset

    weights = load_file(single_files["sdxl", ".safetensors"])
    for key in [k for k in weights if k.startswith("conditioner.embedders.1.model.transformer.resblocks.0.attn")][:4]:
        weights[key] = torch.full_like(weights[key], float("inf"))
    save_file(weights, tmp_path / "broken.safetensors")
    run = {"pretrained_model": str(tmp_path / "broken.safetensors"), "tokenizer": str(char_tokenizer),
           "instance_dir": str(make_demo_dataset(tmp_path / "photos", count=1, size=32)),
           "instance_prompt": "a photo of sks disc", "resolution": 32, "bucket_step": 16, "max_train_steps": 1,
           "output_dir": str(tmp_path / "run")}
    (tmp_path / "run.json").write_text(json.dumps(run))
    assert cli.main(["train", "--config", str(tmp_path / "run.json")]) == 2
    message = capsys.readouterr().err
    assert "broken.safetensors: the text_encoder_2 weights are not all finite" in message
    assert "text_model.encoder.layers.0.self_attn" in message and "more)" in message
    assert "re-download or re-export the checkpoint" in message
