"""From node widgets to one TrainConfig: names, memory presets, the options the nodes expose.

The nodes pass plain dicts between them (a dataset, a base model, training settings);
`build_train_config` turns them and the Train LoRA widgets into the trainer's validated
`TrainConfig`. No ComfyUI import here, so all of it is tested without ComfyUI; the
tooltips of option widgets come from the TrainConfig field help, so the node and the
CLI document an option with the same words.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from pathlib import Path
from typing import Any

from ..trainer.config import TrainConfig

# Options of the Dataset nodes (the same names as TrainConfig fields).
DATASET_OPTIONS = ("caption_mode", "repeats", "resolution", "buckets", "crop", "flip_p")

# Options of the Training settings node, in widget order. This order is part of the
# saved-workflow format (`widgets_values` is positional): append new options at the end.
SETTINGS_OPTIONS = (
    "mixed_precision", "gradient_checkpointing", "batch_size", "gradient_accumulation_steps", "optimizer",
    "lr_scheduler", "lr_warmup_steps", "max_grad_norm", "weight_decay",
    "train_text_encoder", "text_encoder_lr", "lora_targets", "lora_dropout", "use_dora",
    "snr_gamma", "noise_offset", "caption_dropout", "shuffle_captions", "keep_tokens", "upscale", "bucket_step",
    "cache_latents", "prediction_type",
    "num_class_images", "prior_loss_weight", "class_sample_steps",
    "validation_prompts", "sample_every", "sample_at_end", "sample_steps", "sample_guidance", "sample_seed",
    "sample_resolution",
    "checkpoint_every", "keep_checkpoints", "save_dtype", "export_format", "overwrite",
)
# Options added after the node's num_gpus widget existed: they come after it, so older saved
# workflows keep their values in place. Append new options here.
SETTINGS_OPTIONS_AFTER_NUM_GPUS = ("offload_frozen_models", "compile_unet", "cuda_graphs")

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

# What the Train LoRA node uses when no Training settings node is connected.
DEFAULT_SETTINGS: dict[str, Any] = {"memory_preset": PRESET_NONE, "options": {}}

# Native resolution of each architecture, the Dataset node's "auto" (0).
NATIVE_RESOLUTION = {"sd1": 512, "sdxl": 1024}

# Choices a node offers where they are fewer than the TrainConfig option's: Train LoRA's outputs
# (lora_name, LORA_MODEL) are the kohya file, which export_format 'diffusers' alone never writes.
NODE_CHOICES: dict[str, tuple[str, ...]] = {"export_format": ("kohya", "both")}

# What a node widget's tooltip says beyond the option's help text.
NODE_TOOLTIP_NOTES = {
    "prediction_type": "Both DreamBooth Base Model and Training Settings have this widget: 'auto' in one takes the "
                       "other's value; two different values other than 'auto' are an error.",
    "export_format": "Train LoRA outputs the kohya file, so the nodes offer 'kohya' and 'both' (which also writes "
                     "diffusers' layout); 'diffusers' alone is for the command line.",
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


def legacy_class_images_folder_name(base: dict[str, Any], dataset: dict[str, Any]) -> str:
    """The class-images folder name before it carried a hash (a run that used it keeps it)."""
    return slug(f"{Path(str(base['name'])).stem}_{dataset.get('class_prompt', '')}", 100)


def train_prediction_type(base: dict[str, Any], settings_value: str) -> str:
    """The prediction_type to train with, from Training Settings' widget and Base Model's.

    'auto' in one takes the other's value (Base Model's widget, not what it detected: 'auto'
    stays 'auto' so the trainer detects it); two different explicit values are a ValueError.
    """
    base_value = base.get("prediction_type_choice", "auto")
    if settings_value == "auto":
        return base_value
    if base_value not in ("auto", settings_value):
        raise ValueError(f"prediction_type is {base_value!r} in DreamBooth Base Model but {settings_value!r} in "
                         f"DreamBooth Training Settings; set one of them to 'auto'")
    return settings_value


def settings_options(settings: dict[str, Any] | None, arch: str) -> dict[str, Any]:
    """The TrainConfig options of a settings dict, with its memory preset applied for `arch`."""
    settings = settings or DEFAULT_SETTINGS
    options = dict(settings.get("options", {}))
    preset = settings.get("memory_preset", PRESET_NONE)
    if preset != PRESET_NONE:
        if preset not in MEMORY_PRESETS:
            raise ValueError(f"memory_preset {preset!r} is not one of {', '.join(PRESET_CHOICES)}")
        options.update(MEMORY_PRESETS[preset][arch])
    if isinstance(options.get("validation_prompts"), str):
        options["validation_prompts"] = [p.strip() for p in options["validation_prompts"].splitlines() if p.strip()]
    return options


def build_train_config(*, base: dict[str, Any], dataset: dict[str, Any], settings: dict[str, Any] | None,
                       train: dict[str, Any], run_dir: Path, lora_dir: Path, tokenizer: str = "",
                       class_dir: Path | None = None, class_images_available: int | None = None) -> TrainConfig:
    """The validated TrainConfig of a Train LoRA node run (raises the trainer's ConfigError).

    `base` comes from the Base model node, `dataset` from a Dataset node, `settings` from the
    Training settings node (or None), `train` holds the Train LoRA widgets: output_name, steps,
    learning_rate, rank, alpha, seed, resume, prior_preservation. `class_images_available`: the
    number of images in a class folder the user chose, which is read and never written to, so
    at most that many class images are used (none are generated into it).
    """
    values: dict[str, Any] = settings_options(settings, base.get("arch") or "sd1")
    for option, choices in NODE_CHOICES.items():  # ComfyUI checks its widgets; a script calling a node does not
        if option in values and values[option] not in choices:
            raise ValueError(f"{option} {values[option]!r} is not one of {', '.join(choices)}: "
                             f"{NODE_TOOLTIP_NOTES[option]}")
    values.update({key: dataset[key] for key in DATASET_OPTIONS if key in dataset})
    values.update(
        pretrained_model=str(base["path"]),
        tokenizer=tokenizer if base.get("kind", "checkpoint") == "checkpoint" else "",
        instance_dir=str(dataset["folder"]),
        instance_prompt=dataset.get("instance_prompt", ""),
        resolution=train_resolution(base, dataset),
        prediction_type=train_prediction_type(base, values.get("prediction_type", "auto")),
        max_train_steps=int(train["steps"]),
        learning_rate=float(train["learning_rate"]),
        rank=int(train["rank"]),
        alpha=float(train["alpha"]),
        seed=int(train["seed"]),
        output_dir=str(run_dir),
        output_name=sanitize_output_name(train["output_name"]),
        lora_dir=str(lora_dir),
        resume="latest" if train.get("resume") else "",
    )
    if train.get("prior_preservation"):
        values.update(with_prior_preservation=True, class_prompt=dataset.get("class_prompt", ""),
                      class_dir=str(class_dir) if class_dir else "")
        if class_images_available is not None:
            default = cb_default("num_class_images")
            values["num_class_images"] = min(int(values.get("num_class_images", default)), class_images_available)
    return TrainConfig.from_dict(values)
