"""The declared dependency ranges hold in this environment and the stack works together.

transformers 5.24 broke transformers' own PEFT integration with peft 0.21; when the next
release breaks the stack, these tests say so before a user's install does. And installing
the pack into an up-to-date ComfyUI changes none of the packages ComfyUI already has.
"""

import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent


def declared() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    return [Requirement(r) for r in project["dependencies"]]


def test_installed_versions_are_inside_the_declared_ranges():
    for req in declared():
        if req.marker is not None and not req.marker.evaluate():
            continue
        version = importlib.metadata.version(req.name)
        assert req.specifier.contains(version, prereleases=True), f"{req.name} {version} is outside {req.specifier}"


def test_torch_is_never_a_dependency_and_requirements_txt_agrees():
    names = {r.name.lower() for r in declared()}
    assert not names & {"torch", "torchvision", "torchaudio"}
    lines = [line.strip() for line in (ROOT / "requirements.txt").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    # markers included: on Python 3.10 the pack imports tomli, and ComfyUI users install requirements.txt
    assert {str(Requirement(line)) for line in lines} == {str(r) for r in declared()}


def test_peft_adapters_work_on_transformers_and_diffusers_models():
    import torch
    from peft import LoraConfig, inject_adapter_in_model

    from comfyui_dreambooth_lora.trainer.tiny import build_tiny_components

    parts = build_tiny_components("sd1")
    config = LoraConfig(r=2, lora_alpha=2, target_modules=["q_proj", "v_proj"], init_lora_weights="gaussian")
    inject_adapter_in_model(config, parts["text_encoder"])
    inject_adapter_in_model(LoraConfig(r=2, lora_alpha=2, target_modules=["to_q"], init_lora_weights="gaussian"),
                            parts["unet"])
    names = [n for n, _ in parts["text_encoder"].named_parameters() if "lora_" in n]
    assert len(names) == 2 * 2 * 2  # 2 layers x (q, v) x (A, B)
    assert any("lora_A" in n for n, _ in parts["unet"].named_parameters())
    out = parts["text_encoder"](torch.tensor([[512, 1, 2, 513]]))[0]
    assert torch.isfinite(out).all()


def test_adapters_do_not_need_the_peft_integrations_of_transformers_or_diffusers(monkeypatch):
    # transformers' `add_adapter` refused peft < 0.22 from 5.24 on: the pack must not depend on it (nor diffusers').
    import torch
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from comfyui_dreambooth_lora.trainer.config import TrainConfig
    from comfyui_dreambooth_lora.trainer.export import diffusers_state_dict, kohya_state_dict
    from comfyui_dreambooth_lora.trainer.lora import add_lora, lora_parameters
    from comfyui_dreambooth_lora.trainer.tiny import build_tiny_components

    def refused(*args, **kwargs):
        raise AssertionError("a PEFT integration was used")

    for cls in (UNet2DConditionModel, CLIPTextModel, CLIPTextModelWithProjection):
        for method in ("add_adapter", "set_adapter", "enable_adapters", "disable_adapters", "load_adapter"):
            if hasattr(cls, method):
                monkeypatch.setattr(cls, method, refused)
    parts = build_tiny_components("sdxl")
    encoders = [parts["text_encoder"], parts["text_encoder_2"]]
    config = TrainConfig(pretrained_model="x", instance_dir="x", instance_prompt="x", rank=2, alpha=1.0,
                         train_text_encoder=True, use_dora=True, lora_dropout=0.1)
    add_lora(parts["unet"], encoders, config)
    assert all(lora_parameters(m) for m in (parts["unet"], *encoders))
    assert any(".lora_A.default." in n for n, _ in parts["unet"].named_parameters())
    assert any(".lora_magnitude_vector.default" in n for n, _ in encoders[1].named_parameters())
    keys = kohya_state_dict(parts["unet"], encoders, "sdxl", config, torch.float32)
    assert any(k.startswith("lora_unet_") for k in keys) and any(k.startswith("lora_te2_") for k in keys)
    state, adapter_metadata = diffusers_state_dict(parts["unet"], encoders, torch.float32)
    assert {k.split(".")[0] for k in state} == {k.split(".")[0] for k in adapter_metadata} \
        == {"unet", "text_encoder", "text_encoder_2"}


def test_every_dependency_has_one_floor_that_make_test_oldest_installs():
    from oldest_versions import oldest_versions

    floors = oldest_versions()
    assert {"diffusers", "peft", "transformers", "accelerate", "safetensors", "pillow"} <= floors.keys()
    for req in declared():
        if req.marker is None or req.marker.evaluate():
            assert req.specifier.contains(floors[req.name]), f"{req}: its floor {floors[req.name]} is outside it"


@pytest.mark.skipif(not os.environ.get("DREAMBOOTH_LORA_OLDEST"), reason="only in `make test-oldest`")
def test_the_oldest_run_has_the_floor_of_every_range_installed():
    from packaging.version import Version

    pins = [Requirement(line) for line in Path(os.environ["DREAMBOOTH_LORA_OLDEST"]).read_text().split()]
    assert pins
    for pin in pins:
        pinned = next(iter(pin.specifier)).version
        assert Version(importlib.metadata.version(pin.name)) == Version(pinned), pin


# --- installing the pack into an up-to-date ComfyUI ------------------------------------------------

TORCH_PACKAGES = ("torch", "torchvision", "torchaudio")  # ComfyUI's to choose (a CPU or CUDA build): never upgraded


def _installed(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _pip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True, timeout=1200,
                          env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"})


def _would_change(report: Path, *args: str) -> list[str]:
    """What `pip install --dry-run` with `args` would install, upgrade or downgrade here, as 'name old -> new'."""
    proc = _pip("install", "--dry-run", "--quiet", "--report", str(report), *args)
    assert proc.returncode == 0, f"pip install --dry-run {' '.join(args)} failed:\n{proc.stderr[-3000:]}"
    return [f"{item['metadata']['name']} {_installed(item['metadata']['name'])} -> {item['metadata']['version']}"
            for item in json.loads(report.read_text())["install"]]


@pytest.fixture(scope="module")
def package_index():
    """Skip where the package index cannot be reached (CI can reach it)."""
    # pip falls back quietly to the other indexes it is given (local ones too); -vv logs the page it could not get.
    proc = _pip("index", "versions", "peft", "--retries", "0", "--timeout", "30", "-vv")
    unreachable = [line for line in proc.stdout.splitlines() + proc.stderr.splitlines()
                   if line.startswith("Could not fetch URL http")]
    if proc.returncode != 0 or unreachable:
        pytest.skip("the package index cannot be reached: " + (unreachable or proc.stderr.strip().splitlines())[-1])


@pytest.mark.comfyui
@pytest.mark.skipif(bool(os.environ.get("DREAMBOOTH_LORA_OLDEST")), reason="the floors' venv is old on purpose")
def test_installing_requirements_txt_into_an_up_to_date_comfyui_changes_nothing(package_index, tmp_path):
    from comfyui_source import comfyui_dir

    # This environment must hold ComfyUI's own requirements at their newest (`make test` upgrades it
    # first, torch aside): otherwise a dry run could pass only because an old version satisfies a cap.
    torch_pins = tmp_path / "torch_pins.txt"
    torch_pins.write_text("".join(f"{name}=={_installed(name)}\n" for name in TORCH_PACKAGES
                                  if _installed(name) != "not installed"))
    behind = _would_change(tmp_path / "comfyui.json", "--upgrade", "--upgrade-strategy", "eager", "-c",
                           str(torch_pins), "-r", str(comfyui_dir() / "requirements.txt"))
    assert not behind, ("this environment does not hold ComfyUI's requirements at their newest; pip would change "
                        f"{', '.join(behind)}. Run `make newest`; if it did run, the pack's requirements (or the "
                        "test tools') hold these back: an upper bound to lift.")

    changed = _would_change(tmp_path / "pack.json", "-r", str(ROOT / "requirements.txt"))
    assert not changed, ("installing requirements.txt into an up-to-date ComfyUI would change "
                         f"{', '.join(changed)}: lift the bound in requirements.txt / pyproject.toml that asks for it.")
