"""Pictures the nodes output: the dataset preview grid, the loss curve, images as ComfyUI IMAGE tensors.

A ComfyUI IMAGE is a float32 tensor (batch, height, width, 3) in [0, 1]. PIL and numpy do
the drawing; torch is imported only to build the tensor.
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Iterable, Sequence

from PIL import Image, ImageDraw, ImageFont, ImageOps

GRID_CELL = 128
GRID_MAX_IMAGES = 16


def to_image_tensor(images: Sequence[Image.Image]):
    """PIL images of one size as an IMAGE batch."""
    import numpy as np
    import torch

    arrays = [np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0 for img in images]
    return torch.from_numpy(np.stack(arrays))


def from_image_tensor(images) -> list[Image.Image]:
    """An IMAGE batch as PIL images."""
    import numpy as np

    array = (images.detach().cpu().float().clamp(0, 1).numpy() * 255.0).round().astype(np.uint8)
    return [Image.fromarray(a[..., :3]) for a in array]


def from_mask_tensor(masks) -> list[Image.Image]:
    """A MASK batch (batch, height, width) in [0, 1] as 8-bit greyscale ("L") pictures."""
    import numpy as np

    array = (masks.detach().cpu().float().clamp(0, 1).numpy() * 255.0).round().astype(np.uint8)
    return [Image.fromarray(a, mode="L") for a in array]


def png_bytes(image: Image.Image) -> bytes:
    """The image as a PNG file's bytes."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def same_size(images: Sequence[Image.Image]) -> list[Image.Image]:
    """Images fitted (letterboxed) to the first one's size, so they stack into one batch."""
    if not images:
        return []
    size = images[0].size
    return [img if img.size == size else ImageOps.pad(img.convert("RGB"), size, color=(0, 0, 0)) for img in images]


def load_images(paths: Iterable[Path]) -> list[Image.Image]:
    out = []
    for path in paths:
        with Image.open(path) as img:
            out.append(ImageOps.exif_transpose(img).convert("RGB"))
    return out


def preview_grid(paths: Sequence[Path], captions: Sequence[str] | None = None, cell: int = GRID_CELL,
                 max_images: int = GRID_MAX_IMAGES, masks: Sequence[Image.Image | None] = ()) -> Image.Image:
    """Up to `max_images` thumbnails in a near-square grid (each fitted into a cell, letterboxed).

    `masks` (greyscale, 255 = learnt, each of its image's size, or None) are shown over their
    images: what a mask ignores is darkened and tinted, what it keeps stays as it is.
    """
    shown = list(paths)[:max_images]
    if not shown:
        return Image.new("RGB", (cell, cell), (32, 32, 32))
    columns = math.ceil(math.sqrt(len(shown)))
    rows = math.ceil(len(shown) / columns)
    grid = Image.new("RGB", (columns * cell, rows * cell), (24, 24, 24))
    for i, path in enumerate(shown):
        try:
            with Image.open(path) as img:
                thumb = ImageOps.exif_transpose(img).convert("RGB")
        except Exception:  # the dataset scan reports bad files; the grid shows a grey cell
            thumb = Image.new("RGB", (cell, cell), (90, 90, 90))
        mask = masks[i] if i < len(masks) else None
        if mask is not None and mask.size == thumb.size:
            thumb = show_mask(thumb, mask)
        thumb = ImageOps.contain(thumb, (cell - 4, cell - 4))
        x, y = (i % columns) * cell, (i // columns) * cell
        grid.paste(thumb, (x + (cell - thumb.width) // 2, y + (cell - thumb.height) // 2))
    return grid


def show_mask(image: Image.Image, mask: Image.Image) -> Image.Image:
    """`image` with what `mask` ignores (black) darkened and tinted magenta; grey in between."""
    ignored = Image.blend(image, Image.new("RGB", image.size, (160, 0, 160)), 0.5).point(lambda v: v // 2)
    return Image.composite(image, ignored, mask.convert("L"))


def blank_image(size: int = 64) -> Image.Image:
    return Image.new("RGB", (size, size), (0, 0, 0))


def loss_curve(losses: Sequence[tuple[int, float]], width: int = 640, height: int = 360) -> Image.Image:
    """Loss per step (dots, faint) with a moving average (line), axes and the min/max loss."""
    image = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    left, right, top, bottom = 56, 12, 14, 30
    draw.rectangle([left, top, width - right, height - bottom], outline=(0, 0, 0))
    if not losses:
        draw.text((left + 10, height // 2), "no training steps yet", fill=(0, 0, 0), font=font)
        return image
    steps = [s for s, _ in losses]
    values = [v for _, v in losses]
    lo, hi = min(values), max(values)
    if hi - lo < 1e-12:
        lo, hi = lo - 0.5, hi + 0.5
    first, last = steps[0], steps[-1]
    span = max(1, last - first)

    def point(step: float, value: float) -> tuple[float, float]:
        x = left + (step - first) / span * (width - left - right)
        y = top + (hi - value) / (hi - lo) * (height - top - bottom)
        return x, y

    for s, v in losses:
        x, y = point(s, v)
        draw.ellipse([x - 1, y - 1, x + 1, y + 1], fill=(150, 170, 230))
    window = max(1, len(values) // 20)
    smooth = []
    for i in range(len(values)):
        chunk = values[max(0, i - window + 1): i + 1]
        smooth.append(point(steps[i], sum(chunk) / len(chunk)))
    if len(smooth) > 1:
        draw.line(smooth, fill=(20, 60, 200), width=2)
    draw.text((4, top), f"{hi:.4g}", fill=(0, 0, 0), font=font)
    draw.text((4, height - bottom - 10), f"{lo:.4g}", fill=(0, 0, 0), font=font)
    draw.text((left, height - bottom + 6), f"step {first}", fill=(0, 0, 0), font=font)
    label = f"step {last}   loss (moving average of {window})"
    draw.text((width - right - 7 * len(label), height - bottom + 6), label, fill=(0, 0, 0), font=font)
    return image


def losses_of_run(events: Iterable[dict]) -> list[tuple[int, float]]:
    """(step, loss) of the current run in an event log that may hold earlier runs and resumes.

    A `start` with start_step 0 begins a new run (earlier steps are dropped); a resumed
    segment overwrites the steps it repeats.
    """
    losses: dict[int, float] = {}
    for event in events:
        kind = event.get("event")
        if kind == "start" and not event.get("start_step"):
            losses = {}
        elif kind == "step":
            losses[int(event["step"])] = float(event["loss"])
    return sorted(losses.items())
