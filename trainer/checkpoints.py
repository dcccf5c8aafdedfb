"""Resumable training states: `<output_dir>/checkpoints/step_<N>/`.

A checkpoint folder holds the LoRA weights (`lora_state.safetensors`), the optimizer,
learning-rate scheduler and fp16 loss-scaler states (`optimizer.pt`, loaded with
`weights_only=True`), the data position, the config and the images trained on
(`trainer_state.json`), and the partial LoRA as a kohya file (`lora.safetensors`). It is
written under a temporary name, fsynced and renamed when complete, so a crash never leaves
a half checkpoint that `resume` would pick.
Random numbers in the loop are derived from (seed, step), so the step restores them.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .config import TrainConfig, with_option_defaults
from .data import manifest_differences
from .export import safetensors_size, save_safetensors
from .fileio import as_disk_full, ensure_free_space, fsync_directory, fsync_folder
from .run_folder import CHECKPOINTS, checkpoint_dir

# Options that may change between a stop and its resume without changing what is trained.
RESUMABLE_CHANGES = {"max_train_steps", "resume", "resume_from_checkpoint", "overwrite", "checkpoint_every",
                     "keep_checkpoints",
                     "sample_every", "sample_at_end", "sample_steps", "sample_guidance", "sample_seed",
                     "sample_resolution", "validation_prompts", "output_dir", "lora_dir", "export_format",
                     "save_dtype", "compile_unet", "offload_frozen_models", "cuda_graphs",
                     "gradient_checkpointing"}  # memory for time: a run that ran out of memory continues with it


class ResumeError(ValueError):
    """A checkpoint that cannot continue this run."""


@dataclass
class TrainingState:
    step: int          # optimizer steps done
    epoch: int         # epoch of the next batch
    position: int      # index of the next batch within that epoch
    lora: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    lr_scheduler: dict[str, Any]
    config: dict[str, Any]
    path: Path
    mixed_precision: str  # what the run computed in ('no', 'fp16', 'bf16')
    dataset: list[list]  # data.dataset_manifest of the instance images
    base_model_sha256: str  # BaseModel.sha256() of the model trained on
    scaler: dict[str, Any] | None = None  # fp16's loss scaler (its scale and growth tracker); None otherwise
    class_dataset: list[list] | None = None  # data.dataset_manifest of the class images used; None without


def save_checkpoint(output_dir: Path, state: TrainingState, partial_lora: dict[str, torch.Tensor],
                    lora_metadata: dict[str, str]) -> Path:
    """Write a checkpoint folder atomically (temp folder, then rename); returns it."""
    root = Path(output_dir) / CHECKPOINTS
    final = checkpoint_dir(output_dir, state.step)
    tmp = root / f".tmp_step_{state.step:08d}_{os.getpid()}"
    remove_stale_checkpoint_folders(output_dir)  # (ours too, if any)
    needed = checkpoint_size(state, partial_lora, lora_metadata)
    what = f"checkpoint {final.name}"
    ensure_free_space(root, needed, what)
    tmp.mkdir(parents=True)
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in state.lora.items()}, tmp / "lora_state.safetensors")
        torch.save({"optimizer": state.optimizer, "lr_scheduler": state.lr_scheduler, "scaler": state.scaler},
                   tmp / "optimizer.pt")
        save_safetensors(tmp / "lora.safetensors", partial_lora, lora_metadata)
        meta = {"step": state.step, "epoch": state.epoch, "position": state.position, "config": state.config,
                "mixed_precision": state.mixed_precision, "dataset": state.dataset,
                "class_dataset": state.class_dataset, "base_model_sha256": state.base_model_sha256}
        (tmp / "trainer_state.json").write_text(json.dumps(meta, indent=2), encoding="utf-8")
        fsync_folder(tmp)
        if final.exists():  # the same step written again (a resumed run stopped at once)
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_directory(root)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        error = as_disk_full(e, root, needed, what)
        if error is e:
            raise
        raise error from e
    return final


def checkpoint_size(state: TrainingState, partial_lora: dict[str, torch.Tensor], lora_metadata: dict[str, str]) -> int:
    """About the bytes a checkpoint of `state` takes (over-estimated): the LoRA twice, the optimizer state."""
    return (safetensors_size(state.lora) + safetensors_size(partial_lora, lora_metadata)
            + sum(t.numel() * t.element_size() for t in _tensors_in(state.optimizer)) + 64 * 1024
            + len(json.dumps({"config": state.config, "dataset": state.dataset}, default=str)))


def _tensors_in(value: Any):
    """Every tensor in a nest of dicts, lists and tuples (an optimizer's state_dict)."""
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors_in(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors_in(item)


def remove_stale_checkpoint_folders(output_dir: Path) -> list[Path]:
    """Remove the half-written checkpoint folders (`checkpoints/.tmp_step_*`) a killed process left; returns them."""
    stale = sorted((Path(output_dir) / CHECKPOINTS).glob(".tmp_step_*"))
    for folder in stale:
        shutil.rmtree(folder, ignore_errors=True)
    return stale


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoint folders, oldest first."""
    root = Path(output_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    # Only the names this module writes: a copy made beside one ("step_00000004 - Copy") is not a checkpoint.
    return sorted(p for p in root.glob("step_*") if re.fullmatch(r"step_\d+", p.name)
                  and (p / "trainer_state.json").is_file())


def checkpoints_after(output_dir: Path, step: int) -> list[Path]:
    """Complete checkpoint folders in `output_dir` of steps after `step` (after 0: all of them)."""
    return [p for p in list_checkpoints(output_dir) if checkpoint_step(p) > step]


def checkpoint_step(path: Path) -> int:
    """The step a checkpoint folder holds, from its name (`step_<N>`)."""
    return int(path.name.removeprefix("step_"))


def prune_checkpoints(output_dir: Path, keep: int) -> None:
    """Delete all but the newest `keep` checkpoints."""
    for old in list_checkpoints(output_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def resolve_resume(config: TrainConfig) -> Path | None:
    """The checkpoint to continue from: `resume_from_checkpoint`, else with `resume` the newest
    in output_dir; None to start fresh."""
    if not config.resume_from_checkpoint:
        found = list_checkpoints(Path(config.output_dir)) if config.resume else []
        return found[-1] if found else None
    path = Path(config.resume_from_checkpoint)
    if not (path / "trainer_state.json").is_file():
        inside = list_checkpoints(path.parent if path.name == CHECKPOINTS else path)  # the run's folder, or its checkpoints/
        hint = (f"; it holds checkpoints, the newest {inside[-1]} (or set resume = true with output_dir "
                "set to the run's folder)") if inside else "; name a checkpoints/step_NNNNNNNN folder"
        raise ResumeError(f"resume_from_checkpoint: {path} is not a checkpoint folder (no trainer_state.json){hint}")
    return path


def load_checkpoint(path: Path, config: TrainConfig, mixed_precision: str = "") -> TrainingState:
    """Read a checkpoint and check it belongs to a run with the same training options.

    `mixed_precision` is what this run computes in ('auto' resolved): a run must not continue
    in another precision than it trained in (a CPU with bf16, say, where it trained in fp32).
    """
    path = Path(path)
    try:
        meta = json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ResumeError(f"cannot resume from {path}: its trainer_state.json cannot be read ({e}); the checkpoint "
                          f"is damaged (a crash while it was written?). Delete the folder to resume from the one "
                          f"before it") from e
    unrecorded = [key for key in ("mixed_precision", "dataset", "base_model_sha256") if meta.get(key) in (None, "")]
    if unrecorded:
        raise ResumeError(f"cannot resume from {path}: it was written by a development version of the pack before "
                          f"0.1.0 (its trainer_state.json lacks {', '.join(unrecorded)}); start a new run")
    saved, current = meta["config"], config.to_dict()
    saved = with_option_defaults(saved)  # options added since the checkpoint was written
    saved_precision = meta["mixed_precision"]
    # What the checkpoint computed in is compared rather than the option ('auto' or not); its images and
    # its model's file rather than their folders and path, which may have moved (check_same_dataset,
    # check_same_base_model).
    ignored = RESUMABLE_CHANGES | {"mixed_precision", "instance_dir", "pretrained_model"}
    if meta.get("class_dataset") is not None:
        ignored |= {"class_dir"}
    differences = [f"{k}: checkpoint has {saved.get(k)!r}, config has {current[k]!r}"
                   for k in current if k not in ignored and saved.get(k) != current[k]]
    if mixed_precision and saved_precision != mixed_precision:
        differences.append(f"precision: checkpoint trained in {saved_precision!r}, this run would compute in "
                           f"{mixed_precision!r} (set mixed_precision = {saved_precision!r} to continue it)")
    if differences:
        raise ResumeError(f"cannot resume from {path}: options that change training differ "
                          f"(start a new run, or set them back):\n  " + "\n  ".join(differences))
    try:
        opt = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
        lora = load_file(path / "lora_state.safetensors")
    except Exception as e:  # noqa: BLE001 - torch and safetensors raise many kinds on a truncated file
        raise ResumeError(f"cannot resume from {path}: its optimizer.pt or lora_state.safetensors cannot be read "
                          f"({type(e).__name__}: {e}); the checkpoint is damaged (a crash while it was written?). "
                          f"Delete the folder to resume from the one before it") from e
    return TrainingState(step=meta["step"], epoch=meta["epoch"], position=meta["position"],
                         lora=lora, optimizer=opt["optimizer"],
                         lr_scheduler=opt["lr_scheduler"], config=saved, path=path,
                         mixed_precision=saved_precision, dataset=meta["dataset"], scaler=opt.get("scaler"),
                         class_dataset=meta.get("class_dataset"), base_model_sha256=meta["base_model_sha256"])


def check_same_dataset(state: TrainingState, manifest: list[list], folder: Path, class_images: bool = False) -> None:
    """Refuse to resume on other images (`manifest`, data.dataset_manifest of `folder`) than the
    checkpoint's run trained on: the data order, the repeats and so the result would follow neither run.
    `class_images`: the class images (prior preservation) rather than the instance images."""
    saved = state.class_dataset if class_images else state.dataset
    differences = manifest_differences(saved, manifest)
    if differences:
        kind = "class images" if class_images else "images"
        raise ResumeError(f"cannot resume from {state.path}: the {kind} in {folder} changed since it was "
                          f"written ({'; '.join(differences)}). Put them back as they were, or start a new run")


def check_same_base_model(state: TrainingState, sha256: str, path: str) -> None:
    """Refuse to resume on another base model than the checkpoint's run trained on (`sha256` of the
    model at `path`); the same file elsewhere (a moved or renamed model) is the same model."""
    if state.base_model_sha256 == sha256:
        return
    saved_path, hashes = state.config.get("pretrained_model"), f"SHA-256 {state.base_model_sha256[:12]}..."
    if saved_path == path:
        change = f"the file {path} is not the one it trained on ({hashes}, now {sha256[:12]}...)"
    else:
        change = f"it trained on {saved_path} ({hashes}); pretrained_model {path} is another file ({sha256[:12]}...)"
    raise ResumeError(f"cannot resume from {state.path}: the base model changed: {change}. Set pretrained_model to "
                      "the model it trained on, or start a new run")
