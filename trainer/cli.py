"""Command line: `python -m comfyui_dreambooth_lora.trainer {train,inspect,demo,options}`.

`train` runs unchanged under `accelerate launch`. Exit codes: 0 done or stopped
gracefully, 1 training failed, 2 bad config or input (the message says what to fix),
3 out of disk space (the message names the folder, the space needed and free, and the
checkpoint to resume from).
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from .config import ConfigError, load_config, option_table
from .step_clock import StepClock, duration


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m comfyui_dreambooth_lora.trainer",
                                     description="Offline LoRA DreamBooth training for SD1.x and SDXL.")
    sub = parser.add_subparsers(dest="command", required=True)
    p_train = sub.add_parser("train", help="train a LoRA from a TOML or JSON config")
    p_train.add_argument("--config", required=True, type=Path, help="run.toml or run.json")
    p_train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                         help="override an option (VALUE is parsed as JSON when it can be: --set max_train_steps=50)")
    p_train.add_argument("--events", choices=("file", "stdout"), default="file",
                         help="also write the JSON-lines event stream to stdout (for programs driving the trainer)")
    p_inspect = sub.add_parser("inspect", help="say what a checkpoint is (SD1.x / SDXL / v-prediction)")
    p_inspect.add_argument("model", type=Path)
    p_demo = sub.add_parser("demo", help="train on a small local model and generated images (CPU, about a minute)")
    p_demo.add_argument("--output", type=Path, default=Path("demo_output"))
    p_demo.add_argument("--steps", type=int, default=200)
    sub.add_parser("options", help="print every config option with its default (markdown)")
    args = parser.parse_args(argv)

    if args.command == "options":
        print(option_table())
        return 0
    if args.command == "inspect":
        return _inspect(args.model)
    if args.command == "demo":
        from .demo import run_demo

        return run_demo(args.output, args.steps)
    try:
        config = load_config(args.config, dict(_parse_override(s) for s in args.set))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return run_training(config, events_to_stdout=args.events == "stdout")


def run_training(config, events_to_stdout: bool = False) -> int:
    """Train with a terminal progress line; turn expected failures into a message and an exit code."""
    import torch
    from accelerate import PartialState

    from .checkpoints import ResumeError
    from .data import DatasetError
    from .events import EventWriter
    from .fileio import DiskFullError
    from .loop import PROCESS_GROUP_TIMEOUT, InputError, OutOfDiskSpace, StepFailed, TrainingError, train, use_cpu
    from .stop import ForcedStop
    from .models import ModelError
    from .run_folder import events_path

    # Under a multi-process launch, the other processes wait while the main one generates the
    # class images: more than torch's default 10-minute collective timeout for a hundred SDXL images.
    main_process = PartialState(cpu=use_cpu(), timeout=PROCESS_GROUP_TIMEOUT).is_main_process
    events = EventWriter(events_path(config.output_dir), stream=sys.stdout if events_to_stdout else None,
                         enabled=main_process)
    if main_process and not events_to_stdout:
        events.listeners.append(ProgressPrinter())
    try:
        result = train(config, events)
    except InputError as e:  # refused before training: bad input, as below
        print(f"\nerror: {e}", file=sys.stderr)
        return 2
    except ForcedStop as e:  # a second Ctrl-C: the conventional 128 + signal number
        print(f"\n{e}", file=sys.stderr)
        return 128 + getattr(signal, e.signal_name)
    except (OutOfDiskSpace, DiskFullError) as e:
        print(f"\nerror: {e}", file=sys.stderr)
        return 3
    except StepFailed as e:
        if not e.out_of_memory:  # an unexpected failure: where it happened, for a bug report
            traceback.print_exception(e.__cause__, file=sys.stderr)
        print(f"\nerror: {e}", file=sys.stderr)
        return 1
    except TrainingError as e:
        print(f"\nerror: {e}", file=sys.stderr)
        return 1
    except (DatasetError, ModelError, ResumeError, ConfigError, ValueError) as e:
        # bad input found before or while setting up (e.g. a rank larger than a layer)
        print(f"\nerror: {e}", file=sys.stderr)
        return 2
    finally:
        # Left to the interpreter's exit, a process group's threads can abort the process
        # ("terminate called without an active exception", seen once with accelerate 1.0 and
        # gloo), which fails the whole launch after a clean stop.
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    if main_process:
        print(f"\n{result.summary or f'{result.status} at step {result.step}'}", file=sys.stderr)
        for path in result.lora_files:
            print(f"LoRA: {path}", file=sys.stderr)
    return 0


class ProgressPrinter:
    """Turns events into one updating terminal line and a few plain lines."""

    def __init__(self):
        self.started = time.perf_counter()
        self.step_clock = StepClock()

    def __call__(self, event: dict[str, Any]) -> None:
        kind = event["event"]
        if kind == "step":
            done, total = event["step"], event["total_steps"]
            bar = "#" * int(30 * done / total)
            self.step_clock.add(event["seconds_per_step"])
            left = duration(self.step_clock.seconds_left(total - done))
            print(f"\r[{bar:<30}] {done}/{total} loss {event['loss']:.4f} lr {event['lr']:.2e} "
                  f"{self.step_clock.seconds_per_step:.2f} s/step ~{left} left ", end="", file=sys.stderr, flush=True)
        elif kind == "start":
            print(f"training {event['model']} on {event['num_images']} images ({event['summary']}), "
                  f"device {event['device']}, precision {event['mixed_precision']}", file=sys.stderr)
        elif kind == "sample":
            print(f"\nsamples at step {event['step']}: {', '.join(event['paths'])}", file=sys.stderr)
        elif kind == "checkpoint":
            print(f"\ncheckpoint: {event['path']}", file=sys.stderr)
        elif kind == "stopped" and not event.get("summary"):  # (a stop before training: the last line says it)
            print(f"\nstopped ({event.get('reason')}); continue with resume = true (train: --set resume=true)",
                  file=sys.stderr)


def _parse_override(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep:
        print(f"error: --set expects KEY=VALUE, got {text!r}", file=sys.stderr)
        raise SystemExit(2)
    try:
        return key.strip(), json.loads(value)
    except json.JSONDecodeError:
        return key.strip(), value


def _inspect(path: Path) -> int:
    from .models import ModelError, inspect_model

    try:
        info = inspect_model(path)
    except ModelError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"arch": info.arch, "variant": info.variant, "prediction_type": info.prediction_type}))
    return 0
