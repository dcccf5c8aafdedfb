"""Graceful stop: SIGINT, SIGTERM or a stop file ask the loop to finish its step and save."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

STOP_FILE_NAME = "STOP"
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


class StopRequest:
    """Polled by the training loop once per step.

    A stop is requested by SIGINT / SIGTERM (handlers installed only in the main thread,
    and restored by `close`), by a file named STOP in the run folder (how the ComfyUI node
    asks its worker to stop on every platform), or by calling `request()`.
    """

    def __init__(self, stop_file: Path | None = None, handle_signals: bool = True):
        self.stop_file = stop_file
        self.reason = ""
        self._previous: dict[int, object] = {}
        if handle_signals and threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        self.request(signal.Signals(signum).name)

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
