"""Whether Train LoRA may reuse a finished run instead of training again, and the checks before a new one.

A run that finished records what its LoRA was trained from (`run_folder.identity_path`:
the options that shape the weights, the base model file, the image files, the GPU count). The
same graph queued again (after a restart of ComfyUI, or with only a validation prompt changed)
then returns that LoRA at once instead of loading the model and training for minutes.

Nothing here imports ComfyUI: it is tested on its own.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..trainer.events import read_events
from ..trainer.fileio import atomic_write_bytes
from ..trainer.run_folder import events_path, identity_path, pid_path
from .worker import running_worker


# Options that cannot change the trained weights nor the LoRA file; a change to them alone reuses a
# finished run:
# - validation_prompts and the sample_* options make only the validation images (with seeds of
#   their own; training draws its noise from per-step generators, so samples in between change
#   nothing). sample_guidance also makes missing class images, so with prior preservation it counts;
# - checkpoint_every and keep_checkpoints choose which checkpoints are written and kept;
# - resume and overwrite say how a run may start, not what it trains (a resume with more steps has
#   another max_train_steps).
# Everything else counts, among them export_format and save_dtype (they change the file written) and
# the speed and memory options (mixed_precision, gradient_checkpointing, cuda_graphs, compile_unet,
# offload_frozen_models, cache_latents), which change the rounding of the arithmetic or what is drawn.
SAMPLE_OPTIONS = ("validation_prompts", "sample_every", "sample_at_end", "sample_steps", "sample_guidance",
                  "sample_seed", "sample_resolution")
NOT_WEIGHT_OPTIONS = (*SAMPLE_OPTIONS, "checkpoint_every", "keep_checkpoints", "resume", "overwrite")


def file_state(path: str | os.PathLike) -> tuple:
    """(path, size, modification time in ns) of a file; (path, None) when it cannot be read. Equal states:
    the same file, unchanged."""
    try:
        stat = os.stat(path)
        return str(path), stat.st_size, stat.st_mtime_ns
    except OSError:
        return str(path), None


def run_identity(options: dict[str, Any], base_path: str | os.PathLike, dataset_fingerprint: str | None,
                 class_images_fingerprint: str | None, num_gpus: int) -> dict[str, Any]:
    """Everything a run's LoRA depends on: `options` (TrainConfig.to_dict()) but those in
    NOT_WEIGHT_OPTIONS (kept apart under "not_weights", to say what a reuse ignored), the base model
    file, the image files and the GPU count (the global batch is batch_size x num_gpus)."""
    ignored = set(NOT_WEIGHT_OPTIONS)
    if options.get("with_prior_preservation"):
        ignored.discard("sample_guidance")
    base = Path(base_path)
    return _plain({"config": {k: v for k, v in options.items() if k not in ignored},
                   "base": file_state(base / "model_index.json" if base.is_dir() else base)[1:],
                   "dataset": dataset_fingerprint, "class_images": class_images_fingerprint, "num_gpus": num_gpus,
                   "not_weights": {k: v for k, v in options.items() if k in ignored}})


@dataclass
class FinishedRun:
    """A finished run whose LoRA this run would train again: `changed` are the options that differ,
    all of which leave the weights alone."""

    lora_path: Path
    changed: list[str]

    def message(self) -> str:
        """What the node says when it reuses the run."""
        text = f"reused the finished run: {self.lora_path.name} was trained with these inputs before, nothing " \
               f"is trained again"
        samples = [name for name in self.changed if name in SAMPLE_OPTIONS]
        if samples:
            text += (f". Changed since: {', '.join(samples)}; the samples output shows the run's own images, "
                     f"DreamBooth Sample draws new ones with the LoRA")
        return text


def find_finished_run(run_dir: Path, lora_path: Path, identity: dict[str, Any],
                      max_train_steps: int) -> FinishedRun | None:
    """The finished run in `run_dir` that trained `lora_path` from the same weight-shaping inputs as
    `identity`, or None (its LoRA gone, never finished, or trained from other inputs)."""
    try:
        saved = json.loads(identity_path(run_dir).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not lora_path.is_file() or not isinstance(saved, dict):
        return None
    before, now = saved.pop("not_weights", {}), {k: v for k, v in identity.items() if k != "not_weights"}
    if saved != _plain(now):
        return None
    done = [e for e in read_run_events(run_dir) if e.get("event") == "done"]
    if not done or done[-1].get("step") != max_train_steps:
        return None
    ignored = identity.get("not_weights", {})
    return FinishedRun(lora_path, sorted(k for k in ignored if before.get(k) != _plain(ignored[k])))


def record_finished_run(run_dir: Path, identity: dict[str, Any]) -> None:
    """Note that the run in `run_dir` finished with `identity` (see `find_finished_run`)."""
    atomic_write_bytes(identity_path(run_dir), json.dumps(identity, sort_keys=True).encode("utf-8"))


def forget_finished_run(run_dir: Path) -> None:
    """Before a new run starts in `run_dir`: its LoRA is about to change."""
    identity_path(run_dir).unlink(missing_ok=True)


def read_run_events(run_dir: Path) -> list[dict[str, Any]]:
    """The events of the runs in `run_dir` so far (none when it has no event log)."""
    path = events_path(run_dir)
    return read_events(path) if path.is_file() else []


def check_run_can_start(run_dir: Path, lora_path: Path, resume: bool, overwrite: bool) -> None:
    """A new run needs its run folder to itself, and must neither mix with an earlier run's checkpoints
    nor replace a LoRA silently (ValueError saying what to change)."""
    leftover = running_worker(run_dir)
    if leftover is not None:  # two workers in one folder would mix events and checkpoints, and stop each other
        raise ValueError(f"a training worker (pid {leftover}) still runs in {run_dir}: one started before "
                         f"ComfyUI restarted stops by itself after its step and a checkpoint, then queue again "
                         f"(with resume on, to continue from that checkpoint); one of another ComfyUI using this "
                         f"output folder trains there. If no such process is yours, delete "
                         f"{pid_path(run_dir)}.")
    if resume or overwrite:  # (with overwrite the trainer deletes the old checkpoints)
        return
    from ..trainer.checkpoints import checkpoints_after  # (torch: only when a run starts)

    if lora_path.exists():
        raise ValueError(f"{lora_path} already exists. Choose another output_name, turn resume on to continue its "
                         f"run, or turn overwrite on in DreamBooth Samples & Checkpoints to replace it.")
    old = checkpoints_after(run_dir, 0)
    if old:
        raise ValueError(f"{run_dir} holds checkpoints of an earlier run ({old[-1].name}). Turn resume on to "
                         f"continue it, choose another output_name, or turn overwrite on in DreamBooth Samples & "
                         f"Checkpoints to start over.")


def _plain(value: Any) -> Any:
    """`value` as it reads back from JSON (tuples become lists), so saved and new identities compare."""
    return json.loads(json.dumps(value))
