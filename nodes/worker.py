"""The training worker: the trainer's CLI in a child process, and the event stream it prints.

The Train LoRA node never trains in ComfyUI's own process. On one GPU it starts

    <python> nodes/worker_main.py <pack folder> <run folder> train --config run.json --events stdout

and on N local GPUs the same script once per GPU through accelerate's launcher:

    <python> -m accelerate.commands.launch --config_file <run folder>/accelerate_launch.json
             --multi_gpu --num_processes N --num_machines 1 --dynamo_backend no
             --main_process_port <free port> nodes/worker_main.py <the same arguments>

where <python> is ComfyUI's own interpreter (`sys.executable`). `worker_main.py` imports
this pack from its folder under the name `comfyui_dreambooth_lora` (ComfyUI imports
custom nodes by folder name and the pack need not be pip-installed), watches ComfyUI and
runs the CLI. Under the launcher each process trains its share of every batch and only the
main process prints events. The worker prints one JSON event per line on stdout
(`trainer/events.py`) and its log on stderr; `WorkerProcess` turns them into
`poll()`-able events and a log tail, asks the worker to stop with the STOP file
(`trainer/stop.py`, seen by every process) and waits for it to exit, or kills the whole
process tree.

Nothing here imports ComfyUI, torch or the trainer: it is plain process handling,
tested without ComfyUI.
"""

from __future__ import annotations

import collections
import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from ..trainer.run_folder import launch_config_path, log_path, pid_path, stop_path
from .progress import stopped_text
from .worker_main import PARENT_PID_ENV, process_alive

PACKAGE_NAME = "comfyui_dreambooth_lora"
PACK_DIR = Path(__file__).resolve().parent.parent
WORKER_MAIN = Path(__file__).resolve().with_name("worker_main.py")
MAX_PROCESSES = 16
# A second Cancel sooner than this after the first is a double-click, not a request to kill the worker
# (which would lose the step and the checkpoint the first Cancel asked for).
KILL_GRACE_SECONDS = 3.0
# After the worker exits, how long a process it started may still hold its output pipes (a training
# process its launcher left behind) before that process is killed and the streams are given up.
READ_GRACE_SECONDS = 5.0
_TRUE = ("1", "y", "yes", "t", "true", "on")  # accelerate's str_to_bool


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


def worker_command(config_path: Path, run_dir: Path, python: str | None = None, num_processes: int = 1) -> list[str]:
    """The command line that trains `config_path` in a worker, on `num_processes` local GPUs (see above).

    For several processes it also writes the launcher's settings into the run folder.
    """
    num_processes = int(num_processes)
    if not 1 <= num_processes <= MAX_PROCESSES:
        raise ValueError(f"num_processes {num_processes} must be between 1 and {MAX_PROCESSES}")
    python = python or sys.executable
    script = [str(WORKER_MAIN), str(PACK_DIR), str(run_dir),
              "train", "--config", str(config_path), "--events", "stdout"]
    if num_processes == 1:
        return [python, *script]
    launch_config = write_launch_config(Path(run_dir), num_processes)
    return [python, "-m", "accelerate.commands.launch", "--config_file", str(launch_config), "--multi_gpu",
            "--num_processes", str(num_processes), "--num_machines", "1", "--dynamo_backend", "no",
            "--main_process_port", str(free_port()), *script]


def write_launch_config(run_dir: Path, num_processes: int) -> Path:
    """accelerate settings for N processes on this machine, all GPUs, nothing else.

    Without `--config_file` the launcher reads the user's `accelerate config` default
    (often made for another trainer: one GPU id, DeepSpeed, several machines, a machine
    rank), and its settings would reach this run or stop the launch.
    """
    settings = {"compute_environment": "LOCAL_MACHINE", "distributed_type": "MULTI_GPU", "mixed_precision": "no",
                "use_cpu": False, "debug": False, "num_processes": num_processes, "num_machines": 1,
                "machine_rank": 0, "gpu_ids": "all", "rdzv_backend": "static", "same_network": True,
                "main_training_function": "main", "enable_cpu_affinity": False, "downcast_bf16": False,
                "dynamo_config": {}}
    path = launch_config_path(run_dir)
    path.write_text(json.dumps(settings, indent=1), encoding="utf-8")
    return path


def free_port() -> int:
    """A TCP port free right now, for the launcher's rendezvous (a fixed one may be taken)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("", 0))
        return int(sock.getsockname()[1])


def check_num_processes(num_processes: int, gpus_found: int, comfy_on_cpu: bool = False,
                        env: Mapping[str, str] | None = None) -> None:
    """Refuse to train on more local GPUs than there are (ValueError saying how many were found).

    `gpus_found` is `torch.cuda.device_count()` in ComfyUI's process; `comfy_on_cpu` is
    ComfyUI's `--cpu`. With ACCELERATE_USE_CPU=true in the environment any number of CPU
    processes is allowed (they talk over gloo: how the tests run several processes).
    """
    num_processes = int(num_processes)
    if not 1 <= num_processes <= MAX_PROCESSES:
        raise ValueError(f"num_gpus {num_processes} must be between 1 and {MAX_PROCESSES}")
    if num_processes == 1:
        return
    env = os.environ if env is None else env
    if str(env.get("ACCELERATE_USE_CPU", "")).strip().lower() in _TRUE:
        return
    if comfy_on_cpu:
        raise ValueError(f"num_gpus is {num_processes}, but ComfyUI runs on the CPU (--cpu), so the worker gets no "
                         f"GPU; set num_gpus in DreamBooth Memory & Speed to 1")
    if num_processes > gpus_found:
        found = "no CUDA GPU was found" if gpus_found <= 0 else (
            f"only {gpus_found} CUDA GPU{'s' if gpus_found != 1 else ''} {'were' if gpus_found != 1 else 'was'} found")
        raise ValueError(f"num_gpus is {num_processes}, but {found} (torch.cuda.device_count() = {gpus_found}, "
                         f"as CUDA_VISIBLE_DEVICES lets ComfyUI see them); set num_gpus in DreamBooth Training "
                         f"Settings to {max(gpus_found, 1)} or less")


def worker_environment(force_cpu: bool = False) -> dict[str, str]:
    """ComfyUI's environment, offline, unbuffered; with `force_cpu` no GPU is visible."""
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", DIFFUSERS_OFFLINE="1", PYTHONUNBUFFERED="1",
               TOKENIZERS_PARALLELISM="false", PYTHONIOENCODING="utf-8")
    env[PARENT_PID_ENV] = str(os.getpid())  # watched by the worker, also from under a launcher
    if force_cpu:
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


class WorkerProcess:
    """One training worker: start it, read its events, stop it gracefully, collect its result.

    Usage: `start()`, then call `poll(timeout)` until it returns None with `finished` set;
    `request_stop()` writes the STOP file (again on every later poll, since the trainer
    removes a stale one when it starts); `kill()` is the last resort; `cancel()` picks
    between them for a Cancel button.
    """

    def __init__(self, command: list[str], run_dir: Path, env: dict[str, str] | None = None, tail_lines: int = 40):
        self.command = command
        self.run_dir = Path(run_dir)
        self.env = env
        self.log_path = log_path(self.run_dir)
        self.events: list[dict[str, Any]] = []
        self._queue: queue.Queue = queue.Queue()
        self._tail: collections.deque[str] = collections.deque(maxlen=tail_lines)
        self._tail_lock = threading.Lock()
        self._process: subprocess.Popen | None = None
        self._threads: list[threading.Thread] = []
        self._log = None
        self.stop_requested_at: float | None = None
        self._exited_at: float | None = None  # when `finished` first saw the exit with a stream still open
        self._streams_given_up = False

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
        pid_path(self.run_dir).write_text(str(self._process.pid), encoding="utf-8")
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
        """The process has exited and both of its streams are read to the end (`_streams_ended`)."""
        return (self._process is not None and self._process.poll() is not None and self._streams_ended()
                and self._queue.empty())

    def _streams_ended(self) -> bool:
        """Whether both streams are read to the end, once the worker has exited. A process it started
        that still holds them READ_GRACE_SECONDS later (and the GPU memory it has) is killed with the
        worker's process group, and the streams are given up: else the node would wait for it."""
        if not any(t.is_alive() for t in self._threads) or self._streams_given_up:
            return True
        self._exited_at = self._exited_at or time.monotonic()
        if time.monotonic() - self._exited_at < READ_GRACE_SECONDS:
            return False
        self._streams_given_up = True
        self._append_log("=== the worker exited, but a process it started still held its output: killed ===")
        if os.name != "nt":  # (on Windows a process does not keep a dead parent's pipes open this way)
            try:
                os.killpg(self._process.pid, signal.SIGKILL)  # start_new_session: the group id is its pid
            except OSError:
                pass
        return True

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

    def cancel(self) -> str:
        """Answer a Cancel: the first asks the worker to stop ("stop"); one within KILL_GRACE_SECONDS of it
        is the same click twice and does nothing ("ignored"); a later one kills the worker ("kill")."""
        if self.stop_requested_at is None:
            self.request_stop()
            return "stop"
        if time.monotonic() - self.stop_requested_at < KILL_GRACE_SECONDS:
            return "ignored"
        self.kill()
        return "kill"

    def kill(self) -> None:
        """End the worker at once (no checkpoint), with every process it started: the answer to a second Cancel."""
        if self._process is not None and self._process.poll() is None:
            self._append_log("=== worker killed ===")
            kill_process_tree(self._process)

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
        if self._process is not None and running_worker(self.run_dir) is None:
            pid_path(self.run_dir).unlink(missing_ok=True)
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
            stop_path(self.run_dir).touch()
        except OSError:
            pass


# --- supervising a run: events, Cancel, the outcome ---------------------------------------------------

CANCEL_TEXTS = {
    "stop": f"stopping: finishing the step, writing a checkpoint and a partial LoRA (Cancel again after "
            f"{KILL_GRACE_SECONDS:.0f} s to kill the worker)",
    "ignored": f"stopping; a second Cancel within {KILL_GRACE_SECONDS:.0f} s is taken as a double-click (Cancel "
               f"again later to kill the worker)",
}


@dataclass
class RunOutcome:
    """How a supervised worker ended: `cancel` is the exception of the first Cancel pressed (None without one)."""

    worker: WorkerProcess
    cancel: BaseException | None

    @property
    def finished(self) -> bool:
        """The run trained every step and wrote its LoRA (also when a Cancel came after the last step)."""
        return self.worker.last("done") is not None and self.worker.returncode == 0

    def events_or_raise(self, say: Callable[[str], None]) -> list[dict[str, Any]]:
        """The events of a finished run. Otherwise raises: the Cancel's exception (after a finished
        run too: the user asked the queue item to stop, and the nodes after this one must not run),
        the worker's failure, or a RuntimeError for a stop from outside (a STOP file, a signal)."""
        if self.cancel is not None:
            done = self.worker.last("done")
            if self.finished and done is not None:
                say(f"cancelled after the last step: {', '.join(Path(p).name for p in done.get('lora', []))} is "
                    f"complete; queue again to use it (nothing is trained again)")
            raise self.cancel
        failure = self.worker.failure()
        if failure is not None:
            raise failure
        stopped = self.worker.last("stopped")
        if stopped is not None:  # not an error, but no result
            raise RuntimeError(f"training was stopped from outside (a STOP file or a signal): {stopped_text(stopped)}")
        return self.worker.events


def supervise(worker: WorkerProcess, show: Callable[[dict[str, Any]], None],
              cancel_pressed: Callable[[], BaseException | None], say: Callable[[str], None]) -> RunOutcome:
    """Follow a started `worker` to its end: every event goes to `show`; `cancel_pressed()` (polled
    ten times a second) returns the exception of a Cancel pressed since its last call, or None, and
    each one is answered by `WorkerProcess.cancel` (stop, a double-click ignored, then kill), told
    through `say`. The worker is closed (killed if it still runs) whatever happens here."""
    cancel = None
    try:
        while not worker.finished:
            event = worker.poll(0.1)
            if event is not None:
                show(event)
            pressed = cancel_pressed()
            if pressed is not None:
                cancel = cancel or pressed
                answer = worker.cancel()
                if answer in CANCEL_TEXTS:
                    say(CANCEL_TEXTS[answer])
        worker.wait()
    finally:
        worker.close()
    return RunOutcome(worker, cancel)


# --- killing a worker with its children ----------------------------------------------------------

def running_worker(run_dir: Path) -> int | None:
    """The pid of a worker still running in `run_dir` (one a ComfyUI that was restarted left behind,
    which finishes its step and checkpoint before it exits), or None.

    The pid file may be stale (ComfyUI crashed) and its pid given to another process since: it
    counts only while that process runs in `run_dir`, where every worker runs (its working folder),
    as psutil (ComfyUI's dependency) or /proc tell. Where neither can, its running is all there is.
    """
    try:
        pid = int(pid_path(run_dir).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not process_alive(pid):
        return None
    folder = _working_folder(pid)
    if folder is None:
        return pid
    try:
        return pid if folder and os.path.samefile(folder, run_dir) else None
    except OSError:
        return None


def _working_folder(pid: int) -> str | None:
    """Process `pid`'s working folder; "" where it cannot be read (it exited, or is another user's);
    None where nothing here can tell."""
    try:
        import psutil
    except ImportError:
        psutil = None
    if psutil is not None:
        try:
            process = psutil.Process(pid)
            return "" if process.status() == psutil.STATUS_ZOMBIE else process.cwd()
        except psutil.Error:
            return ""
    if Path(f"/proc/{pid}").is_dir():
        try:
            return os.readlink(f"/proc/{pid}/cwd")
        except OSError:
            return ""
    return None


def kill_process_tree(process: subprocess.Popen) -> None:
    """SIGKILL a worker started with `start_new_session`, its process group and all its descendants.

    The group alone is not enough: accelerate's launcher (torch elastic) starts each training
    process in a session of its own.
    """
    if os.name == "nt":
        try:  # the launcher and the processes it started
            subprocess.run(["taskkill", "/F", "/T", "/PID", str(process.pid)], stdin=subprocess.DEVNULL,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=30)
        except (OSError, subprocess.SubprocessError):
            pass
        process.kill()
        return
    descendants = _descendants(process.pid)  # before the kill, while they are still its children
    try:
        os.killpg(process.pid, signal.SIGKILL)  # start_new_session: the group id is its pid
    except OSError:
        process.kill()
    for pid in descendants:
        for kill in (os.killpg, os.kill):  # a process started in a new session leads its own group
            try:
                kill(pid, signal.SIGKILL)
            except OSError:
                pass


def _descendants(pid: int) -> list[int]:
    """The pids of every process below `pid` (psutil when installed, else Linux's /proc)."""
    try:
        import psutil
    except ImportError:
        psutil = None
    if psutil is not None:
        try:
            return [p.pid for p in psutil.Process(pid).children(recursive=True)]
        except psutil.Error:
            return []
    children: dict[int, list[int]] = {}
    try:
        entries = [e for e in os.listdir("/proc") if e.isdigit()]
    except OSError:
        return []
    for entry in entries:
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
            ppid = int(stat[stat.rindex(b")") + 2:].split()[1])  # "pid (comm) state ppid ..."
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found
