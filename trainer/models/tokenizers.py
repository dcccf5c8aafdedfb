"""The CLIP tokenizers: where they are found (the model's folder, an option, ComfyUI's copy) and their checks."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from .base import ModelError

TOKENIZER_FILES = "tokenizer.json, or vocab.json and merges.txt"


def holds_tokenizer(folder: Path) -> bool:
    """Whether a folder holds a CLIP tokenizer: `tokenizer.json` (as transformers 5 saves one) or the
    older `vocab.json` + `merges.txt`."""
    return (folder / "tokenizer.json").is_file() or ((folder / "vocab.json").is_file()
                                                     and (folder / "merges.txt").is_file())


def comfyui_tokenizer_dir() -> Path | None:
    """ComfyUI's bundled CLIP tokenizer (comfy/sd1_tokenizer), when ComfyUI is importable."""
    try:
        spec = importlib.util.find_spec("comfy")
    except (ImportError, ValueError):
        return None
    for location in (spec.submodule_search_locations or []) if spec else []:
        folder = Path(location) / "sd1_tokenizer"
        if holds_tokenizer(folder):
            return folder
    return None


def resolve_tokenizer_dirs(arch: str, tokenizer_dir: str | Path | None = None,
                           model_folder: Path | None = None, source: str = "this checkpoint") -> list[Path]:
    """The tokenizer folder(s) to use, one per text encoder, in this order of preference:

    1. `tokenizer_dir`, when given: a tokenizer folder (used for both of SDXL's encoders), or a
       diffusers model folder (its `tokenizer/` and `tokenizer_2/`);
    2. the diffusers folder's `tokenizer/` (and `tokenizer_2/`);
    3. ComfyUI's bundled `comfy/sd1_tokenizer/`, when ComfyUI is importable.

    A tokenizer folder holds `tokenizer.json` or `vocab.json` + `merges.txt`. `source` names the
    single-file checkpoint in the error when no tokenizer is found.
    """
    count = 2 if arch == "sdxl" else 1
    if tokenizer_dir:
        folder = Path(tokenizer_dir).expanduser()
        if not folder.is_dir():
            raise ModelError(f"tokenizer option: {folder} is not a folder. Set it to a folder with a CLIP tokenizer "
                             f"({TOKENIZER_FILES}), such as the tokenizer/ folder of an SD1.x / SDXL diffusers "
                             "model, or leave it empty.")
        if holds_tokenizer(folder):
            return [folder] * count
        if holds_tokenizer(folder / "tokenizer"):
            return _model_tokenizer_dirs(folder, count)
        raise ModelError(f"tokenizer option: {folder} holds no CLIP tokenizer (neither {TOKENIZER_FILES}, nor a "
                         "tokenizer/ folder with them). Set it to a folder that does, such as the tokenizer/ folder "
                         "of an SD1.x / SDXL diffusers model, or leave it empty.")
    if model_folder is not None and holds_tokenizer(model_folder / "tokenizer"):
        return _model_tokenizer_dirs(model_folder, count)
    comfy = comfyui_tokenizer_dir()
    if comfy is not None:
        return [comfy] * count
    if model_folder is not None:
        raise ModelError(f"{model_folder.name}: this diffusers folder has no usable CLIP tokenizer (tokenizer/ holds "
                         f"neither {TOKENIZER_FILES}), and ComfyUI (which ships one) is not importable here. Copy the "
                         "model's tokenizer/ folder back, or set the `tokenizer` option to a folder with "
                         f"{TOKENIZER_FILES}, such as the tokenizer/ folder of any SD1.x / SDXL diffusers model.")
    raise ModelError(f"{source}: a single-file checkpoint does not include a CLIP tokenizer, and ComfyUI (which "
                     "ships one) is not importable here. Set the `tokenizer` option to a folder with "
                     f"{TOKENIZER_FILES}, such as the tokenizer/ folder of any SD1.x / SDXL diffusers model.")


def _model_tokenizer_dirs(model_folder: Path, count: int) -> list[Path]:
    """A diffusers folder's `tokenizer/` and `tokenizer_2/` (the first again where the second is missing)."""
    first, second = model_folder / "tokenizer", model_folder / "tokenizer_2"
    return [first, second if holds_tokenizer(second) else first][:count]



def load_tokenizers(folders: list[Path]) -> list:
    """One CLIP tokenizer per folder, offline; SDXL's second pads with "!"."""
    from transformers import CLIPTokenizer, CLIPTokenizerFast

    tokenizers = []
    for i, folder in enumerate(folders):
        # vocab.json + merges.txt: the tokenizer as before; tokenizer.json alone (transformers 5's
        # way of saving it) needs the fast tokenizer before transformers 5 (from 5 on, the same class).
        has_vocab = (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()
        tokenizer_class = CLIPTokenizer if has_vocab else CLIPTokenizerFast
        try:
            # SDXL's second encoder was trained with "!" as padding (OpenCLIP's convention).
            extra = {"pad_token": "!"} if i == 1 else {}
            tokenizers.append(tokenizer_class.from_pretrained(str(folder), local_files_only=True, **extra))
        except Exception as e:
            raise ModelError(f"tokenizer folder {folder}: cannot be loaded as a CLIP tokenizer ({type(e).__name__}: "
                             f"{e}). The files there ({TOKENIZER_FILES}) are damaged or of another kind of "
                             "tokenizer; set the `tokenizer` option to a folder with a working CLIP tokenizer, such "
                             "as the tokenizer/ folder of an SD1.x / SDXL diffusers model.") from e
    return tokenizers


def check_tokenizers(tokenizers: list, encoder_sizes: list[tuple[int, int]], folders: list[Path],
                      source: str) -> None:
    """Each tokenizer must fit its text encoder, given as (vocab size, positions); cap its length at the positions."""
    for tokenizer, (vocab, positions), folder in zip(tokenizers, encoder_sizes, folders, strict=True):
        if len(tokenizer) > vocab:
            raise ModelError(f"{source}: the tokenizer from {folder} has {len(tokenizer)} tokens but the text encoder "
                             f"only knows {vocab}: they do not belong together. Set the tokenizer option to this "
                             "model's own tokenizer folder.")
        # ComfyUI's copy says 8192; the encoder only has its position embeddings (77).
        tokenizer.model_max_length = min(int(tokenizer.model_max_length), positions)

