"""Graceful stop: SIGINT, SIGTERM or a stop file ask the loop to finish its step and save.

A second SIGINT / SIGTERM, after a grace period, ends the run at once (`ForcedStop`).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path

# A second signal sooner than this after the first is taken for the same request: a key pressed
# twice, or a launcher forwarding the terminal's Ctrl-C to a process that got it already.
GRACE_SECONDS = 2.0
# When this process (in practice) started: a STOP file older than this is left over from
# an earlier run; a newer one is a request made while this run was still starting up.
_STARTED = time.time()


def clear_stale_stop_file(path: Path) -> None:
    """Remove a STOP file left by an earlier run, keeping one written since this process started."""
    try:
        if os.stat(path).st_mtime < _STARTED:
            os.unlink(path)
    except FileNotFoundError:
        pass


class ForcedStop(KeyboardInterrupt):
    """A second SIGINT / SIGTERM: the run ends at once, where it is, saving nothing more.

    A KeyboardInterrupt, so that no `except Exception` holds it up; every write is atomic, so
    the one it interrupts leaves nothing half-written. `last_checkpoint` is set by the loop.
    """

    def __init__(self, signal_name: str):
        super().__init__(signal_name)
        self.signal_name = signal_name
        self.last_checkpoint: Path | None = None

    def __str__(self) -> str:
        if self.last_checkpoint is None:
            return f"{self.signal_name} again: ended at once; no checkpoint was written"
        return (f"{self.signal_name} again: ended at once; the last checkpoint, {self.last_checkpoint}, is kept "
                "(resume = true continues from it)")


class StopRequest:
    """Polled by the training loop once per step.

    A stop is requested by SIGINT / SIGTERM (handlers installed only in the main thread,
    and restored by `close`), by the run folder's STOP file (run_folder.stop_path) (how the ComfyUI node
    asks its worker to stop on every platform), or by calling `request()`. A signal that
    comes `GRACE_SECONDS` or more after the first raises `ForcedStop` in the main thread.
    """

    def __init__(self, stop_file: Path | None = None, handle_signals: bool = True):
        self.stop_file = stop_file
        self.reason = ""
        self._first_signal: float | None = None  # time.monotonic() of the first signal
        self._previous: dict[int, object] = {}
        if handle_signals and threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        now = time.monotonic()
        if self._first_signal is None:
            self._first_signal = now
            print(f"\n{name}: stopping after this step, then saving; {name} again (after {GRACE_SECONDS:.0f} s) "
                  "ends at once", file=sys.stderr, flush=True)
        elif now - self._first_signal >= GRACE_SECONDS:
            raise ForcedStop(name)
        self.request(name)

    def request(self, reason: str = "requested") -> None:
        self.reason = self.reason or reason

    def requested(self) -> bool:
        if not self.reason and self.stop_file is not None and self.stop_file.exists():
            self.reason = f"stop file {self.stop_file.name}"
        return bool(self.reason)

    def close(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
