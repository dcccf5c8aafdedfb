"""`make comfyui-demo`: a real ComfyUI with this pack, a small model and demo photos, ready for the SD1.5 template.

    .venv/bin/python tests/comfyui_demo.py [--port 8188] [--base-directory DIR]

starts ComfyUI (the source the tests use, offline, on 127.0.0.1, CPU) with the pack linked
into `custom_nodes`, the real frontend, and prints the address. Open it, choose the pack's
SD1.5 template (Workflow > Browse Templates) and press Run.

The shipped workflows name a checkpoint and photo folders (tests/workflow_builder.py sets
them). `provide_workflow_names` reads them from a workflow through the live `/object_info`
and puts what the server lacks in place: a small SD1.5-shaped (or SDXL-family) checkpoint
under the workflow's checkpoint name, generated demo photos under its folder names. The
real-frontend test prepares its server the same way. The small model has random weights:
its pictures are noise that the LoRA turns towards the demo subject (a red disc with a
yellow star), not photographs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from comfyui_server import (SMALL_SD15_VERSION, SMALL_SDXL_VERSION, ComfyUIServer, _input_spec,  # noqa: E402
                            frontend_static_dir, widget_names, workflow_to_api, write_small_sd15_checkpoint,
                            write_small_sdxl_checkpoint)

REPO = Path(__file__).resolve().parent.parent
# ComfyUI serves either folder as the pack's templates ("example_workflows" is the documented name).
WORKFLOWS = REPO / "example_workflows"  # the folder name ComfyUI serves templates from
# The workflow `make comfyui-demo` and the README are about.
SD15_WORKFLOW = WORKFLOWS / "SD1.5 LoRA from your photos.json"
MODEL_CACHE = REPO / ".cache" / "test_models"
DEMO_BASE = REPO / ".cache" / "comfyui_demo"
# The SD1.5 workflow at sizes the CPU trains in minutes, saved beside the template as a user workflow.
CPU_DEMO_NAME = "DreamBooth LoRA demo (CPU sizes)"
CPU_DEMO_VALUES = {"resolution": 64, "max_train_steps": 60, "width": 64, "height": 64, "steps": 12,
                   "sample_steps": 12, "checkpoint_every": 30}
MODEL_EXTENSIONS = (".safetensors", ".ckpt", ".pt", ".pth", ".bin", ".sft")


def small_sd15_checkpoint() -> Path:
    """The small SD1.5-shaped checkpoint of the tests (full-depth CLIP: ComfyUI's pictures are not NaN), cached."""
    path = MODEL_CACHE / f"small_sd15_v{SMALL_SD15_VERSION}.safetensors"
    if not path.is_file():
        _with_comfyui_on_path()
        write_small_sd15_checkpoint(path)
    return path


def small_sdxl_checkpoint() -> Path:
    """The small SDXL-family checkpoint of the tests (Segmind Vega's depths, about 2 GiB), cached."""
    path = MODEL_CACHE / f"small_sdxl_v{SMALL_SDXL_VERSION}.safetensors"
    if not path.is_file():
        _with_comfyui_on_path()
        write_small_sdxl_checkpoint(path)
    return path


def _with_comfyui_on_path() -> None:
    # ldm_checkpoints converts keys with ComfyUI's own code
    from comfyui_source import comfyui_dir

    if str(comfyui_dir()) not in sys.path:
        sys.path.insert(0, str(comfyui_dir()))


def combo_values(object_info: dict[str, Any], class_type: str, input_name: str) -> list[Any] | None:
    """The choices of a node's combo input (None when the input is no combo)."""
    input_type, options = _input_spec(object_info[class_type], input_name)
    if isinstance(input_type, list):
        return input_type
    if input_type == "COMBO":
        return list(options.get("options") or [])
    return None


def missing_names(workflow: dict[str, Any], object_info: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(node class, input, value) of every combo value in the workflow that the server does not offer.

    Linked inputs (a LoRA name that comes from Train LoRA) are not choices and are skipped.
    """
    missing = []
    for node in workflow_to_api(workflow, object_info).values():
        for name, value in node["inputs"].items():
            if isinstance(value, list):
                continue
            values = combo_values(object_info, node["class_type"], name)
            if values is not None and value not in values:
                missing.append((node["class_type"], name, value))
    return missing


def is_sdxl_name(name: str) -> bool:
    """Whether a checkpoint name is taken for an SDXL-family model (the small SDXL checkpoint stands in for it)."""
    return "xl" in name.lower()


def names_an_sdxl_checkpoint(workflow: dict[str, Any]) -> bool:
    """Whether any widget of the workflow names an SDXL-family checkpoint (no server needed)."""
    return any(isinstance(value, str) and value.lower().endswith(MODEL_EXTENSIONS) and is_sdxl_name(value)
               for node in workflow["nodes"] for value in node.get("widgets_values") or [])


def provide_workflow_names(server: ComfyUIServer, workflow: dict[str, Any]) -> list[str]:
    """Put in place what the workflow names and the server lacks; what was added, as relative paths.

    A model file name becomes a link to the small checkpoint (the SDXL-family one when the
    name says 'xl'); any other missing choice is taken for a photo folder in `input/` and
    filled with demo pictures and captions. Raises ValueError for a name that is neither.
    """
    from comfyui_dreambooth_lora.trainer.tiny import make_demo_dataset

    added = []
    for class_type, name, value in missing_names(workflow, server.object_info()):
        if not isinstance(value, str) or not value or value.startswith(("/", "\\")) or ".." in Path(value).parts:
            raise ValueError(f"{class_type}.{name} = {value!r}: not a name this script can provide")
        if value.lower().endswith(MODEL_EXTENSIONS):
            target = server.models_dir / "checkpoints" / value
            source = small_sdxl_checkpoint() if is_sdxl_name(value) else small_sd15_checkpoint()
            if not target.exists():
                target.parent.mkdir(parents=True, exist_ok=True)
                _link(source, target)
            added.append(f"models/checkpoints/{value}")
        else:
            folder = server.input_dir / value
            if not folder.exists():
                make_demo_dataset(folder, count=6, size=64, captions=True)
            added.append(f"input/{value}")
    return added


def write_frontend_settings(base_dir: Path, **settings: Any) -> None:
    """The default user's frontend settings: first-run dialogs already seen (the graph is what one sees), plus `settings`."""
    from importlib.metadata import version

    path = Path(base_dir) / "user" / "default" / "comfy.settings.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    current = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    seen = {"Comfy.TutorialCompleted": True, "Comfy.InstalledVersion": version("comfyui-frontend-package")}
    path.write_text(json.dumps({**current, **seen, **settings}, indent=2), encoding="utf-8")


def _link(source: Path, target: Path) -> None:
    try:
        target.symlink_to(source)
    except OSError:  # no symlinks (Windows without developer mode)
        shutil.copy(source, target)


def with_widget_values(workflow: dict[str, Any], object_info: dict[str, Any], values: dict[str, Any]) -> dict:
    """A copy of a UI-format workflow with the named widgets set on every node that has them."""
    workflow = json.loads(json.dumps(workflow))
    for node in workflow["nodes"]:
        if node["type"] not in object_info or not isinstance(node.get("widgets_values"), list):
            continue
        position = 0
        for name, has_control in widget_names(object_info[node["type"]]):
            if name in values and position < len(node["widgets_values"]):
                node["widgets_values"][position] = values[name]
            position += 2 if has_control else 1
    return workflow


def prepare_demo(server: ComfyUIServer) -> list[str]:
    """On a started server: the checkpoint and photo folder the SD1.5 workflow names, and the
    workflow at CPU sizes in the user's workflows; what was added."""
    workflow = json.loads(SD15_WORKFLOW.read_text(encoding="utf-8"))
    added = provide_workflow_names(server, workflow)
    info = server.object_info()
    still_missing = missing_names(workflow, info)
    if still_missing:
        raise RuntimeError(f"ComfyUI does not list {still_missing} after they were put in place")
    saved = server.base / "user" / "default" / "workflows" / f"{CPU_DEMO_NAME}.json"
    if not saved.exists():
        saved.parent.mkdir(parents=True, exist_ok=True)
        saved.write_text(json.dumps(with_widget_values(workflow, info, CPU_DEMO_VALUES), indent=1), encoding="utf-8")
        added.append(f"user/default/workflows/{saved.name}")
    return added


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=8188)
    parser.add_argument("--base-directory", type=Path, default=DEMO_BASE,
                        help="ComfyUI's base directory (models/, input/, output/, custom_nodes/); kept between runs")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    frontend = frontend_static_dir()
    if frontend is None:
        print("comfyui-frontend-package is not installed: run `make setup` first", file=sys.stderr)
        return 2
    print("building the small model on first use (about a minute) ...", flush=True)
    small_sd15_checkpoint()
    server = ComfyUIServer(args.base_directory, port=args.port, frontend_root=frontend)
    # `kill` stops the demo as Ctrl+C does: ComfyUI runs in its own session and would outlive us.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    server.prepare()
    write_frontend_settings(server.base)
    server.start()
    try:
        added = prepare_demo(server)
        print(f"\nComfyUI with comfyui-dreambooth-lora is running at {server.url}")
        print(f"  base directory: {server.base}  (log: {server.log_path.name})")
        for path in added:
            print(f"  {path}")
        print("Open it and choose Templates > DreamBooth LoRA > the SD1.5 workflow, press Run. The template's\n"
              "512 px and 800 steps are for a GPU: on the CPU, open Workflows > "
              f"'{CPU_DEMO_NAME}' (the same graph at 64 px, 60 steps;\n"
              "a few minutes) and press Run. Ctrl+C stops the server.", flush=True)
        while server.alive:
            time.sleep(1)
        print("ComfyUI exited:\n" + server.log_tail(), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        server.stop()


if __name__ == "__main__":
    sys.exit(main())
