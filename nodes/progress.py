"""What the Train LoRA node shows while a run goes on: its progress bar, a line of text for every
phase (loading the model, class images, steps with the time left, samples, export, the end) and
the samples as previews, from the worker's events (trainer/events.py).

Nothing here imports ComfyUI: the node passes ComfyUI's progress bar and text sender in, and
tests pass stand-ins.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

from ..trainer.step_clock import StepClock, duration

# Step texts come at most this often (a fast GPU makes tens of steps a second); phase texts always.
TEXT_INTERVAL_SECONDS = 0.25


def _names(paths: Any) -> str:
    if isinstance(paths, (str, Path)):
        paths = [paths]
    return ", ".join(Path(str(p)).name for p in paths or [])


class RunProgress:
    """The node's progress bar, text and previews for one run.

    `update_bar(step, total, preview)` moves the bar (`preview`: an image to show, or None);
    `send_text(text)` shows a line on the node; `load_preview(path)` reads a sample file as the
    image `update_bar` takes; `log(text)` receives what belongs in ComfyUI's log too (the run's
    warnings, a stop, an error).
    """

    def __init__(self, total: int, update_bar: Callable[[int, int, Any], None], send_text: Callable[[str], None],
                 load_preview: Callable[[str], Any] | None = None, log: Callable[[str], None] | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.total = total
        self.step = 0
        self.update_bar = update_bar
        self.send_text = send_text
        self.load_preview = load_preview
        self.log = log or (lambda message: None)
        self.clock = clock
        self.step_clock = StepClock()
        self._last_text: float | None = None
        self._kept = ""

    def keep(self, note: str) -> None:
        """Show `note` above every later line of text, for the whole run (what the memory preset set)."""
        self._kept = note

    def text(self, message: str, force: bool = False) -> None:
        """Show `message` on the node; a step text only if the last text is TEXT_INTERVAL_SECONDS old."""
        now = self.clock()
        if not force and self._last_text is not None and now - self._last_text < TEXT_INTERVAL_SECONDS:
            return
        self._last_text = now
        self.send_text(f"{self._kept}\n{message}" if self._kept else message)

    def show(self, event: dict[str, Any]) -> None:
        """Show what one worker event says."""
        kind = event.get("event")
        if kind == "step":
            self._show_step(event)
        elif kind == "start":
            self.total = int(event.get("total_steps", self.total))
            self.step = int(event.get("start_step", 0))
            self.update_bar(self.step, self.total, None)
            resumed = f", resumed at step {self.step}" if self.step else ""
            self.text(f"training {event.get('model')} on {event.get('num_images')} images ({event.get('device')})"
                      f"{resumed}", force=True)
        elif kind == "sample":
            paths = event.get("paths") or []
            if paths and self.load_preview is not None:
                self.update_bar(self.step, self.total, self.load_preview(paths[0]))
            self.text(f"samples at step {event.get('step')} done", force=True)
        elif kind == "class_images":  # (one event per image: throttled like steps)
            self.text(f"making class images: {event.get('done')}/{event.get('total')}",
                      force=event.get("done") == event.get("total"))
        elif kind == "log":  # on the node too: it says what the run is doing until the next event
            self.log(str(event.get("message")))
            self.text(str(event.get("message")), force=True)
        elif kind == "done":
            self.update_bar(self.total, self.total, None)
            self.text(f"done: {_names(event.get('lora'))}", force=True)
        else:
            text = self._phase_text(kind, event)
            if text and kind in ("stopped", "error"):
                self.log(text)
            if text:
                self.text(text, force=True)

    def _show_step(self, event: dict[str, Any]) -> None:
        self.step = int(event["step"])
        self.total = int(event.get("total_steps", self.total))
        self.update_bar(self.step, self.total, None)
        seconds = float(event.get("seconds_per_step", 0.0))
        self.step_clock.add(seconds)
        left = duration(self.step_clock.seconds_left(self.total - self.step))
        self.text(f"step {self.step}/{self.total}  loss {float(event['loss']):.4f}  "
                  f"{self.step_clock.seconds_per_step:.2f} s/step  ~{left} left", force=self.step == self.total)

    def _phase_text(self, kind: Any, event: dict[str, Any]) -> str | None:
        if kind == "loading":
            return f"loading {Path(str(event.get('model', ''))).name} ..."
        if kind == "sampling":
            when = "the end" if event.get("step") == self.total else f"step {event.get('step')}"
            return f"making {event.get('count')} sample image(s) at {when} ..."
        if kind == "checkpoint":
            return f"checkpoint at step {event.get('step')} written"
        if kind == "exporting":
            return f"writing the LoRA {_names(event.get('lora'))} ..."
        if kind == "stopped":
            return stopped_text(event)
        if kind == "error":
            return f"error: {event.get('message')}"
        return None


def stopped_text(event: dict[str, Any]) -> str:
    """What a stopped run left behind and how to continue it, from its `stopped` event."""
    lora, checkpoint = _names(event.get("lora")), event.get("checkpoint")
    if not checkpoint:
        return (f"stopped at step {event.get('step')} before any training step: nothing was written; queue again "
                f"to start")
    partial = f"partial LoRA {lora} (in models/loras), " if lora else ""
    return (f"stopped at step {event.get('step')}: {partial}checkpoint {checkpoint}. To continue, turn resume on "
            f"and queue again")
