"""File writes that lose nothing: atomic writes, free-space checks, fsync, and the clean-up of
temporary files a killed process left behind."""

from __future__ import annotations

import errno
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Callable

# What a write that ran out of space raises besides OSError(ENOSPC): torch.save reports it as a
# RuntimeError ("... unexpected pos ..." or "file write failed"), safetensors as a SafetensorError.
_DISK_FULL_MESSAGES = ("no space left on device", "unexpected pos", "file write failed", "disk quota exceeded")
# The random part tempfile.mkstemp puts in a name (tempfile._RandomNameSequence: 8 of these characters).
_MKSTEMP_RANDOM = r"[a-z0-9_]{8}"


class DiskFullError(OSError):
    """A file did not fit on its disk. Says the folder, the space needed and the space free."""

    def __init__(self, folder: Path, needed: int, free: int, what: str = "a file"):
        super().__init__(errno.ENOSPC, f"out of disk space in {folder}")
        self.folder, self.needed, self.free, self.what = Path(folder), needed, free, what

    def __str__(self) -> str:
        need = f"needs about {_megabytes(self.needed)}" if self.needed > 0 else "did not fit"
        return (f"out of disk space: writing {self.what} in {self.folder} {need}, {_megabytes(self.free)} free. "
                "Free some space there (or choose another output_dir / lora_dir)")


def _megabytes(size: int) -> str:
    return f"{size / 2**20:.1f} MB"


def is_disk_full(error: BaseException) -> bool:
    """Whether `error` is how a write reports a full disk (or a quota reached)."""
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return isinstance(error, Exception) and any(m in str(error).lower() for m in _DISK_FULL_MESSAGES)


def free_bytes(folder: Path) -> int:
    """Free space on the disk holding `folder` (or its nearest existing parent)."""
    folder = Path(folder).absolute()
    while not folder.exists() and folder.parent != folder:
        folder = folder.parent
    return shutil.disk_usage(folder).free


def ensure_free_space(folder: Path, needed: int, what: str) -> None:
    """Raise DiskFullError unless `folder`'s disk has room for `needed` bytes (and a megabyte more)."""
    free = free_bytes(folder)
    if free < needed + 2**20:
        raise DiskFullError(folder, needed, free, what)


def as_disk_full(error: BaseException, folder: Path, needed: int, what: str) -> BaseException:
    """`error` as a DiskFullError naming `what` when it is a full disk's, else `error` itself."""
    if not is_disk_full(error):
        return error
    return DiskFullError(folder, needed, free_bytes(folder), what)


def atomic_write(path: Path, write: Callable[[Path], None], size: int = 0, what: str = "") -> None:
    """Call `write(tmp)` on a temporary file beside `path`, fsync it, then rename it over `path`.

    `size` (bytes, about) is checked against the free space first. On any failure the temporary
    file is removed and `path` keeps whatever it held before; a full disk raises DiskFullError.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    what = what or path.name
    if size:
        ensure_free_space(path.parent, size, what)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        error = as_disk_full(e, path.parent, size, what)
        if error is e:
            raise
        raise error from e


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` atomically."""
    atomic_write(path, lambda tmp: tmp.write_bytes(data), size=len(data))


def stale_temp_files(folder: Path, final_name: re.Pattern | str) -> list[Path]:
    """The temporary files `atomic_write` made in `folder` for a final file named `final_name`
    (a name, or a pattern of names) and left there when its process was killed:
    `.<name>.<8 random characters>.tmp`, nothing else."""
    pattern = final_name.pattern if isinstance(final_name, re.Pattern) else re.escape(final_name)
    ours = re.compile(rf"\.(?:{pattern})\.{_MKSTEMP_RANDOM}\.tmp")
    if not Path(folder).is_dir():
        return []
    return sorted(p for p in Path(folder).iterdir() if ours.fullmatch(p.name) and p.is_file())


def fsync_folder(folder: Path) -> None:
    """fsync every file in `folder` (not recursive) and the folder itself: after a power loss a
    renamed folder then holds its files whole, not empty ones."""
    for path in Path(folder).iterdir():
        if path.is_file():
            with open(path, "rb+") as f:  # (Windows fsyncs only a file opened for writing)
                os.fsync(f.fileno())
    fsync_directory(folder)


def fsync_directory(folder: Path) -> None:
    """fsync a directory's entries (a rename into it, say), where the platform allows it."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # Windows cannot open a directory; NTFS journals the rename itself
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
