"""The one TrainConfig: every option of a training run, typed, documented and validated.

A config is read from TOML or JSON (`load_config`), checked once (`TrainConfig.validate`,
called by `from_dict`), and then travels through the trainer as this object. Each field
carries its help text, its allowed values and its range in the dataclass metadata; the
docs/options.md and the error messages are both made from that metadata.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .run_folder import checkpoints_dir

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]


class ConfigError(ValueError):
    """A config that cannot be trained: every problem found, one per line."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("invalid training config:\n  - " + "\n  - ".join(problems))


def opt(default: Any, help: str, *, choices: tuple | None = None, min: float | None = None,
        max: float | None = None, section: str = "train", factory: bool = False) -> Any:
    """A config field with its documentation and constraints in the metadata."""
    meta = {"help": help, "choices": choices, "min": min, "max": max, "section": section}
    if factory:
        return field(default_factory=default, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class TrainConfig:
    # --- model -----------------------------------------------------------------------
    pretrained_model: str = opt("", "Base model: a single-file checkpoint (.safetensors, .ckpt) or a diffusers folder.", section="model")
    tokenizer: str = opt("", "Folder with the CLIP tokenizer (tokenizer.json, or vocab.json and merges.txt), or a diffusers model folder. Empty: the diffusers folder's own, else ComfyUI's bundled one.", section="model")
    prediction_type: str = opt("auto", "What the model predicts. 'auto' reads it from the model (a `v_pred` key or the scheduler config).", choices=("auto", "epsilon", "v_prediction"), section="model")

    # --- data ------------------------------------------------------------------------
    instance_dir: str = opt("", "Folder of training images (png, jpg, jpeg, webp). `N_name` subfolders repeat their images N times.", section="data")
    instance_prompt: str = opt("", "Prompt with the trigger word, e.g. 'a photo of sks dog'. Used for images without a caption file.", section="data")
    caption_mode: str = opt("file_or_prompt", "'file_or_prompt': the .txt beside an image, else the instance prompt; 'prompt': always the instance prompt; 'prompt_and_file': instance prompt, then the caption.", choices=("file_or_prompt", "prompt", "prompt_and_file"), section="data")
    caption_extension: str = opt(".txt", "Extension of caption files beside the images.", section="data")
    repeats: int = opt(1, "How often each image is seen per epoch (folders named `N_name` override it).", min=1, max=10000, section="data")
    resolution: int = opt(512, "Training resolution: the side of the square of equal area (512 for SD1.5, 1024 for SDXL).", min=8, max=4096, section="data")
    buckets: bool = opt(True, "Aspect-ratio buckets: keep each image's shape instead of cropping to a square.", section="data")
    bucket_step: int = opt(64, "Bucket sides are multiples of this (pixels; 8 at least).", min=8, max=512, section="data")
    upscale: bool = opt(False, "Upscale images smaller than their bucket (otherwise they train at a smaller bucket).", section="data")
    crop: str = opt("center", "How an image is cropped to its bucket.", choices=("center", "random"), section="data")
    flip_p: float = opt(0.0, "Probability of a horizontal flip per sample (0 for asymmetric subjects and text).", min=0.0, max=1.0, section="data")
    caption_dropout: float = opt(0.0, "Probability of training a sample with an empty caption.", min=0.0, max=1.0, section="data")
    shuffle_captions: bool = opt(False, "Shuffle the comma-separated tags of a caption each time it is used.", section="data")
    keep_tokens: int = opt(0, "With shuffle_captions: the first K comma-separated tags stay in place (the trigger word).", min=0, max=1000, section="data")
    mask_floor: float = opt(0.1, "Masked training (images with a mask: `<name>_mask.png` beside the image, `masks/<name>.png`, or transparency): the loss weight where a mask is black; white weighs 1, grey between. 0 ignores the background entirely; 1 trains as if there were no masks.", min=0.0, max=1.0, section="data")

    # --- prior preservation ----------------------------------------------------------------
    with_prior_preservation: bool = opt(False, "Train on class images too, so the class ('dog') keeps its meaning.", section="prior")
    class_dir: str = opt("", "Folder of class images; missing ones are generated there with the base model and reused.", section="prior")
    class_prompt: str = opt("", "Prompt of the class, e.g. 'a photo of dog'.", section="prior")
    num_class_images: int = opt(100, "Class images to use (generated if the folder has fewer).", min=1, max=100000, section="prior")
    prior_loss_weight: float = opt(1.0, "Weight of the class-image loss.", min=0.0, max=100.0, section="prior")
    class_sample_steps: int = opt(25, "Sampling steps when generating class images.", min=1, max=1000, section="prior")

    # --- LoRA ------------------------------------------------------------------------------
    network: str = opt("lora", "The kind of adapter. 'lora': low-rank (up @ down); 'loha': LoHa, the elementwise product of two low-rank products (rank r holds up to r²); 'lokr': LoKr, a Kronecker product of a small and a larger matrix, few parameters (see lokr_factor). All three are exported in the layout ComfyUI, A1111/Forge and kohya load.", choices=("lora", "loha", "lokr"), section="lora")
    rank: int = opt(16, "LoRA rank (dimension). LoKr: the rank of its factors where a factor is decomposed; a factor small enough (a side at most 2 x rank) is trained as a full matrix.", min=1, max=1024, section="lora")
    alpha: float = opt(16.0, "LoRA alpha; the update is scaled by alpha / rank.", min=0.0, max=4096.0, section="lora")
    lora_dropout: float = opt(0.0, "Dropout on the LoRA path.", min=0.0, max=1.0, section="lora")
    lora_targets: str = opt("attention", "'attention': the q/k/v/out projections of the UNet attention; 'all_linear': every linear layer of the transformer blocks; 'all_linear_and_conv': also the UNet's convolutions (ResNet blocks, down/up samplers, 1x1 projections), as LyCORIS's LoCon does.", choices=("attention", "all_linear", "all_linear_and_conv"), section="lora")
    train_text_encoder: bool = opt(False, "Also train a LoRA on the text encoder(s) (both on SDXL).", section="lora")
    text_encoder_lr: float = opt(0.0, "Learning rate of the text-encoder LoRA; 0 uses learning_rate.", min=0.0, max=1.0, section="lora")
    use_dora: bool = opt(False, "DoRA (weight-decomposed LoRA), for network 'lora'. Exported with `dora_scale` keys.", section="lora")
    lokr_factor: int = opt(-1, "LoKr: each side of a layer is split as factor x (side / factor) between the Kronecker product's first and second matrix (where it does not divide, the nearest split below); -1 splits near the square root, as LyCORIS does.", min=-1, max=4096, section="lora")
    lokr_decompose_both: bool = opt(False, "LoKr: also decompose the first (smaller) Kronecker factor into two rank-`rank` matrices where that is smaller.", section="lora")

    # --- optimisation ----------------------------------------------------------------------
    max_train_steps: int = opt(800, "Optimizer steps to train.", min=1, max=10_000_000)
    learning_rate: float = opt(1e-4, "Peak learning rate of the UNet LoRA.", min=0.0, max=10.0)
    batch_size: int = opt(1, "Instance images per step (the same number of class images is added with prior preservation).", min=1, max=4096)
    gradient_accumulation_steps: int = opt(1, "Micro-batches summed per optimizer step.", min=1, max=4096)
    optimizer: str = opt("adamw", "'adamw' (fused where available), 'adamw8bit' (needs bitsandbytes), 'prodigy' (needs prodigyopt; use learning_rate 1.0).", choices=("adamw", "adamw8bit", "prodigy"))
    adam_beta1: float = opt(0.9, "Adam beta1.", min=0.0, max=1.0)
    adam_beta2: float = opt(0.999, "Adam beta2.", min=0.0, max=1.0)
    adam_epsilon: float = opt(1e-8, "Adam epsilon.", min=0.0, max=1.0)
    weight_decay: float = opt(1e-2, "Decoupled weight decay.", min=0.0, max=10.0)
    max_grad_norm: float = opt(1.0, "Clip the gradient norm to this; 0 disables clipping.", min=0.0, max=1e6)
    lr_scheduler: str = opt("constant", "Learning-rate schedule after warm-up.", choices=("constant", "cosine", "linear"))
    lr_warmup_steps: int = opt(0, "Linear warm-up steps.", min=0, max=10_000_000)
    mixed_precision: str = opt("auto", "'auto': bf16 where the GPU or CPU computes in bf16 (CPUs with AVX512-BF16/AMX), else fp16 on a GPU and 'no' (fp32) on a CPU. LoRA weights stay fp32.", choices=("auto", "no", "fp16", "bf16"))
    gradient_checkpointing: bool = opt(False, "Recompute activations in the backward pass: less memory, about 25% slower.")
    compile_unet: bool = opt(False, "Compile the UNet with torch.compile: minutes of compiling before the first step (samples are made uncompiled); later runs with the same model and resolution reuse inductor's disk cache and start ~10x sooner. It turns cuda_graphs off, and on a GPU the graphs did more: in one H200 run compile_unet took a step from 0.178 to 0.087 s, in another (a different host) CUDA graphs from 0.162 to 0.036 s. Keep it off unless it measures faster on your GPU. No gain on the CPU for real models (benchmarks/README.md).")
    cuda_graphs: str = opt("auto", "Replay the UNet's forward and backward as CUDA graphs, captured once per bucket shape, and again after each round of samples (1-3 s each): on a GPU the step is bound by the host launching thousands of kernels, and a graph launches them at once (H100: SD1.5 512 px 0.111 -> 0.032 s/step, SDXL 1024 px 0.433 -> 0.143; the same losses). The graphs keep their memory while training runs (SDXL 1024 px: 22.6 GB reserved against 17.9), so the SDXL memory presets turn them off. 'auto': on a CUDA GPU with one process, except in fp32 (mixed_precision 'no') and for LoHa / LoKr (network), neither yet checked on a GPU; 'yes': also there; 'no': never. Samples are made without graphs.", choices=("auto", "yes", "no"))
    snr_gamma: float = opt(0.0, "Min-SNR loss weighting gamma (5 is the paper's value); 0 disables it.", min=0.0, max=1000.0)
    noise_offset: float = opt(0.0, "Noise offset (0.05-0.1 helps very dark or bright images); 0 disables it.", min=0.0, max=1.0)
    offload_frozen_models: bool = opt(False, "Encode every image and caption once before the first step (the UNet waits in CPU memory meanwhile), then keep the VAE and text encoders in CPU memory (on a GPU: ~1.8 GB less for SDXL, ~0.4 GB for SD1.5). Class images and samples are made with the models taking turns on the GPU: text encoders, then UNet, then VAE. Has an effect only while latents are cached and the text encoders are not trained.")
    cache_latents: str = opt("auto", "Cache VAE latents and text embeddings per sample. 'auto': when no augmentation or text-encoder training changes them. 'yes' also with augmentation (each image's first draw is then reused every step); text embeddings are never cached while the text encoders train.", choices=("auto", "yes", "no"))
    seed: int = opt(42, "Seed for noise, data order, augmentation and LoRA initialisation: the same seed repeats a run.", min=0, max=2**32 - 1)

    # --- samples ---------------------------------------------------------------------------
    validation_prompts: list[str] = opt(list, "Prompts sampled during and after training; empty uses the instance prompt.", section="sample", factory=True)
    sample_every: int = opt(0, "Sample the validation prompts every N steps; 0 only at the end.", min=0, max=10_000_000, section="sample")
    sample_at_end: bool = opt(True, "Sample the validation prompts when training ends.", section="sample")
    sample_steps: int = opt(25, "Sampling steps for validation images.", min=1, max=1000, section="sample")
    sample_guidance: float = opt(7.0, "Classifier-free guidance scale of validation images.", min=0.0, max=100.0, section="sample")
    sample_seed: int = opt(1234, "Seed of the first validation image (the next ones use seed+1, ...); fixed so samples compare across steps.", min=0, max=2**32 - 1, section="sample")
    sample_resolution: int = opt(0, "Side of validation images; 0 uses resolution.", min=0, max=4096, section="sample")

    # --- checkpoints and output --------------------------------------------------------------
    output_dir: str = opt("output", "Run folder: checkpoints, samples, the event log and the LoRA.", section="output")
    output_name: str = opt("my_lora", "Name of the LoRA file (no folders, no extension); one every system accepts: not a Windows device name (CON, NUL, COM1 ...), no trailing dot or space, no character Windows forbids (< > ? * and the like).", section="output")
    lora_dir: str = opt("", "Where the finished LoRA is written; empty uses output_dir.", section="output")
    save_dtype: str = opt("fp16", "Precision of the exported LoRA.", choices=("fp16", "bf16", "fp32"), section="output")
    export_format: str = opt("kohya", "'kohya' loads in ComfyUI, A1111, Forge and diffusers; 'diffusers' is diffusers' own layout; 'both' writes both.", choices=("kohya", "diffusers", "both"), section="output")
    checkpoint_every: int = opt(250, "Write a resumable checkpoint (with the LoRA so far: checkpoints/step_NNNNNNNN/lora.safetensors) every N steps, and when the run ends or stops; 0: only then.", min=0, max=10_000_000, section="output")
    keep_checkpoints: int = opt(2, "How many of the latest checkpoints to keep.", min=1, max=1000, section="output")
    resume: bool = opt(False, "Continue from the newest checkpoint in output_dir (with none there, start from step 0).", section="output")
    resume_from_checkpoint: str = opt("", "A checkpoint folder (output_dir/checkpoints/step_NNNNNNNN) to continue from, for an earlier one than the newest; empty: see resume.", section="output")
    overwrite: bool = opt(False, "Replace an existing LoRA of the same name, and delete the checkpoints in output_dir this run did not write: an earlier run's, or those after the checkpoint it resumes from (otherwise the run refuses to start).", section="output")

    # ---------------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        """Build and validate a config; unknown keys and wrong types are errors, all listed at once."""
        problems: list[str] = []
        names = {f.name: f for f in dataclasses.fields(cls)}
        hints = typing.get_type_hints(cls)
        kwargs: dict[str, Any] = {}
        for key, value in _flatten_sections(data).items():
            if isinstance(value, dict) and key not in names:  # a TOML table that is none of the sections
                problems.append(f"[{key}]: not a section; the sections are {_section_list()} (or none)")
                continue
            if key not in names:
                close = difflib.get_close_matches(key, names, n=1)
                hint = f"; did you mean '{close[0]}'?" if close else ""
                problems.append(f"{key}: unknown option{hint}")
                continue
            try:
                kwargs[key] = _coerce(value, hints[key])
            except (TypeError, ValueError, OverflowError):  # OverflowError: int(inf), a TOML 1e400
                choices = names[key].metadata["choices"]
                # `cuda_graphs = true` is a likely slip: name the strings it takes, not just "a string"
                expected = f"one of {', '.join(map(repr, choices))} (a string)" if choices else _type_name(hints[key])
                got = (f"a table ([{key}] is an option, not one of the sections {_section_list()})"
                       if isinstance(value, dict) else repr(value))
                problems.append(f"{key}: expected {expected}, got {got}")
        if problems:
            raise ConfigError(problems)
        config = cls(**kwargs)
        config.validate()
        return config

    def to_dict(self) -> dict[str, Any]:
        """All options as plain JSON-able values (the form written into LoRA metadata)."""
        return dataclasses.asdict(self)

    def validate(self) -> None:
        """Check every value against its constraints and the rules between options."""
        problems: list[str] = []
        for f in dataclasses.fields(self):
            value, meta = getattr(self, f.name), f.metadata
            if meta.get("choices") and value not in meta["choices"]:
                allowed = ", ".join(repr(c) for c in meta["choices"])
                problems.append(f"{f.name}: {value!r} is not allowed; choose one of {allowed}")
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                if isinstance(value, float) and not math.isfinite(value):
                    problems.append(f"{f.name}: {value!r} is not a finite number")
                elif meta.get("min") is not None and value < meta["min"]:
                    problems.append(f"{f.name}: {value!r} is below the minimum {meta['min']}")
                elif meta.get("max") is not None and value > meta["max"]:
                    problems.append(f"{f.name}: {value!r} is above the maximum {meta['max']}")
        if not self.pretrained_model:
            problems.append("pretrained_model: required; a checkpoint file or a diffusers folder")
        if not self.instance_dir:
            problems.append("instance_dir: required; the folder of training images")
        if not self.instance_prompt.strip():
            problems.append("instance_prompt: required; e.g. 'a photo of sks dog'")
        if self.with_prior_preservation:
            if not self.class_prompt.strip():
                problems.append("class_prompt: required with with_prior_preservation; e.g. 'a photo of dog'")
            if not self.class_dir:
                problems.append("class_dir: required with with_prior_preservation; a folder for class images (created if missing)")
        problems += check_output_name(self.output_name) or _check_path_lengths(self)
        if self.resume_from_checkpoint and not Path(self.resume_from_checkpoint).is_dir():
            problems.append(f"resume_from_checkpoint: {self.resume_from_checkpoint!r} is not an existing folder; name "
                            "an output_dir/checkpoints/step_NNNNNNNN folder, or leave it empty and set resume = true")
        if self.bucket_step % 8:
            problems.append(f"bucket_step: {self.bucket_step} must be a multiple of 8 (the VAE downsamples by 8)")
        if self.resolution % 8:
            problems.append(f"resolution: {self.resolution} must be a multiple of 8 (the VAE downsamples by 8)")
        if self.keep_tokens and not self.shuffle_captions:
            problems.append("keep_tokens: only has an effect with shuffle_captions = true")
        if self.bucket_step > self.resolution:
            problems.append(f"bucket_step: {self.bucket_step} is above resolution {self.resolution}; buckets would "
                            "train larger than the resolution asks. Use a bucket_step of at most the resolution")
        if self.sample_resolution % 8:
            problems.append(f"sample_resolution: {self.sample_resolution} must be a multiple of 8 (the VAE "
                            "downsamples by 8), or 0 for resolution")
        if self.caption_extension and not self.caption_extension.startswith("."):
            problems.append(f"caption_extension: {self.caption_extension!r} must start with a dot, e.g. "
                            f"'.{self.caption_extension}'")
        if not self.learning_rate > 0:  # NaN included
            problems.append(f"learning_rate: {self.learning_rate} trains nothing (the LoRA stays zero); use a value "
                            "above 0, e.g. 1e-4 (1.0 with optimizer 'prodigy')")
        elif self.optimizer == "prodigy" and self.learning_rate < 0.1:
            # Prodigy finds the step size itself; learning_rate scales it, so 1e-4 trains next to nothing
            problems.append(f"learning_rate: {self.learning_rate} with optimizer 'prodigy' scales the step size it "
                            "finds by that much, and trains next to nothing; use 1.0 (or 0.1 to 1)")
        if self.with_prior_preservation and self.class_dir and Path(self.class_dir).is_file():
            problems.append(f"class_dir: {self.class_dir} is a file; class images need a folder (created if missing)")
        if not self.alpha > 0:  # NaN included
            problems.append(f"alpha: {self.alpha} trains nothing (the LoRA's update is scaled by alpha / rank); "
                            f"use a value above 0, e.g. {self.rank} for a scale of 1")
        if self.lokr_factor == 0:
            problems.append("lokr_factor: 0 splits nothing; use -1 (automatic, the usual choice) or a factor such as 4 or 8")
        if self.use_dora and self.lora_targets == "all_linear_and_conv":
            problems.append("use_dora: DoRA is exported for linear layers only; use lora_targets 'all_linear' with it, "
                            "or use_dora = false")
        if self.network in ("loha", "lokr") and self.use_dora:
            problems.append(f"use_dora: DoRA is a LoRA option; set use_dora = false for network '{self.network}', "
                            "or network = 'lora'")
        if self.network in ("loha", "lokr") and self.lora_dropout > 0:
            problems.append(f"lora_dropout: dropout on the LoRA path is a LoRA option; set lora_dropout = 0 for "
                            f"network '{self.network}', or network = 'lora'")
        if self.network in ("loha", "lokr") and self.export_format != "kohya":
            problems.append(f"export_format: diffusers' layout holds LoRAs only; use 'kohya' for network "
                            f"'{self.network}' (ComfyUI, A1111/Forge and kohya load it)")
        if self.lora_dropout >= 1:
            problems.append(f"lora_dropout: {self.lora_dropout} drops the whole LoRA path, which then never trains; "
                            "use a value below 1 (0 to 0.1 is usual)")
        for name in ("adam_beta1", "adam_beta2"):
            if getattr(self, name) >= 1:
                problems.append(f"{name}: {getattr(self, name)} must be below 1 (0.9 and 0.999 are usual)")
        if self.with_prior_preservation and self.class_dir and self.instance_dir:
            problems += _check_separate_folders(Path(self.instance_dir), Path(self.class_dir))
        if problems:
            raise ConfigError(problems)

    @property
    def use_cached_latents(self) -> bool:
        """Whether latents and text embeddings can be computed once per sample."""
        if self.cache_latents != "auto":
            return self.cache_latents == "yes"
        return not self.augments and not self.train_text_encoder

    @property
    def augments(self) -> bool:
        """Whether a sample changes from one draw to the next (flip, random crop, caption shuffle or dropout)."""
        return self.flip_p > 0 or self.crop == "random" or self.shuffle_captions or self.caption_dropout > 0

    @property
    def unet_targets_all_linear(self) -> bool:
        return self.lora_targets in ("all_linear", "all_linear_and_conv")


def with_option_defaults(options: dict[str, Any]) -> dict[str, Any]:
    """`options` (a saved `to_dict()`) with every option it lacks at its default: files written
    before an option existed still compare equal to a config that leaves it at its default."""
    return {**TrainConfig().to_dict(), **options}


def _check_separate_folders(instance_dir: Path, class_dir: Path) -> list[str]:
    """The instance and class folders must not read each other's images: equal, or one an `N_name`
    subfolder of the other (which the image scan reads; a plain subfolder it ignores)."""
    from .data import REPEAT_FOLDER  # (data imports this module)

    instance, classes = instance_dir.resolve(), class_dir.resolve()

    def reads(folder: Path, other: Path) -> bool:
        return other == folder or (folder in other.parents
                                   and REPEAT_FOLDER.match(other.relative_to(folder).parts[0]) is not None)
    if reads(instance, classes) or reads(classes, instance):
        return [f"class_dir: {class_dir} is instance_dir {instance_dir}, or an `N_name` subfolder of it or the other "
                "way round: the subject's photos would train as class images (and generated class images land "
                "among them). Use a folder of its own, e.g. beside the instance folder"]
    return []


def partial_lora_name(output_name: str, step: int) -> str:
    """The file name of the LoRA a run stopped at `step` writes (`check_output_name` keeps a
    run's own name from ending like one)."""
    return f"{output_name}_step{step:06d}.safetensors"


_PARTIAL_SUFFIX = re.compile(r"_step\d{6}$")
# Names Windows keeps for devices, with any extension ('con.foo' too): a file cannot be called that there.
WINDOWS_DEVICE_NAMES = frozenset(["con", "prn", "aux", "nul", *(f"{port}{n}" for port in ("com", "lpt")
                                                                 for n in [*"0123456789", "\u00b9", "\u00b2", "\u00b3"])])
# Windows' MAX_PATH is 260 with the terminating NUL: the longest path it opens without long-path support.
WINDOWS_MAX_PATH = 259


def check_output_name(name: str) -> list[str]:
    """The problems of `name` as output_name (a file name every system accepts); empty when it is fine."""
    if not name or not name.strip():
        return ["output_name: required; a plain file name such as 'my_dog'"]
    if name in (".", "..") or ".." in name or "/" in name or "\\" in name or os.path.isabs(name) or ":" in name:
        return [f"output_name: {name!r} must be a plain file name without folders, '..' or a drive"]
    if any(ord(c) < 32 for c in name):
        return [f"output_name: {name!r} contains control characters"]
    if any(c in '<>"|?*' for c in name):  # refused everywhere: a workflow made elsewhere must work on Windows
        return [f"output_name: {name!r} contains one of < > \" | ? *, which Windows does not allow in a file name; "
                "use letters, digits, spaces, '_' or '-'"]
    stem = name.split(".")[0].rstrip(" ")
    if stem.lower() in WINDOWS_DEVICE_NAMES:
        return [f"output_name: {name!r} is a device name on Windows (CON, PRN, AUX, NUL, COM1-9, LPT1-9, also with "
                f"an extension), where no file can have it; choose another, e.g. '{stem}_lora'"]
    if name != name.rstrip(" ."):
        return [f"output_name: {name!r} ends with a dot or a space, which Windows drops from file names; remove it "
                f"({name.rstrip(' .')!r})"]
    if name.lower().endswith((".safetensors", ".bin", ".pt", ".ckpt")):  # it would be my_dog.safetensors.safetensors
        return [f"output_name: {name!r} has a file extension; give the name without it ({Path(name).stem!r})"]
    if _PARTIAL_SUFFIX.search(name):  # a stopped run named 'dog' writes dog_step000002: it would replace this one's
        return [f"output_name: {name!r} ends like the partial LoRA a stopped run writes (<name>_stepNNNNNN); "
                "choose a name without that ending"]
    if len(name.encode("utf-8")) > 200:  # file systems allow 255 bytes, and '_step000000.safetensors' is added
        return [f"output_name: {len(name.encode('utf-8'))} bytes long; use at most 200"]
    return []


def _check_path_lengths(config: TrainConfig) -> list[str]:
    """The longest paths the run writes must fit Windows' limit, on every platform (a workflow moves)."""
    suffix = "_step000000.diffusers.safetensors.abcdefgh.tmp"  # a partial LoRA's temporary file, the longest name
    run_dir = os.path.abspath(config.output_dir)
    longest = {"output_dir": [os.path.join(run_dir, f".{config.output_name}{suffix}"),
                              str(checkpoints_dir(run_dir) / ".tmp_step_00000000_4194304" / "lora_state.safetensors")]}
    if config.lora_dir:
        longest["lora_dir"] = [os.path.join(os.path.abspath(config.lora_dir), f".{config.output_name}{suffix}")]
    problems = []
    for option, paths in longest.items():
        path = max(paths, key=len)
        if len(path) > WINDOWS_MAX_PATH:
            problems.append(f"{option}: the run would write {path} ({len(path)} characters), longer than Windows "
                            f"allows ({WINDOWS_MAX_PATH}); choose a shorter output_name or a shorter {option}")
    return problems


def _sections() -> list[str]:
    return list(dict.fromkeys(f.metadata["section"] for f in dataclasses.fields(TrainConfig)))


def _section_list() -> str:
    return ", ".join(f"[{s}]" for s in _sections())


def _flatten_sections(data: dict[str, Any]) -> dict[str, Any]:
    """Accept both a flat table and TOML sections ([data], [lora], ...) as docs/cli.md shows."""
    sections = _sections()
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if key in sections and isinstance(value, dict):
            flat.update(value)
        else:
            flat[key] = value
    return flat


def _coerce(value: Any, hint: Any) -> Any:
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise TypeError
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
            raise TypeError
        return int(value)
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise TypeError
        return value
    if typing.get_origin(hint) is list:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise TypeError
        return list(value)
    raise TypeError(f"unsupported type {hint}")


def _type_name(hint: Any) -> str:
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(hint, "a list of strings")


def load_config(path: str | os.PathLike, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Read a TOML or JSON config file; relative paths in it are relative to the file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError([f"{path}: cannot read the config file ({e.strerror})"]) from e
    try:
        data = json.loads(text) if path.suffix.lower() == ".json" else tomllib.loads(text)
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as e:
        hint = ""
        if isinstance(e, tomllib.TOMLDecodeError) and "\\" in text:  # "C:\Users\me": TOML reads \U as an escape
            hint = ("; in TOML a path with backslashes goes in single quotes ('C:\\Users\\me\\photos') "
                    "or takes forward slashes")
        raise ConfigError([f"{path}: not valid {'JSON' if path.suffix.lower() == '.json' else 'TOML'}: {e}{hint}"]) from e
    data = _flatten_sections(data)
    data.setdefault("output_dir", "output")  # beside the config file, not wherever the command ran
    data.update(_absolute_paths(data, path.parent))
    data.update(_absolute_paths(overrides or {}, Path.cwd()))  # typed on the command line: where it ran
    return TrainConfig.from_dict(data)


def _absolute_paths(values: dict[str, Any], folder: Path) -> dict[str, Any]:
    """`values` with its path options made absolute: `~` expanded, relative ones joined to `folder`."""
    out = dict(values)
    for key in ("pretrained_model", "tokenizer", "instance_dir", "class_dir", "output_dir", "lora_dir",
                "resume_from_checkpoint"):
        value = out.get(key)
        if isinstance(value, str) and value:
            value = os.path.expanduser(value)
            out[key] = value if os.path.isabs(value) else str((folder / value).resolve())
    return out


def save_config(config: TrainConfig, path: str | os.PathLike) -> None:
    """Write the config as JSON (atomically), the form `load_config` reads back."""
    from .fileio import atomic_write_bytes

    atomic_write_bytes(Path(path), json.dumps(config.to_dict(), indent=2).encode("utf-8"))


def option_table() -> str:
    """The option reference (docs/options.md), made from the field metadata."""
    rows = ["| section | option | default | meaning |", "|---|---|---|---|"]
    defaults = TrainConfig()
    for f in dataclasses.fields(TrainConfig):
        meta = f.metadata
        allowed = f" One of: {', '.join(f'`{c}`' for c in meta['choices'])}." if meta.get("choices") else ""
        default = json.dumps(getattr(defaults, f.name))
        rows.append(f"| {meta['section']} | `{f.name}` | `{default}` | {meta['help']}{allowed} |")
    return "\n".join(rows)
