"""`make screenshots`: the README's pictures, taken in ComfyUI's real frontend.

    .venv/bin/python tests/screenshots.py [--steps 8]

Starts the demo's ComfyUI (tests/comfyui_demo.py: small checkpoint, demo photos, the real
frontend) in a temporary folder, opens the SD1.5 workflow in headless Chromium and saves

- docs/images/workflow_sd15.png: the workflow as the frontend draws it;
- docs/images/samples_sd15.png: what a run gives, queued from the page at CPU sizes: the loss
  curve and the pictures of Train LoRA, DreamBooth Sample and KSampler (the small model has
  random weights: its pictures are noise, not photographs);
- docs/images/templates.png: the template browser with the pack's workflows.

PNGs are reduced to a 256-colour palette to stay small. Needs chromium on PATH.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from comfyui_demo import SD15_WORKFLOW, prepare_demo, write_frontend_settings  # noqa: E402
from comfyui_frontend import (chromium_path, frontend_prompt, launch_chromium, open_frontend,  # noqa: E402
                              open_pack_templates)
from comfyui_server import ComfyUIServer, frontend_static_dir  # noqa: E402

IMAGES = Path(__file__).resolve().parent.parent / "docs" / "images"
GRAPH_VIEWPORT = {"width": 2400, "height": 1350}
# Pictures without the canvas' debug corner and minimap, and with node text drawn at every zoom.
PICTURE_SETTINGS = {"Comfy.Minimap.Visible": False, "Comfy.Graph.CanvasInfo": False,
                    "LiteGraph.Canvas.MinFontSizeForLOD": 0, "Comfy.Workflow.WorkflowTabsPosition": "Sidebar"}
MAX_BYTES = 400 << 10


def save_small_png(source: Path, target: Path, width: int | None = None) -> Path:
    """`source` as a palette PNG (optionally scaled to `width`), written atomically."""
    from PIL import Image

    image = Image.open(source).convert("RGB")
    if width and image.width > width:
        image = image.resize((width, round(image.height * width / image.width)), Image.LANCZOS)
    small = image.quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".tmp")
    small.save(tmp, format="PNG", optimize=True)
    tmp.replace(target)
    size = target.stat().st_size
    print(f"wrote {target.relative_to(IMAGES.parent.parent)} ({image.width}x{image.height}, {size >> 10} KiB)")
    if size > MAX_BYTES:
        print(f"  warning: over {MAX_BYTES >> 10} KiB", file=sys.stderr)
    return target


# The graph's bounds fill the canvas right of the side bar and below the top bar (the
# frontend's own "fit view" leaves a wide margin).
_FIT_GRAPH = """
([left, top, margin]) => {
  const nodes = app.graph.nodes ?? app.graph._nodes;
  const title = 30;
  const x0 = Math.min(...nodes.map((n) => n.pos[0])), y0 = Math.min(...nodes.map((n) => n.pos[1] - title));
  const x1 = Math.max(...nodes.map((n) => n.pos[0] + n.size[0]));
  const y1 = Math.max(...nodes.map((n) => n.pos[1] + n.size[1]));
  const width = window.innerWidth - left - 2 * margin, height = window.innerHeight - top - 2 * margin;
  const scale = Math.min(width / (x1 - x0), height / (y1 - y0));
  const ds = app.canvas.ds;
  ds.scale = scale;
  ds.offset = [(left + margin + (width - scale * (x1 - x0)) / 2) / scale - x0, (top + margin) / scale - y0];
  app.canvas.setDirty(true, true);
  return scale;
}
"""


def fit_view(page) -> None:
    page.evaluate("() => app.canvas.deselectAll?.()")
    scale = page.evaluate(_FIT_GRAPH, [60, 90, 16])
    page.wait_for_timeout(800)
    print(f"graph drawn at {scale:.0%}")


def screenshot(page, target: Path, width: int | None = None) -> Path:
    """The page without passing notifications, as a small PNG."""
    page.evaluate("() => document.querySelectorAll('.p-toast-message').forEach((toast) => toast.remove())")
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "page.png"
        page.screenshot(path=str(raw))
        return save_small_png(raw, target, width)


def run_from_page(page, server: ComfyUIServer, workflow: dict, overrides: dict, timeout: float = 1800) -> dict:
    """Queue the graph from the page (its nodes then show the results) and wait; the history entry."""
    _, problems = frontend_prompt(page, workflow, overrides)
    if problems:
        raise RuntimeError(f"the frontend shows values the server does not offer: {problems}")
    before = set(server.get("/history"))
    page.evaluate("() => app.queuePrompt(0, 1)")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        new = [pid for pid in server.get("/history") if pid not in before]
        if new:
            entry = server.wait(new[0], timeout=max(1.0, deadline - time.monotonic()))
            if entry["status"]["status_str"] != "success":
                raise RuntimeError("the run failed:\n" + server.log_tail())
            return entry
        time.sleep(1)
    raise TimeoutError("the run did not finish:\n" + server.log_tail())


def samples_sheet(server: ComfyUIServer, entry: dict, workflow: dict, target: Path, tile: int = 192) -> Path:
    """The run's pictures side by side, each under its node's title."""
    from PIL import Image, ImageDraw

    titles = {str(n["id"]): n.get("title") or n["type"] for n in workflow["nodes"]}
    folders = {"output": server.output_dir, "temp": server.temp_dir}
    tiles = []
    for node_id, output in entry["outputs"].items():
        for image in output.get("images", []):
            picture = Image.open(folders[image["type"]] / image["subfolder"] / image["filename"]).convert("RGB")
            picture.thumbnail((tile * 2, tile), Image.NEAREST if picture.width <= tile else Image.LANCZOS)
            if picture.height < tile:  # small samples: scale up without blurring
                factor = max(1, tile // picture.height)
                picture = picture.resize((picture.width * factor, picture.height * factor), Image.NEAREST)
            tiles.append((titles.get(node_id, node_id), picture))
    gap, label = 12, 22
    width = sum(p.width for _, p in tiles) + gap * (len(tiles) + 1)
    height = max(p.height for _, p in tiles) + label + 2 * gap
    sheet = Image.new("RGB", (width, height), (32, 32, 32))
    draw = ImageDraw.Draw(sheet)
    x = gap
    for title, picture in tiles:
        draw.text((x, gap), title[:int(picture.width / 6)], fill=(230, 230, 230))
        sheet.paste(picture, (x, gap + label))
        x += picture.width + gap
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "sheet.png"
        sheet.save(raw)
        return save_small_png(raw, target)


def template_browser(page, target: Path) -> Path:
    """The template browser opened on the pack's entry."""
    open_pack_templates(page)
    return screenshot(page, target, width=1400)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=8, help="training steps of the run pictured (CPU: ~10 s each)")
    parser.add_argument("--skip-run", action="store_true", help="only the pictures of the graph and the templates")
    args = parser.parse_args(argv)
    from playwright.sync_api import sync_playwright

    if chromium_path() is None or frontend_static_dir() is None:
        print("needs chromium on PATH and comfyui-frontend-package (make setup)", file=sys.stderr)
        return 2
    workflow = json.loads(SD15_WORKFLOW.read_text(encoding="utf-8"))
    with tempfile.TemporaryDirectory() as base:
        server = ComfyUIServer(Path(base), frontend_root=frontend_static_dir())
        server.prepare()
        write_frontend_settings(server.base, **PICTURE_SETTINGS)
        with server, sync_playwright() as playwright:
            prepare_demo(server)
            browser = launch_chromium(playwright)
            page = open_frontend(browser, server.url, viewport=GRAPH_VIEWPORT)
            page.evaluate("async (workflow) => { await app.loadGraphData(workflow); }", workflow)
            fit_view(page)
            screenshot(page, IMAGES / "workflow_sd15.png")
            overrides = {"resolution": 64, "max_train_steps": args.steps, "width": 64, "height": 64, "steps": 12,
                         "sample_steps": 12, "output_name": "my_dog"}
            if not args.skip_run:
                entry = run_from_page(page, server, workflow, overrides)
                samples_sheet(server, entry, workflow, IMAGES / "samples_sd15.png")
            page.context.close()
            page = open_frontend(browser, server.url, viewport={"width": 1400, "height": 900})
            # behind the dialog, a graph whose models are present (the default graph's are not: an error panel)
            page.evaluate("async (workflow) => { await app.loadGraphData(workflow); }", workflow)
            template_browser(page, IMAGES / "templates.png")
            browser.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
