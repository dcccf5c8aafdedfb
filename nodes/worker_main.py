"""The training worker's script: `python worker_main.py <pack folder> <run folder> <trainer CLI arguments>`.

Started by the Train LoRA node (`worker.worker_command`), either directly with ComfyUI's
Python or, for several GPUs, once per GPU by `accelerate launch`, which needs a script
path (`-m comfyui_dreambooth_lora...` would fail: inside ComfyUI the pack is imported by
folder name and need not be pip-installed). It

1. imports the pack from its folder under the name `comfyui_dreambooth_lora`;
2. watches ComfyUI: if ComfyUI (or the launcher between them) goes away, or a write to
   the pipe ComfyUI read fails, it writes the run's STOP file, so the trainer finishes its
   step and saves a checkpoint instead of training on unwatched, and sends its own output
   to /dev/null from then on, so that printing does not fail the run;
3. runs the trainer's CLI with the remaining arguments.

Only the standard library is used before the pack is imported.
"""

from __future__ import annotations

import errno
import importlib.util
import os
import sys
import threading
import time

PACKAGE_NAME = "comfyui_dreambooth_lora"
PARENT_PID_ENV = "DREAMBOOTH_LORA_PARENT_PID"  # ComfyUI's pid (worker.worker_environment sets it)
STOP_FILE_NAME = "STOP"  # a copy of trainer/run_folder.py STOP_FILE: the pack is not importable yet
WATCH_SECONDS = 2.0


def import_pack(root: str) -> None:
    """Import the pack in `root` as `comfyui_dreambooth_lora` (unless that name is imported already)."""
    if PACKAGE_NAME in sys.modules:
        return
    spec = importlib.util.spec_from_file_location(PACKAGE_NAME, os.path.join(root, "__init__.py"),
                                                  submodule_search_locations=[root])
    module = importlib.util.module_from_spec(spec)
    sys.modules[PACKAGE_NAME] = module
    spec.loader.exec_module(module)


def process_alive(pid: int) -> bool:
    """Whether process `pid` still runs."""
    if os.name == "nt":  # where os.kill(pid, 0) would end the process: ask for a handle instead
        return _windows_process_alive(pid)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. EPERM: it exists
        return True
    return True


def _windows_process_alive(pid: int) -> bool:
    import ctypes
    from ctypes import wintypes

    synchronize, wait_timeout, access_denied = 0x00100000, 0x102, 5
    kernel32 = ctypes.WinDLL("kernel32", use_last_error=True)
    # Declared: by default ctypes would pass and return a HANDLE as a 32-bit int.
    kernel32.OpenProcess.restype = wintypes.HANDLE
    kernel32.OpenProcess.argtypes = (wintypes.DWORD, wintypes.BOOL, wintypes.DWORD)
    kernel32.WaitForSingleObject.restype = wintypes.DWORD
    kernel32.WaitForSingleObject.argtypes = (wintypes.HANDLE, wintypes.DWORD)
    kernel32.CloseHandle.argtypes = (wintypes.HANDLE,)
    handle = kernel32.OpenProcess(synchronize, False, pid)
    if not handle:  # no such process, unless we may merely not open it
        return ctypes.get_last_error() == access_denied
    try:
        return kernel32.WaitForSingleObject(handle, 0) == wait_timeout  # not yet signalled: running
    finally:
        kernel32.CloseHandle(handle)


class ParentGone:
    """What to do once ComfyUI is gone: write the STOP file, send our output to /dev/null. Runs once."""

    def __init__(self, run_dir: str):
        self.run_dir = run_dir
        self.happened = False
        self._lock = threading.Lock()

    def touch_stop_file(self) -> None:
        try:
            open(os.path.join(self.run_dir, STOP_FILE_NAME), "a").close()
            os.utime(os.path.join(self.run_dir, STOP_FILE_NAME))
        except OSError:
            pass

    def __call__(self) -> None:
        with self._lock:
            if self.happened:
                return
            self.happened = True
            self.touch_stop_file()
            try:  # nobody reads our pipes any more: writing to them would fail the run
                devnull = os.open(os.devnull, os.O_WRONLY)
            except OSError:
                return
            for fd in (1, 2):
                try:
                    os.dup2(devnull, fd)
                except OSError:
                    pass


def reader_gone(error: OSError) -> bool:
    """Whether a failed write to a pipe means its reader is gone: EPIPE on POSIX; on Windows, where a
    write to a pipe whose reader closed fails with EINVAL as often as with EPIPE, either."""
    return isinstance(error, BrokenPipeError) or error.errno == errno.EPIPE or (
        os.name == "nt" and error.errno == errno.EINVAL)


class GuardedStream:
    """sys.stdout / sys.stderr whose writes survive the reader going away (a broken pipe means ComfyUI died).

    The watcher thread notices a dead parent within seconds; a step can print sooner than that.
    """

    def __init__(self, stream, on_broken: ParentGone):
        self._stream = stream
        self._on_broken = on_broken

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except OSError as e:
            if not reader_gone(e):
                raise
            self._on_broken()
            return len(text)

    def flush(self) -> None:
        for _ in range(2):  # after a broken pipe, once more: into /dev/null, emptying the buffer
            try:
                self._stream.flush()
                return
            except OSError as e:
                if not reader_gone(e):
                    return
                self._on_broken()
            except ValueError:
                return

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


def watch_parent(on_gone: ParentGone, interval: float = WATCH_SECONDS) -> threading.Thread:
    """Call `on_gone` once ComfyUI, or the launcher between ComfyUI and us, is gone.

    Under `accelerate launch` the direct parent is the launcher, so ComfyUI's own pid (from
    the environment) is watched too.
    """
    parent = os.getppid()
    try:
        comfyui: int | None = int(os.environ.get(PARENT_PID_ENV, ""))
    except ValueError:
        comfyui = None

    def run() -> None:
        # (os.getppid() changes when the parent dies on POSIX, not on Windows: hence its liveness too)
        while os.getppid() == parent and process_alive(parent) and (comfyui is None or process_alive(comfyui)):
            time.sleep(interval)
        on_gone()
        while True:  # again and again: the trainer removes a STOP file older than its start
            time.sleep(interval)
            on_gone.touch_stop_file()

    thread = threading.Thread(target=run, name="watch-parent", daemon=True)
    thread.start()
    return thread


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) < 3:
        print("usage: worker_main.py <pack folder> <run folder> <trainer CLI arguments>", file=sys.stderr)
        return 2
    root, run_dir = argv[0], argv[1]
    on_gone = ParentGone(run_dir)
    sys.stdout = GuardedStream(sys.stdout, on_gone)
    sys.stderr = GuardedStream(sys.stderr, on_gone)
    watch_parent(on_gone)
    import_pack(root)
    from comfyui_dreambooth_lora.trainer.cli import main as cli_main

    return cli_main(argv[2:])


if __name__ == "__main__":
    # Run as a script, Python puts this file's folder (nodes/) first on sys.path, where its
    # modules would shadow top-level names; the pack is imported by its package name instead.
    if sys.path and os.path.abspath(sys.path[0] or ".") == os.path.dirname(os.path.abspath(__file__)):
        del sys.path[0]
    sys.exit(main())
