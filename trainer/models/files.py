"""Reading single-file checkpoints: safetensors headers and data, and `.ckpt` files loaded safely."""

from __future__ import annotations

import json
import pickle
import re
import struct
from pathlib import Path

import torch

from .base import ModelError

SINGLE_FILE_SUFFIXES = (".safetensors", ".sft")
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")


def check_path(path: str | Path) -> Path:
    """`path` as a Path, if it is a diffusers folder or a checkpoint file of a known type; else ModelError."""
    path = Path(path).expanduser()
    if not path.exists():
        raise ModelError(f"{path}: no such file or folder. Check the model path (a .safetensors / .ckpt "
                         "checkpoint, or a diffusers folder with model_index.json).")
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise ModelError(f"{path}: a folder without model_index.json, so not a diffusers model. Point to a "
                             "single .safetensors / .ckpt file, or to a diffusers model folder.")
    elif not path.name.lower().endswith(SINGLE_FILE_SUFFIXES + PICKLE_SUFFIXES):
        raise ModelError(f"{path.name}: unknown model file type {path.suffix!r}. Use a .safetensors (or .ckpt) "
                         "checkpoint or a diffusers folder.")
    return path


def is_safetensors(path: Path) -> bool:
    """Whether `path` is named as a safetensors file."""
    return path.name.lower().endswith(SINGLE_FILE_SUFFIXES)


def read_safetensors_header(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor shapes from a safetensors header, reading nothing else."""
    try:
        with open(path, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            if size > 200 * 1024 * 1024:  # no real header is this large: not a safetensors file
                raise ValueError("header too large")
            header = json.loads(f.read(size))
        return {k: tuple(v["shape"]) for k, v in header.items() if k != "__metadata__"}
    except (OSError, ValueError, struct.error, KeyError, TypeError, AttributeError) as e:
        raise ModelError(f"{path.name}: not a readable safetensors file ({e}). The download may be incomplete or "
                         "the file is something else renamed; download it again.") from e


def load_pickle_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a `.ckpt` / `.pt`, loaded with `weights_only=True` so no code in the file can run."""
    try:
        try:
            # Memory-mapping keeps a multi-GB checkpoint out of RAM until its tensors are used.
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            obj = torch.load(path, map_location="cpu", weights_only=True)  # the legacy (non-zip) format
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        if found is None:  # the pickle stream itself is broken, not a refused object
            raise ModelError(f"{path.name}: cannot be read as a PyTorch checkpoint (the pickle data is invalid). "
                             "The file may be damaged or not a model; use a .safetensors checkpoint.") from e
        raise ModelError(f"{path.name}: this .ckpt contains pickled Python objects besides weights (such as "
                         f"{found.group(1)}), which are refused for safety: unpickling them could run code. Convert "
                         "it to .safetensors with a tool you trust, or download the .safetensors version of the "
                         "model.") from e
    except Exception as e:  # torch raises many kinds for truncated or foreign files
        raise ModelError(f"{path.name}: cannot be read as a PyTorch checkpoint ({type(e).__name__}: {e}). The file "
                         "may be damaged or not a model; use a .safetensors checkpoint.") from e
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise ModelError(f"{path.name}: holds a {type(obj).__name__}, not a dictionary of weights, so it is not a "
                         "model checkpoint.")
    return {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}



def read_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Every tensor's shape: from the header of a safetensors file, by memory-mapping a `.ckpt`."""
    if is_safetensors(path):
        return read_safetensors_header(path)
    return {k: tuple(v.shape) for k, v in load_pickle_checkpoint(path).items()}



def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint file, on the CPU."""
    if not is_safetensors(path):
        return load_pickle_checkpoint(path)
    from safetensors.torch import load_file

    try:
        return load_file(path, device="cpu")
    except Exception as e:  # the header was fine but the data is not (truncated download)
        raise ModelError(f"{path.name}: the safetensors data cannot be read ({e}). The download may be "
                         "incomplete; download it again.") from e
