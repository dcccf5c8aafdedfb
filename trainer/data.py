"""The training images: finding and checking them, aspect-ratio buckets, and turning one into a sample.

`scan_images` reads a folder once, before any model is loaded, and fails with one
`DatasetError` that lists every unusable file, so a bad dataset costs seconds, not a run.
`build_buckets` gives each image a training size of about `resolution**2` pixels with its
own aspect ratio. `ImageDataset` orders the images into batches of one bucket each and
prepares a sample (resize, crop, flip, caption shuffle and dropout); every random choice
is a pure function of the seed, the epoch (batch order) or the draw (augmentation: the
trainer's micro-batch number) and the image, so a resumed run sees exactly the same data.

Masks (masked training) weight the loss per pixel, white = learn, black = ignore: a mask file
`<name>_mask.png` beside the image, else `masks/<name>.png` in the image's folder, else the image's
own alpha channel where it has transparency. A mask goes through its image's resize, crop and flip.
"""

from __future__ import annotations

import hashlib
import math
import random
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import ExifTags, Image, ImageOps

from .config import TrainConfig

IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png", ".webp")
# Pictures a user may expect to be read; each skipped one is named (the rest are only counted).
OTHER_PICTURE_EXTENSIONS = (".gif", ".bmp", ".tif", ".tiff", ".avif", ".heic", ".heif", ".jxl")
REPEAT_FOLDER = re.compile(r"^(\d+)_(.+)$")  # kohya's `10_sks dog`: 10 repeats (the subfolders read)
_TRANSPOSED_ORIENTATIONS = (5, 6, 7, 8)  # EXIF orientations that swap width and height
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
MASK_SUFFIX = "_mask"  # `photo_mask.png` is the mask of `photo.jpg`
MASK_FOLDER = "masks"  # `masks/photo.png` is the mask of `photo.jpg` (where there is no `photo_mask.png`)


class DatasetError(ValueError):
    """A dataset that cannot be trained on: every problem found, one per line, each with its fix."""

    def __init__(self, folder: Path, problems: list[str]):
        self.folder = folder
        self.problems = problems
        super().__init__(f"cannot use the images in {folder}:\n  - " + "\n  - ".join(problems))


@dataclass
class ImageItem:
    path: Path
    caption: str  # raw caption (per config.caption_mode), before shuffle and dropout
    repeats: int
    size: tuple[int, int]  # (width, height) after EXIF orientation
    caption_file: Path | None = None  # the caption file the caption came from, if any
    mask_file: Path | None = None  # its mask file (`<name>_mask.png` or `masks/<name>.png`), if any
    alpha_mask: bool = False  # no mask file, and its alpha channel has transparency: that is its mask

    @property
    def masked(self) -> bool:
        return self.mask_file is not None or self.alpha_mask


@dataclass
class DatasetScan:
    folder: Path
    items: list[ImageItem]
    skipped: list[Path]  # files that are not images (ignored, counted)
    warnings: list[str]  # e.g. images smaller than the resolution


@dataclass
class Sample:
    pixels: torch.Tensor  # (3, H, W) float32 in [-1, 1]
    caption: str  # after shuffle / dropout
    original_size: tuple[int, int]  # (height, width) of the image before resize: SDXL conditioning
    crop_top_left: tuple[int, int]  # (top, left) of the crop in the resized image: SDXL conditioning
    target_size: tuple[int, int]  # (height, width) = bucket
    mask: torch.Tensor | None = None  # (1, H, W) float32 in [0, 1], 1 = learn; None: no mask (learn everything)


# --- scanning ------------------------------------------------------------------------------


def scan_images(folder: Path, prompt: str, config: TrainConfig, *, masks: bool = True) -> DatasetScan:
    """Find, decode and caption every image of `folder`; raise one `DatasetError` listing all bad files.

    Images (png, jpg, jpeg, webp, any case) are read from the folder itself, with
    `config.repeats` repeats, and from kohya-style `N_name` subfolders, with N repeats.
    Other subfolders and hidden files are ignored; other files are counted in `skipped`.
    Each image is fully decoded, so truncated, corrupt and oversized files (above
    `PIL.Image.MAX_IMAGE_PIXELS`) are found here rather than in the middle of training.
    With `masks` (instance images; class images have none) each image's mask is found
    (`find_mask_files`, else its alpha channel) and checked: the image's size, not all black.
    """
    folder = Path(folder)
    if not folder.is_dir():
        what = "is not a folder" if folder.exists() else "does not exist"
        raise DatasetError(folder, [f"{folder}: {what}; check the path, or create the folder and put the images in it"])

    problems: list[str] = []
    notes: list[str] = []
    files: list[tuple[Path, int]] = []  # (file, repeats)
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith("."):  # .DS_Store, .ipynb_checkpoints: tool litter, not data
            continue
        if entry.is_file():
            files.append((entry, config.repeats))
            continue
        match = REPEAT_FOLDER.match(entry.name)
        if masks and entry.name == MASK_FOLDER:
            continue  # read by find_mask_files
        if not match:
            notes.append(f"{entry}: subfolder ignored; only `N_name` subfolders (e.g. `10_sks dog`) are read")
        elif int(match.group(1)) < 1:
            problems.append(f"{entry}: 0 repeats would never show its images; rename it to `1_{match.group(2)}` or more")
        else:
            files += [(f, int(match.group(1))) for f in sorted(entry.iterdir())
                      if f.is_file() and not f.name.startswith(".")]
    files.sort(key=lambda pair: str(pair[0]))

    images = [(f, r) for f, r in files if f.suffix.lower() in IMAGE_EXTENSIONS]
    mask_files = find_mask_files([f for f, _ in images]) if masks else {}
    images = [(f, r) for f, r in images if f not in mask_files.values()]  # a mask beside its image is no image
    mask_files = {image: mask for image, mask in mask_files.items() if image not in mask_files.values()}
    # Caption files beside their images are part of the dataset, not skipped files.
    caption_files = find_caption_files([f for f, _ in files], [f for f, _ in images], config.caption_extension)
    skipped = [f for f, _ in files if f.suffix.lower() not in IMAGE_EXTENSIONS and f not in caption_files.values()]
    notes += [f"{f}: {f.suffix.lower()} pictures are not read (accepted: {', '.join(IMAGE_EXTENSIONS)}); "
              "convert it to PNG to train on it" for f in skipped if f.suffix.lower() in OTHER_PICTURE_EXTENSIONS]
    if not images:
        accepted = ", ".join(IMAGE_EXTENSIONS)
        problems.append(f"{folder}: no images found (accepted: {accepted}, in any case, also in `N_name` "
                        f"subfolders); {len(skipped)} other {_plural(len(skipped), 'file')} skipped")
        problems += notes  # images in a plain subfolder are the usual cause

    items: list[ImageItem] = []
    for path, repeats in images:
        size, transparency, problem = _check_image(path)
        caption, caption_file, caption_problem = _read_caption(path, caption_files.get(path), prompt, config)
        mask_file, alpha_mask = mask_files.get(path), masks and transparency is not None and path not in mask_files
        mask_problem = None
        if size is not None and mask_file is not None:
            mask_problem = _check_mask_file(mask_file, path, size)
        elif alpha_mask and transparency == "full":
            mask_problem = (f"{path}: fully transparent, and its alpha channel is its mask (white = learn), so "
                            f"nothing of it would be learnt; save it with the subject opaque")
        problems += [p for p in (problem, caption_problem, mask_problem) if p]
        if size is None or caption_problem or mask_problem:
            continue
        items.append(ImageItem(path, caption, repeats, size, caption_file, mask_file, alpha_mask))
        if size[0] * size[1] < config.resolution**2:
            if config.upscale or not config.buckets:
                effect = "it is upscaled"
            elif min(size) < config.bucket_step:  # no bucket side is shorter than one step
                effect = f"a side under bucket_step ({config.bucket_step} px) is upscaled to it"
            else:
                effect = "it trains at a smaller bucket (upscale = true enlarges it)"
            notes.append(f"{path}: {size[0]}x{size[1]} is smaller than the resolution "
                         f"{config.resolution}x{config.resolution}; {effect}")
    if problems:
        raise DatasetError(folder, problems)
    return DatasetScan(folder, items, skipped, notes)


def count_images(folder: Path) -> int:
    """Image files directly in `folder` (0 when it does not exist): how many class images are there already."""
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    return sum(1 for f in folder.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS)


def _check_image(path: Path) -> tuple[tuple[int, int] | None, str | None, str | None]:
    """Decode the image fully: its (width, height) after EXIF orientation, its transparency (None: opaque,
    "partial", or "full": every pixel transparent), or why it cannot be used."""
    if path.stat().st_size == 0:
        return None, None, f"{path}: empty file (0 bytes); copy it again or delete it"
    try:
        with warnings.catch_warnings():
            # Pillow only warns between 1x and 2x its pixel limit; both are refused here.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                image.load()
                orientation = image.getexif().get(ExifTags.Base.Orientation, 1)
                width, height = image.size
                transparency = None
                if _has_alpha(image):
                    low, high = image.convert("RGBA").getchannel("A").getextrema()
                    transparency = None if low == 255 else "full" if high == 0 else "partial"
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        return None, None, f"{path}: too large to decode safely ({e}); downscale it"
    except Exception as e:  # decoders raise many types (OSError, SyntaxError, ValueError, ...) on bad files
        return None, None, (f"{path}: cannot be decoded, it is corrupt, truncated or not an image ({e}); "
                            "re-export or delete it")
    if orientation in _TRANSPOSED_ORIENTATIONS:
        width, height = height, width
    return (width, height), transparency, None


def find_mask_files(images: list[Path]) -> dict[Path, Path]:
    """Each image's mask file, where it has one: `<name>_mask.<ext>` beside it, else `masks/<name>.<ext>`
    in its folder (<name>: the image's name without extension; <ext>: any image extension, any case)."""
    listings: dict[Path, dict[str, Path]] = {}  # folder -> lower-case file name -> file

    def listing(folder: Path) -> dict[str, Path]:
        if folder not in listings:
            files = sorted(folder.iterdir()) if folder.is_dir() else []
            listings[folder] = {f.name.lower(): f for f in reversed(files) if f.is_file()}  # first name wins
        return listings[folder]

    found = {}
    for image in images:
        for folder, stem in ((image.parent, image.stem + MASK_SUFFIX), (image.parent / MASK_FOLDER, image.stem)):
            names = listing(folder)
            mask = next((names[n] for n in ((stem + e).lower() for e in IMAGE_EXTENSIONS) if n in names), None)
            if mask is not None:
                found[image] = mask
                break
    return found


def _check_mask_file(mask_file: Path, image: Path, image_size: tuple[int, int]) -> str | None:
    """Why the mask file of `image` cannot be used (unreadable, another size, all black), or None."""
    fix = "paint the subject white and what to ignore black (or delete the mask to learn the whole image)"
    try:
        mask = _read_mask_file(mask_file)
    except Exception as e:  # decoders raise many types on bad files
        return f"{mask_file}: the mask of {image.name} cannot be decoded ({e}); re-export or delete it"
    if mask.size != image_size:
        return (f"{mask_file}: the mask is {mask.width}x{mask.height} but its image {image.name} is "
                f"{image_size[0]}x{image_size[1]}; save the mask at its image's size")
    if mask.getextrema()[1] == 0:
        return f"{mask_file}: the mask of {image.name} is all black, so nothing of it would be learnt; {fix}"
    return None


def find_caption_files(files: list[Path], images: list[Path], extension: str) -> dict[Path, Path]:
    """Each image's caption file among `files`: its name with `extension` (the config's
    caption_extension), matched in any case as image extensions are (`photo.TXT` beside
    `photo.png`); the exact name first where both exist."""
    present, by_name = set(files), {(f.parent, f.name.lower()): f for f in files}
    found = {}
    for image in images:
        exact = image.with_name(image.stem + extension)
        caption = exact if exact in present else by_name.get((image.parent, exact.name.lower()))
        if caption is not None:
            found[image] = caption
    return found


def _read_caption(path: Path, caption_path: Path | None, prompt: str,
                  config: TrainConfig) -> tuple[str, Path | None, str | None]:
    """The caption of image `path` per `config.caption_mode` (from `caption_path`, its caption file
    if it has one), the caption file it came from, and any problem."""
    prompt = prompt.strip()
    if config.caption_mode == "prompt" or caption_path is None:
        return prompt, None, None
    try:
        text = caption_path.read_bytes().decode("utf-8-sig").strip()  # -sig: Notepad's byte-order mark
    except UnicodeDecodeError as e:
        return prompt, None, f"{caption_path}: not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8"
    except OSError as e:
        return prompt, None, f"{caption_path}: cannot be read ({e.strerror}); check its permissions"
    if not text:
        return prompt, None, None
    if config.caption_mode == "prompt_and_file" and prompt:
        return f"{prompt}, {text}", caption_path, None
    return text, caption_path, None


def load_mask(item: ImageItem) -> Image.Image | None:
    """The mask of an image as 8-bit greyscale ("L", 255 = learn) of the image's size, upright per its EXIF
    orientation: its mask file's brightness, else its alpha channel; None when it has no mask."""
    if item.mask_file is not None:
        return _read_mask_file(item.mask_file)
    if item.alpha_mask:
        with Image.open(item.path) as image:
            return ImageOps.exif_transpose(image).convert("RGBA").getchannel("A")
    return None


def _read_mask_file(path: Path) -> Image.Image:
    # A transparent pixel of a mask file counts as white (to_rgb), as a stroke on an empty layer shows.
    return load_image(path).convert("L")


def _has_alpha(image: Image.Image) -> bool:
    return image.mode in _ALPHA_MODES or "transparency" in image.info


def load_image(path: Path) -> Image.Image:
    """Open an image as 8-bit RGB, turned upright per its EXIF orientation.

    Transparent pixels are composited onto white; 16-bit and 32-bit greyscale ("I;16", "I",
    "F") are scaled from 0..65535 to 0..255 rather than clipped; CMYK and palettes are converted.
    """
    with Image.open(path) as image:
        image = ImageOps.exif_transpose(image)
    return to_rgb(image)


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB (see `load_image`)."""
    if image.mode.startswith(("I", "F")):
        # Pillow's own convert clips these to 255; 16-bit PNGs hold 0..65535.
        grey = np.asarray(image, dtype=np.float64) * (255.0 / 65535.0)
        return Image.fromarray(np.clip(np.round(grey), 0, 255).astype(np.uint8)).convert("RGB")
    if _has_alpha(image):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


# --- buckets -------------------------------------------------------------------------------


def build_buckets(sizes: list[tuple[int, int]], config: TrainConfig) -> list[tuple[int, int]]:
    """The training size (width, height) of each image size (width, height).

    The rule (kohya's): the candidate buckets are, for every side s = step, 2*step, ... up to
    twice the resolution, the size with s as one side and the largest multiple of `bucket_step`
    as the other such that the area stays within `resolution**2`. Each image gets the
    candidate whose log aspect ratio is closest to its own (the larger area on a tie).

    Without `upscale`, an image that does not cover its bucket gets a smaller one: its own
    size, shrunk to at most `resolution**2` pixels if needed, each side rounded down to a
    multiple of `bucket_step` (at least one step). It is then only ever scaled down, but for a
    side shorter than one step.

    With `buckets = False` every image is trained as a `resolution` square.
    """
    res, step = config.resolution, config.bucket_step
    if not config.buckets:
        return [(res, res) for _ in sizes]
    candidates = _candidate_buckets(res, step)
    buckets = []
    for width, height in sizes:
        aspect = math.log(width / height)
        bw, bh = min(candidates, key=lambda b: (abs(math.log(b[0] / b[1]) - aspect), -b[0] * b[1]))
        if not config.upscale and (width < bw or height < bh):
            scale = min(1.0, math.sqrt(res * res / (width * height)))
            bw = max(step, int(width * scale) // step * step)
            bh = max(step, int(height * scale) // step * step)
        buckets.append((bw, bh))
    return buckets


def _candidate_buckets(resolution: int, step: int) -> list[tuple[int, int]]:
    area, max_side = resolution * resolution, max(step, 2 * resolution // step * step)
    candidates = set()
    for side in range(step, max_side + 1, step):
        other = max(step, min(max_side, area // side // step * step))
        candidates.update({(side, other), (other, side)})
    return sorted(candidates)


# --- the dataset ---------------------------------------------------------------------------


def dataset_manifest(scan: DatasetScan) -> list[list]:
    """What a resumed run must find again: each image's path in the folder, pixel size, file size,
    repeats and caption, and for a masked image its mask: "alpha", or the mask file's path and the
    SHA-256 of its content. (Not modification times: a dataset copied to another machine is the same.)"""
    rows = []
    for item in scan.items:
        row = [item.path.relative_to(scan.folder).as_posix(), *item.size, item.path.stat().st_size, item.repeats,
               item.caption]
        if item.mask_file is not None:  # masks are small files: their content is hashed, not only their size
            row += [item.mask_file.relative_to(scan.folder).as_posix(),
                    hashlib.sha256(item.mask_file.read_bytes()).hexdigest()]
        elif item.alpha_mask:
            row.append("alpha")
        rows.append(row)
    return rows


def manifest_differences(saved: list[list], current: list[list], limit: int = 5) -> list[str]:
    """How two dataset manifests differ, by image (at most `limit` named per kind)."""
    before, after = {row[0]: row for row in saved}, {row[0]: row for row in current}
    kinds = {"added": [n for n in after if n not in before], "removed": [n for n in before if n not in after],
             "changed (size, repeats, caption or mask)": [n for n in after if n in before and after[n] != before[n]]}
    return [f"{kind}: {', '.join(names[:limit])}{f' and {len(names) - limit} more' if len(names) > limit else ''}"
            for kind, names in kinds.items() if names]


class ImageDataset:
    """Scanned images with their buckets: batch order per epoch and prepared samples.

    With `augment=False` (class images, cached latents) no random choice is made: center
    crop, no flip, the caption unchanged, whatever the config says.
    """

    def __init__(self, scan: DatasetScan, config: TrainConfig, *, augment: bool = True):
        self.scan = scan
        self.config = config
        self.augment = augment
        self.items = scan.items
        self.buckets = build_buckets([item.size for item in self.items], config)

    def __len__(self) -> int:
        return len(self.items)

    def epoch_batches(self, epoch: int, batch_size: int, seed: int) -> list[list[int]]:
        """Item indices of one epoch, each `repeats` times, in shuffled batches of a single bucket.

        The last batch of a bucket may be smaller than `batch_size`. The order depends only
        on (epoch, seed, batch_size), so a resumed run repeats it exactly.
        """
        rng = random.Random(f"batches:{seed}:{epoch}")
        by_bucket: dict[tuple[int, int], list[int]] = {}
        for index, (item, bucket) in enumerate(zip(self.items, self.buckets)):
            by_bucket.setdefault(bucket, []).extend([index] * item.repeats)
        batches = []
        for bucket in sorted(by_bucket):  # sorted: dict order must not decide the shuffle
            indices = by_bucket[bucket]
            rng.shuffle(indices)
            batches += [indices[i:i + batch_size] for i in range(0, len(indices), batch_size)]
        rng.shuffle(batches)
        return batches

    def prepare(self, index: int, bucket: tuple[int, int], *, draw: int | tuple[int, int], seed: int) -> Sample:
        """Item `index` as a training sample of size `bucket` (width, height).

        The image is resized to cover the bucket (keeping its aspect ratio), cropped to it
        (`config.crop`), flipped with probability `config.flip_p`; the caption's tags are
        shuffled (`shuffle_captions`, the first `keep_tokens` stay) and dropped with
        probability `caption_dropout`. The random choices come from (seed, draw, index), so
        the same call always returns the same sample; the trainer draws anew each time an image
        comes round ((micro-batch number, place in the batch)), repeats within an epoch included.
        """
        config, item = self.config, self.items[index]
        # Every draw is made whether used or not, so enabling one augmentation leaves the others unchanged.
        rng = random.Random(f"sample:{seed}:{draw}:{index}")
        u_top, u_left, u_flip, u_drop = rng.random(), rng.random(), rng.random(), rng.random()

        image = load_image(item.path)
        bw, bh = bucket
        scale = max(bw / image.width, bh / image.height)
        rw, rh = max(bw, round(image.width * scale)), max(bh, round(image.height * scale))
        if self.augment and config.crop == "random":
            top, left = int(u_top * (rh - bh + 1)), int(u_left * (rw - bw + 1))
        else:
            top, left = (rh - bh) // 2, (rw - bw) // 2
        flip = self.augment and u_flip < config.flip_p

        def place(picture: Image.Image) -> Image.Image:
            """Resize, crop and flip: the same for the image and its mask."""
            if (rw, rh) != picture.size:
                picture = picture.resize((rw, rh), Image.Resampling.LANCZOS if scale < 1 else Image.Resampling.BICUBIC)
            picture = picture.crop((left, top, left + bw, top + bh))
            return picture.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flip else picture

        pixels = place(image)
        mask = load_mask(item)
        if mask is not None:
            mask = torch.from_numpy(np.asarray(place(mask), dtype=np.float32) / 255.0)[None]
        if flip:
            left = rw - left - bw  # the same pixels are this crop of the mirrored resized image

        caption = item.caption
        if self.augment and config.shuffle_captions:
            tags = [t.strip() for t in caption.split(",") if t.strip()]
            rest = tags[config.keep_tokens:]
            rng.shuffle(rest)
            caption = ", ".join(tags[:config.keep_tokens] + rest)
        if self.augment and u_drop < config.caption_dropout:
            caption = ""

        array = torch.from_numpy(np.asarray(pixels, dtype=np.uint8).copy())  # copy: PIL's buffer is read-only
        return Sample(
            pixels=array.permute(2, 0, 1).float() / 127.5 - 1.0,
            caption=caption,
            original_size=(image.height, image.width),
            crop_top_left=(top, left),
            target_size=(bh, bw),
            mask=mask,
        )

    def cache_key(self, index: int, bucket: tuple[int, int]) -> str:
        """A key for the latents of item `index`'s un-augmented sample at `bucket`; changes with the file
        and its mask file."""
        item = self.items[index]
        stat = item.path.stat()
        text = f"{item.path.resolve().as_posix()}|{stat.st_mtime_ns}|{stat.st_size}|{bucket[0]}x{bucket[1]}"
        if item.mask_file is not None:
            stat = item.mask_file.stat()
            text += f"|{item.mask_file.resolve().as_posix()}|{stat.st_mtime_ns}|{stat.st_size}"
        return hashlib.sha256(text.encode("utf-8")).hexdigest()

    def summary(self) -> str:
        """One line for the log: images, captions, buckets with their image counts, skipped files."""
        counts: dict[tuple[int, int], int] = {}
        for bucket in self.buckets:
            counts[bucket] = counts.get(bucket, 0) + 1
        ordered = sorted(counts.items(), key=lambda kv: (-kv[1], -kv[0][0] * kv[0][1], kv[0]))
        captioned = sum(item.caption_file is not None for item in self.items)
        masked = sum(item.masked for item in self.items)
        text = (f"{len(self.items)} {_plural(len(self.items), 'image')} ({captioned} captioned"
                f"{f', {masked} masked' if masked else ''}), "
                f"{len(counts)} {_plural(len(counts), 'bucket')}: "
                + ", ".join(f"{w}x{h} x{n}" for (w, h), n in ordered))
        samples = sum(item.repeats for item in self.items)
        if samples != len(self.items):
            text += f", {samples} samples per epoch with repeats"
        if self.scan.skipped:
            text += f", {len(self.scan.skipped)} non-image {_plural(len(self.scan.skipped), 'file')} skipped"
        return text


def _plural(n: int, word: str) -> str:
    return word if n == 1 else word + "s"


def dataset_summary(dataset: ImageDataset) -> dict:
    """What a LoRA's metadata says about its data: counts (images, masked images), folders with
    repeats, caption tag frequencies."""
    dirs: dict[str, dict[str, int]] = {}
    tags: dict[str, dict[str, int]] = {}
    for item in dataset.items:
        folder = item.path.parent.name
        entry = dirs.setdefault(folder, {"n_repeats": item.repeats, "img_count": 0})
        entry["img_count"] += 1
        for tag in (t.strip() for t in item.caption.split(",")):
            if tag:
                tags.setdefault(folder, {})[tag] = tags.get(folder, {}).get(tag, 0) + 1
    return {"num_images": len(dataset), "masked_images": sum(item.masked for item in dataset.items),
            "summary": dataset.summary(), "dataset_dirs": dirs, "tag_frequency": tags}
