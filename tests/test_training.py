"""The training loop end to end on tiny models: learning, prior preservation, resume, stop, failures."""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from comfyui_dreambooth_lora.trainer import loop
from comfyui_dreambooth_lora.trainer.checkpoints import ResumeError
from comfyui_dreambooth_lora.trainer.config import ConfigError, TrainConfig
from comfyui_dreambooth_lora.trainer.data import DatasetError
from comfyui_dreambooth_lora.trainer.events import EventWriter, read_events
from comfyui_dreambooth_lora.trainer.stop import StopRequest
from comfyui_dreambooth_lora.trainer.tiny import draw_subject_image, make_demo_dataset
from comfyui_dreambooth_lora.trainer.run_folder import checkpoints_dir, events_path, stop_path


def make_config(model: Path, photos: Path, out: Path, **overrides) -> TrainConfig:
    # fp32 unless a test asks: 'auto' picks bf16 on CPUs that have it, and results should not depend on the CPU.
    values = dict(pretrained_model=str(model), instance_dir=str(photos), instance_prompt="a photo of sks disc",
                  resolution=32, bucket_step=16, rank=4, alpha=4.0, learning_rate=1e-3, max_train_steps=6,
                  checkpoint_every=0, sample_at_end=False, output_dir=str(out), output_name="test_lora", seed=7,
                  mixed_precision="no")
    values.update(overrides)
    config = TrainConfig(**values)
    config.validate()
    return config


def lora_file(config: TrainConfig) -> dict[str, torch.Tensor]:
    return load_file(Path(config.output_dir) / f"{config.output_name}.safetensors")


def losses(config: TrainConfig) -> list[float]:
    return [e["loss"] for e in read_events(events_path(config.output_dir)) if e["event"] == "step"]


def record_unet_moves(monkeypatch, order: list[str]) -> None:
    """Append "unet to <device type>" to `order` whenever a UNet is moved (torch's Module.to)."""
    real_to = torch.nn.Module.to

    def to(module, *args, **kwargs):
        if type(module).__name__ == "UNet2DConditionModel":
            device = kwargs.get("device", args[0] if args and not isinstance(args[0], torch.dtype) else None)
            order.append(f"unet to {torch.device(device).type}" if device is not None else "unet cast")
        return real_to(module, *args, **kwargs)

    monkeypatch.setattr(torch.nn.Module, "to", to)


def predict_noise(model: Path, lora: Path | None, images: list, prompt: str, seeds=range(8)):
    """The UNet's noise predictions for `images` noised with fixed seeds and timesteps, and that noise."""
    from comfyui_dreambooth_lora.trainer.conditioning import encode_prompts, tokenize
    from comfyui_dreambooth_lora.trainer.models import load_base_model

    base = load_base_model(model)
    unet = base.unet
    if lora is not None:
        apply_kohya(unet, load_file(lora))
    predictions, noises = [], []
    with torch.no_grad():
        latents = base.vae.encode(to_pixels(images)).latent_dist.mean * base.vae.config.scaling_factor
        ids = [tokenize(t, [prompt] * len(images)) for t in base.tokenizers]
        embeds, _ = encode_prompts(base.info.arch, base.text_encoders, ids)
        for seed in seeds:
            g = torch.Generator().manual_seed(seed)
            noise = torch.randn(latents.shape, generator=g)
            t = torch.randint(0, 1000, (len(images),), generator=g)
            noisy = base.noise_scheduler.add_noise(latents, noise, t)
            predictions.append(unet(noisy, t, embeds).sample)
            noises.append(noise)
    return torch.stack(predictions), torch.stack(noises)


def to_pixels(images: list) -> torch.Tensor:
    return torch.stack([torch.tensor(np.array(im)).permute(2, 0, 1).float() / 127.5 - 1 for im in images])


def eval_loss(model: Path, lora: Path | None, prompt: str) -> float:
    """Denoising loss of `prompt` on square pictures of the subject with fixed noise and timesteps."""
    images = [draw_subject_image((32, 32), seed=i) for i in range(4)]
    predictions, noise = predict_noise(model, lora, images, prompt)
    return torch.nn.functional.mse_loss(predictions, noise).item()


def apply_kohya(unet, sd: dict[str, torch.Tensor]) -> int:
    """W += alpha/rank * up @ down for every UNet module in a kohya file; returns how many."""
    modules = {"lora_unet_" + name.replace(".", "_"): m for name, m in unet.named_modules()}
    applied = 0
    for key in sd:
        if key.endswith(".lora_down.weight") and key.startswith("lora_unet_"):
            stem = key[: -len(".lora_down.weight")]
            down, up = sd[key].float(), sd[stem + ".lora_up.weight"].float()
            scale = sd[stem + ".alpha"].float() / down.shape[0]
            weight = modules[stem].weight
            weight.data += (scale * (up.flatten(1) @ down.flatten(1))).reshape(weight.shape)
            applied += 1
    return applied


CLASS_PROMPT = "a photo of disc"


@pytest.fixture(scope="module")
def class_model(tiny_sd1, tmp_path_factory) -> tuple[Path, Path, list]:
    """A tiny model that knows its class: its UNet fitted to eight class pictures under the class prompt.

    Prior preservation keeps the model near what it already knows about the class, so
    testing it needs a base that knows something; a random UNet has no prior to keep.
    """
    import shutil

    from comfyui_dreambooth_lora.trainer.conditioning import encode_prompts, tokenize
    from comfyui_dreambooth_lora.trainer.models import load_base_model

    root = tmp_path_factory.mktemp("class_model")
    class_dir = root / "class"
    class_dir.mkdir()
    images = [draw_subject_image((32, 32), seed=100 + i, subject=False) for i in range(8)]
    for i, image in enumerate(images):
        image.save(class_dir / f"class_{i:02d}.png")

    base = load_base_model(tiny_sd1)
    with torch.no_grad():
        latents = base.vae.encode(to_pixels(images)).latent_dist.mean * base.vae.config.scaling_factor
        embeds, _ = encode_prompts("sd1", base.text_encoders,
                                   [tokenize(t, [CLASS_PROMPT] * len(images)) for t in base.tokenizers])
    unet = base.unet.train().requires_grad_(True)
    steps = 300
    optimizer = torch.optim.AdamW(unet.parameters(), lr=3e-3, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        noise = torch.randn(latents.shape, generator=g)
        t = torch.randint(0, 1000, (len(images),), generator=g)
        loss = torch.nn.functional.mse_loss(unet(base.noise_scheduler.add_noise(latents, noise, t), t, embeds).sample,
                                            noise)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    model = root / "model"
    shutil.copytree(tiny_sd1, model)
    unet.save_pretrained(model / "unet")
    return model, class_dir, images


# --- learning ----------------------------------------------------------------------------------

def test_short_run_learns_the_subject_and_the_lora_changes_the_output(class_model, photos, tmp_path):
    model = class_model[0]
    config = make_config(model, photos, tmp_path / "run", max_train_steps=150, learning_rate=1e-2)
    result = loop.train(config)
    assert result.status == "done" and result.step == 150
    lora = Path(config.output_dir) / "test_lora.safetensors"
    assert result.lora_files == [lora]
    before = eval_loss(model, None, config.instance_prompt)
    after = eval_loss(model, lora, config.instance_prompt)
    assert after < 0.85 * before, (before, after)
    sd = load_file(lora)
    assert any(k.startswith("lora_unet_") for k in sd)
    assert max(v.abs().max().item() for k, v in sd.items() if "lora_up" in k) > 0  # the LoRA is not a no-op


def test_sdxl_run_trains_and_exports(tiny_sdxl, photos, tmp_path):
    config = make_config(tiny_sdxl, photos, tmp_path / "run", max_train_steps=3, train_text_encoder=True,
                         sample_at_end=True, sample_steps=2, gradient_checkpointing=True, mixed_precision="bf16")
    result = loop.train(config)
    assert result.status == "done" and len(result.samples) == 1 and result.samples[0].exists()
    keys = lora_file(config).keys()
    assert any(k.startswith("lora_te1_") for k in keys) and any(k.startswith("lora_te2_") for k in keys)


def test_bf16_on_the_cpu_trains_like_fp32(tiny_sd1, photos, tmp_path):
    fp32 = make_config(tiny_sd1, photos, tmp_path / "fp32", max_train_steps=4)
    bf16 = dataclasses.replace(fp32, output_dir=str(tmp_path / "bf16"), mixed_precision="bf16")
    loop.train(fp32)
    loop.train(bf16)
    assert losses(bf16) != losses(fp32)  # it did compute in bf16
    assert losses(bf16) == pytest.approx(losses(fp32), rel=0.03)


def test_bf16_run_keeps_lora_weights_fp32_and_samples_and_makes_class_images_in_bf16(tiny_sd1, photos, tmp_path,
                                                                                     monkeypatch):
    config = make_config(tiny_sd1, photos, tmp_path / "bf16", max_train_steps=2, mixed_precision="bf16",
                         sample_at_end=True, sample_steps=2, with_prior_preservation=True, class_prompt=CLASS_PROMPT,
                         class_dir=str(tmp_path / "class"), num_class_images=2, class_sample_steps=2)
    dtypes = []
    real_place, real_generate = loop.place_models, loop.ensure_class_images

    autocast = {"unet": set(), "vae decoder": set()}
    casts = set()  # peft's input casts in the UNet's LoRA layers: off (every UNet call is under autocast)
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")  # the hooks below read the CPU's autocast

    def place(base, device, weight_dtype, **kwargs):
        real_place(base, device, weight_dtype, **kwargs)
        dtypes.append(("placed", base.unet.conv_in.weight.dtype, {p.dtype for p in loop.lora_parameters(base.unet)}))
        casts.update(m.cast_input_dtype_enabled for m in base.unet.modules() if hasattr(m, "cast_input_dtype_enabled"))
        for name, module in (("unet", base.unet), ("vae decoder", base.vae.decoder)):
            module.register_forward_pre_hook(lambda *_, name=name: autocast[name].add(torch.is_autocast_enabled("cpu")))

    def generate(base, *args, **kwargs):
        dtypes.append(("class images", base.unet.conv_in.weight.dtype))
        return real_generate(base, *args, **kwargs)

    monkeypatch.setattr(loop, "place_models", place)
    monkeypatch.setattr(loop, "ensure_class_images", generate)
    result = loop.train(config)
    # frozen weights bf16, trained weights fp32; the class images come from the placed model (on the device)
    assert dtypes == [("placed", torch.bfloat16, {torch.float32}), ("class images", torch.bfloat16)]
    assert len(list((tmp_path / "class").glob("*.png"))) == 2 and len(result.samples) == 1
    # denoising in the training precision; the VAE decodes in its own dtype (SDXL's overflows in fp16)
    assert autocast == {"unet": {True}, "vae decoder": {False}}
    assert casts == {False}


@pytest.mark.parametrize("variant", [dict(use_dora=True), dict(lora_dropout=0.1)])
def test_dora_and_lora_dropout_keep_peft_input_cast(tiny_sd1, photos, tmp_path, monkeypatch, variant):
    # Without the cast, DoRA would take its weight norm in bf16 and dropout would scale by a bf16 1/(1-p).
    casts = set()
    real_place = loop.place_models

    def place(base, *args, **kwargs):
        casts.update(m.cast_input_dtype_enabled for m in base.unet.modules() if hasattr(m, "cast_input_dtype_enabled"))
        return real_place(base, *args, **kwargs)

    monkeypatch.setattr(loop, "place_models", place)
    loop.train(make_config(tiny_sd1, photos, tmp_path / "run", max_train_steps=1, mixed_precision="bf16", **variant))
    assert casts == {True}


def test_unet_norms_compute_in_the_input_dtype_only_under_mixed_precision(tiny_sd1, photos, tmp_path, monkeypatch):
    # CUDA autocast would run them in fp32, casting to and fro (trainer/precision.py, tests/test_precision.py)
    from comfyui_dreambooth_lora.trainer.precision import GroupNormInInputDtype, LayerNormInInputDtype

    seen = {}
    real_place = loop.place_models

    def place(base, *args, **kwargs):
        norms = [m for m in base.unet.modules() if isinstance(m, (torch.nn.GroupNorm, torch.nn.LayerNorm))]
        seen[precision] = {type(m) for m in norms}
        return real_place(base, *args, **kwargs)

    monkeypatch.setattr(loop, "place_models", place)
    for precision in ("no", "bf16"):
        loop.train(make_config(tiny_sd1, photos, tmp_path / precision, max_train_steps=1, mixed_precision=precision))
    assert seen == {"no": {torch.nn.GroupNorm, torch.nn.LayerNorm},
                    "bf16": {GroupNormInInputDtype, LayerNormInInputDtype}}


@pytest.mark.parametrize("on_cpu, native_bf16, cuda_capability, expected", [
    (True, True, None, "bf16"), (True, False, None, "no"),
    (False, False, (9, 0), "bf16"), (False, False, (8, 0), "bf16"),  # H100, A100
    (False, False, (7, 5), "fp16"), (False, False, (7, 0), "fp16"),  # T4, V100: bf16 only emulated
])
def test_auto_precision_is_bf16_only_where_the_hardware_has_it(monkeypatch, on_cpu, native_bf16, cuda_capability,
                                                               expected):
    monkeypatch.setattr(loop, "use_cpu", lambda: on_cpu)
    monkeypatch.setattr(loop, "cpu_has_native_bf16", lambda: native_bf16)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, **k: cuda_capability)
    auto = TrainConfig(pretrained_model="x", instance_dir="x", instance_prompt="x")
    assert loop.resolve_mixed_precision(auto) == expected
    assert loop.resolve_mixed_precision(dataclasses.replace(auto, mixed_precision="no")) == "no"


def test_samples_out_of_gpu_memory_are_skipped_with_a_warning_and_the_lora_is_written_before_them(
        tiny_sd1, photos, tmp_path, monkeypatch):
    config = make_config(tiny_sd1, photos, tmp_path / "run", max_train_steps=2, sample_every=1, sample_at_end=True,
                         sample_steps=2)
    lora = Path(config.output_dir) / f"{config.output_name}.safetensors"
    written_before = []

    def out_of_memory(*args, **kwargs):
        written_before.append(lora.exists())
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(loop, "generate_images", out_of_memory)
    result = loop.train(config)
    assert result.status == "done" and result.samples == [] and lora.exists()
    assert written_before == [False, True]  # step 1's samples, then the end's, after the LoRA
    events = read_events(events_path(config.output_dir))
    skipped = [e["message"] for e in events if e["event"] == "log" and "ran out of memory" in e["message"]]
    assert len(skipped) == 2 and "sample_resolution" in skipped[0]
    assert [e["step"] for e in events if e["event"] == "step"] == [1, 2]  # training went on after step 1's


def test_a_failing_end_sample_fails_the_run_but_keeps_the_lora(tiny_sd1, photos, tmp_path, monkeypatch):
    config = make_config(tiny_sd1, photos, tmp_path / "run", max_train_steps=1, sample_at_end=True, sample_steps=2)
    monkeypatch.setattr(loop, "generate_images", lambda *a, **k: (_ for _ in ()).throw(ValueError("a bug")))
    with pytest.raises(ValueError, match="a bug"):
        loop.train(config)
    assert (Path(config.output_dir) / f"{config.output_name}.safetensors").exists()


def test_trained_models_are_in_train_mode_while_training_and_in_eval_mode_while_sampling(tiny_sd1, photos,
                                                                                         tmp_path, monkeypatch):
    # Train mode is what makes LoRA dropout and gradient checkpointing act (also in the text encoders).
    config = make_config(tiny_sd1, photos, tmp_path / "run", max_train_steps=2, train_text_encoder=True,
                         lora_dropout=0.1, sample_every=1, sample_steps=1)
    seen = []
    real_encode, real_generate = loop.encode_prompts, loop.generate_images

    def encode(arch, encoders, ids):
        seen.append(("encode", [e.training for e in encoders]))
        return real_encode(arch, encoders, ids)

    def generate(base, unet, *args, **kwargs):
        seen.append(("sample", [unet.training, base.text_encoders[0].training]))
        return real_generate(base, unet, *args, **kwargs)

    monkeypatch.setattr(loop, "encode_prompts", encode)
    monkeypatch.setattr(loop, "generate_images", generate)
    loop.train(config)
    assert seen == [("encode", [True]), ("sample", [False, False]), ("encode", [True])], seen


def test_compile_unet_says_before_step_1_that_the_first_step_compiles(tiny_sd1, photos, tmp_path, monkeypatch):
    # Minutes without a step would look like a hang in the node's progress.
    compiled = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda module, *a, **k: compiled.append(type(module).__name__))
    config = make_config(tiny_sd1, photos, tmp_path / "run", max_train_steps=1, compile_unet=True)
    loop.train(config)
    events = read_events(events_path(tmp_path / "run"))
    names = [e["event"] for e in events]
    said = next(i for i, e in enumerate(events) if e["event"] == "log" and "compiles the UNet" in e["message"])
    assert compiled == ["UNet2DConditionModel"] and names.index("start") < said < names.index("step")


@pytest.mark.slow  # compiling the tiny UNet takes ~40 s on 2 cores
def test_compiled_unet_trains_like_eager_and_exports_the_same_keys(tiny_sd1, photos, tmp_path):
    eager = make_config(tiny_sd1, photos, tmp_path / "eager", max_train_steps=3, sample_at_end=True, sample_steps=2)
    compiled = dataclasses.replace(eager, output_dir=str(tmp_path / "compiled"), compile_unet=True)
    loop.train(eager)
    result = loop.train(compiled)
    assert losses(compiled) == pytest.approx(losses(eager), rel=1e-4)
    assert lora_file(compiled).keys() == lora_file(eager).keys()
    assert len(result.samples) == 1  # sampling runs eager (no compile for its shapes)


@pytest.mark.parametrize("train_text_encoder", [False, True], ids=["unet", "text encoder too"])
def test_cached_and_uncached_runs_are_identical(tiny_sd1, photos, tmp_path, train_text_encoder):
    # With the text encoder trained, its LoRA used to learn on step 1 only: the cached embeddings were detached.
    a = make_config(tiny_sd1, photos, tmp_path / "a", cache_latents="yes", max_train_steps=4,
                    train_text_encoder=train_text_encoder)
    b = dataclasses.replace(a, output_dir=str(tmp_path / "b"), cache_latents="no")
    loop.train(a)
    loop.train(b)
    assert losses(a) == pytest.approx(losses(b), rel=1e-5)
    assert any(key.startswith("lora_te") for key in lora_file(a)) == train_text_encoder
    for key, value in lora_file(a).items():
        torch.testing.assert_close(value, lora_file(b)[key])


@pytest.mark.parametrize("cache, warned", [("yes", True), ("auto", False)])
def test_a_forced_cache_with_augmentation_warns_that_the_first_draw_is_reused(tiny_sd1, photos, tmp_path, cache,
                                                                              warned):
    config = make_config(tiny_sd1, photos, tmp_path / "run", max_train_steps=1, flip_p=0.5, cache_latents=cache)
    loop.train(config)
    logs = [e["message"] for e in read_events(events_path(config.output_dir)) if e["event"] == "log"]
    assert any("first draw is cached and reused" in m for m in logs) == warned


def test_offloading_frozen_models_encodes_everything_before_step_1_and_trains_the_same(tiny_sd1, tmp_path, monkeypatch):
    # Several buckets and class images: every (image, bucket) a step can ask for is encoded up front.
    class_dir, instance_dir = tmp_path / "class", tmp_path / "instance"
    class_dir.mkdir()
    instance_dir.mkdir()
    for i in range(3):
        draw_subject_image((32, 32), seed=50 + i, subject=False).save(class_dir / f"c{i}.png")
    for i, size in enumerate([(32, 32), (32, 32), (64, 32), (64, 32)]):  # two buckets: 32x32 and 40x24
        draw_subject_image(size, seed=i).save(instance_dir / f"s{i}.png")
    plain = make_config(tiny_sd1, instance_dir, tmp_path / "plain", max_train_steps=8, bucket_step=8,
                        with_prior_preservation=True,
                        class_prompt=CLASS_PROMPT, class_dir=str(class_dir), num_class_images=3)
    offloaded = dataclasses.replace(plain, output_dir=str(tmp_path / "offloaded"), offload_frozen_models=True,
                                    sample_at_end=True, sample_steps=2)
    loop.train(plain)

    calls = {"vae encoder": 0, "text encoder": 0}
    at = {}
    order = []
    real_place = loop.place_models

    def place(base, device, weight_dtype, unet_waits):
        order.append(f"placed, unet waits: {unet_waits}")
        real_place(base, device, weight_dtype, unet_waits)
        for name, module in (("vae encoder", base.vae.encoder), ("text encoder", base.text_encoders[0])):
            module.register_forward_pre_hook(lambda *_, name=name: calls.__setitem__(name, calls[name] + 1))

    def note(event):
        if event["event"] in ("start", "step"):
            at[event["event"]] = dict(calls)

    # The UNet waits in CPU memory until the VAE has encoded everything (on a GPU, encoding beside it
    # was the run's memory peak). On a CPU machine every device is the CPU: what this can check is
    # the order of the moves; benchmarks/gpu_smoke.py and `bench.py --gpu-session` check it on a GPU.
    real_fill = loop.fill_cache

    def fill(*args, **kwargs):
        order.append("fill cache")
        return real_fill(*args, **kwargs)

    monkeypatch.setattr(loop, "place_models", place)
    monkeypatch.setattr(loop, "fill_cache", fill)
    record_unet_moves(monkeypatch, order)
    events = EventWriter(events_path(offloaded.output_dir))
    events.listeners.append(note)
    result = loop.train(offloaded, events=events)
    start = next(e for e in read_events(events_path(offloaded.output_dir)) if e["event"] == "start")
    device = torch.device(start["device"]).type
    assert order[0] == "placed, unet waits: True"  # in CPU memory (the device on a GPU machine would be cuda)
    assert order[order.index("fill cache") - 1:order.index("fill cache") + 2] == [
        "unet to cpu", "fill cache", f"unet to {device}"], order
    assert len(start["buckets"]) > 1
    # everything encoded before step 1: 4 instance images + 3 class images x each bucket, 2 captions
    assert at["start"] == {"vae encoder": 4 + 3 * len(start["buckets"]), "text encoder": 2}
    assert at["step"] == at["start"]  # no VAE or text-encoder work in any step
    assert len(result.samples) == 1  # sampling brings them back
    assert losses(offloaded) == losses(plain)
    for key, value in lora_file(plain).items():
        torch.testing.assert_close(lora_file(offloaded)[key], value, rtol=0, atol=0)


@pytest.mark.parametrize("batch_size", [1, 4], ids=["repeats in turn", "repeats in one batch"])
def test_each_repeat_of_an_image_is_augmented_afresh(tiny_sd1, tmp_path, monkeypatch, batch_size):
    # Draws were seeded by (epoch, image): all 8 repeats of the image in epoch 0 were one identical sample;
    # then by (micro-batch, image): the copies of it in one batch were.
    photos = tmp_path / "photos"
    photos.mkdir()
    draw_subject_image((96, 48), seed=0).save(photos / "wide.png")
    config = make_config(tiny_sd1, photos, tmp_path / "run", repeats=8, batch_size=batch_size,
                         max_train_steps=8 // batch_size, crop="random", flip_p=0.5, buckets=False)
    from comfyui_dreambooth_lora.trainer.data import ImageDataset

    prepare, seen = ImageDataset.prepare, []

    def recorded(self, *args, **kwargs):
        sample = prepare(self, *args, **kwargs)
        seen.append(sample.crop_top_left)
        return sample
    monkeypatch.setattr(ImageDataset, "prepare", recorded)
    loop.train(config)
    assert len(seen) == 8 and len(set(seen[:max(batch_size, 2)])) > 1  # the first batch (or two steps) already differ
    assert len(set(seen)) > 2


def test_same_seed_repeats_the_run_and_another_seed_does_not(tiny_sd1, photos, tmp_path):
    a = make_config(tiny_sd1, photos, tmp_path / "a", max_train_steps=3, flip_p=0.5)
    loop.train(a)
    loop.train(dataclasses.replace(a, output_dir=str(tmp_path / "b")))
    loop.train(dataclasses.replace(a, output_dir=str(tmp_path / "c"), seed=8))
    assert losses(a) == losses(dataclasses.replace(a, output_dir=str(tmp_path / "b")))
    assert losses(a) != losses(dataclasses.replace(a, output_dir=str(tmp_path / "c")))


# --- prior preservation --------------------------------------------------------------------------

def test_prior_preservation_generates_class_images_once_and_trains_on_them(tiny_sd1, photos, tmp_path, monkeypatch):
    class_dir = tmp_path / "class"
    config = make_config(tiny_sd1, photos, tmp_path / "prior", with_prior_preservation=True, max_train_steps=2,
                         class_prompt="a photo of disc", class_dir=str(class_dir), num_class_images=3,
                         class_sample_steps=2)
    seen = []
    real = loop.diffusion_loss

    def spy(unet, scheduler, latents, embeds, added, cfg, rng, num_instance, **options):
        seen.append((latents.shape[0], num_instance))
        return real(unet, scheduler, latents, embeds, added, cfg, rng, num_instance, **options)

    monkeypatch.setattr(loop, "diffusion_loss", spy)
    loop.train(config)
    made = sorted(class_dir.glob("*.png"))
    assert len(made) == 3
    assert seen == [(2, 1), (2, 1)]  # one instance + one class image per step
    mtimes = [p.stat().st_mtime_ns for p in made]
    loop.train(dataclasses.replace(config, output_dir=str(tmp_path / "again"), num_class_images=4))
    after = sorted(class_dir.glob("*.png"))
    assert len(after) == 4 and [p.stat().st_mtime_ns for p in after[:3]] == mtimes  # reused; only the missing one made


def test_offloading_run_makes_the_same_class_images_and_samples_with_the_models_taking_turns(tiny_sd1, photos,
                                                                                          tmp_path, monkeypatch):
    # On a CPU machine every move is to the CPU: this checks that the stages run in order and change
    # nothing; test_offloaded_models_take_turns_on_the_gpu checks where each stage puts the models.
    stages = []
    real_placement = loop.model_placement

    @contextlib.contextmanager
    def placement(base, unet, device, take_turns, **kwargs):
        with real_placement(base, unet, device, take_turns, **kwargs) as place:
            yield lambda stage: (stages.append(stage if take_turns else f"{stage} (all stay)"), place(stage))

    monkeypatch.setattr(loop, "model_placement", placement)
    runs = {}
    for offload in (False, True):
        config = make_config(tiny_sd1, photos, tmp_path / f"run_{offload}", with_prior_preservation=True,
                             max_train_steps=2, class_prompt="a photo of disc", num_class_images=5,
                             class_dir=str(tmp_path / f"class_{offload}"), class_sample_steps=2,
                             offload_frozen_models=offload, sample_at_end=True, sample_steps=2,
                             validation_prompts=["a photo of sks disc", "a sks disc on a table"])
        stages.clear()
        result = loop.train(config)
        runs[offload] = (sorted(Path(config.class_dir).glob("*.png")), result.samples, list(stages))
    assert len(runs[True][0]) == 5 and len(runs[True][1]) == 2
    for plain, offloaded in zip(runs[False][0] + runs[False][1], runs[True][0] + runs[True][1]):
        assert np.array_equal(np.asarray(Image.open(plain)), np.asarray(Image.open(offloaded)))
    # class images 4 and then 1 per turn of the models (CLASS_IMAGES_PER_MOVE), then the samples at the end
    assert runs[True][2] == ["encode", "denoise", "decode"] * 3
    assert runs[False][2] == ["encode (all stay)", "denoise (all stay)", "decode (all stay)"] * 6


@pytest.mark.parametrize("case", ["class images", "samples", "samples, several processes"])
def test_offloaded_models_take_turns_on_the_gpu(monkeypatch, case):
    # No GPU needed: the moves are recorded, not made, and a model is where its last move sent it.
    from types import SimpleNamespace

    from comfyui_dreambooth_lora.trainer.tiny import build_tiny_components

    parts = build_tiny_components("sdxl")
    base = SimpleNamespace(text_encoders=[parts["text_encoder"], parts["text_encoder_2"]], vae=parts["vae"])
    unet = parts["unet"]
    names = {id(m): n for n, m in [("te1", base.text_encoders[0]), ("te2", base.text_encoders[1]), ("unet", unet),
                                   ("vae", base.vae)]}
    # class images: made before training, the UNet waits in CPU memory; samples: made while it trains on the GPU
    home = {"te1": "cpu", "te2": "cpu", "unet": "cuda", "vae": "cpu"} if case.startswith("samples") else \
        {"te1": "cuda", "te2": "cuda", "unet": "cpu", "vae": "cuda"}
    where = dict(home)
    together = []  # the models on the GPU after every move

    moved = []  # (model, to), only the moves that change where it is

    def to(module, device, *args, **kwargs):
        name, target = names[id(module)], torch.device(device).type
        if where[name] != target:
            moved.append((name, target))
        where[name] = target
        together.append({n for n, d in where.items() if d == "cuda"})
        return module

    monkeypatch.setattr(torch.nn.Module, "to", to)
    monkeypatch.setattr(loop, "_device_of", lambda model: torch.device(home[names[id(model)]]))
    move_unet = case != "samples, several processes"
    resident = set() if move_unet else {"unet"}  # a wrapped UNet stays on the GPU throughout
    on_gpu = {}
    with loop.model_placement(base, unet, torch.device("cuda"), True, move_unet=move_unet) as place:
        for stage in ("encode", "denoise", "decode"):
            place(stage)
            on_gpu[stage] = {n for n, d in where.items() if d == "cuda"}
    assert on_gpu == {"encode": {"te1", "te2"} | resident, "denoise": {"unet"}, "decode": {"vae"} | resident}
    stage_of = {"te1": "encode", "te2": "encode", "unet": "denoise", "vae": "decode"}
    start = {n for n, d in home.items() if d == "cuda"}
    # never more on the GPU than at the start or than one stage's models: out first, then in
    assert all(models <= start or len({stage_of[n] for n in models - resident}) <= 1 for models in together)
    assert where == home  # and back, those leaving the GPU first
    if case == "samples":  # the training UNet leaves for the encoding and the decoding
        assert [m for m in moved if m[0] == "unet"] == [("unet", "cpu"), ("unet", "cuda")] * 2
    with pytest.raises(RuntimeError):  # a stage that fails still puts every model back
        with loop.model_placement(base, unet, torch.device("cuda"), True, move_unet=move_unet) as place:
            place("encode")
            place("denoise")
            raise RuntimeError("out of memory")
    assert where == home
    with loop.model_placement(base, unet, torch.device("cuda"), False) as place:  # not offloading: nothing moves
        moves = len(together)
        for stage in ("encode", "denoise", "decode"):
            place(stage)
    assert len(together) == moves


def test_a_stop_while_making_class_images_keeps_every_image_already_made(tiny_sd1, photos, tmp_path):
    # With offloading, class images come CLASS_IMAGES_PER_MOVE per turn of the models: a stop asked
    # at the first of them must not drop the others, which are made by then.
    config = make_config(tiny_sd1, photos, tmp_path / "run", with_prior_preservation=True, max_train_steps=2,
                         class_prompt="a photo of disc", class_dir=str(tmp_path / "class"), num_class_images=6,
                         class_sample_steps=2, offload_frozen_models=True)
    events = EventWriter(events_path(config.output_dir))
    events.listeners.append(lambda e: e["event"] == "class_images" and stop_path(config.output_dir).touch())
    result = loop.train(config, events=events)
    assert result.status == "stopped" and result.step == 0
    assert len(list((tmp_path / "class").glob("*.png"))) == loop.CLASS_IMAGES_PER_MOVE == 4


def test_prior_preservation_keeps_the_class_prediction_near_the_base_model(class_model, photos, tmp_path):
    # Training "a photo of sks disc" without the prior drags what the model predicts for
    # "a photo of disc" toward the subject (DreamBooth's language drift); the class loss holds it back.
    model, class_dir, class_images = class_model
    base_prediction, _ = predict_noise(model, None, class_images, CLASS_PROMPT)
    for seed in (1, 2):
        drift = {}
        for prior in (False, True):
            config = make_config(model, photos, tmp_path / f"prior_{prior}_{seed}", max_train_steps=150, seed=seed,
                                 with_prior_preservation=prior, class_prompt=CLASS_PROMPT, class_dir=str(class_dir),
                                 num_class_images=len(class_images))
            loop.train(config)
            prediction, _ = predict_noise(model, Path(config.output_dir) / "test_lora.safetensors", class_images,
                                          CLASS_PROMPT)
            drift[prior] = torch.nn.functional.mse_loss(prediction, base_prediction).item()
        assert drift[True] < 0.5 * drift[False], (seed, drift)


def test_prior_loss_adds_the_weighted_class_loss():
    from diffusers import DDPMScheduler

    from comfyui_dreambooth_lora.trainer.tiny import sd_noise_scheduler_config

    scheduler = DDPMScheduler(**sd_noise_scheduler_config())
    latents = torch.randn(4, 4, 4, 4)
    prediction = torch.randn(4, 4, 4, 4)
    config = TrainConfig(pretrained_model="x", instance_dir="x", instance_prompt="x", prior_loss_weight=0.25)
    rng = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    total = loop.diffusion_loss(EchoUNet(prediction), scheduler, latents, None, None, config, rng(), num_instance=2)
    noise = torch.randn(latents.shape, generator=rng())
    losses = ((prediction - noise) ** 2).mean(dim=(1, 2, 3))
    assert total.item() == pytest.approx((losses[:2].mean() + 0.25 * losses[2:].mean()).item(), rel=1e-5)


# --- checkpoints, resume, stop ----------------------------------------------------------------------

class StopAtStep:
    """An event listener that asks the run to stop after a given step."""

    def __init__(self, stop: StopRequest, step: int):
        self.stop, self.step = stop, step

    def __call__(self, event):
        if event["event"] == "step" and event["step"] == self.step:
            self.stop.request("test")


def test_a_stop_asked_at_the_last_step_finishes_the_run(tiny_sd1, photos, tmp_path):
    # It ended "stopped" with a partial LoRA instead of the finished one (a Cancel in ComfyUI at the end).
    config = make_config(tiny_sd1, photos, tmp_path / "run", max_train_steps=3, sample_at_end=True, sample_steps=1)
    events = EventWriter(events_path(config.output_dir))
    stop = StopRequest(handle_signals=False)
    events.listeners.append(StopAtStep(stop, 3))
    result = loop.train(config, events=events, stop=stop)
    assert result.status == "done" and result.lora_files[0].name == "test_lora.safetensors"
    assert result.samples == []  # the end samples, which the stop asked not to wait for, are skipped, saying so
    logs = [e["message"] for e in read_events(events_path(config.output_dir)) if e["event"] == "log"]
    assert any("end-of-run samples are skipped" in m for m in logs)


def test_stop_then_resume_equals_one_uninterrupted_run(tiny_sd1, photos, tmp_path):
    common = dict(max_train_steps=7, gradient_accumulation_steps=2, batch_size=2, lr_scheduler="cosine",
                  lr_warmup_steps=2, flip_p=0.5, lora_dropout=0.1, checkpoint_every=3, snr_gamma=5.0)
    whole = make_config(tiny_sd1, photos, tmp_path / "whole", **common)
    loop.train(whole)

    parts = make_config(tiny_sd1, photos, tmp_path / "parts", **common)
    events = EventWriter(events_path(parts.output_dir))
    stop = StopRequest(handle_signals=False)
    events.listeners.append(StopAtStep(stop, 4))
    first = loop.train(parts, events=events, stop=stop)
    assert first.status == "stopped" and first.step == 4
    assert first.checkpoint.name == "step_00000004" and (first.checkpoint / "lora.safetensors").exists()
    assert first.lora_files[0].name == "test_lora_step000004.safetensors"
    assert not (Path(parts.output_dir) / "test_lora.safetensors").exists()
    second = loop.train(dataclasses.replace(parts, resume=True))
    assert second.status == "done" and second.step == 7
    assert losses(parts)[4:] == pytest.approx(losses(whole)[4:], rel=1e-5)
    for key, value in lora_file(whole).items():
        torch.testing.assert_close(lora_file(parts)[key], value, rtol=0, atol=1e-6)
    kept = sorted(p.name for p in checkpoints_dir(parts.output_dir).iterdir())
    assert kept == ["step_00000006", "step_00000007"]  # keep_checkpoints = 2


def checkpoint_names(config: TrainConfig) -> list[str]:
    return sorted(p.name for p in checkpoints_dir(config.output_dir).iterdir())


def test_a_fresh_run_refuses_an_earlier_runs_checkpoints_and_overwrite_deletes_them(tiny_sd1, photos, tmp_path):
    earlier = make_config(tiny_sd1, photos, tmp_path / "run", max_train_steps=4, checkpoint_every=2)
    loop.train(earlier)
    (Path(earlier.output_dir) / "test_lora.safetensors").unlink()  # as a stopped run leaves it: no final LoRA
    fresh = dataclasses.replace(earlier, seed=8, max_train_steps=8)
    with pytest.raises(loop.TrainingError, match=r"checkpoints of an earlier run \(step_00000002, step_00000004\)"):
        loop.train(fresh)
    assert checkpoint_names(earlier) == ["step_00000002", "step_00000004"]
    with pytest.raises(DatasetError):  # a run that fails to start (a typo in instance_dir) deletes nothing
        loop.train(dataclasses.replace(fresh, overwrite=True, instance_dir=str(tmp_path / "typo")))
    assert checkpoint_names(earlier) == ["step_00000002", "step_00000004"]

    # Before, the earlier run's step 4 outlived this run's stop at step 2, and resume = true resumed from it.
    events = EventWriter(events_path(fresh.output_dir))
    stop = StopRequest(handle_signals=False)
    events.listeners.append(StopAtStep(stop, 2))
    assert loop.train(dataclasses.replace(fresh, overwrite=True), events=events, stop=stop).step == 2
    assert checkpoint_names(fresh) == ["step_00000002"]
    resumed = loop.train(dataclasses.replace(fresh, resume=True))
    assert resumed.status == "done" and resumed.step == 8
    starts = [e for e in read_events(events_path(fresh.output_dir)) if e["event"] == "start"]
    assert starts[-1]["start_step"] == 2


def test_a_checkpoint_overwrite_cannot_delete_fails_the_run(tiny_sd1, photos, tmp_path, monkeypatch):
    # It was ignored: the earlier run's checkpoint stayed, and pruning then deleted this run's own for it.
    config = make_config(tiny_sd1, photos, tmp_path / "run", max_train_steps=2)
    loop.train(config)
    (Path(config.output_dir) / "test_lora.safetensors").unlink()

    def locked(path, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))
    monkeypatch.setattr(loop.shutil, "rmtree", locked)
    with pytest.raises(PermissionError):
        loop.train(dataclasses.replace(config, overwrite=True, seed=8))
    logs = [e["message"] for e in read_events(events_path(config.output_dir)) if e["event"] == "log"]
    assert not any("deleted the checkpoints" in m for m in logs)


def test_resuming_an_older_checkpoint_refuses_the_later_ones_and_overwrite_deletes_them(tiny_sd1, photos, tmp_path):
    config = make_config(tiny_sd1, photos, tmp_path / "run", max_train_steps=6, checkpoint_every=2, keep_checkpoints=5)
    loop.train(config)
    older = checkpoints_dir(config.output_dir) / "step_00000002"
    again = dataclasses.replace(config, resume_from_checkpoint=str(older), keep_checkpoints=1)
    with pytest.raises(loop.TrainingError, match=r"checkpoints after step_00000002, which this run resumes from "
                                                 r"\(step_00000004, step_00000006\)"):
        loop.train(again)
    result = loop.train(dataclasses.replace(again, overwrite=True))
    assert result.step == 6 and result.checkpoint.name == "step_00000006" and result.checkpoint.is_dir()
    assert checkpoint_names(config) == ["step_00000006"]  # written by this run, pruned to 1 by it
    logs = [e["message"] for e in read_events(events_path(config.output_dir)) if e["event"] == "log"]
    assert any("deleted the checkpoints this run did not write (step_00000004, step_00000006)" in m for m in logs)


def test_resume_refuses_a_changed_dataset_and_names_the_changes(tiny_sd1, photos, tmp_path):
    import shutil

    data = tmp_path / "photos"
    shutil.copytree(photos, data)
    config = make_config(tiny_sd1, data, tmp_path / "run", max_train_steps=2)
    loop.train(config)
    names = sorted(p.name for p in data.iterdir())
    (data / names[0]).unlink()
    draw_subject_image((32, 32), seed=9).save(data / "new.png")
    (data / names[1]).with_suffix(".txt").write_text("a photo of sks disc, red", encoding="utf-8")
    with pytest.raises(ResumeError) as e:  # was accepted: the data order and repeats then followed neither run
        loop.train(dataclasses.replace(config, resume=True, max_train_steps=4))
    assert f"added: new.png; removed: {names[0]}; changed (size, repeats, caption or mask): {names[1]}" in str(e.value)


# What every checkpoint records beside the weights and optimizer (made up here: nothing resumes from them).
RECORDED = dict(mixed_precision="no", dataset=[["a.png", 1, 2]], base_model_sha256="0" * 64)


def test_a_checkpoint_without_what_every_checkpoint_records_is_refused_as_from_before_the_release(tmp_path):
    from comfyui_dreambooth_lora.trainer import checkpoints

    state = checkpoints.TrainingState(step=3, epoch=0, position=3, lora={"w": torch.ones(2)}, optimizer={},
                                      lr_scheduler={}, config=TrainConfig().to_dict(), path=tmp_path, **RECORDED)
    path = checkpoints.save_checkpoint(tmp_path, state, {"w": torch.ones(2)}, {})
    assert checkpoints.load_checkpoint(path, TrainConfig()).base_model_sha256 == "0" * 64
    meta = json.loads((path / "trainer_state.json").read_text())
    del meta["base_model_sha256"]
    meta["dataset"] = None
    (path / "trainer_state.json").write_text(json.dumps(meta))
    with pytest.raises(ResumeError, match="development version of the pack before 0.1.0 .*lacks dataset, "
                                          "base_model_sha256\); start a new run"):
        checkpoints.load_checkpoint(path, TrainConfig())


def test_a_checkpoint_keeps_the_fp16_loss_scalers_state(tmp_path):
    # Only the optimizer and scheduler were kept: a resumed fp16 run restarted at scale 65536 and skipped steps.
    from comfyui_dreambooth_lora.trainer import checkpoints

    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    scaler.scale(torch.ones(()))  # (its scale tensor is made on first use)
    scaler.update(new_scale=512.0)
    state = checkpoints.TrainingState(step=3, epoch=0, position=3, lora={"w": torch.ones(2)}, optimizer={},
                                      lr_scheduler={}, config=TrainConfig().to_dict(), path=tmp_path,
                                      scaler=scaler.state_dict(), **RECORDED)
    path = checkpoints.save_checkpoint(tmp_path, state, {"w": torch.ones(2)}, {})
    restored = torch.amp.GradScaler("cpu")
    restored.load_state_dict(checkpoints.load_checkpoint(path, TrainConfig()).scaler)
    assert restored.get_scale() == 512.0


@pytest.mark.parametrize("damaged, message", [("trainer_state.json", "its trainer_state.json cannot be read"),
                                               ("optimizer.pt", "its optimizer.pt or lora_state.safetensors cannot"),
                                               ("lora_state.safetensors", "its optimizer.pt or lora_state.safetensors")])
def test_a_damaged_checkpoint_is_named_with_the_fix(tiny_sd1, photos, tmp_path, damaged, message):
    config = make_config(tiny_sd1, photos, tmp_path / "run", max_train_steps=2, checkpoint_every=1)
    loop.train(config)
    path = checkpoints_dir(config.output_dir) / "step_00000002" / damaged
    path.write_bytes(path.read_bytes()[:10])  # cut short, as by a power loss
    with pytest.raises(ResumeError, match=rf"step_00000002: {message}.*Delete the folder"):
        loop.train(dataclasses.replace(config, resume=True, max_train_steps=3))


def test_a_copy_of_a_checkpoint_folder_is_not_taken_for_one(tiny_sd1, photos, tmp_path):
    import shutil

    config = make_config(tiny_sd1, photos, tmp_path / "run", max_train_steps=2)
    loop.train(config)
    root = checkpoints_dir(config.output_dir)
    shutil.copytree(root / "step_00000002", root / "step_00000002 - Copy")  # a backup, as Explorer names it
    result = loop.train(dataclasses.replace(config, resume=True, max_train_steps=3))  # was a ValueError
    assert result.status == "done" and result.step == 3


def test_a_moved_dataset_resumes_where_its_images_are_the_same(tiny_sd1, photos, tmp_path):
    import shutil

    data = tmp_path / "photos"
    shutil.copytree(photos, data)
    config = make_config(tiny_sd1, data, tmp_path / "run", max_train_steps=2)
    loop.train(config)
    moved = shutil.move(str(data), str(tmp_path / "elsewhere"))
    result = loop.train(dataclasses.replace(config, instance_dir=moved, resume=True, max_train_steps=3))
    assert result.status == "done" and result.step == 3  # was refused: "instance_dir: checkpoint has ..."


def test_checkpoint_files_are_fsynced_through_handles_windows_accepts(tmp_path, monkeypatch):
    # Windows fsyncs only a file opened for writing: opened read-only, every checkpoint (and so every run) failed.
    import fcntl
    import stat

    from comfyui_dreambooth_lora.trainer import checkpoints

    fsync = os.fsync

    def windows_like_fsync(fd):
        if not stat.S_ISDIR(os.fstat(fd).st_mode) and fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY:
            raise OSError(errno.EBADF, "Bad file descriptor")
        fsync(fd)
    monkeypatch.setattr(os, "fsync", windows_like_fsync)
    state = checkpoints.TrainingState(step=3, epoch=0, position=3, lora={"w": torch.ones(2)}, optimizer={},
                                      lr_scheduler={}, config={}, path=tmp_path, **RECORDED)
    assert checkpoints.save_checkpoint(tmp_path, state, {"w": torch.ones(2)}, {}).is_dir()


def test_checkpoint_files_reach_the_disk_before_the_folder_is_renamed_and_stale_halves_go(tmp_path, monkeypatch):
    from comfyui_dreambooth_lora.trainer import checkpoints

    stale = checkpoints_dir(tmp_path) / ".tmp_step_00000001_99999"  # a process killed while writing
    stale.mkdir(parents=True)
    happened = []
    fsync, replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (happened.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))),
                                                 fsync(fd)))
    monkeypatch.setattr(os, "replace", lambda src, dst: (happened.append(("replace", str(dst))), replace(src, dst)))
    state = checkpoints.TrainingState(step=3, epoch=0, position=3, lora={"w": torch.ones(2)}, optimizer={},
                                      lr_scheduler={}, config={}, path=tmp_path, **RECORDED)
    final = checkpoints.save_checkpoint(tmp_path, state, {"w": torch.ones(2)}, {})
    renamed = happened.index(("replace", str(final)))
    synced_before = {Path(p).name for kind, p in happened[:renamed] if kind == "fsync"}
    assert {p.name for p in final.iterdir()} <= synced_before
    assert ("fsync", str(final.parent)) in happened[renamed:]
    assert not stale.exists()


def test_resume_refuses_a_checkpoint_with_other_training_options(tiny_sd1, photos, tmp_path):
    config = make_config(tiny_sd1, photos, tmp_path / "run", max_train_steps=2)
    loop.train(config)
    with pytest.raises(Exception, match="rank: checkpoint has 4, config has 8"):
        loop.train(dataclasses.replace(config, resume=True, rank=8, alpha=8.0))


@pytest.mark.parametrize("schedule, warned", [("linear", True), ("constant", False)])
def test_a_longer_resumed_run_warns_that_a_decaying_schedule_jumps(tiny_sd1, photos, tmp_path, schedule, warned):
    config = make_config(tiny_sd1, photos, tmp_path / "run", max_train_steps=2, lr_scheduler=schedule)
    loop.train(config)
    loop.train(dataclasses.replace(config, resume=True, max_train_steps=4))
    logs = [e["message"] for e in read_events(events_path(config.output_dir)) if e["event"] == "log"]
    assert any("max_train_steps changed from 2 to 4 on resume" in m for m in logs) == warned


def test_resume_refuses_another_precision_and_accepts_options_added_since(tiny_sd1, photos, tmp_path):
    config = make_config(tiny_sd1, photos, tmp_path / "run", max_train_steps=2, checkpoint_every=1)
    loop.train(config)
    with pytest.raises(Exception, match="precision: checkpoint trained in 'no', this run would compute in 'bf16'"):
        loop.train(dataclasses.replace(config, resume=True, max_train_steps=3, mixed_precision="bf16"))
    # A checkpoint written before an option existed resumes with that option at its default.
    state_file = checkpoints_dir(config.output_dir) / "step_00000002" / "trainer_state.json"
    meta = json.loads(state_file.read_text())
    del meta["config"]["snr_gamma"]
    state_file.write_text(json.dumps(meta))
    result = loop.train(dataclasses.replace(config, resume=True, max_train_steps=3))
    assert result.status == "done" and result.step == 3


def test_stop_file_via_cli_exits_0_with_checkpoint(tiny_sd1, photos, tmp_path):
    config = make_config(tiny_sd1, photos, tmp_path / "run", max_train_steps=500)
    (tmp_path / "run.json").write_text(json.dumps(config.to_dict()))
    out = Path(config.output_dir)
    proc = subprocess.Popen([sys.executable, "-m", "comfyui_dreambooth_lora.trainer", "train", "--config",
                             str(tmp_path / "run.json"), "--events", "stdout"], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    for line in proc.stdout:
        if line.startswith('{"event": "step"'):
            stop_path(out).touch()
            break
    proc.stdout.read()
    assert proc.wait(timeout=120) == 0
    kinds = [e["event"] for e in read_events(events_path(out))]
    assert kinds[:2] == ["loading", "start"] and kinds[-1] == "stopped"
    stopped = read_events(events_path(out))[-1]
    assert Path(stopped["checkpoint"]).is_dir() and Path(stopped["lora"][0]).is_file()


# --- failures ------------------------------------------------------------------------------------

def test_fp16_on_the_cpu_is_refused_before_the_model_loads(tiny_sd1, photos, tmp_path, monkeypatch):
    # It used to load the model and fail in the UNet's first layer ("mat1 and mat2 must have the same dtype").
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")  # on the CPU also where a GPU is
    monkeypatch.setattr(loop, "load_base_model", lambda *a, **k: pytest.fail("the model was loaded"))
    config = make_config(tiny_sd1, photos, tmp_path / "run", mixed_precision="fp16")
    with pytest.raises(loop.TrainingError, match="'fp16' needs a GPU.*'auto', 'bf16' or 'no'"):
        loop.train(config)
    errors = [e for e in map(json.loads, (events_path(tmp_path / "run")).read_text().splitlines())
              if e["event"] == "error"]
    assert len(errors) == 1 and "needs a GPU" in errors[0]["message"]


def test_existing_output_is_refused_unless_overwrite(tiny_sd1, photos, tmp_path):
    config = make_config(tiny_sd1, photos, tmp_path / "run", max_train_steps=1)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "test_lora.safetensors").write_bytes(b"precious")
    with pytest.raises(loop.TrainingError, match="already exists"):
        loop.train(config)
    assert (tmp_path / "run" / "test_lora.safetensors").read_bytes() == b"precious"
    assert loop.train(dataclasses.replace(config, overwrite=True)).status == "done"


def test_nan_loss_stops_names_the_step_and_keeps_the_last_good_checkpoint(tiny_sd1, photos, tmp_path, monkeypatch):
    config = make_config(tiny_sd1, photos, tmp_path / "run", max_train_steps=10, checkpoint_every=2)
    real = loop.diffusion_loss
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        loss = real(*args, **kwargs)
        return loss * float("nan") if calls["n"] == 5 else loss

    monkeypatch.setattr(loop, "diffusion_loss", poisoned)
    with pytest.raises(loop.TrainingError, match="at step 5") as e:
        loop.train(config)
    assert "step_00000004" in str(e.value) and "Lower learning_rate" in str(e.value)  # after 4 updates
    checkpoints = sorted(p.name for p in checkpoints_dir(config.output_dir).iterdir())
    assert checkpoints == ["step_00000002", "step_00000004"]
    assert read_events(events_path(config.output_dir))[-1]["event"] == "error"


def test_nan_loss_before_any_update_blames_the_model_or_data_not_the_learning_rate(tiny_sd1, photos, tmp_path,
                                                                                  monkeypatch):
    config = make_config(tiny_sd1, photos, tmp_path / "run", max_train_steps=3)
    real = loop.diffusion_loss
    monkeypatch.setattr(loop, "diffusion_loss", lambda *a, **k: real(*a, **k) * float("nan"))
    with pytest.raises(loop.TrainingError, match="at step 1") as e:
        loop.train(config)
    assert "No update had happened yet" in str(e.value) and "learning_rate" not in str(e.value)
    assert "base model or the training data" in str(e.value)


def test_lora_weights_broken_by_an_update_are_never_saved(tiny_sd1, photos, tmp_path, monkeypatch):
    # Step 4's loss was finite, but its update made a weight NaN, and step 4's checkpoint held it.
    config = make_config(tiny_sd1, photos, tmp_path / "run", max_train_steps=6, checkpoint_every=2)
    build = loop.build_optimizer

    def breaking_optimizer(config, param_groups, device):
        optimizer, calls = build(config, param_groups, device), {"n": 0}

        def break_a_weight(optimizer, args, kwargs):
            calls["n"] += 1
            if calls["n"] == 4:  # the update of a checkpoint's step: no loss is computed with it before the save
                with torch.no_grad():
                    param_groups[0]["params"][0].fill_(float("nan"))
        optimizer.register_step_post_hook(break_a_weight)
        return optimizer

    monkeypatch.setattr(loop, "build_optimizer", breaking_optimizer)
    with pytest.raises(loop.TrainingError, match=r"stopped being finite by step 4 .*step_00000002"):
        loop.train(config)
    assert checkpoint_names(config) == ["step_00000002"]
    assert not (Path(config.output_dir) / "test_lora.safetensors").exists()


# --- the loss ------------------------------------------------------------------------------------

class EchoUNet(torch.nn.Module):
    """Returns a fixed prediction, to check what the loss compares it with."""

    def __init__(self, prediction):
        super().__init__()
        self.prediction = prediction

    def forward(self, noisy, t, embeds, added_cond_kwargs=None):
        return type("Out", (), {"sample": self.prediction})()


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_loss_target_follows_the_prediction_type(prediction_type):
    from diffusers import DDPMScheduler

    from comfyui_dreambooth_lora.trainer.tiny import sd_noise_scheduler_config

    scheduler = DDPMScheduler(**sd_noise_scheduler_config(prediction_type))
    config = TrainConfig(pretrained_model="x", instance_dir="x", instance_prompt="x")
    latents = torch.randn(2, 4, 4, 4)
    rng = torch.Generator().manual_seed(0)
    noise = torch.randn(latents.shape, generator=rng)
    t = torch.randint(0, 1000, (2,), generator=rng)
    velocity = scheduler.get_velocity(latents, noise, t)
    for prediction, expected_zero in ((noise, prediction_type == "epsilon"), (velocity, prediction_type == "v_prediction")):
        loss = loop.diffusion_loss(EchoUNet(prediction), scheduler, latents, None, None, config,
                                   torch.Generator().manual_seed(0), num_instance=2)
        assert (loss.item() < 1e-10) == expected_zero


def test_min_snr_weights():
    from diffusers import DDPMScheduler

    from comfyui_dreambooth_lora.trainer.tiny import sd_noise_scheduler_config

    scheduler = DDPMScheduler(**sd_noise_scheduler_config())
    t = torch.tensor([0, 500, 999])
    w = loop.min_snr_weights(scheduler, t, gamma=5.0)
    snr = scheduler.alphas_cumprod[t] / (1 - scheduler.alphas_cumprod[t])
    assert w[0] == pytest.approx(5.0 / snr[0].item(), rel=1e-5)  # low noise: high SNR is clipped
    assert w[2] == pytest.approx(1.0)  # high noise: SNR < gamma, weight 1


@pytest.mark.parametrize("prediction_type, last", [("epsilon", 1.0), ("v_prediction", 0.0)])
def test_min_snr_weights_stay_finite_on_a_zero_terminal_snr_schedule(prediction_type, last):
    from diffusers import DDPMScheduler

    from comfyui_dreambooth_lora.trainer.tiny import sd_noise_scheduler_config

    scheduler = DDPMScheduler(**{**sd_noise_scheduler_config(), "rescale_betas_zero_snr": True,
                                 "prediction_type": prediction_type})
    assert scheduler.alphas_cumprod[999] == 0  # its last timestep is pure noise: SNR 0 (the weight was 0/0 = NaN)
    w = loop.min_snr_weights(scheduler, torch.tensor([0, 999]), gamma=5.0)
    assert torch.isfinite(w).all() and w[1].item() == pytest.approx(last, abs=1e-6)


def test_cli_reports_bad_input_with_exit_code_2(tiny_sd1, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (tmp_path / "run.toml").write_text(f'pretrained_model = "{tiny_sd1}"\ninstance_dir = "empty"\n'
                                       'instance_prompt = "a photo of sks disc"\nrank = 0\n')
    run = [sys.executable, "-m", "comfyui_dreambooth_lora.trainer", "train", "--config", str(tmp_path / "run.toml")]
    bad_config = subprocess.run(run, capture_output=True, text=True)
    assert bad_config.returncode == 2 and "rank: 0 is below the minimum 1" in bad_config.stderr
    no_images = subprocess.run(run + ["--set", "rank=4"], capture_output=True, text=True)
    assert no_images.returncode == 2 and str(empty) in no_images.stderr
    no_equals = subprocess.run(run + ["--set", "rank"], capture_output=True, text=True)
    assert no_equals.returncode == 2 and "--set expects KEY=VALUE" in no_equals.stderr
    bad_network = subprocess.run(run + ["--set", "network=foo", "--set", "lokr_factor=0"], capture_output=True,
                                 text=True)
    assert bad_network.returncode == 2
    assert "network: 'foo' is not allowed; choose one of 'lora', 'loha', 'lokr'" in bad_network.stderr
    assert "lokr_factor: 0 splits nothing" in bad_network.stderr


def test_cli_refusals_before_training_are_bad_input_too(tiny_sd1, photos, tmp_path):
    # the trainer's own refusals (an existing LoRA, fp16 on the CPU) exit 2 as docs/cli.md says, not 1
    config = make_config(tiny_sd1, photos, tmp_path / "run")
    (tmp_path / "run.json").write_text(json.dumps(config.to_dict()))
    (tmp_path / "run" / "test_lora.safetensors").parent.mkdir(parents=True)
    (tmp_path / "run" / "test_lora.safetensors").write_bytes(b"")
    run = [sys.executable, "-m", "comfyui_dreambooth_lora.trainer", "train", "--config", str(tmp_path / "run.json")]
    exists = subprocess.run(run, capture_output=True, text=True)
    assert exists.returncode == 2 and "already exists" in exists.stderr
    fp16 = subprocess.run(run + ["--set", "mixed_precision=fp16", "--set", "overwrite=true"],
                          capture_output=True, text=True)
    assert fp16.returncode == 2 and "needs a GPU" in fp16.stderr


@pytest.mark.parametrize("optimizer, package", [("adamw8bit", "bitsandbytes"), ("prodigy", "prodigyopt")])
def test_missing_optional_optimizer_package_is_a_clear_error(optimizer, package, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, package, None)  # as if not installed: importing it raises ImportError
    config = TrainConfig(pretrained_model="x", instance_dir="x", instance_prompt="x", optimizer=optimizer)
    params = [{"params": [torch.nn.Parameter(torch.zeros(2))], "lr": 1e-3}]
    with pytest.raises(loop.InputError, match=f"pip install {package}"):
        loop.build_optimizer(config, params, torch.device("cpu"))
    # train finds it first, before the model loads (not after minutes of class images)
    monkeypatch.setattr(loop, "load_base_model", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(loop.InputError, match=f"pip install {package}"):
        loop.train(dataclasses.replace(config, output_dir=str(tmp_path / "run"), learning_rate=1.0))


def test_rank_larger_than_a_layer_is_bad_input(tiny_sd1, photos, tmp_path):
    config = make_config(tiny_sd1, photos, tmp_path / "run", rank=64, alpha=64.0)
    (tmp_path / "run.json").write_text(json.dumps(config.to_dict()))
    run = subprocess.run([sys.executable, "-m", "comfyui_dreambooth_lora.trainer", "train", "--config",
                          str(tmp_path / "run.json")], capture_output=True, text=True)
    assert run.returncode == 2 and "choose rank <= 32" in run.stderr


def test_stop_file_left_by_an_earlier_run_is_ignored_but_a_new_one_stops_before_training(tiny_sd1, photos, tmp_path):
    config = make_config(tiny_sd1, photos, tmp_path / "run", max_train_steps=2)
    out = Path(config.output_dir)
    out.mkdir()
    stop_path(out).touch()
    os.utime(stop_path(out), (1, 1))  # from long ago
    assert loop.train(config).status == "done"

    stop_path(out).touch()  # a request made after this process started: honoured at once
    result = loop.train(dataclasses.replace(config, output_name="second", overwrite=True))
    assert result.status == "stopped" and result.step == 0
    kinds = [e["event"] for e in read_events(events_path(out))]
    assert kinds[-2:] == ["loading", "stopped"]


def test_resume_takes_the_newest_checkpoint_or_the_one_named_and_a_run_folder_points_at_its_newest(tmp_path):
    from comfyui_dreambooth_lora.trainer.checkpoints import resolve_resume

    for step in (2, 4):
        (checkpoints_dir(tmp_path / "run") / f"step_{step:08d}").mkdir(parents=True)
        (checkpoints_dir(tmp_path / "run") / f"step_{step:08d}" / "trainer_state.json").write_text("{}")
    newest = checkpoints_dir(tmp_path / "run") / "step_00000004"
    for named in (tmp_path / "run", tmp_path / "run" / "checkpoints"):  # the run, or its checkpoints folder
        with pytest.raises(ResumeError, match=rf"not a checkpoint folder.*the newest {re.escape(str(newest))}"):
            resolve_resume(TrainConfig(resume_from_checkpoint=str(named)))
    assert resolve_resume(TrainConfig(resume_from_checkpoint=str(newest))) == newest
    older = checkpoints_dir(tmp_path / "run") / "step_00000002"
    run = str(tmp_path / "run")
    assert resolve_resume(TrainConfig(output_dir=run, resume=True)) == newest
    assert resolve_resume(TrainConfig(output_dir=run, resume=True, resume_from_checkpoint=str(older))) == older
    assert resolve_resume(TrainConfig(output_dir=run)) is None  # resume off: a fresh run (refused later if it would mix)
    with pytest.raises(ResumeError, match="name a checkpoints/step_NNNNNNNN folder"):
        resolve_resume(TrainConfig(resume_from_checkpoint=str(tmp_path)))


def stopped_then_resumed(config: TrainConfig, at: int, **on_resume) -> TrainConfig:
    """Train `config` to a stop after step `at`, then resume it to the end with `on_resume` changed."""
    events = EventWriter(events_path(config.output_dir))
    stop = StopRequest(handle_signals=False)
    events.listeners.append(StopAtStep(stop, at))
    assert loop.train(config, events=events, stop=stop).status == "stopped"
    resumed = dataclasses.replace(config, resume=True, **on_resume)
    assert loop.train(resumed).status == "done"
    return resumed


def assert_same_lora(a: TrainConfig, b: TrainConfig) -> None:
    theirs = lora_file(b)
    for key, value in lora_file(a).items():
        torch.testing.assert_close(theirs[key], value, rtol=0, atol=1e-6)


def test_a_run_resumes_with_gradient_checkpointing_turned_on(tiny_sd1, tmp_path):
    # what a user does after running out of memory: it was refused as an option "that changes training"
    photos = make_demo_dataset(tmp_path / "photos", count=4, size=32, captions=False)
    whole = make_config(tiny_sd1, photos, tmp_path / "whole", max_train_steps=5, lora_dropout=0.1)
    loop.train(whole)
    parts = make_config(tiny_sd1, photos, tmp_path / "parts", max_train_steps=5, lora_dropout=0.1)
    assert_same_lora(whole, stopped_then_resumed(parts, 2, gradient_checkpointing=True))


# The text encoders' adapters are saved and restored alike for every network: one case trains them (slower).
# One case per architecture: LoHa on SD1.x, LoKr on SDXL.
@pytest.mark.parametrize("model, network, tensor, train_text_encoder",
                         [("tiny_sd1", "loha", "hada_w1_a", True), ("tiny_sdxl", "lokr", "lokr_w1", False)])
def test_loha_and_lokr_runs_resume_exactly_and_export_lycoris_files(request, tmp_path, model, network, tensor,
                                                                     train_text_encoder):
    model = request.getfixturevalue(model)
    photos = make_demo_dataset(tmp_path / "photos", count=2, size=32, captions=False)
    common = dict(network=network, lora_targets="all_linear_and_conv", train_text_encoder=train_text_encoder,
                  max_train_steps=4)
    whole = make_config(model, photos, tmp_path / "whole", **common)
    loop.train(whole)
    parts = make_config(model, photos, tmp_path / "parts", **common)
    assert_same_lora(whole, stopped_then_resumed(parts, 2))

    lora = lora_file(whole)
    trained = [key for key in lora if key.endswith("." + tensor)]
    assert any(key.startswith("lora_te_") for key in trained) == train_text_encoder
    assert any("_resnets_" in key for key in trained)
    assert all(lora[key].abs().max() > 0 for key in trained)  # trained away from its zero (LoKr) start
    with safe_open(Path(whole.output_dir) / "test_lora.safetensors", "pt") as file:
        metadata = file.metadata()
    assert metadata["ss_network_module"] == "lycoris.kohya"
    assert json.loads(metadata["ss_network_args"])["algo"] == network


def test_cached_augmented_samples_resume_exactly(tiny_sd1, tmp_path):
    # the cache kept whichever flip the first step to meet an image drew; a resumed run's cache starts empty
    photos = make_demo_dataset(tmp_path / "photos", count=4, size=32, captions=False)
    common = dict(cache_latents="yes", flip_p=0.5, max_train_steps=10)
    whole = make_config(tiny_sd1, photos, tmp_path / "whole", **common)
    loop.train(whole)
    parts = make_config(tiny_sd1, photos, tmp_path / "parts", **common)
    assert_same_lora(whole, stopped_then_resumed(parts, 5))


def test_a_deleted_class_image_is_made_again_under_its_own_name(tiny_sd1, tmp_path):
    photos = make_demo_dataset(tmp_path / "photos", count=2, size=32, captions=False)
    class_dir = tmp_path / "class"
    config = make_config(tiny_sd1, photos, tmp_path / "run1", max_train_steps=1, with_prior_preservation=True,
                         class_prompt="a photo of disc", class_dir=str(class_dir), num_class_images=3,
                         class_sample_steps=1)
    loop.train(config)
    names = ["class_7_00000.png", "class_7_00001.png", "class_7_00002.png"]
    assert sorted(p.name for p in class_dir.iterdir()) == names
    kept = (class_dir / "class_7_00002.png").read_bytes()
    (class_dir / "class_7_00000.png").unlink()
    loop.train(dataclasses.replace(config, output_dir=str(tmp_path / "run2")))
    # was: class_7_00002 made again over the one there, and two class images trained on
    assert sorted(p.name for p in class_dir.iterdir()) == names
    assert (class_dir / "class_7_00002.png").read_bytes() == kept


def test_class_images_are_used_evenly_when_a_batch_is_partial(tiny_sd1, tmp_path, monkeypatch):
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(3):  # batch 2: every epoch ends with a batch of one
        draw_subject_image((32, 32), seed=i).save(photos / f"{i}.png")
    class_dir = tmp_path / "class"
    class_dir.mkdir()
    for i in range(6):
        draw_subject_image((32, 32), seed=50 + i, subject=False).save(class_dir / f"c{i}.png")
    used, encode = [], loop.encode_image

    def record(dataset, index, *args, **kwargs):
        if dataset.scan.folder == class_dir:
            used.append(index)
        return encode(dataset, index, *args, **kwargs)
    monkeypatch.setattr(loop, "encode_image", record)
    config = make_config(tiny_sd1, photos, tmp_path / "run", max_train_steps=6, batch_size=2, cache_latents="no",
                         with_prior_preservation=True, class_prompt="a photo of disc", class_dir=str(class_dir),
                         num_class_images=6)
    loop.train(config)
    counts = [used.count(i) for i in range(6)]
    assert max(counts) - min(counts) <= 1, counts  # was [0, 2, 3, 4, 5, 3, 2, 3, 5]: image 1 never


def test_step_events_report_the_learning_rate_the_step_used(tiny_sd1, photos, tmp_path, monkeypatch):
    used, optimizer_step = [], torch.optim.AdamW.step

    def step(self, *args, **kwargs):
        used.append(self.param_groups[0]["lr"])
        return optimizer_step(self, *args, **kwargs)
    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    config = make_config(tiny_sd1, photos, tmp_path / "run", max_train_steps=4, lr_warmup_steps=2)
    loop.train(config)
    reported = [e["lr"] for e in read_events(events_path(config.output_dir)) if e["event"] == "step"]
    assert reported == pytest.approx(used) and used[0] == 0  # warm-up starts at 0 (was shown as the next step's)


def test_a_resumed_run_stopped_while_loading_names_its_step_and_checkpoint(tiny_sd1, photos, tmp_path):
    config = make_config(tiny_sd1, photos, tmp_path / "run", max_train_steps=6)
    events = EventWriter(events_path(config.output_dir))
    stop = StopRequest(handle_signals=False)
    events.listeners.append(StopAtStep(stop, 3))
    first = loop.train(config, events=events, stop=stop)
    stop = StopRequest(handle_signals=False)
    stop.request("Cancel while loading")
    result = loop.train(dataclasses.replace(config, resume=True), stop=stop)
    stopped = [e for e in read_events(events_path(config.output_dir)) if e["event"] == "stopped"][-1]
    assert result.step == stopped["step"] == 3  # was 0
    assert result.checkpoint == first.checkpoint and stopped["checkpoint"] == str(first.checkpoint)


def test_settings_that_train_nothing_or_cannot_work_are_refused(tmp_path):
    required = dict(pretrained_model="m", instance_dir="i", instance_prompt="p")
    with pytest.raises(ConfigError, match="learning_rate: 0.0 trains nothing"):
        TrainConfig.from_dict({**required, "learning_rate": 0.0})
    with pytest.raises(ConfigError, match="optimizer 'prodigy' scales the step size"):
        TrainConfig.from_dict({**required, "optimizer": "prodigy", "learning_rate": 1e-4})
    TrainConfig.from_dict({**required, "optimizer": "prodigy", "learning_rate": 1.0})
    (tmp_path / "classes").write_text("not a folder")
    with pytest.raises(ConfigError, match="class_dir: .*classes is a file"):  # was an OSError after the model loaded
        TrainConfig.from_dict({**required, "with_prior_preservation": True, "class_prompt": "a photo of dog",
                               "class_dir": str(tmp_path / "classes")})


def test_a_stop_during_the_end_samples_skips_them_and_the_run_is_done(tiny_sd1, photos, tmp_path, monkeypatch):
    # ComfyUI's Cancel while the end samples were made waited for all of them (minutes for SDXL),
    # and a second Cancel then killed a run whose LoRA was complete
    config = make_config(tiny_sd1, photos, tmp_path / "run", max_train_steps=2, sample_at_end=True, sample_steps=2,
                         validation_prompts=["a photo of sks disc", "a red disc"])
    stop = StopRequest(handle_signals=False)
    generate = loop.generate_images

    def cancelled_meanwhile(*args, **kwargs):
        stop.request("Cancel during the samples")
        return generate(*args, **kwargs)
    monkeypatch.setattr(loop, "generate_images", cancelled_meanwhile)
    result = loop.train(config, stop=stop)
    assert result.status == "done" and result.lora_files and result.samples == []
    logs = [e["message"] for e in read_events(events_path(config.output_dir)) if e["event"] == "log"]
    assert any("2 of 2 skipped" in m for m in logs), logs


# --- masked training ---------------------------------------------------------------------------------

def masked_photos(folder: Path, count: int = 4) -> tuple[Path, list]:
    """Pictures of the subject whose right half is noise, another in every picture, with masks that
    keep the left half (white) and ignore the right (black)."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    images = []
    for i in range(count):
        pixels = np.asarray(draw_subject_image((32, 32), seed=i)).copy()
        pixels[:, 16:] = rng.integers(0, 256, (32, 16, 3))
        images.append(Image.fromarray(pixels))
        images[-1].save(folder / f"photo_{i}.png")
        mask = np.zeros((32, 32), np.uint8)
        mask[:, :16] = 255
        Image.fromarray(mask).save(folder / f"photo_{i}_mask.png")
    return folder, images


def test_masked_loss_weights_each_latent_pixel_by_its_masks_area_average():
    from diffusers import DDPMScheduler

    from comfyui_dreambooth_lora.trainer.data import Sample
    from comfyui_dreambooth_lora.trainer.tiny import sd_noise_scheduler_config

    mask = torch.zeros(1, 16, 16)
    mask[:, :8, :8] = 1.0  # a white quarter
    mask[:, 8:12, 8:] = 1.0  # half of each latent pixel of this band is white
    sample = lambda m: Sample(pixels=None, caption="", original_size=(16, 16), crop_top_left=(0, 0),  # noqa: E731
                              target_size=(16, 16), mask=m)
    weights = loop.mask_loss_weights([sample(mask), sample(None)], (2, 2), floor=0.2)
    expected = torch.tensor([[1.0, 0.2], [0.2, 0.2 + 0.8 * 0.5]])
    torch.testing.assert_close(weights, torch.stack([expected[None], torch.ones(1, 2, 2)]))
    assert loop.mask_loss_weights([sample(None)], (2, 2), floor=0.2) is None  # no mask: the plain loss
    assert loop.mask_loss_weights([sample(mask)], (2, 2), floor=1.0) is None  # floor 1: as if there were none

    scheduler = DDPMScheduler(**sd_noise_scheduler_config())
    latents, prediction = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    config = TrainConfig(pretrained_model="x", instance_dir="x", instance_prompt="x", prior_loss_weight=0.5)
    rng = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    class_weights = torch.ones(1, 1, 2, 2)  # class images are never masked
    total = loop.diffusion_loss(EchoUNet(prediction), scheduler, latents, None, None, config, rng(), num_instance=2,
                                loss_weights=torch.cat([weights, class_weights]))
    noise = torch.randn(latents.shape, generator=rng())
    per_sample = (((prediction - noise) ** 2) * torch.cat([weights, class_weights])).mean(dim=(1, 2, 3))
    assert total.item() == pytest.approx((per_sample[:2].mean() + 0.5 * per_sample[2]).item(), rel=1e-5)


def test_what_a_mask_ignores_is_learnt_less(class_model, tmp_path):
    # The right half of every picture is noise, another each time, and the masks ignore it. Trained
    # without masks, the model learns to denoise those halves (its error there falls); with the masks
    # it learns much less there. (The LoRA is shared by all pixels, so it changes the prediction
    # everywhere: what differs is whether the change fits the ignored pixels.)
    model = class_model[0]
    photos, images = masked_photos(tmp_path / "photos")
    base, noise = predict_noise(model, None, images, "a photo of sks disc")
    right = (..., slice(base.shape[-1] // 2, None))
    error_before = torch.nn.functional.mse_loss(base[right], noise[right]).item()
    learnt = {}
    for floor in (0.1, 1.0):  # the default; 1 = as if there were no masks
        config = make_config(model, photos, tmp_path / f"floor_{floor}", max_train_steps=30, learning_rate=1e-2,
                             mask_floor=floor)
        loop.train(config)
        trained, _ = predict_noise(model, Path(config.output_dir) / "test_lora.safetensors", images,
                                   "a photo of sks disc")
        learnt[floor] = error_before - torch.nn.functional.mse_loss(trained[right], noise[right]).item()
    # seen: 0.043 with the masks, 0.064 without (fp32 on a CPU)
    assert learnt[1.0] > 0 and learnt[0.1] < 0.8 * learnt[1.0], learnt


def test_masked_runs_resume_exactly_cache_the_same_and_refuse_a_changed_mask(tiny_sd1, tmp_path):
    photos, _ = masked_photos(tmp_path / "photos")
    Image.fromarray(np.full((32, 32), 128, np.uint8)).save(photos / "photo_3_mask.png")  # grey: a weight between
    common = dict(max_train_steps=5, batch_size=2, crop="random", flip_p=0.5, cache_latents="no")
    whole = make_config(tiny_sd1, photos, tmp_path / "whole", **common)
    loop.train(whole)
    with safe_open(str(Path(whole.output_dir) / "test_lora.safetensors"), "pt") as f:  # as kohya records it
        assert f.metadata()["ss_masked_loss"] == "True"
        assert json.loads(f.metadata()["dreambooth_lora.dataset"])["masked_images"] == 4
    parts = stopped_then_resumed(make_config(tiny_sd1, photos, tmp_path / "parts", **common), 3)
    assert_same_lora(whole, parts)
    assert losses(parts)[3:] == pytest.approx(losses(whole)[3:], rel=1e-5)

    # cached latents keep the masks (at latent resolution): the same run as without the cache
    still = dict(common, crop="center", flip_p=0.0, max_train_steps=3)
    cached = make_config(tiny_sd1, photos, tmp_path / "cached", **{**still, "cache_latents": "yes"})
    uncached = make_config(tiny_sd1, photos, tmp_path / "uncached", **still)
    loop.train(cached)
    loop.train(uncached)
    assert_same_lora(cached, uncached)

    Image.fromarray(np.full((32, 32), 200, np.uint8)).save(photos / "photo_3_mask.png")  # another weight
    with pytest.raises(ResumeError) as e:
        loop.train(dataclasses.replace(parts, max_train_steps=7))
    assert "changed (size, repeats, caption or mask): photo_3.png" in str(e.value)
