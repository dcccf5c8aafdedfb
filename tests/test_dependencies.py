"""The declared dependency ranges hold in this environment and the stack works together.

transformers 5.24 broke peft 0.21; when the next release breaks the pair, these tests
say so before a user's install does.
"""

import importlib.metadata
import os
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
    lines = [l.strip() for l in (ROOT / "requirements.txt").read_text().splitlines() if l.strip() and not l.startswith("#")]
    # markers included: on Python 3.10 the pack imports tomli, and ComfyUI users install requirements.txt
    assert {str(Requirement(l)) for l in lines} == {str(r) for r in declared()}


def test_peft_adapters_work_on_transformers_and_diffusers_models():
    import torch
    from peft import LoraConfig

    from comfyui_dreambooth_lora.trainer.tiny import build_tiny_components

    parts = build_tiny_components("sd1")
    config = LoraConfig(r=2, lora_alpha=2, target_modules=["q_proj", "v_proj"], init_lora_weights="gaussian")
    parts["text_encoder"].add_adapter(config)
    parts["unet"].add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["to_q"], init_lora_weights="gaussian"))
    names = [n for n, _ in parts["text_encoder"].named_parameters() if "lora_" in n]
    assert len(names) == 2 * 2 * 2  # 2 layers x (q, v) x (A, B)
    assert any("lora_A" in n for n, _ in parts["unet"].named_parameters())
    out = parts["text_encoder"](torch.tensor([[512, 1, 2, 513]]))[0]
    assert torch.isfinite(out).all()


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
