"""The training worker: the trainer's CLI in a child process, and the event stream it prints.

The Train LoRA node never trains in ComfyUI's own process. It starts

    <python> -c <BOOTSTRAP> <pack folder> <run folder> train --config run.json --events stdout

where <python> is ComfyUI's own interpreter (`sys.executable`). The bootstrap imports this
pack from its folder under the name `comfyui_dreambooth_lora` (ComfyUI imports custom
nodes by folder name and the pack need not be pip-installed) and runs the CLI. The
worker prints one JSON event per line on stdout (`trainer/events.py`) and its log on
stderr; `WorkerProcess` turns them into `poll()`-able events and a log tail, asks the
worker to stop with the STOP file (`trainer/stop.py`) and waits for it to exit.

Nothing here imports ComfyUI, torch or the trainer: it is plain process handling,
tested without ComfyUI.
"""

from __future__ import annotations

import collections
import json
import os
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

PACKAGE_NAME = "comfyui_dreambooth_lora"
PACK_DIR = Path(__file__).resolve().parent.parent
STOP_FILE_NAME = "STOP"  # trainer/stop.py STOP_FILE_NAME (not imported: this module stays import-light)
LOG_NAME = "worker.log"

# Runs in the worker: import the pack from its folder as `comfyui_dreambooth_lora`, watch the
# parent (ComfyUI) and ask for a graceful stop if it goes away, then run the trainer's CLI.
BOOTSTRAP = r"""
import importlib.util, os, sys, threading, time
root, run_dir = sys.argv[1], sys.argv[2]
name = "comfyui_dreambooth_lora"
spec = importlib.util.spec_from_file_location(name, os.path.join(root, "__init__.py"), submodule_search_locations=[root])
module = importlib.util.module_from_spec(spec)
sys.modules[name] = module
spec.loader.exec_module(module)
parent = os.getppid()
def _watch_parent():
    while True:
        time.sleep(2.0)
        if os.getppid() != parent:
            open(os.path.join(run_dir, "STOP"), "a").close()
            return
threading.Thread(target=_watch_parent, daemon=True).start()
from comfyui_dreambooth_lora.trainer.cli import main
sys.exit(main(sys.argv[3:]))
"""


class WorkerError(RuntimeError):
    """The worker failed: `message` is the cause, `log_tail` the last lines of its log."""

    def __init__(self, message: str, log_tail: str, returncode: int | None, log_path: Path | None):
        self.message = message
        self.log_tail = log_tail
        self.returncode = returncode
        self.log_path = log_path
        text = f"DreamBooth LoRA training failed: {message}"
        if log_tail.strip():
            where = f" ({log_path})" if log_path else ""
            text += f"\n\nLast lines of the training log{where}:\n{log_tail}"
        super().__init__(text)


def worker_command(config_path: Path, run_dir: Path, python: str | None = None) -> list[str]:
    """The command line that trains `config_path` in a worker (see the module docstring)."""
    return [python or sys.executable, "-c", BOOTSTRAP, str(PACK_DIR), str(run_dir),
            "train", "--config", str(config_path), "--events", "stdout"]


def worker_environment(force_cpu: bool = False) -> dict[str, str]:
    """ComfyUI's environment, offline, unbuffered; with `force_cpu` no GPU is visible."""
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", DIFFUSERS_OFFLINE="1", PYTHONUNBUFFERED="1",
               TOKENIZERS_PARALLELISM="false", PYTHONIOENCODING="utf-8")
    if force_cpu:
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


class WorkerProcess:
    """One training worker: start it, read its events, stop it gracefully, collect its result.

    Usage: `start()`, then call `poll(timeout)` until it returns None with `finished` set;
    `request_stop()` writes the STOP file (again on every later poll, since the trainer
    removes a stale one when it starts); `kill()` is the last resort.
    """

    def __init__(self, command: list[str], run_dir: Path, env: dict[str, str] | None = None, tail_lines: int = 40):
        self.command = command
        self.run_dir = Path(run_dir)
        self.env = env
        self.log_path = self.run_dir / LOG_NAME
        self.events: list[dict[str, Any]] = []
        self._queue: queue.Queue = queue.Queue()
        self._tail: collections.deque[str] = collections.deque(maxlen=tail_lines)
        self._tail_lock = threading.Lock()
        self._process: subprocess.Popen | None = None
        self._threads: list[threading.Thread] = []
        self._log = None
        self.stop_requested_at: float | None = None

    # --- lifecycle ------------------------------------------------------------------------
    def start(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "a", encoding="utf-8", errors="replace")
        self._log.write(f"\n=== worker started {time.strftime('%Y-%m-%d %H:%M:%S')} ===\n")
        self._log.flush()
        kwargs: dict[str, Any] = {}
        if os.name == "nt":
            kwargs["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP
        else:
            kwargs["start_new_session"] = True  # a Ctrl+C in ComfyUI's terminal is not the worker's to handle
        self._process = subprocess.Popen(self.command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                         stderr=subprocess.PIPE, env=self.env, cwd=str(self.run_dir), **kwargs)
        self._threads = [threading.Thread(target=self._read_stdout, daemon=True),
                         threading.Thread(target=self._read_stderr, daemon=True)]
        for thread in self._threads:
            thread.start()

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    @property
    def returncode(self) -> int | None:
        return self._process.poll() if self._process else None

    @property
    def finished(self) -> bool:
        """The process has exited and both of its streams are read to the end."""
        return (self._process is not None and self._process.poll() is not None
                and not any(t.is_alive() for t in self._threads) and self._queue.empty())

    def poll(self, timeout: float = 0.1) -> dict[str, Any] | None:
        """The next event, or None when none came within `timeout` seconds."""
        if self.stop_requested_at is not None:
            self._touch_stop_file()
        try:
            event = self._queue.get(timeout=timeout)
        except queue.Empty:
            return None
        self.events.append(event)
        return event

    def request_stop(self) -> None:
        """Ask the worker to finish its step, write a checkpoint and a partial LoRA, and exit."""
        if self.stop_requested_at is None:
            self.stop_requested_at = time.monotonic()
            self._append_log("=== stop requested ===")
        self._touch_stop_file()

    def kill(self) -> None:
        """End the worker at once (no checkpoint): the answer to a second Cancel."""
        if self._process is not None and self._process.poll() is None:
            self._append_log("=== worker killed ===")
            self._process.kill()

    def wait(self, timeout: float | None = None) -> int:
        """Wait for the exit and the end of both streams; the exit code."""
        assert self._process is not None
        code = self._process.wait(timeout=timeout)
        for thread in self._threads:
            thread.join(timeout=5)
        return code

    def close(self) -> None:
        """Kill the worker if it still runs (an unexpected error in the node) and close the log."""
        self.kill()
        if self._process is not None:
            try:
                self._process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
        for thread in self._threads:
            thread.join(timeout=5)
        if self._log is not None:
            self._log.close()
            self._log = None

    # --- results ----------------------------------------------------------------------------
    def log_tail(self) -> str:
        with self._tail_lock:
            return "\n".join(self._tail)

    def last(self, kind: str) -> dict[str, Any] | None:
        """The last event of a kind seen so far."""
        for event in reversed(self.events):
            if event.get("event") == kind:
                return event
        return None

    def failure(self) -> WorkerError | None:
        """After the exit: why the run failed, or None if it finished or stopped gracefully."""
        code = self.returncode
        if self.last("done") or self.last("stopped"):
            if code in (0, None):
                return None
        error = self.last("error")
        if error is not None:
            message = error.get("message") or error.get("kind") or "unknown error"
            if error.get("kind") and error["kind"] not in message:
                message = f"{message} ({error['kind']})"
        else:
            message = self._error_from_log() or (f"the worker exited with code {code} without finishing"
                                                 if code != 0 else "the worker exited without a result")
            if code is not None and code < 0:
                message += f" (killed by signal {-code}; out of memory?)"
        return WorkerError(message, self.log_tail(), code, self.log_path)

    def _error_from_log(self) -> str | None:
        """The CLI's own `error: ...` message, which may span several lines, from the log tail."""
        lines = self.log_tail().splitlines()
        for i in range(len(lines) - 1, -1, -1):
            if lines[i].startswith("error: "):
                return "\n".join([lines[i][len("error: "):]] + lines[i + 1:]).strip()
        for line in reversed(lines):  # a Python traceback's last line
            if line and not line.startswith((" ", "\t")) and ("Error" in line or "Exception" in line):
                return line.strip()
        return None

    # --- stream readers (threads) --------------------------------------------------------------
    def _read_stdout(self) -> None:
        assert self._process is not None and self._process.stdout is not None
        for raw in self._process.stdout:
            line = raw.decode("utf-8", errors="replace").rstrip("\r\n")
            event = None
            if line.startswith("{"):
                try:
                    event = json.loads(line)
                except json.JSONDecodeError:
                    event = None
            if isinstance(event, dict) and "event" in event:
                self._queue.put(event)
                if event["event"] in ("error", "stopped", "done", "checkpoint", "start"):  # `log` is on stderr too
                    self._append_log(f"[{event['event']}] " + json.dumps(
                        {k: v for k, v in event.items() if k not in ("event", "time")}, default=str))
            elif line:
                self._append_log(line)

    def _read_stderr(self) -> None:
        assert self._process is not None and self._process.stderr is not None
        for raw in self._process.stderr:
            # the CLI's progress line uses \r; keep what a terminal would show last
            line = raw.decode("utf-8", errors="replace").rstrip("\r\n").split("\r")[-1]
            if line:
                self._append_log(line)

    def _append_log(self, line: str) -> None:
        with self._tail_lock:
            self._tail.append(line)
            if self._log is not None:
                try:
                    self._log.write(line + "\n")
                    self._log.flush()
                except (OSError, ValueError):
                    pass

    def _touch_stop_file(self) -> None:
        try:
            (self.run_dir / STOP_FILE_NAME).touch()
        except OSError:
            pass
