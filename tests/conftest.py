"""Shared fixtures: tiny models and generated images, all made locally (HF_HUB_OFFLINE=1)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

sys.path.insert(0, str(Path(__file__).resolve().parent))


def pytest_collection_modifyitems(config, items):
    """At the dependency floors (`make test-oldest`), skip the tests marked `newest_only`."""
    if not os.environ.get("DREAMBOOTH_LORA_OLDEST"):
        return
    skip = pytest.mark.skip(reason="ComfyUI-side behaviour that does not depend on the pack's dependency versions: "
                                   "it runs once, in the newest environment")
    for item in items:
        if "newest_only" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_sd1(tmp_path_factory) -> Path:
    """A tiny SD1.x model as a diffusers folder."""
    from comfyui_dreambooth_lora.trainer.tiny import save_tiny_diffusers_model

    return save_tiny_diffusers_model(tmp_path_factory.mktemp("tiny_sd1"), "sd1")


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """Four small generated pictures of the demo subject, without captions."""
    from comfyui_dreambooth_lora.trainer.tiny import make_demo_dataset

    return make_demo_dataset(tmp_path_factory.mktemp("photos"), count=4, size=32, captions=False)


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory) -> Path:
    """A tiny SDXL model as a diffusers folder."""
    from comfyui_dreambooth_lora.trainer.tiny import save_tiny_diffusers_model

    return save_tiny_diffusers_model(tmp_path_factory.mktemp("tiny_sdxl"), "sdxl")


@pytest.fixture(scope="session")
def comfyui(tmp_path_factory):
    """ComfyUI's source on sys.path, with its CLI arguments parsed for CPU, for `comfy.*` imports."""
    from comfyui_source import comfyui_dir

    path = str(comfyui_dir())
    if path not in sys.path:
        sys.path.insert(0, path)
    argv = sys.argv
    sys.argv = [argv[0], "--cpu"]
    try:
        import comfy.options

        comfy.options.enable_args_parsing()
        import comfy.cli_args  # noqa: F401  (parses --cpu)
        import comfy.lora
        import comfy.model_management  # noqa: F401
    finally:
        sys.argv = argv
    return comfy.lora
