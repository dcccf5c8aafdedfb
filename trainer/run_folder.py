"""The layout of a run folder (a run's `output_dir`): the one place its file names are spelled.

    <run folder>/
        events.jsonl             the event stream (events.py), appended by every run in the folder
        run.json                 the config the Train LoRA node wrote for its worker
        STOP                     asks the run to stop after its step (stop.py)
        worker.log               the worker's log (stderr), written by the node
        worker.pid               the running worker's pid, while a node waits for it
        node_run.json            what a finished run was trained from (nodes/run_reuse.py)
        accelerate_launch.json   the launcher's settings, for several GPUs
        checkpoints/step_<N>/    resumable states (checkpoints.py); N has 8 digits
        samples/step_<N>_<i>.png validation images; N has 6 digits, i 2

Standard library only: the node side imports it without torch.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

EVENTS_FILE = "events.jsonl"
CONFIG_FILE = "run.json"
STOP_FILE = "STOP"  # nodes/worker_main.py holds a copy (it runs before the pack can be imported)
LOG_FILE = "worker.log"
PID_FILE = "worker.pid"
IDENTITY_FILE = "node_run.json"
LAUNCH_CONFIG_FILE = "accelerate_launch.json"
CHECKPOINTS = "checkpoints"
SAMPLES = "samples"
SAMPLE_NAME = re.compile(r"step_\d{6}_\d{2}\.png")  # what sample_path names


def events_path(run_dir: str | os.PathLike) -> Path:
    """The run folder's event stream."""
    return Path(run_dir) / EVENTS_FILE


def config_path(run_dir: str | os.PathLike) -> Path:
    """The config the node writes for its worker."""
    return Path(run_dir) / CONFIG_FILE


def stop_path(run_dir: str | os.PathLike) -> Path:
    """The file whose existence asks the run to stop after its step."""
    return Path(run_dir) / STOP_FILE


def log_path(run_dir: str | os.PathLike) -> Path:
    """The worker's log."""
    return Path(run_dir) / LOG_FILE


def pid_path(run_dir: str | os.PathLike) -> Path:
    """The running worker's pid file."""
    return Path(run_dir) / PID_FILE


def identity_path(run_dir: str | os.PathLike) -> Path:
    """What the run that finished in this folder was trained from."""
    return Path(run_dir) / IDENTITY_FILE


def launch_config_path(run_dir: str | os.PathLike) -> Path:
    """accelerate's launcher settings for a run on several GPUs."""
    return Path(run_dir) / LAUNCH_CONFIG_FILE


def checkpoints_dir(run_dir: str | os.PathLike) -> Path:
    """The folder of the run's checkpoints."""
    return Path(run_dir) / CHECKPOINTS


def checkpoint_dir(run_dir: str | os.PathLike, step: int) -> Path:
    """The checkpoint of `step`."""
    return checkpoints_dir(run_dir) / f"step_{step:08d}"


def samples_dir(run_dir: str | os.PathLike) -> Path:
    """The folder of the validation images."""
    return Path(run_dir) / SAMPLES


def sample_path(run_dir: str | os.PathLike, step: int, index: int) -> Path:
    """Validation image `index` of `step`."""
    return samples_dir(run_dir) / f"step_{step:06d}_{index:02d}.png"
