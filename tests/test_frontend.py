"""Every shipped workflow through ComfyUI's real frontend, run on a real ComfyUI server.

The server serves the `comfyui-frontend-package` ComfyUI's requirements name; headless
Chromium (the system's `chromium`, driven by playwright) opens it. For each workflow, in a
fresh browser context: the frontend loads the graph (`app.loadGraphData`), every combo value
must be one the server offers, a few widgets are set by name to CPU sizes (as a user would),
and the frontend's own `graphToPrompt()` is queued on the server. The run must succeed and
leave the LoRA in models/loras and every image it reports.

The server is given what the workflows name (a small checkpoint under each checkpoint name,
demo photos under each folder name) by the demo's `provide_workflow_names`. A workflow that
names an SDXL-family checkpoint runs on the small SDXL-family checkpoint (about 2 GiB on disk
and 10 GB of RAM; about a minute on 2 CPU cores, which is why it runs last).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from comfyui_demo import (CPU_DEMO_NAME, CPU_DEMO_VALUES, WORKFLOWS, names_an_sdxl_checkpoint, prepare_demo,
                          provide_workflow_names, write_frontend_settings)
from comfyui_frontend import (PACK_TEMPLATES_LABEL, chromium_path, frontend_prompt, launch_chromium, open_frontend,
                              open_pack_templates)
from comfyui_server import ComfyUIServer, execution_error, frontend_static_dir, workflow_to_api

pytestmark = [
    pytest.mark.comfyui,
    pytest.mark.skipif(chromium_path() is None,
                       reason="no chromium on PATH (Debian: apt-get install chromium); the real-frontend test needs it"),
    # The frontend, the workflows and the server do not depend on the pack's dependency floors (the
    # workflows run at the floors in test_nodes_comfyui.py): `make test-oldest` skips this module.
    pytest.mark.newest_only,
    pytest.mark.skipif(frontend_static_dir() is None,
                       reason="comfyui-frontend-package is not installed (make setup installs requirements-dev.txt)"),
]

WORKFLOW_NAMES = sorted(p.name for p in WORKFLOWS.glob("*.json"))
# Widget values set by name on every node that has them: CPU sizes for a short run (one step, one sample).
CPU_SIZES = {"resolution": 64, "max_train_steps": 1, "width": 64, "height": 64, "steps": 1, "sample_steps": 1,
             "validation_prompts": "a photo of sks dog", "num_class_images": 1, "class_sample_steps": 1,
             "batch_size": 1}


def load_workflow(name: str) -> dict:
    return json.loads((WORKFLOWS / name).read_text(encoding="utf-8"))


def run_order() -> list[str]:
    """Every workflow, those on an SDXL-family checkpoint last: the server then holds the largest
    model only at the end."""
    return sorted(WORKFLOW_NAMES, key=lambda name: names_an_sdxl_checkpoint(load_workflow(name)))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    server = ComfyUIServer(tmp_path_factory.mktemp("comfyui_frontend"), frontend_root=frontend_static_dir())
    server.prepare()
    write_frontend_settings(server.base)
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def browser():
    playwright_api = pytest.importorskip("playwright.sync_api")
    with playwright_api.sync_playwright() as playwright:
        browser = launch_chromium(playwright)
        yield browser
        browser.close()


def test_the_demo_setup_offers_the_names_of_the_sd15_workflow(server):
    """`make comfyui-demo`'s setup: ComfyUI lists the checkpoint and photo folder the SD1.5 template names."""
    added = prepare_demo(server)
    info = server.object_info()
    checkpoints = [p.split("/", 2)[2] for p in added if p.startswith("models/checkpoints/")]
    folders = [p.split("/", 1)[1] for p in added if p.startswith("input/")]
    assert checkpoints and folders, added
    for name in checkpoints:
        assert name in info["CheckpointLoaderSimple"]["input"]["required"]["ckpt_name"][0]
        assert (server.models_dir / "checkpoints" / name).stat().st_size > 100 << 20
    for name in folders:
        assert len(list((server.input_dir / name).glob("*.png"))) >= 4
    saved = server.base / "user" / "default" / "workflows" / f"{CPU_DEMO_NAME}.json"
    assert saved.is_file()
    cpu_prompt = workflow_to_api(json.loads(saved.read_text(encoding="utf-8")), info)
    assert max(node["inputs"].get("max_train_steps", 0) for node in cpu_prompt.values()) == \
        CPU_DEMO_VALUES["max_train_steps"]
    assert all(node["inputs"].get("resolution", 64) == 64 for node in cpu_prompt.values())
    assert prepare_demo(server) == []  # a second start finds everything in place


def test_the_template_browser_shows_the_packs_workflows_under_its_name(server, browser):
    """The frontend titles a pack's template by its file name; the pack's entry is named by locales/en/main.json."""
    templates = server.get("/workflow_templates")
    pack = next(names for module, names in templates.items() if "dreambooth" in module)
    assert sorted(f"{name}.json" for name in pack) == WORKFLOW_NAMES
    page = open_frontend(browser, server.url)
    try:
        open_pack_templates(page)  # fails when no entry is labelled PACK_TEMPLATES_LABEL
        dialog = page.get_by_role("dialog")
        assert dialog.get_by_text(PACK_TEMPLATES_LABEL, exact=True).count() >= 1
        for name in pack:
            card = dialog.get_by_text(name, exact=True).first
            card.scroll_into_view_if_needed()
            assert card.is_visible(), f"the template browser does not show {name}"
    finally:
        page.context.close()


@pytest.mark.parametrize("name", WORKFLOW_NAMES)
def test_the_frontend_makes_the_prompt_the_tests_make(server, browser, name):
    """The frontend's prompt of a shipped workflow is the one `workflow_to_api` (used by the other tests) makes."""
    workflow = load_workflow(name)
    page = open_frontend(browser, server.url)
    try:
        prompt, _ = frontend_prompt(page, workflow)
        errors = list(page.errors)
    finally:
        page.context.close()
    ours = workflow_to_api(workflow, server.object_info())
    assert {k: v["class_type"] for k, v in prompt.items()} == {k: v["class_type"] for k, v in ours.items()}
    for node_id, node in ours.items():
        assert prompt[node_id]["inputs"] == node["inputs"], f"{name}: node {node_id} ({node['class_type']})"
    assert not errors, f"{name}: errors in the page: {errors}"


@pytest.mark.parametrize("name", run_order())
def test_the_workflow_runs_from_the_real_frontend(server, browser, name):
    workflow = load_workflow(name)
    provide_workflow_names(server, workflow)
    output_name = f"frontend_{Path(name).stem}"
    page = open_frontend(browser, server.url)
    try:
        prompt, problems = frontend_prompt(page, workflow, {**CPU_SIZES, "output_name": output_name})
        assert not problems, f"{name}: the frontend shows values the server does not offer: {problems}"
        assert prompt, f"{name}: the frontend made an empty prompt"
        started = time.monotonic()
        entry = server.wait(server.queue(prompt), timeout=1500)
        seconds = time.monotonic() - started
    finally:
        page.context.close()
    error = execution_error(entry)
    assert entry["status"]["status_str"] == "success" and error is None, (
        f"{name}: {error and error.get('node_type')}: {error and error.get('exception_message')}\n"
        + server.log_tail())
    lora = server.models_dir / "loras" / f"{output_name}.safetensors"
    assert lora.is_file() and lora.stat().st_size > 0, f"{name}: no {lora.name} in models/loras"
    images = [image for output in entry["outputs"].values() for image in output.get("images", [])]
    assert images, f"{name}: the run reported no images"
    folders = {"output": server.output_dir, "temp": server.temp_dir}
    for image in images:
        path = folders[image["type"]] / image["subfolder"] / image["filename"]
        assert path.is_file() and path.stat().st_size > 0, f"{name}: {path} is missing"
    print(f"{name}: {seconds:.1f}s from the frontend's prompt to the finished run, {len(images)} images")
