"""The JSON-lines event stream of a training run.

One JSON object per line, written to `<output_dir>/events.jsonl` (appended, flushed per
event) and, from the CLI, to stdout when `--events stdout` is given. Every event has
`event` (its kind) and `time` (Unix seconds). The kinds and their fields:

- `loading`: `model`: the base model is being loaded (the slow part of start-up).
- `class_images`: `done`, `total`: class images for prior preservation being generated (after a
  `log` saying how many); once per image.
- `start`: `total_steps`, `start_step` (> 0 when resumed), `model` (architecture),
  `num_images`, `buckets` (list of [width, height]), `device`, `mixed_precision` (what
  'auto' chose: `no`, `fp16` or `bf16`), `summary` (the dataset in words).
- `step`: `step`, `total_steps`, `loss` (this step's mean loss), `lr`, `seconds_per_step`. On a GPU
  a step's event comes once the next step is queued (loss_readout.py), and always before
  the `checkpoint`, `sample`, `stopped` or `done` of its step; its `seconds_per_step` is then
  the time since the previous step's loss was read (they add up to the training time).
- `sampling`: `step`, `count`: validation images are being made (minutes on a slow card); a
  `sample` event follows with those made.
- `sample`: `step`, `paths` (PNG files of the validation images), `prompts`.
- `checkpoint`: `step`, `path` (the checkpoint folder), `lora` (partial LoRA file).
- `exporting`: `step`, `lora` (the file being written): the finished LoRA is being exported.
- `done`: `step`, `lora` (list of written LoRA files), `samples` (PNG files).
- `stopped`: `step`, `checkpoint`, `lora`: a graceful stop (signal or stop file); a stop before
  the first step also has `summary` (what it kept, in words: "stopped before training; nothing written").
- `error`: `message`, `kind` (the exception class), `step` (the step it concerns, e.g. the one
  whose loss was NaN; or null). Kinds the trainer names: `StepFailed` (a step raised; the steps
  done before it were saved where possible), `OutOfDiskSpace`, `ForcedStop` (a second SIGINT /
  SIGTERM), `TrainingError`, `InputError`.
- `log`: `level`, `message` (warnings such as small images or skipped files).

The ComfyUI node and the CLI read this stream; only the main process writes it.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable, TextIO


class EventWriter:
    """Writes events to a JSON-lines file and to any number of listeners."""

    def __init__(self, path: Path | None = None, stream: TextIO | None = None, enabled: bool = True):
        self.enabled = enabled
        self._file = None
        if enabled and path is not None:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            self._file = open(path, "a", encoding="utf-8")
        self._stream = stream if enabled else None
        self.listeners: list[Callable[[dict[str, Any]], None]] = []

    def emit(self, name: str, /, **fields: Any) -> dict[str, Any]:
        """Record one event named `name` with its fields; returns it."""
        event = {"event": name, "time": round(time.time(), 3), **fields}
        if not self.enabled:
            return event
        line = json.dumps(event, default=str)
        for out in (self._file, self._stream):
            if out is not None:
                try:
                    out.write(line + "\n")
                    out.flush()
                except OSError as e:  # a full disk: the run must still be able to say so, and save what it can
                    if out is not self._file:
                        raise
                    self._file = None
                    with contextlib.suppress(OSError):  # (its buffer cannot be written either)
                        out.close()
                    print(f"[warning] the event log cannot be written any more ({e}); events go on to the "
                          "listeners and stdout only", file=sys.stderr, flush=True)
        for listener in self.listeners:
            listener(event)
        return event

    def log(self, message: str, level: str = "warning") -> None:
        """A human-readable message; also printed to stderr so the CLI user sees it."""
        self.emit("log", level=level, message=message)
        if self.enabled and self._stream is not sys.stderr:
            print(f"[{level}] {message}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def read_events(path: Path) -> list[dict[str, Any]]:
    """Parse an event file, skipping a last line that is still being written."""
    events = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return events
