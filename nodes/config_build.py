"""From node widgets to one TrainConfig: names, memory presets, the options the nodes expose.

The nodes pass plain dicts between them (a dataset, a base model, training settings);
`build_train_config` turns them and the Train LoRA widgets into the trainer's validated
`TrainConfig`. No ComfyUI import here, so all of it is tested without ComfyUI. The settings
nodes are defined here, one table entry each (`SETTINGS_NODES`); a widget's tooltip is its
TrainConfig field's help unless the table gives a shorter one, so the node and the CLI
document an option with the same words.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..trainer.config import TrainConfig
from .worker import MAX_PROCESSES

# Options of the Dataset nodes (the same names as TrainConfig fields).
DATASET_OPTIONS = ("caption_mode", "repeats", "resolution", "buckets", "crop", "flip_p")

# Memory presets: what each one sets, per architecture. The values trade speed for memory
# in the order that costs least quality: gradient checkpointing first (slower, same result),
# then the batch size, then text-encoder training (a UNet-only LoRA), and with little memory the
# VAE and text encoders wait in CPU memory once everything is encoded. SDXL's presets leave CUDA
# graphs off: the graphs keep the activations' memory reserved (SDXL 1024 px: 22.6 GB reserved
# against 17.9 without; with the 16 GB preset's checkpointing 17.3 GB, H100). LoRA optimizer states
# are small, so 8-bit Adam is not needed at these sizes. Precision is left to the user's
# setting ('auto' by default: bf16 or fp16 on every GPU already).
MEMORY_PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "8 GB": {
        "sd1": dict(gradient_checkpointing=True, batch_size=1, train_text_encoder=False, offload_frozen_models=True),
        "sdxl": dict(gradient_checkpointing=True, batch_size=1, train_text_encoder=False,
                     cache_latents="auto", offload_frozen_models=True, cuda_graphs="no"),
    },
    "12 GB": {
        "sd1": dict(gradient_checkpointing=False, batch_size=1),
        "sdxl": dict(gradient_checkpointing=True, batch_size=1, train_text_encoder=False, offload_frozen_models=True,
                     cuda_graphs="no"),
    },
    "16 GB": {
        "sd1": dict(gradient_checkpointing=False, batch_size=2),
        "sdxl": dict(gradient_checkpointing=True, batch_size=1, cuda_graphs="no"),
    },
    "24 GB": {
        "sd1": dict(gradient_checkpointing=False, batch_size=4),
        "sdxl": dict(gradient_checkpointing=False, batch_size=1, cuda_graphs="no"),
    },
}
PRESET_NONE = "none (use the options below)"
PRESET_CHOICES = (PRESET_NONE, *MEMORY_PRESETS)
ARCH_NAMES = {"sd1": "SD1.x", "sdxl": "SDXL"}

# Widgets of the settings nodes that are no TrainConfig option: they travel beside the options.
MEMORY_PRESET, NUM_GPUS = "memory_preset", "num_gpus"

# What the Train LoRA node uses when no settings node is connected.
DEFAULT_SETTINGS: dict[str, Any] = {MEMORY_PRESET: PRESET_NONE, NUM_GPUS: 1, "options": {}, "nodes": []}

# Native resolution of each architecture, the Dataset node's "auto" (0).
NATIVE_RESOLUTION = {"sd1": 512, "sdxl": 1024}

_FROM_OPTION: Any = object()  # a Widget field left as the TrainConfig option has it


@dataclass(frozen=True)
class Widget:
    """One widget of a node: a TrainConfig option (type, default, range, choices and help from its
    field), with what the node changes of it. With `kind` set, a widget of the node's own instead."""

    name: str
    kind: type | None = None  # bool, int, float, str, list: only for widgets that are no TrainConfig option
    default: Any = _FROM_OPTION
    tooltip: str = ""  # replaces the option's help (one or two sentences; the docs' option table has the rest)
    choices: tuple[str, ...] | None = None  # fewer than the option's
    min: float | None = None
    max: float | None = None
    step: float | None = None  # float widgets; 0.01 when not given
    placeholder: str = ""  # the grey text of an empty text box (a multiline box has no other label)


@dataclass(frozen=True)
class SettingsNode:
    """A settings node: its title, description and widgets, in widget order (saved workflows keep
    `widgets_values` by position, so this order is part of their format)."""

    display_name: str
    description: str
    widgets: tuple[Widget, ...]


def preset_summary(preset: str, arch: str) -> str:
    """What a memory preset sets for `arch`, e.g. 'gradient_checkpointing on, batch_size 1'."""
    return ", ".join(f"{key} {_shown(value)}" for key, value in MEMORY_PRESETS[preset][arch].items())


def _shown(value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value)


_PRESET_LINES = "\n".join(f"{preset}: {ARCH_NAMES['sd1']}: {preset_summary(preset, 'sd1')}; {ARCH_NAMES['sdxl']}: "
                           f"{preset_summary(preset, 'sdxl')}." for preset in MEMORY_PRESETS)

# The settings nodes: node id -> title, description and widgets. Each option lives in exactly one of
# them; they chain (settings in, settings out) in any order into Train LoRA's settings input.
SETTINGS_NODES: dict[str, SettingsNode] = {
    "DreamBoothMemorySettings": SettingsNode(
        "DreamBooth Memory & Speed",
        "How the run uses the GPU: precision, batch, caches, compiling, number of GPUs, or a memory preset. A preset "
        "sets the options below for the base model's family; an option you set away from its default keeps your "
        "value, and Train LoRA names it when it starts.\n" + _PRESET_LINES,
        (Widget(MEMORY_PRESET, kind=str, default=PRESET_NONE, choices=PRESET_CHOICES,
                tooltip="GPU memory to fit in: a preset sets the memory options for SD1.x or SDXL (listed in this "
                        "node's description). An option you set away from its default keeps your value."),
         Widget("mixed_precision"),
         Widget("gradient_checkpointing"),
         Widget("batch_size"),
         Widget("gradient_accumulation_steps"),
         Widget("cache_latents",
                tooltip="Encode the images and captions once instead of every step. 'auto': when no augmentation or "
                        "text-encoder training changes them; 'yes' also with augmentation (each image's first draw "
                        "is reused)."),
         Widget("offload_frozen_models",
                tooltip="Encode every image and caption before the first step, then keep the VAE and text encoders "
                        "in CPU memory (less GPU memory). Works only while latents are cached and the text encoders "
                        "are not trained."),
         Widget("compile_unet",
                tooltip="Compile the UNet with torch.compile: minutes of compiling before the first step, and "
                        "cuda_graphs off. Keep it off unless it measures faster on your GPU."),
         Widget("cuda_graphs",
                tooltip="Replay the UNet's step as CUDA graphs, which launch its many small GPU kernels at once "
                        "(faster; the graphs keep their memory while training runs). 'auto': on one CUDA GPU except "
                        "in fp32; 'yes': also in fp32; 'no': never."),
         Widget(NUM_GPUS, kind=int, default=1, min=1, max=MAX_PROCESSES,
                tooltip="Local GPUs to train on: more than 1 runs the trainer under `accelerate launch "
                        "--multi_gpu`, batch_size images per GPU."))),
    "DreamBoothOptimizerSettings": SettingsNode(
        "DreamBooth Optimizer & Schedule",
        "The optimizer, the learning-rate schedule and the loss: how each step changes the LoRA. The learning rate "
        "itself and the number of steps are on Train LoRA.",
        (Widget("optimizer"),
         Widget("lr_scheduler"),
         Widget("lr_warmup_steps"),
         Widget("max_grad_norm", step=0.1),
         Widget("weight_decay", step=1e-3),
         Widget("snr_gamma", step=0.5),
         Widget("noise_offset", step=0.01))),
    "DreamBoothNetworkSettings": SettingsNode(
        "DreamBooth LoRA & Text Encoder",
        "Which layers get a LoRA (or LoHa / LoKr), and whether the text encoder(s) learn too. Rank and alpha are "
        "on Train LoRA.",
        (Widget("train_text_encoder"),
         Widget("text_encoder_lr", step=1e-6),
         Widget("lora_targets"),
         Widget("lora_dropout"),
         Widget("use_dora"),
         Widget("network",
                tooltip="'lora' (the usual), 'loha' (more expressive at the same rank) or 'lokr' (a Kronecker "
                        "product: few parameters, often chosen for small subjects); all load in the stock Load LoRA."),
         Widget("lokr_factor",
                tooltip="LoKr only: how each layer is split between the Kronecker factors; -1 chooses near the "
                        "square root, as LyCORIS does."),
         Widget("lokr_decompose_both",
                tooltip="LoKr only: also decompose the smaller Kronecker factor into two rank-sized matrices."))),
    "DreamBoothDataSettings": SettingsNode(
        "DreamBooth Captions & Class Images",
        "How captions and images are used in training, and the class images of prior preservation (turned on in "
        "Train LoRA).",
        (Widget("caption_dropout"),
         Widget("shuffle_captions"),
         Widget("keep_tokens"),
         Widget("upscale"),
         Widget("bucket_step"),
         Widget("num_class_images"),
         Widget("prior_loss_weight", step=0.1),
         Widget("class_sample_steps"),
         Widget("mask_floor", step=0.05))),
    "DreamBoothOutputSettings": SettingsNode(
        "DreamBooth Samples & Checkpoints",
        "Validation images during and after training, resumable checkpoints, and how the LoRA file is written.",
        (Widget("validation_prompts", placeholder="validation prompts, one per line (empty: the instance prompt)"),
         Widget("sample_every"),
         Widget("sample_at_end"),
         Widget("sample_steps"),
         Widget("sample_guidance", step=0.5),
         Widget("sample_seed"),
         Widget("sample_resolution"),
         Widget("checkpoint_every",
                tooltip="Write a resumable checkpoint (with the LoRA so far) every N steps, and when the run ends "
                        "or stops; 0: only then."),
         Widget("keep_checkpoints"),
         Widget("save_dtype"),
         # Train LoRA's outputs are the kohya file, which 'diffusers' alone never writes
         Widget("export_format", choices=("kohya", "both"),
                tooltip="'kohya' loads in ComfyUI, A1111, Forge and diffusers; 'both' also writes diffusers' own "
                        "layout beside it."),
         Widget("overwrite",
                tooltip="Replace an existing LoRA of this name and delete the checkpoints an earlier run left in "
                        "its run folder (otherwise such a run refuses to start)."))),
}


def field_info(name: str) -> dict[str, Any]:
    """Type, default, help, choices and range of a TrainConfig option, for building its widget."""
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    f = fields[name]
    default = f.default_factory() if f.default is dataclasses.MISSING else f.default  # type: ignore[misc]
    hint = {"bool": bool, "int": int, "float": float, "str": str}.get(str(f.type), None)
    if hint is None:
        hint = list if "list" in str(f.type) else str
    return {"name": name, "type": hint, "default": default, "help": f.metadata["help"],
            "choices": f.metadata.get("choices"), "min": f.metadata.get("min"), "max": f.metadata.get("max")}


def cb_default(name: str) -> Any:
    return field_info(name)["default"]


_UNSAFE = re.compile(r'[\\/:*?"<>|\x00-\x1f]')


def sanitize_output_name(name: str) -> str:
    """A plain LoRA file name: no folders, no `..`, no drive, no extension; raises ValueError when empty.

    Names Windows cannot have for other reasons (CON, NUL, ..., a trailing dot or space) are left
    as they are, for TrainConfig to refuse with its message, as it does in the CLI.
    """
    text = str(name).strip()
    if text.lower().endswith(".safetensors"):
        text = text[: -len(".safetensors")]
    text = _UNSAFE.sub("_", text)
    while ".." in text:
        text = text.replace("..", "_")
    text = text.lstrip(" .")
    if not text:
        raise ValueError(f"output_name {name!r} leaves no usable file name; use letters, digits, '_' or '-'")
    return text


def slug(text: str, limit: int = 60) -> str:
    """A short file-system-safe form of a prompt or a model name (for folder names)."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "_", text.strip()).strip("._")
    return (cleaned or "x")[:limit]


def short_hash(*parts: Any) -> str:
    """8 hex digits of a SHA-256 over `parts`: tells apart folders whose readable names may collide."""
    return hashlib.sha256("\0".join(str(p) for p in parts).encode("utf-8")).hexdigest()[:8]


def train_resolution(base: dict[str, Any], dataset: dict[str, Any]) -> int:
    """The training resolution: the Dataset node's, or the architecture's own for its 0."""
    return dataset.get("resolution") or NATIVE_RESOLUTION.get(base.get("arch") or "sd1", 512)


def class_images_folder_name(base: dict[str, Any], dataset: dict[str, Any]) -> str:
    """The folder of generated class images: `<model stem>_<class prompt>_<hash>`.

    The slug keeps the name readable but drops non-ASCII text and the model's subfolder, so the
    hash of the full model name, class prompt and resolution keeps apart what the slug merges.
    """
    model, prompt = str(base["name"]), dataset.get("class_prompt", "")
    readable = slug(f"{Path(model).stem}_{prompt}", 80)
    return f"{readable}_{short_hash(model, prompt, train_resolution(base, dataset))}"


def widget_spec(widget: Widget) -> dict[str, Any]:
    """Everything needed to draw a widget: its TrainConfig option's type, default, help, choices and
    range, with what `widget` changes of them."""
    if widget.kind is not None:
        spec = {"type": widget.kind, "default": widget.default, "help": "", "choices": None, "min": None, "max": None}
    else:
        spec = field_info(widget.name)
    changes = {"default": widget.default, "choices": widget.choices, "min": widget.min, "max": widget.max}
    spec.update({key: value for key, value in changes.items() if value is not None and value is not _FROM_OPTION})
    help_text = spec.pop("help")
    tooltip = widget.tooltip or help_text
    if spec["type"] is list:
        tooltip += " One per line."
    return {**spec, "name": widget.name, "tooltip": tooltip, "step": widget.step or 0.01,
            "placeholder": widget.placeholder}


def _settings_widget(option: str) -> tuple[str, Widget] | None:
    """(settings node id, widget) of an option a settings node has."""
    return next(((node_id, w) for node_id, node in SETTINGS_NODES.items() for w in node.widgets if w.name == option),
                None)


def add_settings(settings: dict[str, Any] | None, node_id: str, values: dict[str, Any]) -> dict[str, Any]:
    """The settings a chain of settings nodes has made so far (`settings`, None at its start) with the
    widget values of node `node_id` added. A new dict: ComfyUI caches the incoming one.

    Each option lives in one settings node, so nothing is replaced; the same node twice in one chain
    is a ValueError (which of its values counts would depend on the order of the links)."""
    settings = settings or DEFAULT_SETTINGS
    title = SETTINGS_NODES[node_id].display_name
    if node_id in settings.get("nodes", []):
        raise ValueError(f"two {title} nodes are chained into one settings input; remove one of them (each option "
                         f"is set by one node)")
    values = dict(values)
    own = {key: values.pop(key) for key in (MEMORY_PRESET, NUM_GPUS) if key in values}
    return {**settings, **own, "options": {**settings.get("options", {}), **values},
            "nodes": [*settings.get("nodes", []), node_id]}


def apply_memory_preset(settings: dict[str, Any] | None, arch: str) -> tuple[dict[str, Any], dict[str, tuple]]:
    """The TrainConfig options of a settings dict with its memory preset applied for `arch`, and the
    options the preset left as the user set them: {option: (the user's value, the preset's)}.

    A preset sets an option the user left at its default; a value the user chose (another than the
    default) is kept, so switching train_text_encoder on under a preset that turns it off trains it."""
    settings = settings or DEFAULT_SETTINGS
    options = dict(settings.get("options", {}))
    preset = settings.get(MEMORY_PRESET, PRESET_NONE)
    if preset != PRESET_NONE and preset not in MEMORY_PRESETS:
        raise ValueError(f"memory_preset {preset!r} is not one of {', '.join(PRESET_CHOICES)}")
    kept = {}
    for key, value in (MEMORY_PRESETS[preset][arch] if preset != PRESET_NONE else {}).items():
        chosen = options.get(key, cb_default(key))
        if chosen != cb_default(key) and chosen != value:
            kept[key] = (chosen, value)
        else:
            options[key] = value
    return options, kept


def memory_preset_report(settings: dict[str, Any] | None, arch: str) -> str:
    """What the memory preset does in this run, in a line for the user ('' without a preset)."""
    preset = (settings or DEFAULT_SETTINGS).get(MEMORY_PRESET, PRESET_NONE)
    if preset == PRESET_NONE:
        return ""
    _, kept = apply_memory_preset(settings, arch)
    report = f"memory_preset {preset} ({ARCH_NAMES.get(arch, arch)}) sets {preset_summary(preset, arch)}"
    if kept:
        report += "; kept as you set: " + ", ".join(f"{key} {_shown(mine)} (the preset's: {_shown(theirs)})"
                                                     for key, (mine, theirs) in kept.items())
    return report


def memory_node_text(preset: str) -> str:
    """The Memory & Speed node's text: what its preset sets for each architecture."""
    if preset == PRESET_NONE:
        return "no memory preset: the options as set"
    sets = "; ".join(f"for {ARCH_NAMES[arch]}: {preset_summary(preset, arch)}" for arch in ARCH_NAMES)
    return (f"memory_preset {preset} sets {sets}. Options you set away from their defaults keep your value "
            f"(Train LoRA names them when it starts).")


def settings_options(settings: dict[str, Any] | None, arch: str) -> dict[str, Any]:
    """The TrainConfig options of a settings dict, with its memory preset applied for `arch`."""
    options, _ = apply_memory_preset(settings, arch)
    for option, value in options.items():  # ComfyUI checks its widgets; a script calling a node does not
        found = _settings_widget(option)
        if found and found[1].choices and value not in found[1].choices:
            raise ValueError(f"{option} {value!r} is not one of {', '.join(found[1].choices)} in "
                             f"{SETTINGS_NODES[found[0]].display_name}")
    if isinstance(options.get("validation_prompts"), str):
        options["validation_prompts"] = [p.strip() for p in options["validation_prompts"].splitlines() if p.strip()]
    return options


def build_train_config(*, base: dict[str, Any], dataset: dict[str, Any], settings: dict[str, Any] | None,
                       train: dict[str, Any], run_dir: Path, lora_dir: Path, tokenizer: str = "",
                       class_dir: Path | None = None, class_images_available: int | None = None) -> TrainConfig:
    """The validated TrainConfig of a Train LoRA node run (raises the trainer's ConfigError).

    `base` comes from the Base model node, `dataset` from a Dataset node, `settings` from the
    chain of settings nodes (or None), `train` holds the Train LoRA widgets, by their TrainConfig
    names: output_name, max_train_steps, learning_rate, rank, alpha, seed, with_prior_preservation and
    resume. `class_images_available`: the
    number of images in a class folder the user chose, which is read and never written to, so
    at most that many class images are used (none are generated into it).
    """
    values: dict[str, Any] = settings_options(settings, base.get("arch") or "sd1")
    values.update({key: dataset[key] for key in DATASET_OPTIONS if key in dataset})
    values.update(
        pretrained_model=str(base["path"]),
        tokenizer=tokenizer if base.get("kind", "checkpoint") == "checkpoint" else "",
        instance_dir=str(dataset["folder"]),
        instance_prompt=dataset.get("instance_prompt", ""),
        resolution=train_resolution(base, dataset),
        prediction_type=base.get("prediction_type_choice", "auto"),  # 'auto': the trainer detects it
        max_train_steps=int(train["max_train_steps"]),
        learning_rate=float(train["learning_rate"]),
        rank=int(train["rank"]),
        alpha=float(train["alpha"]),
        seed=int(train["seed"]),
        output_dir=str(run_dir),
        output_name=sanitize_output_name(train["output_name"]),
        lora_dir=str(lora_dir),
        resume=bool(train.get("resume")),
    )
    if train.get("with_prior_preservation"):
        values.update(with_prior_preservation=True, class_prompt=dataset.get("class_prompt", ""),
                      class_dir=str(class_dir) if class_dir else "")
        if class_images_available is not None:
            default = cb_default("num_class_images")
            values["num_class_images"] = min(int(values.get("num_class_images", default)), class_images_available)
    return TrainConfig.from_dict(values)
