"""The ComfyUI nodes (V3 schema), category "DreamBooth LoRA".

Thin by design: widgets become a TrainConfig (`config_build`), training runs in a worker
process (`worker`), pictures are drawn in `pictures`. This module is imported only by
ComfyUI (through `comfy_entrypoint`), so it may import ComfyUI's modules at the top; torch,
diffusers and the trainer's heavy modules are imported inside `execute`.

Types passed between the nodes (plain dicts, so they cache and print well):
- DREAMBOOTH_DATASET: folder, instance_prompt, class_prompt and the data options;
- DREAMBOOTH_BASE: path, name, kind (checkpoint / diffusers), arch, variant, prediction_type (detected or
  set), prediction_type_choice (the widget: 'auto' or the type set);
- DREAMBOOTH_SETTINGS: what a chain of settings nodes set (`config_build.add_settings`): memory_preset,
  num_gpus (not TrainConfig options), the TrainConfig options and the settings nodes in the chain;
- LORA_MODEL: ComfyUI's own type, a dict of tensors in kohya keys (UNet part).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import folder_paths
from comfy_api.latest import ComfyExtension, io, ui

from ..trainer.fileio import atomic_write_bytes
from ..trainer.run_folder import config_path, log_path
from . import config_build as cb
from . import pictures
from .progress import RunProgress
from .run_reuse import (check_run_can_start, file_state, find_finished_run, forget_finished_run, read_run_events,
                        record_finished_run, run_identity)
from .worker import WorkerProcess, check_num_processes, supervise, worker_command, worker_environment

CATEGORY = "DreamBooth LoRA"
LOG = logging.getLogger("dreambooth_lora")

# The pack's socket types (what links between its nodes carry).
DatasetType = io.Custom("DREAMBOOTH_DATASET")
BaseModelType = io.Custom("DREAMBOOTH_BASE")
SettingsType = io.Custom("DREAMBOOTH_SETTINGS")
LoraModelType = io.Custom("LORA_MODEL")

DATASETS_PREFIX = "[datasets] "
DIFFUSERS_PREFIX = "[diffusers] "
NO_LORA = "[none]"
OUTPUT_ROOT = "dreambooth_lora"  # under ComfyUI's output folder: runs/, datasets/, class_images/


# --- folders ---------------------------------------------------------------------------------

def _output_root() -> Path:
    return Path(folder_paths.get_output_directory()) / OUTPUT_ROOT


def _inside(root: str | os.PathLike, target: str | os.PathLike) -> bool:
    """Whether `target` lies inside `root` (lexically, after making both absolute)."""
    root, target = os.path.abspath(root), os.path.abspath(target)
    try:
        return os.path.commonpath([root, target]) == root and root != target
    except ValueError:
        return False


def _dataset_roots() -> list[str]:
    try:
        return [p for p in folder_paths.get_folder_paths("datasets") if os.path.isdir(p)]
    except KeyError:
        return []


def dataset_folder_options() -> list[str]:
    """Subfolders of ComfyUI's input folder, then of the registered `datasets` folders."""
    options = [f for f in folder_paths.get_input_subfolders()
               if not any(part.startswith(".") for part in f.split("/"))]
    for root in _dataset_roots():
        for dirpath, dirs, _ in os.walk(root):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            rel = os.path.relpath(dirpath, root)
            if rel != ".":
                options.append(DATASETS_PREFIX + rel.replace(os.sep, "/"))
            if rel.count(os.sep) >= 2:
                dirs[:] = []
    return options or ["(put a folder of images into ComfyUI/input)"]


def resolve_dataset_folder(choice: str) -> Path:
    """The folder a Dataset node choice names; only input subfolders and registered dataset folders."""
    if DATASETS_PREFIX and choice.startswith(DATASETS_PREFIX):
        rel, roots = choice[len(DATASETS_PREFIX):], _dataset_roots()
    else:
        rel, roots = choice, [folder_paths.get_input_directory()]
    parts = rel.replace("\\", "/").split("/")
    # a drive ("C:x" is not absolute on Windows); elsewhere "A: portraits" is a folder name
    if not rel or os.path.isabs(rel) or ".." in parts or (os.name == "nt" and re.match(r"[A-Za-z]:", rel)):
        raise ValueError(f"folder {choice!r}: choose a subfolder of ComfyUI's input folder")
    for root in roots:
        target = Path(root, *parts)
        if _inside(root, target) and target.is_dir():
            return target
    raise ValueError(f"folder {choice!r} not found; put the images into a subfolder of "
                     f"{folder_paths.get_input_directory()} (or a registered datasets folder) and refresh")


def allowed_dataset_folder(folder: str | os.PathLike) -> bool:
    """Whether `folder` is one a Dataset node may read: inside ComfyUI's input folder (not that folder
    itself), the configured dataset roots, or the pack's own output folders."""
    roots = [folder_paths.get_input_directory(), *_dataset_roots(), str(_output_root() / "datasets"),
             str(_output_root() / "class_images")]
    return any(_inside(root, folder) for root in roots)


def base_model_options() -> list[str]:
    """Checkpoint files, then diffusers folders (with a model_index.json)."""
    options = list(folder_paths.get_filename_list("checkpoints"))
    for root in folder_paths.get_folder_paths("diffusers"):
        if os.path.isdir(root):
            for entry in sorted(os.listdir(root)):
                if os.path.isfile(os.path.join(root, entry, "model_index.json")):
                    options.append(DIFFUSERS_PREFIX + entry)
    return options or ["(put a checkpoint into ComfyUI/models/checkpoints)"]


def resolve_base_model(choice: str) -> tuple[Path, str]:
    """(path, kind) of a Base model node choice."""
    if choice.startswith(DIFFUSERS_PREFIX):
        name = choice[len(DIFFUSERS_PREFIX):]
        if not name or "/" in name or "\\" in name or name in (".", ".."):
            raise ValueError(f"model {choice!r}: not a diffusers folder name")
        for root in folder_paths.get_folder_paths("diffusers"):
            if os.path.isfile(os.path.join(root, name, "model_index.json")):
                return Path(root, name), "diffusers"
        raise ValueError(f"diffusers folder {name!r} not found in {folder_paths.get_folder_paths('diffusers')}")
    return Path(folder_paths.get_full_path_or_raise("checkpoints", choice)), "checkpoint"


def allowed_base_model(path: str | os.PathLike) -> bool:
    """Whether `path` lies in ComfyUI's checkpoints or diffusers folders (what the Base Model node lists)."""
    roots = folder_paths.get_folder_paths("checkpoints") + folder_paths.get_folder_paths("diffusers")
    return any(_inside(root, path) for root in roots)


def comfy_tokenizer_dir() -> str:
    """ComfyUI's bundled CLIP tokenizer (the one every SD1.x / SDXL checkpoint uses)."""
    import comfy.sd1_clip

    return os.path.join(os.path.dirname(os.path.abspath(comfy.sd1_clip.__file__)), "sd1_tokenizer")


def dataset_files(folder: Path) -> list[Path]:
    """The files the trainer reads from a dataset folder: images, their caption files and their masks, in it
    and in its `N_name` subfolders. Hidden files (.DS_Store) and others (Thumbs.db, notes) are not among them.

    In os.walk's order (the folder's files, then each subfolder's, by name), as fingerprints were
    made before, so a folder holding nothing else keeps the fingerprint its finished runs recorded.
    """
    from ..trainer.data import IMAGE_EXTENSIONS, REPEAT_FOLDER, find_caption_files, find_mask_files

    caption_extension = cb.cb_default("caption_extension")  # the nodes have no widget for it

    def visible(directory: Path) -> list[Path]:
        return sorted((p for p in directory.iterdir() if not p.name.startswith(".")), key=lambda p: p.name)

    def images_and_captions(directory: Path) -> list[Path]:
        files = [p for p in visible(directory) if p.is_file()]
        images = [p for p in files if p.suffix.lower() in IMAGE_EXTENSIONS]
        masks = find_mask_files(images)
        read = set(images) | set(find_caption_files(files, images, caption_extension).values()) | set(masks.values())
        in_mask_folder = sorted((m for m in masks.values() if m.parent != directory), key=lambda p: p.name)
        return [p for p in files if p in read] + in_mask_folder

    subfolders = [p for p in visible(folder) if p.is_dir() and REPEAT_FOLDER.match(p.name)]
    return [path for directory in (folder, *subfolders) for path in images_and_captions(directory)]


def folder_fingerprint(folder: Path) -> str:
    """A hash of the name, size and modification time of every file the trainer reads (`dataset_files`)."""
    try:
        files = dataset_files(folder)
    except OSError:  # gone or unreadable: the Dataset node says why when it runs
        return "missing"
    digest = hashlib.sha256()
    for path in files:
        try:
            stat = path.stat()
        except OSError:
            continue
        rel = path.relative_to(folder).as_posix()
        digest.update(f"{rel}|{stat.st_size}|{stat.st_mtime_ns}\n".encode("utf-8", "replace"))
    return digest.hexdigest()


# --- widgets from TrainConfig options ----------------------------------------------------------

def widget_input(widget: cb.Widget, *, optional: bool = False, control_after_generate=None) -> io.Input:
    """The ComfyUI widget of a `config_build.Widget`."""
    spec = cb.widget_spec(widget)
    name, default, common = spec["name"], spec["default"], {"tooltip": spec["tooltip"], "optional": optional}
    if spec["choices"]:
        return io.Combo.Input(name, options=list(spec["choices"]), default=default, **common)
    kind, lo, hi = spec["type"], spec["min"], spec["max"]
    if kind is bool:
        return io.Boolean.Input(name, default=default, **common)
    if kind is int:
        return io.Int.Input(name, default=default, min=None if lo is None else int(lo),
                            max=None if hi is None else int(hi), control_after_generate=control_after_generate,
                            **common)
    if kind is float:
        return io.Float.Input(name, default=default, min=lo, max=hi, step=spec["step"], round=spec["step"] / 10,
                              **common)
    if kind is list:
        return io.String.Input(name, multiline=True, default="\n".join(default),
                               placeholder=spec["placeholder"] or None, **common)
    return io.String.Input(name, default=default, placeholder=spec["placeholder"] or None, **common)


def option_input(name: str, *, optional: bool = False, control_after_generate=None, **changes) -> io.Input:
    """The widget of TrainConfig option `name`; `changes` are `config_build.Widget` fields (tooltip,
    default, min, max, step, ...) for what this node changes of the option."""
    return widget_input(cb.Widget(name, **changes), optional=optional, control_after_generate=control_after_generate)


def _dataset_inputs() -> list[io.Input]:
    return [
        io.String.Input("instance_prompt", default="a photo of sks dog",
                        tooltip="Prompt with the trigger word (a rare token such as 'sks' plus the class), used for "
                                "images without a caption file: 'a photo of sks dog'."),
        io.String.Input("class_prompt", default="a photo of dog",
                        tooltip="Prompt of the class without the trigger word ('a photo of dog'); used for prior "
                                "preservation (turn it on in Train LoRA)."),
        option_input("caption_mode"),
        option_input("repeats"),
        option_input("resolution", default=0, min=0,
                     tooltip="Training resolution, a multiple of 8 (the side of a square of equal area); 0 = the "
                             "model's own: 512 for SD1.x, 1024 for SDXL."),
        option_input("buckets"),
        option_input("crop"),
        option_input("flip_p", step=0.05),
    ]


def _dataset_outputs() -> list[io.Output]:
    return [
        DatasetType.Output(display_name="dataset", tooltip="The training images and their captions; connect to Train LoRA."),
        io.Image.Output(display_name="preview", tooltip="A grid of up to 16 of the images, to check the folder."),
        io.String.Output(display_name="summary",
                         tooltip="Images, captions found and aspect-ratio buckets, in one line."),
    ]


def _scan_dataset(folder: Path, instance_prompt: str, class_prompt: str, caption_mode: str, repeats: int,
                  resolution: int, buckets: bool, crop: str, flip_p: float) -> io.NodeOutput:
    """Check a folder the way the trainer will (every image decoded) and describe it."""
    from ..trainer.config import TrainConfig
    from ..trainer.data import DatasetError, ImageDataset, load_mask, scan_images

    if not instance_prompt.strip():
        raise ValueError("instance_prompt is empty: type the prompt with the trigger word, e.g. 'a photo of sks dog'")
    if resolution % 8:
        raise ValueError(f"resolution {resolution} must be a multiple of 8 (or 0 for the model's own)")
    shown_resolution = resolution or 512
    config = TrainConfig(instance_dir=str(folder), instance_prompt=instance_prompt, caption_mode=caption_mode,
                         repeats=repeats, resolution=shown_resolution, buckets=buckets, crop=crop, flip_p=flip_p)
    try:
        scan = scan_images(folder, instance_prompt, config)
    except DatasetError as e:
        raise ValueError(str(e)) from None
    for warning in scan.warnings:
        LOG.info("[DreamBooth LoRA] %s", warning)
    summary = ImageDataset(scan, config).summary()
    if not resolution:
        summary += " (buckets shown at 512; SDXL trains at 1024)"
    dataset = {"folder": str(folder), "instance_prompt": instance_prompt, "class_prompt": class_prompt,
               "caption_mode": caption_mode, "repeats": repeats, "resolution": resolution, "buckets": buckets,
               "crop": crop, "flip_p": flip_p, "num_images": len(scan.items), "summary": summary,
               "fingerprint": folder_fingerprint(folder)}
    shown = scan.items[:pictures.GRID_MAX_IMAGES]
    grid = pictures.to_image_tensor([pictures.preview_grid([item.path for item in shown],
                                                           masks=[load_mask(item) for item in shown])])
    return io.NodeOutput(dataset, grid, summary, ui=ui.PreviewText(summary))


# --- nodes -------------------------------------------------------------------------------------------

class DreamBoothDataset(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DreamBoothDataset",
            display_name="DreamBooth Dataset",
            category=CATEGORY,
            description="Training images from a subfolder of ComfyUI's input folder (png, jpg, webp; optional .txt "
                        "captions beside them; optional masks for masked training: `<name>_mask.png` beside an "
                        "image, `masks/<name>.png`, or transparency; kohya `N_name` subfolders repeat N times). "
                        "Every image is checked here, so a bad file fails in seconds, not in the middle of training.",
            inputs=[io.Combo.Input("folder", options=dataset_folder_options(),
                                   tooltip="A subfolder of ComfyUI/input (or of a `datasets` folder registered in "
                                           "extra_model_paths.yaml) holding the photos. Refresh after adding one."),
                    *_dataset_inputs()],
            outputs=_dataset_outputs(),
        )

    @classmethod
    def fingerprint_inputs(cls, folder, **kwargs):
        try:
            return folder_fingerprint(resolve_dataset_folder(folder))
        except ValueError:
            return "missing"

    @classmethod
    def execute(cls, folder, instance_prompt, class_prompt, caption_mode, repeats, resolution, buckets, crop,
                flip_p) -> io.NodeOutput:
        return _scan_dataset(resolve_dataset_folder(folder), instance_prompt, class_prompt, caption_mode, repeats,
                             resolution, buckets, crop, flip_p)


class DreamBoothDatasetFromImages(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DreamBoothDatasetFromImages",
            display_name="DreamBooth Dataset from Images",
            category=CATEGORY,
            description="Training images from any ComfyUI node (a batch of IMAGE), with captions and optional "
                        "masks. They are written as PNG files (with .txt captions and _mask.png masks) to "
                        "output/dreambooth_lora/datasets/<name>_<hash>/, the hash that of the images, captions and "
                        "masks.",
            inputs=[io.Image.Input("images", tooltip="The training images (a batch; e.g. from Load Image or a "
                                                     "crop / upscale node)."),
                    io.Mask.Input("masks", optional=True,
                                  tooltip="Optional masks for masked training: where a mask is 1 (the area painted in "
                                          "the mask editor of Load Image) the image is learnt, where 0 only with the "
                                          "weight mask_floor. One mask for every image, or one for all."),
                    io.String.Input("name", default="my_subject",
                                    tooltip="Name of the dataset folder under output/dreambooth_lora/datasets/; a "
                                            "short hash of the images and captions is appended, so other images "
                                            "never share the folder."),
                    io.String.Input("captions", multiline=True, default="",
                                    tooltip="One caption per line, for the images in order; images without a line "
                                            "(or with an empty one) use the instance prompt."),
                    *_dataset_inputs()],
            outputs=_dataset_outputs(),
        )

    @classmethod
    def execute(cls, images, name, captions, instance_prompt, class_prompt, caption_mode, repeats, resolution,
                buckets, crop, flip_p, masks=None) -> io.NodeOutput:
        pil_images, lines = pictures.from_image_tensor(images), captions.splitlines()
        image_captions = [(image, lines[i].strip() if i < len(lines) else "") for i, image in enumerate(pil_images)]
        pil_masks = _masks_of_images(masks, pil_images) if masks is not None else []
        readable = cb.slug(cb.sanitize_output_name(name))
        folder = _output_root() / "datasets" / f"{readable}_{_content_hash(image_captions, pil_masks)}"
        folder.mkdir(parents=True, exist_ok=True)
        # The folder's name is its content, so a file already there is this one: it is not written again,
        # and its modification time (part of the dataset fingerprint) survives a restart of ComfyUI.
        for i, (image, caption) in enumerate(image_captions):
            png, txt, mask = (folder / f"image_{i:04d}.png", folder / f"image_{i:04d}.txt",
                              folder / f"image_{i:04d}_mask.png")
            if not png.is_file():
                atomic_write_bytes(png, pictures.png_bytes(image))
            if caption and not txt.is_file():
                atomic_write_bytes(txt, caption.encode("utf-8"))
            if pil_masks and not mask.is_file():
                atomic_write_bytes(mask, pictures.png_bytes(pil_masks[i]))
        return _scan_dataset(folder, instance_prompt, class_prompt, caption_mode, repeats, resolution, buckets,
                             crop, flip_p)


def _masks_of_images(masks, images: list) -> list:
    """ComfyUI MASK values (1 = learn) as one 8-bit greyscale picture per image; the batch must hold one
    mask per image or one for all, each of its image's size and not empty."""
    batch = masks.reshape(-1, *masks.shape[-2:])
    if batch.shape[0] not in (1, len(images)):
        raise ValueError(f"masks: {batch.shape[0]} masks for {len(images)} images; connect one mask per image, "
                         f"or one for all of them")
    pictures_of_masks = pictures.from_mask_tensor(batch)
    pictures_of_masks *= len(images) // len(pictures_of_masks)
    for i, (image, mask) in enumerate(zip(images, pictures_of_masks)):
        if mask.size != image.size:
            raise ValueError(f"masks: mask {i + 1} is {mask.width}x{mask.height} but image {i + 1} is "
                             f"{image.width}x{image.height}; give each image a mask of its size (Load Image gives "
                             f"a 64x64 empty mask for an image without a painted one)")
        if mask.getextrema()[1] == 0:
            raise ValueError(f"masks: mask {i + 1} is empty (all 0), so nothing of image {i + 1} would be learnt; "
                             f"paint the subject in Load Image's mask editor, or disconnect masks")
    return pictures_of_masks


def _content_hash(image_captions: list[tuple[Any, str]], masks: list | None = None) -> str:
    """8 hex digits of a hash of the images' pixels, their captions and masks (not of the PNG encoding, which
    may change with Pillow)."""
    digest = hashlib.sha256()
    for image, caption in image_captions:
        digest.update(json.dumps([image.mode, image.size, caption]).encode("utf-8"))
        digest.update(image.tobytes())
    for mask in masks or []:  # none: the hash datasets without masks always had
        digest.update(b"mask")
        digest.update(mask.tobytes())
    return digest.hexdigest()[:8]


class DreamBoothBaseModel(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DreamBoothBaseModel",
            display_name="DreamBooth Base Model",
            category=CATEGORY,
            description="The model to train on: a checkpoint from models/checkpoints or a diffusers folder from "
                        "models/diffusers. Shows what it is (SD1.x / SDXL family, v-prediction) before training.",
            inputs=[io.Combo.Input("model", options=base_model_options(),
                                   tooltip="A single-file SD1.x / SDXL checkpoint (models/checkpoints) or a "
                                           "diffusers folder (models/diffusers, listed as '[diffusers] name')."),
                    option_input("prediction_type")],
            outputs=[BaseModelType.Output(display_name="base_model",
                                      tooltip="The base model to train; connect to Train LoRA (and Sample)."),
                     io.AnyType.Output(display_name="ckpt_name",
                                       tooltip="The checkpoint's name: connect it to Load Checkpoint's ckpt_name so "
                                               "the graph names the checkpoint once (single-file checkpoints)."),
                     io.String.Output(display_name="info",
                                      tooltip="What was detected: architecture, variant and prediction type.")],
        )

    @classmethod
    def execute(cls, model, prediction_type) -> io.NodeOutput:
        from ..trainer.models import ModelError, inspect_model

        path, kind = resolve_base_model(model)
        try:
            detected = inspect_model(path, prediction_type=prediction_type)
        except ModelError as e:
            raise ValueError(f"{model}: {e}") from None
        info = f"{detected.variant} ({detected.arch}), {detected.prediction_type}, {kind}: {model}"
        base = {"path": str(path), "name": model, "kind": kind, "arch": detected.arch, "variant": detected.variant,
                "prediction_type": detected.prediction_type, "prediction_type_choice": prediction_type}
        return io.NodeOutput(base, model, info, ui=ui.PreviewText(info))


class _SettingsNode(io.ComfyNode):
    """A settings node, drawn from its entry in `config_build.SETTINGS_NODES`: it adds its widgets'
    values to the settings that come in and passes them on, so the settings nodes chain in any order."""

    NODE_ID = ""

    @classmethod
    def define_schema(cls) -> io.Schema:
        node = cb.SETTINGS_NODES[cls.NODE_ID]
        return io.Schema(
            node_id=cls.NODE_ID,
            display_name=node.display_name,
            category=CATEGORY,
            description=node.description + " Chain the settings nodes in any order into Train LoRA's settings "
                                           "input; a setting without its node keeps its default.",
            inputs=[SettingsType.Input("settings", optional=True,
                                   tooltip="From another DreamBooth settings node (optional): this node adds to "
                                           "its settings."),
                    *[widget_input(widget) for widget in node.widgets]],
            outputs=[SettingsType.Output(display_name="settings",
                                     tooltip="Connect to Train LoRA's settings input or to another settings node.")],
        )

    @classmethod
    def execute(cls, settings=None, **values) -> io.NodeOutput:
        settings = cb.add_settings(settings, cls.NODE_ID, values)
        if cb.MEMORY_PRESET in values:
            return io.NodeOutput(settings, ui=ui.PreviewText(cb.memory_node_text(values[cb.MEMORY_PRESET])))
        return io.NodeOutput(settings)


class DreamBoothMemorySettings(_SettingsNode):
    NODE_ID = "DreamBoothMemorySettings"


class DreamBoothOptimizerSettings(_SettingsNode):
    NODE_ID = "DreamBoothOptimizerSettings"


class DreamBoothNetworkSettings(_SettingsNode):
    NODE_ID = "DreamBoothNetworkSettings"


class DreamBoothDataSettings(_SettingsNode):
    NODE_ID = "DreamBoothDataSettings"


class DreamBoothOutputSettings(_SettingsNode):
    NODE_ID = "DreamBoothOutputSettings"


SETTINGS_NODE_CLASSES = [DreamBoothMemorySettings, DreamBoothOptimizerSettings, DreamBoothNetworkSettings,
                         DreamBoothDataSettings, DreamBoothOutputSettings]


def settings_num_gpus(settings: dict | None) -> int:
    """How many local GPUs the worker trains on (Memory & Speed's num_gpus), checked against the machine."""
    num_gpus = int((settings or {}).get(cb.NUM_GPUS, 1) or 1)
    on_cpu, gpus_found = _comfy_on_cpu(), 0
    if num_gpus > 1 and not on_cpu:
        import torch

        gpus_found = torch.cuda.device_count()
    check_num_processes(num_gpus, gpus_found, comfy_on_cpu=on_cpu)
    return num_gpus


class DreamBoothTrainLoRA(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DreamBoothTrainLoRA",
            display_name="DreamBooth Train LoRA",
            category=CATEGORY,
            description="Trains a LoRA in a separate worker process and writes it to models/loras/<output_name>."
                        "safetensors, where Load LoRA lists it. Cancel stops gracefully: a resumable checkpoint "
                        "and a partial LoRA are written first. Run folder: output/dreambooth_lora/runs/<output_name>.",
            is_output_node=True,
            inputs=[
                BaseModelType.Input("base_model", tooltip="From DreamBooth Base Model."),
                DatasetType.Input("dataset", tooltip="From DreamBooth Dataset (or Dataset from Images)."),
                io.String.Input("output_name", default="my_lora",
                                tooltip="File name of the LoRA in models/loras (no folders; '.safetensors' is "
                                        "added). Also names the run folder, so resume finds its checkpoints."),
                option_input("max_train_steps", tooltip="Optimizer steps to train (about 100 per training image is "
                                                        "a common start for a subject)."),
                option_input("learning_rate", step=1e-6,
                             tooltip="Learning rate of the LoRA (1e-4 is a safe start for SD1.5 and SDXL)."),
                option_input("rank"),
                option_input("alpha", step=1.0),
                option_input("seed", control_after_generate=io.ControlAfterGenerate.fixed),
                io.Boolean.Input("resume", default=False,
                                 tooltip="Continue the run of this output_name from its newest checkpoint (after a "
                                         "Cancel, or with more steps). Off starts a new run."),
                io.Boolean.Input("with_prior_preservation", default=False,
                                 tooltip="Also train on class images with the dataset's class prompt, so the class "
                                         "('dog') keeps its meaning. Images come from class_images, else they are "
                                         "generated once with the base model and reused."),
                SettingsType.Input("settings", optional=True,
                               tooltip="From the DreamBooth settings nodes (chained in any order); defaults where "
                                       "not connected."),
                DatasetType.Input("class_images", optional=True,
                              tooltip="Class images for prior preservation (a DreamBooth Dataset node on a folder of "
                                      "them). Not connected: they are generated once into "
                                      "output/dreambooth_lora/class_images/ and reused."),
            ],
            outputs=[
                io.AnyType.Output(display_name="lora_name",
                                  tooltip="The LoRA's file name in models/loras; connect to Load LoRA's lora_name."),
                LoraModelType.Output(display_name="lora",
                                 tooltip="The UNet part of the LoRA as ComfyUI's LORA_MODEL (kohya keys), for "
                                         "Load LoRA Model. Text-encoder weights load through the file."),
                io.Image.Output(display_name="loss_curve", tooltip="Training loss per step, with a moving average."),
                io.Image.Output(display_name="samples",
                                tooltip="The validation images made at the end of training (one per validation "
                                        "prompt); a black square when sampling is off."),
            ],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, base_model, dataset, output_name, max_train_steps, learning_rate, rank, alpha, seed, resume,
                with_prior_preservation, settings=None, class_images=None) -> io.NodeOutput:
        train = dict(output_name=output_name, max_train_steps=max_train_steps, learning_rate=learning_rate, rank=rank,
                     alpha=alpha, seed=seed, resume=resume, with_prior_preservation=with_prior_preservation)
        plan = plan_run(base_model, dataset, train, settings, class_images)
        progress = _run_progress(cls.hidden.unique_id, plan.config.max_train_steps)

        def say(text: str) -> None:
            progress.text(text, force=True)
            LOG.info("[DreamBooth LoRA] %s: %s", plan.name, text)

        if plan.preset_report:
            say(plan.preset_report)
            progress.keep(plan.preset_report)  # else the next line would replace it at once
        reused = find_finished_run(plan.run_dir, plan.lora_path, plan.identity, plan.config.max_train_steps)
        if reused is not None:
            say(reused.message())
            return train_outputs(plan, read_run_events(plan.run_dir), cls)
        check_run_can_start(plan.run_dir, plan.lora_path, plan.config.resume, plan.config.overwrite)
        say("starting the training worker ...")
        outcome = supervise(_start_worker(plan), progress.show, _cancel_pressed, say)
        if outcome.finished:  # also when Cancel came after the last step: the LoRA is complete, a re-queue reuses it
            record_finished_run(plan.run_dir, plan.identity)
        return train_outputs(plan, outcome.events_or_raise(say), cls)


def _comfy_on_cpu() -> bool:
    try:
        from comfy.cli_args import args

        return bool(args.cpu)
    except Exception:
        return False


@dataclass
class RunPlan:
    """A Train LoRA run, planned: its name, TrainConfig, folders, identity (run_reuse) and GPU count."""

    name: str
    config: Any  # TrainConfig (imported with the trainer, when the node runs)
    run_dir: Path
    lora_path: Path
    identity: dict
    num_gpus: int
    preset_report: str  # what the memory preset set and which of the user's own choices it kept


def plan_run(base_model: dict, dataset: dict, train: dict, settings: dict | None,
             class_images: dict | None) -> RunPlan:
    """Train LoRA's inputs, checked, as a TrainConfig with where its run and LoRA go."""
    from ..trainer.config import ConfigError

    if not allowed_base_model(base_model.get("path", "")):
        raise ValueError("base_model must come from the DreamBooth Base Model node")
    if not allowed_dataset_folder(dataset.get("folder", "")):
        raise ValueError("dataset must come from a DreamBooth Dataset node")
    name = cb.sanitize_output_name(train["output_name"])
    num_gpus = settings_num_gpus(settings)
    lora_dir = Path(folder_paths.get_folder_paths("loras")[0])
    run_dir = _output_root() / "runs" / name
    class_dir, class_count = _class_images_folder(train["with_prior_preservation"], class_images, base_model, dataset)
    try:
        config = cb.build_train_config(base=base_model, dataset=dataset, settings=settings,
                                       train={**train, "output_name": name}, run_dir=run_dir, lora_dir=lora_dir,
                                       tokenizer=comfy_tokenizer_dir(), class_dir=class_dir,
                                       class_images_available=class_count)
    except ConfigError as e:
        raise ValueError(str(e)) from None
    identity = run_identity(config.to_dict(), base_model["path"], dataset.get("fingerprint"),
                            class_images.get("fingerprint") if class_images else None, num_gpus)
    preset_report = cb.memory_preset_report(settings, base_model.get("arch") or "sd1")
    return RunPlan(name, config, run_dir, lora_dir / f"{name}.safetensors", identity, num_gpus, preset_report)


def _class_images_folder(with_prior_preservation: bool, class_images: dict | None, base_model: dict,
                         dataset: dict) -> tuple[Path | None, int | None]:
    """(folder, images in it) of the class images: a connected Dataset's folder (read, never written
    to), else the folder they are generated into (count unknown); (None, None) without prior preservation."""
    if not with_prior_preservation:
        return None, None
    if class_images is None:
        return _output_root() / "class_images" / cb.class_images_folder_name(base_model, dataset), None
    from ..trainer.data import count_images

    if not allowed_dataset_folder(class_images.get("folder", "")):
        raise ValueError("class_images must come from a DreamBooth Dataset node")
    class_dir = Path(class_images["folder"])
    class_count = count_images(class_dir)
    if not class_count:
        raise ValueError(f"class_images: {class_dir} has no images directly in it")
    return class_dir, class_count


def _start_worker(plan: RunPlan) -> WorkerProcess:
    """Write the run's config, free the GPU memory ComfyUI's models hold, and start the worker."""
    import comfy.model_management as mm

    from ..trainer.config import save_config

    plan.run_dir.mkdir(parents=True, exist_ok=True)
    config = config_path(plan.run_dir)
    save_config(plan.config, config)
    forget_finished_run(plan.run_dir)  # its LoRA is about to change
    mm.unload_all_models()
    mm.soft_empty_cache(True)
    worker = WorkerProcess(worker_command(config, plan.run_dir, num_processes=plan.num_gpus), plan.run_dir,
                           worker_environment(force_cpu=_comfy_on_cpu()))
    worker.start()
    LOG.info("[DreamBooth LoRA] training %s in worker %s%s (log: %s)", plan.name, worker.pid,
             f" on {plan.num_gpus} processes" if plan.num_gpus > 1 else "", worker.log_path)
    return worker


def _cancel_pressed() -> BaseException | None:
    """ComfyUI's interrupt, taken (ComfyUI clears its flag as it raises it): a Cancel pressed, or None."""
    import comfy.model_management as mm

    try:
        mm.throw_exception_if_processing_interrupted()
    except mm.InterruptProcessingException as e:
        return e
    return None


def _run_progress(node_id: str | None, total: int) -> RunProgress:
    """The progress of a run on ComfyUI's progress bar and node text."""
    import comfy.utils

    bar = comfy.utils.ProgressBar(total, node_id=node_id)

    def update_bar(step: int, steps: int, image) -> None:
        bar.update_absolute(step, steps, None if image is None else ("JPEG", image, 512))

    def send_text(text: str) -> None:
        try:
            from server import PromptServer

            if PromptServer.instance is not None and node_id is not None:
                PromptServer.instance.send_progress_text(text, node_id)
        except Exception:  # no server (e.g. a script driving the node): the log still has it
            pass

    return RunProgress(total, update_bar, send_text, load_preview=lambda path: pictures.load_images([path])[0],
                       log=lambda text: LOG.info("[DreamBooth LoRA] %s", text))


def train_outputs(plan: RunPlan, events: list[dict], cls) -> io.NodeOutput:
    """The Train LoRA outputs of a finished run: file name, LORA_MODEL, loss curve, last samples."""
    from safetensors.torch import load

    if not plan.lora_path.is_file():
        raise RuntimeError(f"the worker finished but {plan.lora_path} was not written; see "
                           f"{log_path(plan.run_dir)}")
    # Read, not memory-mapped (load_file): ComfyUI's cache keeps this output, and Windows refuses to
    # replace a mapped file, so the next run under this name would fail at its very end.
    lora = {k: v for k, v in load(plan.lora_path.read_bytes()).items() if k.startswith("lora_unet_")}
    losses = pictures.losses_of_run(read_run_events(plan.run_dir))
    curve = pictures.to_image_tensor([pictures.loss_curve(losses)])
    sample_event = next((e for e in reversed(events) if e.get("event") == "sample"), None)
    if sample_event and sample_event.get("paths"):
        images = pictures.same_size(pictures.load_images(sample_event["paths"]))
        samples = pictures.to_image_tensor(images)
        preview = ui.PreviewImage(samples, cls=cls)
    else:
        samples = pictures.to_image_tensor([pictures.blank_image()])
        preview = None
    return io.NodeOutput(plan.lora_path.name, lora, curve, samples, ui=preview)

class DreamBoothSample(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        import comfy.samplers

        return io.Schema(
            node_id="DreamBoothSample",
            display_name="DreamBooth Sample",
            category=CATEGORY,
            description="Images from the base model with a LoRA applied (a file from models/loras and/or a "
                        "LORA_MODEL), with ComfyUI's own samplers: one image per prompt line. SD1.x and SDXL.",
            inputs=[
                BaseModelType.Input("base_model", tooltip="From DreamBooth Base Model."),
                io.Combo.Input("lora_name", options=[NO_LORA] + folder_paths.get_filename_list("loras"),
                               tooltip="A LoRA file from models/loras (connect Train LoRA's lora_name here), or "
                                       f"{NO_LORA} for the base model alone."),
                io.Float.Input("strength_model", default=1.0, min=-10.0, max=10.0, step=0.05,
                               tooltip="How strongly the LoRA changes the UNet (0 = not at all)."),
                io.Float.Input("strength_clip", default=1.0, min=-10.0, max=10.0, step=0.05,
                               tooltip="How strongly the LoRA changes the text encoder(s), if it trained them."),
                io.String.Input("prompt", multiline=True, default="a photo of sks dog",
                                tooltip="One image per line; use the trigger word of the LoRA."),
                io.String.Input("negative_prompt", multiline=True, default="",
                                tooltip="What to steer away from (applies to every line)."),
                io.Int.Input("seed", default=1234, min=0, max=0xFFFFFFFFFFFFFFFF,
                             control_after_generate=io.ControlAfterGenerate.fixed,
                             tooltip="Seed of the first image; the next lines use seed+1, seed+2, ..."),
                io.Int.Input("steps", default=25, min=1, max=1000, tooltip="Sampling steps."),
                io.Float.Input("cfg", default=7.0, min=0.0, max=100.0, step=0.5,
                               tooltip="Classifier-free guidance scale."),
                io.Int.Input("width", default=512, min=64, max=8192, step=8,
                             tooltip="Image width (512 for SD1.5, 1024 for SDXL)."),
                io.Int.Input("height", default=512, min=64, max=8192, step=8,
                             tooltip="Image height (512 for SD1.5, 1024 for SDXL)."),
                io.Combo.Input("sampler_name", options=list(comfy.samplers.KSampler.SAMPLERS), default="euler",
                               tooltip="The sampling algorithm (as KSampler's)."),
                io.Combo.Input("scheduler", options=list(comfy.samplers.KSampler.SCHEDULERS), default="normal",
                               tooltip="The noise schedule (as KSampler's)."),
                LoraModelType.Input("lora", optional=True,
                                tooltip="A LORA_MODEL (e.g. Train LoRA's lora output), applied to the UNet at "
                                        "strength_model, on top of lora_name."),
            ],
            outputs=[io.Image.Output(display_name="images", tooltip="One image per prompt line.")],
        )

    @classmethod
    def fingerprint_inputs(cls, lora_name=None, **kwargs):
        """Run again when the LoRA file was replaced (retrained under its name). ComfyUI passes None
        for linked inputs here (base_model always, lora_name when linked): their nodes' changes
        reach this one through the graph anyway."""
        lora_path = folder_paths.get_full_path("loras", lora_name) if lora_name and lora_name != NO_LORA else None
        return file_state(lora_path) if lora_path else None

    @classmethod
    def execute(cls, base_model, lora_name, strength_model, strength_clip, prompt, negative_prompt, seed, steps, cfg,
                width, height, sampler_name, scheduler, lora=None) -> io.NodeOutput:
        import comfy.sd
        import comfy.utils
        import nodes as comfy_nodes
        import torch

        model, clip, vae = load_for_sampling(base_model)
        if lora_name and lora_name != NO_LORA:
            lora_path = folder_paths.get_full_path_or_raise("loras", lora_name)
            lora_sd = comfy.utils.load_torch_file(lora_path, safe_load=True)
            _check_lora_fits(lora_sd, lora_name, model, clip, base_model)
            model, clip = comfy.sd.load_lora_for_models(model, clip, lora_sd, strength_model, strength_clip)
        if lora is not None:
            model, _ = comfy.sd.load_lora_for_models(model, None, lora, strength_model, 0)
        prompts = [p.strip() for p in prompt.splitlines() if p.strip()] or [""]
        negative = clip.encode_from_tokens_scheduled(clip.tokenize(negative_prompt))
        images = []
        for i, text in enumerate(prompts):
            positive = clip.encode_from_tokens_scheduled(clip.tokenize(text))
            latent = {"samples": torch.zeros([1, 4, height // 8, width // 8])}
            out = comfy_nodes.common_ksampler(model, prompt_seed(seed, i), steps, cfg, sampler_name, scheduler,
                                              positive, negative, latent)[0]
            images.append(vae.decode(out["samples"]))
        return io.NodeOutput(torch.cat(images, dim=0))


def load_for_sampling(base_model: dict[str, Any]):
    """ComfyUI's model, clip and vae of the Base Model node's model, sampled as that node says it predicts."""
    import comfy.sd

    path = base_model.get("path", "")
    if not allowed_base_model(path):
        raise ValueError("base_model must come from the DreamBooth Base Model node")
    embeddings = folder_paths.get_folder_paths("embeddings")
    if base_model.get("kind") == "diffusers":
        import comfy.diffusers_load

        model, clip, vae = comfy.diffusers_load.load_diffusers(path, output_vae=True, output_clip=True,
                                                              embedding_directory=embeddings)[:3]
    else:
        model, clip, vae = comfy.sd.load_checkpoint_guess_config(path, output_vae=True, output_clip=True,
                                                                 embedding_directory=embeddings)[:3]
    return sampled_as_predicted(model, base_model.get("prediction_type", "")), clip, vae


def sampled_as_predicted(model, prediction_type: str):
    """`model` sampled as what it predicts: ComfyUI reads v-prediction from a checkpoint's `v_pred`
    key, and the Base Model node may say v_prediction for one without it (as training then does)."""
    import comfy.model_sampling

    kinds = (comfy.model_sampling.V_PREDICTION, comfy.model_sampling.EPS)  # V_PREDICTION subclasses EPS
    wanted = dict(zip(("v_prediction", "epsilon"), kinds)).get(prediction_type)
    current = next((c for c in type(model.get_model_object("model_sampling")).__mro__ if c in kinds), None)
    if wanted is None or current is wanted:
        return model

    class Sampling(comfy.model_sampling.ModelSamplingDiscrete, wanted):  # as ComfyUI's ModelSamplingDiscrete node
        pass

    patched = model.clone()
    patched.add_object_patch("model_sampling", Sampling(model.model.model_config))
    return patched


def _check_lora_fits(lora_sd: dict, lora_name: str, model, clip, base_model: dict) -> None:
    """A LoRA none of whose weights fit the model (an SDXL LoRA on SD1.5, say) is an error: ComfyUI
    would only log its keys as not loaded and sample the plain base model."""
    import comfy.lora

    key_map = comfy.lora.model_lora_keys_clip(clip.cond_stage_model, comfy.lora.model_lora_keys_unet(model.model, {}))
    if not comfy.lora.load_lora(lora_sd, key_map, log_missing=False):
        raise ValueError(f"lora_name {lora_name!r}: none of its weights fit this base model "
                         f"({base_model.get('variant') or base_model.get('arch', '?')}); choose a LoRA trained on "
                         "the same architecture (SD1.x or SDXL)")


LORA_CACHE_SIZE = 4  # LoRA files DreamBooth Load LoRA keeps read (ComfyUI's Load LoRA keeps one per node)
read_loras: dict[str, tuple[tuple, dict]] = {}  # path -> (its file_state when read, its tensors)


def read_lora_file(path: str) -> dict:
    """The tensors of a LoRA file, read again when the file changed (its size or modification time)."""
    import comfy.utils

    state = file_state(path)
    cached = read_loras.pop(path, None)
    if cached is None or cached[0] != state:
        cached = (state, comfy.utils.load_torch_file(path, safe_load=True))
    read_loras[path] = cached  # the newest last
    while len(read_loras) > LORA_CACHE_SIZE:
        del read_loras[next(iter(read_loras))]
    return cached[1]


class DreamBoothLoadLoRA(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DreamBoothLoadLoRA",
            display_name="DreamBooth Load LoRA",
            category=CATEGORY,
            description="Applies a LoRA from models/loras to a model and its CLIP, as Load LoRA does, but reads the "
                        "file again when it changed: a LoRA retrained under the same name shows at once (Load LoRA "
                        "keeps the file it read first until ComfyUI restarts).",
            inputs=[
                io.Model.Input("model", tooltip="The diffusion model the LoRA is applied to."),
                io.Clip.Input("clip", tooltip="The CLIP model the LoRA is applied to."),
                io.Combo.Input("lora_name", options=folder_paths.get_filename_list("loras"),
                               tooltip="A LoRA file from models/loras; connect Train LoRA's lora_name here to use "
                                       "the LoRA it trains."),
                io.Float.Input("strength_model", default=1.0, min=-100.0, max=100.0, step=0.01,
                               tooltip="How strongly the LoRA changes the diffusion model (0 = not at all)."),
                io.Float.Input("strength_clip", default=1.0, min=-100.0, max=100.0, step=0.01,
                               tooltip="How strongly the LoRA changes the CLIP model, if it trained it."),
            ],
            outputs=[io.Model.Output(display_name="MODEL", tooltip="The model with the LoRA applied."),
                     io.Clip.Output(display_name="CLIP", tooltip="The CLIP model with the LoRA applied.")],
        )

    @classmethod
    def fingerprint_inputs(cls, lora_name=None, **kwargs):
        """Run again when the file changed. A linked lora_name comes as None here; Train LoRA, its
        source, runs (and so makes this node run) whenever it writes the file."""
        lora_path = folder_paths.get_full_path("loras", lora_name) if lora_name else None
        return file_state(lora_path) if lora_path else None

    @classmethod
    def execute(cls, model, clip, lora_name, strength_model, strength_clip) -> io.NodeOutput:
        import comfy.sd

        if strength_model == 0 and strength_clip == 0:
            return io.NodeOutput(model, clip)
        lora = read_lora_file(folder_paths.get_full_path_or_raise("loras", lora_name))
        return io.NodeOutput(*comfy.sd.load_lora_for_models(model, clip, lora, strength_model, strength_clip))


def prompt_seed(seed: int, index: int) -> int:
    """The seed of the `index`-th prompt: seed + index, wrapped into the widget's 64-bit range (at its
    maximum, seed + 1 overflowed in torch.manual_seed)."""
    return (seed + index) % 2**64


class DreamBoothExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(NODES)


NODES = [DreamBoothDataset, DreamBoothDatasetFromImages, DreamBoothBaseModel, *SETTINGS_NODE_CLASSES,
         DreamBoothTrainLoRA, DreamBoothSample, DreamBoothLoadLoRA]
