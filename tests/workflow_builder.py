"""Writes the shipped UI-format workflows (`example_workflows/*.json`) from short graph descriptions.

Widget values are given by name and placed in the positional `widgets_values` order of the
live `/object_info` (with the extra value of `control_after_generate` widgets), so the
files match the nodes exactly. Run it after changing a node's widgets:

    .venv/bin/python tests/workflow_builder.py        # starts a headless ComfyUI, rewrites example_workflows/

The tests convert the written files back to the API format and run them; they never read
this module's descriptions, so a hand edit of a workflow file is tested the same way.
"""

from __future__ import annotations

import json
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from comfyui_server import ComfyUIServer, _input_spec, is_widget, widget_names  # noqa: E402

WORKFLOWS = Path(__file__).resolve().parent.parent / "example_workflows"
NOTE_COLOR, NOTE_BGCOLOR = "#432", "#653"


@dataclass
class Node:
    id: int
    type: str
    pos: tuple[int, int]
    widgets: dict[str, Any] = field(default_factory=dict)
    links: dict[str, tuple[int, int]] = field(default_factory=dict)  # input name -> (source id, output slot)
    size: tuple[int, int] = (320, 200)
    title: str | None = None


@dataclass
class Note:
    id: int
    text: str
    pos: tuple[int, int]
    size: tuple[int, int] = (420, 300)
    title: str | None = None


def build_workflow(items: list[Node | Note], object_info: dict[str, Any]) -> dict[str, Any]:
    nodes, links = [], []
    by_id = {item.id: item for item in items}
    outputs: dict[tuple[int, int], list[int]] = {}
    link_id = 0
    pending = []
    for item in items:
        if isinstance(item, Node):
            for name, (source, slot) in item.links.items():
                link_id += 1
                src = by_id[source]
                src_type = object_info[src.type]["output"][slot]
                links.append([link_id, source, slot, item.id, name, src_type])
                outputs.setdefault((source, slot), []).append(link_id)
                pending.append(link_id)
    order = _topological_order([i for i in items if isinstance(i, Node)])
    for item in items:
        if isinstance(item, Note):
            nodes.append({"id": item.id, "type": "Note", "pos": list(item.pos), "size": list(item.size),
                          "flags": {}, "order": len(order), "mode": 0, "inputs": [], "outputs": [],
                          "properties": {}, "widgets_values": [item.text], "color": NOTE_COLOR,
                          "bgcolor": NOTE_BGCOLOR, **({"title": item.title} if item.title else {})})
            continue
        info = object_info[item.type]
        unknown = set(item.widgets) - {n for n, _ in widget_names(info)}
        if unknown:
            raise ValueError(f"{item.type}: no widgets named {sorted(unknown)}")
        values = []
        for name, has_control in widget_names(info):
            values.append(item.widgets[name] if name in item.widgets else _default(info, name))
            if has_control:
                values.append("fixed")
        inputs = []
        slot_index = 0
        link_of = {link[4]: link[0] for link in links if link[3] == item.id}
        input_order = info.get("input_order") or {g: list(info["input"].get(g, {})) for g in ("required", "optional")}
        for group in ("required", "optional"):
            for name in input_order.get(group, []):
                input_type, options = _input_spec(info, name)
                widget = is_widget(input_type, options)
                if widget and name not in link_of:
                    continue
                entry = {"name": name, "type": "COMBO" if isinstance(input_type, list) else input_type,
                         "link": link_of.get(name)}
                if widget:
                    entry["widget"] = {"name": name}
                if group == "optional":
                    entry["shape"] = 7
                inputs.append(entry)
                slot_index += 1
        outs = []
        for slot, (kind, name) in enumerate(zip(info["output"], info["output_name"])):
            entry = {"name": name, "type": kind, "links": outputs.get((item.id, slot), [])}
            if entry["links"]:
                entry["slot_index"] = slot
            outs.append(entry)
        node = {"id": item.id, "type": item.type, "pos": list(item.pos), "size": list(item.size), "flags": {},
                "order": order.index(item.id), "mode": 0, "inputs": inputs, "outputs": outs,
                "properties": {"Node name for S&R": item.type}, "widgets_values": values}
        if item.title:
            node["title"] = item.title
        nodes.append(node)
    # links store the target slot index, not the name
    for link in links:
        target = next(n for n in nodes if n["id"] == link[3])
        link[4] = next(i for i, slot in enumerate(target["inputs"]) if slot["name"] == link[4])
    return {"last_node_id": max(i.id for i in items), "last_link_id": link_id, "nodes": nodes, "links": links,
            "groups": [], "config": {}, "extra": {"ds": {"scale": 0.75, "offset": [40, 40]}}, "version": 0.4}


def _default(info: dict[str, Any], name: str) -> Any:
    input_type, options = _input_spec(info, name)
    if "default" in options:
        return options["default"]
    if isinstance(input_type, list):
        return input_type[0] if input_type else ""
    if input_type == "COMBO":
        return (options.get("options") or [""])[0]
    return {"INT": 0, "FLOAT": 0.0, "STRING": "", "BOOLEAN": False}[input_type]


def _topological_order(nodes: list[Node]) -> list[int]:
    done: list[int] = []
    remaining = {n.id: n for n in nodes}
    while remaining:
        ready = [i for i, n in remaining.items() if all(src in done for src, _ in n.links.values())]
        if not ready:
            raise ValueError("the graph has a cycle")
        for i in sorted(ready):
            done.append(i)
            del remaining[i]
    return done


# --- the shipped workflows ----------------------------------------------------------------------------

SD15_NOTE = """DreamBooth LoRA, SD1.5: teach the model your subject, then draw it.

1. Put 4-20 photos of the subject into a folder in ComfyUI/input/, e.g. ComfyUI/input/my_dog/ (optional: a .txt caption beside each image). Press R (refresh) and choose it in DreamBooth Dataset.
2. DreamBooth Base Model: choose your SD1.5 checkpoint (models/checkpoints). Load Checkpoint follows it.
3. instance_prompt: a rare trigger word + the class, 'a photo of sks dog'. class_prompt: the class alone.
4. Train LoRA: output_name names the file in models/loras. About 100 steps per photo; learning rate 1e-4.
5. Queue. The progress bar shows loss and sample images. Cancel is safe: a checkpoint and a partial LoRA are written; turn resume on and queue again to continue.

The LoRA goes to models/loras/<output_name>.safetensors; DreamBooth Load LoRA below applies it (prompt with the trigger word) and reads it again after a retrain under the same name. DreamBooth Sample draws the same with our own node. Small GPU? Pick a memory preset in DreamBooth Memory & Speed. More settings nodes (optimizer, LoRA and text encoder, captions and class images) chain into the same settings input.

Only the subject, not its background: give a photo a mask (white = learn, black = ignore) as photo_mask.png beside it, or use DreamBooth Dataset from Images with Load Image's MASK (what you paint in the mask editor is learnt). LoHa or LoKr instead of LoRA: the network widget of DreamBooth LoRA & Text Encoder."""

SD15_CHECKPOINT = "v1-5-pruned-emaonly.safetensors"


# Columns left to right (inputs, settings, training, using the LoRA, ...), on a 20 px grid.
COLUMNS = (20, 500, 880, 1260, 1660, 2060, 2460, 2820)


def sd15_workflow(object_info: dict[str, Any], *, resolution: int = 512, checkpoint: str = SD15_CHECKPOINT,
                  name: str = "my_dog", note: str = SD15_NOTE, steps: int = 800, preset: str | None = None,
                  prior_preservation: bool = False, resume: bool = False, class_folder: str | None = None):
    c0, c1, c2, c3, c4, c5, c6, c7 = COLUMNS
    memory_widgets = {"memory_preset": preset} if preset else {}
    items: list[Node | Note] = [
        Note(1, note, (c0, 20), (440, 440), title="Read me"),
        Node(2, "DreamBoothBaseModel", (c1, 20), {"model": checkpoint}, size=(340, 130)),
        Node(3, "DreamBoothDataset", (c1, 220), {"folder": name, "instance_prompt": "a photo of sks dog",
                                                 "class_prompt": "a photo of dog", "resolution": resolution},
             size=(340, 340)),
        # the settings chain below the links from Base Model and Dataset to Train LoRA
        Node(4, "DreamBoothMemorySettings", (c2, 300), memory_widgets, size=(340, 330)),
        Node(18, "DreamBoothOutputSettings", (c2, 700),
             {}, {"settings": (4, 0)},  # validation_prompts empty: its placeholder says what the box is
             size=(340, 440)),
        # tall: the samples it shows when done are drawn inside it, below the widgets
        Node(5, "DreamBoothTrainLoRA", (c3, 20),
             {"output_name": name, "max_train_steps": steps, "resume": resume,
              "with_prior_preservation": prior_preservation},
             {"base_model": (2, 0), "dataset": (3, 0), "settings": (19 if prior_preservation else 18, 0)},
             size=(360, 700)),
        Node(16, "PreviewImage", (c3, 780), {}, {"images": (5, 2)}, size=(360, 300), title="Loss curve"),
        Node(6, "CheckpointLoaderSimple", (c4, 20), {"ckpt_name": checkpoint}, {"ckpt_name": (2, 1)},
             size=(320, 100)),
        Node(7, "DreamBoothLoadLoRA", (c4, 160), {"lora_name": f"{name}.safetensors"},
             {"model": (6, 0), "clip": (6, 1), "lora_name": (5, 0)}, size=(320, 130)),
        Node(8, "CLIPTextEncode", (c5, 20), {"text": "a photo of sks dog on the beach"}, {"clip": (7, 1)},
             size=(360, 150), title="Positive prompt (use the trigger word)"),
        Node(9, "CLIPTextEncode", (c5, 200), {"text": "blurry, low quality"}, {"clip": (7, 1)},
             size=(360, 150), title="Negative prompt"),
        Node(10, "EmptyLatentImage", (c5, 380), {"width": resolution, "height": resolution, "batch_size": 1},
             size=(320, 110)),
        Node(11, "KSampler", (c6, 20), {"seed": 1234, "steps": 25, "cfg": 7.0},
             {"model": (7, 0), "positive": (8, 0), "negative": (9, 0), "latent_image": (10, 0)}, size=(320, 270)),
        Node(12, "VAEDecode", (c6, 340), {}, {"samples": (11, 0), "vae": (6, 2)}, size=(220, 50)),
        Node(13, "SaveImage", (c7, 20), {"filename_prefix": f"dreambooth/{name}"}, {"images": (12, 0)},
             size=(360, 400)),
        Node(14, "DreamBoothSample", (c4, 540),
             {"prompt": "a photo of sks dog\na photo of sks dog in a bucket", "width": resolution,
              "height": resolution},
             {"base_model": (2, 0), "lora_name": (5, 0)}, size=(360, 420)),
        Node(15, "PreviewImage", (c5, 540), {}, {"images": (14, 0)}, size=(360, 400),
             title="Preview: DreamBooth Sample"),
    ]
    if prior_preservation:  # how many class images, and their weight, belong in view here
        items.append(Node(19, "DreamBoothDataSettings", (c2, 1180), {}, {"settings": (18, 0)}, size=(340, 300)))
    if class_folder is not None:
        items.append(Node(17, "DreamBoothDataset", (c1, 620), {"folder": class_folder, "caption_mode": "prompt",
                                                               "instance_prompt": "a photo of dog",
                                                               "class_prompt": "a photo of dog",
                                                               "resolution": resolution},
                          size=(340, 340), title="Class images (optional: connect to class_images)"))
    return build_workflow(items, object_info)


SDXL_NOTE = SD15_NOTE.replace("SD1.5", "SDXL").replace(
    "About 100 steps per photo; learning rate 1e-4.",
    "About 100 steps per photo; learning rate 1e-4. Training runs at 1024 px (the Dataset's resolution).")

PRIOR_NOTE = """DreamBooth LoRA with prior preservation: the subject is learnt while the class keeps its meaning.

As the SD1.5 workflow, plus: with_prior_preservation is on in Train LoRA. The class prompt of DreamBooth Dataset ('a photo of dog') makes the class images: num_class_images (set in DreamBooth Captions & Class Images, 100 by default) are generated once with the base model into output/dreambooth_lora/class_images/ and reused by later runs.

Optional: your own class photos. Put them into a folder in ComfyUI/input/ (e.g. ComfyUI/input/dogs/), choose it in the 'Class images' Dataset node and connect its dataset output to Train LoRA's class_images input."""

RESUME_NOTE = """Resume a stopped DreamBooth LoRA run.

Cancel during training writes a checkpoint (output/dreambooth_lora/runs/<output_name>/checkpoints/) and a partial LoRA (models/loras/<output_name>_stepNNNNNN.safetensors). To continue:

1. Keep output_name and the training options as they were (steps may be raised).
2. resume is on in this workflow's Train LoRA node: it continues from the newest checkpoint of that output_name, with the same data order and random numbers as an uninterrupted run.
3. Queue. With no checkpoint yet, the run simply starts."""


def all_workflows(object_info: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        "SD1.5 LoRA from your photos.json": sd15_workflow(object_info),
        "SDXL LoRA from your photos.json": sd15_workflow(object_info, resolution=1024,
                                                   checkpoint="sd_xl_base_1.0.safetensors", note=SDXL_NOTE,
                                                   preset="12 GB"),
        "SD1.5 LoRA with prior preservation.json": sd15_workflow(object_info, note=PRIOR_NOTE,
                                                                 prior_preservation=True, class_folder="dogs"),
        "Resume a cancelled training run.json": sd15_workflow(object_info, note=RESUME_NOTE, resume=True),
    }


# --- a picture of a workflow (README, and the thumbnail ComfyUI's template browser shows) ----------------------

TYPE_COLORS = {"MODEL": (180, 160, 255), "CLIP": (255, 210, 80), "VAE": (255, 110, 110), "LATENT": (255, 150, 200),
               "CONDITIONING": (255, 170, 80), "IMAGE": (100, 180, 255), "*": (200, 200, 200)}
OUR_COLOR, CORE_COLOR, NOTE_FILL = (46, 74, 64), (53, 53, 53), (70, 56, 40)


def render_workflow(workflow: dict[str, Any], object_info: dict[str, Any] | None = None, scale: float = 0.5):
    """The graph as a picture: nodes with their titles, slots and widget values, and the links."""
    import textwrap

    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    row, title_h = 20, 26
    boxes: dict[int, tuple[int, int, int, int]] = {}
    slots_in: dict[tuple[int, int], tuple[int, int]] = {}
    slots_out: dict[tuple[int, int], tuple[int, int]] = {}
    contents = {}
    for node in workflow["nodes"]:
        x, y = node["pos"]
        w = node["size"][0]
        if node["type"] == "Note":
            lines = [line for para in node["widgets_values"][0].split("\n") for line in (textwrap.wrap(para, w // 6) or [""])]
        else:
            values = list(node.get("widgets_values", []))
            lines = []
            if object_info and node["type"] in object_info:
                position = 0
                for name, has_control in widget_names(object_info[node["type"]]):
                    lines.append(f"{name}: {_short(values[position])}")
                    position += 2 if has_control else 1
            else:
                lines = [_short(v) for v in values]
        n_in, n_out = len(node.get("inputs", [])), len(node.get("outputs", []))
        h = title_h + row * (max(n_in, n_out) + len(lines)) + 8
        boxes[node["id"]] = (x, y, x + w, y + h)
        contents[node["id"]] = lines
        for i in range(n_in):
            slots_in[(node["id"], i)] = (x, y + title_h + row * i + row // 2)
        for i in range(n_out):
            slots_out[(node["id"], i)] = (x + w, y + title_h + row * i + row // 2)
    left = min(b[0] for b in boxes.values()) - 20
    top = min(b[1] for b in boxes.values()) - 20
    right = max(b[2] for b in boxes.values()) + 20
    bottom = max(b[3] for b in boxes.values()) + 20
    image = Image.new("RGB", (right - left, bottom - top), (30, 30, 30))
    draw = ImageDraw.Draw(image)

    def at(p):
        return (p[0] - left, p[1] - top)

    for node in workflow["nodes"]:
        x0, y0, x1, y1 = boxes[node["id"]]
        ours = node["type"].startswith("DreamBooth")
        fill = NOTE_FILL if node["type"] == "Note" else OUR_COLOR if ours else CORE_COLOR
        draw.rounded_rectangle([at((x0, y0)), at((x1, y1))], radius=8, fill=fill, outline=(90, 90, 90))
        draw.rectangle([at((x0, y0)), at((x1, y0 + title_h))], fill=tuple(max(0, c - 15) for c in fill))
        draw.text(at((x0 + 8, y0 + 7)), node.get("title") or node["type"], fill=(235, 235, 235), font=font)
        for i, slot in enumerate(node.get("inputs", [])):
            px, py = slots_in[(node["id"], i)]
            draw.ellipse([at((px - 4, py - 4)), at((px + 4, py + 4))], fill=TYPE_COLORS.get(slot["type"], (150, 220, 150)))
            draw.text(at((px + 10, py - 6)), slot["name"], fill=(200, 200, 200), font=font)
        for i, slot in enumerate(node.get("outputs", [])):
            px, py = slots_out[(node["id"], i)]
            draw.ellipse([at((px - 4, py - 4)), at((px + 4, py + 4))], fill=TYPE_COLORS.get(slot["type"], (150, 220, 150)))
            text = slot["name"]
            draw.text(at((px - 10 - 6 * len(text), py - 6)), text, fill=(200, 200, 200), font=font)
        first = y0 + title_h + row * max(len(node.get("inputs", [])), len(node.get("outputs", [])))
        for j, line in enumerate(contents[node["id"]]):
            draw.text(at((x0 + 10, first + row * j + 4)), line, fill=(225, 225, 225), font=font)
    for link in workflow["links"]:
        _, src, src_slot, dst, dst_slot, kind = link
        a, b = slots_out[(src, src_slot)], slots_in[(dst, dst_slot)]
        mid = (a[0] + b[0]) / 2
        points = [at(_bezier(a, (mid, a[1]), (mid, b[1]), b, t / 20)) for t in range(21)]
        draw.line(points, fill=TYPE_COLORS.get(kind, (150, 220, 150)), width=3)
    return image.resize((int(image.width * scale), int(image.height * scale)), Image.LANCZOS)


def _bezier(p0, p1, p2, p3, t):
    u = 1 - t
    return (u ** 3 * p0[0] + 3 * u * u * t * p1[0] + 3 * u * t * t * p2[0] + t ** 3 * p3[0],
            u ** 3 * p0[1] + 3 * u * u * t * p1[1] + 3 * u * t * t * p2[1] + t ** 3 * p3[1])


def _short(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else value
    text = text.replace("\n", " / ")
    return text if len(text) <= 48 else text[:45] + "..."


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        with ComfyUIServer(Path(tmp)) as server:
            info = server.object_info()
    WORKFLOWS.mkdir(exist_ok=True)
    for name, workflow in all_workflows(info).items():
        (WORKFLOWS / name).write_text(json.dumps(workflow, indent=2) + "\n", encoding="utf-8")
        picture = WORKFLOWS / name.replace(".json", ".jpg")
        render_workflow(workflow, info).save(picture, quality=85)
        print(f"wrote example_workflows/{name} and {picture.name}")


if __name__ == "__main__":
    main()
