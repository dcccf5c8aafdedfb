"""The dataset: scanning and validation, captions, image conversion, buckets, batches and samples."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import ExifTags, Image, ImageFile

from comfyui_dreambooth_lora.trainer.config import TrainConfig
from comfyui_dreambooth_lora.trainer.data import (DatasetError, ImageDataset, build_buckets, dataset_manifest,
                                                  load_image, manifest_differences, scan_images)
from comfyui_dreambooth_lora.trainer.tiny import draw_subject_image, make_demo_dataset

PROMPT = "a photo of sks disc"


def config(**overrides) -> TrainConfig:
    return TrainConfig(**{"resolution": 64, "bucket_step": 8, **overrides})


def save(path: Path, size=(64, 64), colour=(200, 50, 50), mode="RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, colour).save(path)
    return path


def scan(folder: Path, **overrides):
    return scan_images(folder, PROMPT, config(**overrides))


# --- scanning and captions -----------------------------------------------------------------


@pytest.mark.parametrize("mode, expected", [
    ("file_or_prompt", ["tag one, tag two", PROMPT, PROMPT]),
    ("prompt", [PROMPT, PROMPT, PROMPT]),
    ("prompt_and_file", [f"{PROMPT}, tag one, tag two", PROMPT, PROMPT]),
])
def test_captions_per_mode(tmp_path, mode, expected):
    save(tmp_path / "a.png")
    (tmp_path / "a.txt").write_bytes("\ufeff  tag one, tag two \n".encode("utf-8"))  # with a byte-order mark
    save(tmp_path / "b.png")  # no caption file
    save(tmp_path / "c.png")
    (tmp_path / "c.txt").write_text("  \n", encoding="utf-8")  # empty caption: the prompt
    result = scan(tmp_path, caption_mode=mode)
    assert [item.caption for item in result.items] == expected
    assert result.skipped == []  # caption files are part of the dataset


def test_a_caption_file_is_found_whatever_the_case_of_its_extension(tmp_path):
    # As image extensions are: `b.TXT` was skipped and its image trained on the instance prompt.
    save(tmp_path / "a.png")
    save(tmp_path / "b.PNG")
    (tmp_path / "a.txt").write_text("exact", encoding="utf-8")
    (tmp_path / "a.TXT").write_text("other case", encoding="utf-8")  # the exact name wins where both exist
    (tmp_path / "b.TXT").write_text("upper case", encoding="utf-8")
    result = scan(tmp_path)
    assert [(item.path.name, item.caption) for item in result.items] == [("a.png", "exact"), ("b.PNG", "upper case")]
    assert result.skipped == [tmp_path / "a.TXT"]


def test_caption_extension_is_configurable(tmp_path):
    save(tmp_path / "a.jpg")
    (tmp_path / "a.caption").write_text("from caption", encoding="utf-8")
    (tmp_path / "a.txt").write_text("from txt", encoding="utf-8")
    result = scan(tmp_path, caption_extension=".caption")
    assert result.items[0].caption == "from caption"
    assert result.items[0].caption_file == tmp_path / "a.caption"
    assert result.skipped == [tmp_path / "a.txt"]


def test_kohya_folders_set_repeats(tmp_path):
    save(tmp_path / "top.png")
    save(tmp_path / "10_sks dog" / "inner.PNG")
    save(tmp_path / "3_more" / "x.webp")
    save(tmp_path / "unrelated" / "ignored.png")
    result = scan(tmp_path, repeats=2)
    got = {item.path.relative_to(tmp_path).as_posix(): item.repeats for item in result.items}
    assert got == {"top.png": 2, "10_sks dog/inner.PNG": 10, "3_more/x.webp": 3}
    assert [item.path for item in result.items] == sorted(item.path for item in result.items)
    assert any("unrelated" in w for w in result.warnings)


def test_non_image_files_are_skipped_and_counted(tmp_path):
    save(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("caption", encoding="utf-8")
    (tmp_path / "notes.md").write_text("hello", encoding="utf-8")
    (tmp_path / "orphan.txt").write_text("no image", encoding="utf-8")
    (tmp_path / "anim.gif").write_bytes(b"GIF89a")
    result = scan(tmp_path)
    assert [item.path.name for item in result.items] == ["a.png"]
    assert sorted(p.name for p in result.skipped) == ["anim.gif", "notes.md", "orphan.txt"]
    assert ImageDataset(result, config()).summary().endswith("3 non-image files skipped")
    # a picture in a format the trainer does not read is named, so a user sees why it is missing
    assert [w for w in result.warnings if "anim.gif" in w and "convert it to PNG" in w]
    assert not [w for w in result.warnings if "notes.md" in w]


def test_missing_folder(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        scan(tmp_path / "nope")


def test_empty_folder_names_extensions_and_skipped_count(tmp_path):
    (tmp_path / "readme.md").write_text("x", encoding="utf-8")
    (tmp_path / "photo.bmp").write_bytes(b"BM")
    with pytest.raises(DatasetError) as info:
        scan(tmp_path)
    message = str(info.value)
    assert "no images" in message and ".png" in message and ".webp" in message and ".jpg" in message
    assert "2 other files skipped" in message

    save(tmp_path / "dog" / "a.png")  # a plain subfolder is not read, and the error says so
    with pytest.raises(DatasetError, match="dog: subfolder ignored"):
        scan(tmp_path)


def test_every_bad_file_is_listed_in_one_error(tmp_path):
    save(tmp_path / "good.png")
    (tmp_path / "zero.png").write_bytes(b"")
    save(tmp_path / "full.png", size=(64, 64))
    data = (tmp_path / "full.png").read_bytes()
    (tmp_path / "full.png").unlink()
    (tmp_path / "truncated.png").write_bytes(data[: len(data) // 2])
    (tmp_path / "garbage.jpg").write_bytes(os.urandom(2000))
    save(tmp_path / "latin1.png")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))

    with pytest.raises(DatasetError) as info:
        scan(tmp_path)
    problems = info.value.problems
    assert len(problems) == 4
    message = str(info.value)
    for name in ("zero.png", "truncated.png", "garbage.jpg", "latin1.txt"):
        assert str(tmp_path / name) in message
    assert "good.png" not in message
    assert "0 bytes" in message and "UTF-8" in message
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_decompression_bomb_is_reported_with_pixel_count(tmp_path, monkeypatch):
    save(tmp_path / "small.png", size=(20, 20))
    save(tmp_path / "warn.png", size=(40, 40))  # between 1x and 2x the limit: Pillow only warns
    save(tmp_path / "huge.png", size=(100, 100))  # above 2x: Pillow raises
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(DatasetError) as info:
        scan(tmp_path)
    message = str(info.value)
    assert len(info.value.problems) == 2
    assert "warn.png" in message and "1600" in message
    assert "huge.png" in message and "10000" in message
    assert "small.png" not in message


def test_small_image_warning(tmp_path):
    save(tmp_path / "small.png", size=(40, 30))
    save(tmp_path / "big.png", size=(64, 64))
    result = scan(tmp_path)
    assert len(result.warnings) == 1
    assert "small.png" in result.warnings[0] and "40x30" in result.warnings[0]
    assert "smaller bucket" in result.warnings[0]


def test_a_side_under_one_bucket_step_is_said_to_be_upscaled(tmp_path):
    # it is: no bucket side is shorter than bucket_step (the warning said "a smaller bucket")
    save(tmp_path / "tiny.png", size=(48, 48))
    result = scan(tmp_path, bucket_step=64, resolution=128)
    assert build_buckets([(48, 48)], config(bucket_step=64, resolution=128)) == [(64, 64)]
    assert len(result.warnings) == 1 and "upscaled" in result.warnings[0] and "bucket_step (64 px)" in result.warnings[0]


# --- image conversion ----------------------------------------------------------------------


def test_exif_orientation_is_applied(tmp_path):
    image = Image.new("RGB", (40, 20), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 20, 20))  # left half red
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = 6  # display rotated 90 degrees clockwise
    image.save(tmp_path / "rotated.jpg", exif=exif, quality=95)

    assert scan(tmp_path).items[0].size == (20, 40)
    upright = load_image(tmp_path / "rotated.jpg")
    assert upright.size == (20, 40)
    top, bottom = upright.getpixel((10, 5)), upright.getpixel((10, 35))
    assert top[0] > 200 and top[2] < 60  # the left half went to the top
    assert bottom[2] > 200 and bottom[0] < 60


def test_mode_conversions(tmp_path):
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    rgba.putpixel((1, 1), (255, 0, 0, 255))
    rgba.putpixel((2, 2), (255, 0, 0, 128))
    rgba.save(tmp_path / "rgba.png")
    out = load_image(tmp_path / "rgba.png")
    assert out.mode == "RGB"
    assert out.getpixel((0, 0)) == (255, 255, 255)  # transparent -> white, not black
    assert out.getpixel((1, 1)) == (255, 0, 0)
    assert out.getpixel((2, 2)) == (255, 127, 127)

    save(tmp_path / "grey.png", colour=100, mode="L")
    assert load_image(tmp_path / "grey.png").getpixel((0, 0)) == (100, 100, 100)

    palette = Image.new("P", (8, 8), 0)
    palette.putpalette([0, 255, 0, 10, 20, 30] + [0] * 762)
    palette.putpixel((1, 1), 1)
    palette.save(tmp_path / "palette.png", transparency=0)
    out = load_image(tmp_path / "palette.png")
    assert out.getpixel((0, 0)) == (255, 255, 255)
    assert out.getpixel((1, 1)) == (10, 20, 30)

    deep = np.zeros((8, 8), dtype=np.uint16)
    deep[0, 0], deep[0, 1], deep[0, 2] = 65535, 32896, 257
    Image.fromarray(deep).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    out = load_image(tmp_path / "deep.png")
    assert [out.getpixel((x, 0)) for x in range(4)] == [(255,) * 3, (128,) * 3, (1,) * 3, (0,) * 3]

    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg", quality=100)
    r, g, b = load_image(tmp_path / "cmyk.jpg").getpixel((4, 4))
    assert r > 240 and g < 15 and b < 15


# --- buckets -------------------------------------------------------------------------------

SIZES = [(w, h) for w in (300, 512, 640, 777, 1024, 1500, 2000) for h in (300, 512, 700, 1024, 1999)]


def test_buckets_keep_aspect_area_and_step():
    cfg = config(resolution=512, bucket_step=64)
    for (w, h), (bw, bh) in zip(SIZES, build_buckets(SIZES, cfg)):
        assert bw % 64 == 0 and bh % 64 == 0
        assert bw * bh <= 512 * 512
        ratio = w / h
        # within one step: the bucket's width fits its height at the image's aspect, or vice versa
        assert min(abs(bw - bh * ratio), abs(bh - bw / ratio)) <= 64, ((w, h), (bw, bh))
        if w * h >= 512 * 512 and 0.5 <= ratio <= 2:
            assert bw * bh >= 0.75 * 512 * 512  # large images train near the full resolution


def test_square_and_common_buckets():
    cfg = config(resolution=512, bucket_step=64)
    assert build_buckets([(1000, 1000), (1200, 1600), (1600, 1200)], cfg) == [(512, 512), (448, 576), (576, 448)]


def test_small_images_are_not_upscaled_unless_asked():
    sizes = [(200, 150), (100, 300), (40, 40), (600, 300)]
    cfg = config(resolution=512, bucket_step=64)
    for (w, h), (bw, bh) in zip(sizes, build_buckets(sizes, cfg)):
        assert bw % 64 == 0 and bh % 64 == 0 and bw * bh <= 512 * 512
        assert (bw <= max(w, 64) and bh <= max(h, 64)), ((w, h), (bw, bh))
    assert build_buckets([(200, 150)], cfg) == [(192, 128)]
    assert build_buckets([(40, 40)], cfg) == [(64, 64)]  # at least one step

    upscaled = build_buckets(sizes, config(resolution=512, bucket_step=64, upscale=True))
    assert upscaled == build_buckets([(w * 20, h * 20) for w, h in sizes], cfg)  # as large images
    assert upscaled[0][0] > 200


def test_buckets_off_gives_squares():
    cfg = config(resolution=512, bucket_step=64, buckets=False)
    assert build_buckets([(2000, 500), (100, 100), (512, 768)], cfg) == [(512, 512)] * 3


# --- batches -------------------------------------------------------------------------------


def mixed_dataset(tmp_path: Path, **overrides) -> ImageDataset:
    for i, size in enumerate([(64, 64), (64, 64), (64, 64), (80, 48), (80, 48), (48, 80)]):
        draw_subject_image(size, seed=i).save(tmp_path / f"img{i}.png")
    (tmp_path / "3_rep").mkdir()
    draw_subject_image((64, 64), seed=9).save(tmp_path / "3_rep" / "r.png")
    return ImageDataset(scan(tmp_path, **overrides), config(**overrides))


def test_epoch_batches_cover_repeats_without_mixing_buckets(tmp_path):
    data = mixed_dataset(tmp_path, repeats=2)
    assert len(data) == 7
    batches = data.epoch_batches(epoch=0, batch_size=2, seed=1)
    expected = Counter({i: data.items[i].repeats for i in range(len(data))})
    assert Counter(i for batch in batches for i in batch) == expected
    assert expected[data.items.index(next(it for it in data.items if it.path.name == "r.png"))] == 3
    assert all(1 <= len(batch) <= 2 for batch in batches)
    assert all(len({data.buckets[i] for i in batch}) == 1 for batch in batches)
    assert len(set(data.buckets)) == 3  # the test covers several buckets
    incomplete = Counter(data.buckets[b[0]] for b in batches if len(b) < 2)
    assert all(n == 1 for n in incomplete.values())  # at most the last batch of each bucket
    # the batch order interleaves the buckets instead of training one bucket after another
    order = [data.buckets[batch[0]] for batch in data.epoch_batches(epoch=0, batch_size=1, seed=1)]
    assert sum(a != b for a, b in zip(order, order[1:])) > len(set(order)) - 1


def test_epoch_batches_depend_only_on_epoch_and_seed(tmp_path):
    data = mixed_dataset(tmp_path, repeats=2)
    first = data.epoch_batches(epoch=3, batch_size=2, seed=7)
    again = ImageDataset(data.scan, data.config).epoch_batches(epoch=3, batch_size=2, seed=7)
    assert first == again
    assert first != data.epoch_batches(epoch=4, batch_size=2, seed=7)
    assert first != data.epoch_batches(epoch=3, batch_size=2, seed=8)


# --- samples -------------------------------------------------------------------------------


def one_image_dataset(tmp_path: Path, size=(96, 64), caption=None, **overrides) -> ImageDataset:
    draw_subject_image(size, seed=3).save(tmp_path / "img.png")
    if caption is not None:
        (tmp_path / "img.txt").write_text(caption, encoding="utf-8")
    return ImageDataset(scan(tmp_path, **overrides), config(**overrides))


def test_prepare_is_deterministic_with_sdxl_conditioning(tmp_path):
    data = one_image_dataset(tmp_path, size=(96, 64), crop="random", flip_p=0.5)
    a = data.prepare(0, (64, 64), draw=2, seed=5)
    b = data.prepare(0, (64, 64), draw=2, seed=5)
    assert torch.equal(a.pixels, b.pixels) and a.crop_top_left == b.crop_top_left
    assert a.pixels.shape == (3, 64, 64) and a.pixels.dtype == torch.float32
    assert a.pixels.min() >= -1 and a.pixels.max() <= 1 and a.pixels.max() - a.pixels.min() > 1
    assert a.original_size == (64, 96) and a.target_size == (64, 64)
    wide = data.prepare(0, (72, 40), draw=2, seed=5)  # another bucket, e.g. of an instance batch
    assert wide.pixels.shape == (3, 40, 72) and wide.target_size == (40, 72)


def test_prepare_resizes_to_cover_then_center_crops(tmp_path):
    data = one_image_dataset(tmp_path, size=(192, 128))
    sample = data.prepare(0, (64, 64), draw=0, seed=0)
    assert sample.crop_top_left == (0, 16)  # resized to 96x64, 32 columns cropped evenly
    expected = load_image(tmp_path / "img.png").resize((96, 64), Image.Resampling.LANCZOS).crop((16, 0, 80, 64))
    expected = torch.from_numpy(np.asarray(expected).copy()).permute(2, 0, 1).float() / 127.5 - 1
    assert torch.allclose(sample.pixels, expected)


def test_flip_mirrors_the_sample(tmp_path):
    plain = one_image_dataset(tmp_path, size=(160, 64), crop="random", flip_p=0.0)
    flipped = one_image_dataset(tmp_path, size=(160, 64), crop="random", flip_p=1.0)
    a = plain.prepare(0, (64, 64), draw=1, seed=0)
    b = flipped.prepare(0, (64, 64), draw=1, seed=0)
    assert not torch.equal(a.pixels, b.pixels)
    assert torch.equal(a.pixels.flip(-1), b.pixels)
    # SDXL sees the crop's position in the mirrored image: 160 - left - 64
    assert a.crop_top_left[1] != 48 and b.crop_top_left == (0, 160 - a.crop_top_left[1] - 64)
    unaugmented = ImageDataset(flipped.scan, flipped.config, augment=False).prepare(0, (64, 64), draw=1, seed=0)
    centered = one_image_dataset(tmp_path, size=(160, 64)).prepare(0, (64, 64), draw=1, seed=0)
    assert torch.equal(unaugmented.pixels, centered.pixels) and unaugmented.crop_top_left == (0, 48)


def test_random_crop_varies_by_epoch_center_crop_does_not(tmp_path):
    random_crop = one_image_dataset(tmp_path, size=(160, 64), crop="random")
    lefts = {random_crop.prepare(0, (64, 64), draw=e, seed=0).crop_top_left for e in range(10)}
    assert len(lefts) > 3 and all(0 <= left <= 96 for _, left in lefts)

    center = one_image_dataset(tmp_path, size=(160, 64), crop="center")
    assert {center.prepare(0, (64, 64), draw=e, seed=0).crop_top_left for e in range(10)} == {(0, 48)}

    unaugmented = ImageDataset(random_crop.scan, random_crop.config, augment=False)
    samples = [unaugmented.prepare(0, (64, 64), draw=e, seed=e) for e in range(3)]
    assert all(s.crop_top_left == (0, 48) and torch.equal(s.pixels, samples[0].pixels) for s in samples)


def test_caption_shuffle_keeps_first_tokens(tmp_path):
    caption = "sks, red, round, star, outdoors, sunny, photo"
    data = one_image_dataset(tmp_path, caption=caption, shuffle_captions=True, keep_tokens=1)
    shuffled = [data.prepare(0, (64, 64), draw=e, seed=0).caption for e in range(8)]
    assert all(c.split(", ")[0] == "sks" for c in shuffled)
    assert all(sorted(c.split(", ")) == sorted(caption.split(", ")) for c in shuffled)
    assert len(set(shuffled)) > 1
    assert data.prepare(0, (64, 64), draw=3, seed=0).caption == shuffled[3]


def test_caption_dropout(tmp_path):
    always = one_image_dataset(tmp_path, caption="sks, red", caption_dropout=1.0)
    assert always.prepare(0, (64, 64), draw=0, seed=0).caption == ""
    half = one_image_dataset(tmp_path, caption="sks, red", caption_dropout=0.5)
    captions = {half.prepare(0, (64, 64), draw=e, seed=0).caption for e in range(20)}
    assert captions == {"", "sks, red"}
    never = one_image_dataset(tmp_path, caption="sks, red", caption_dropout=0.0)
    assert never.prepare(0, (64, 64), draw=0, seed=0).caption == "sks, red"


def test_cache_key_changes_with_bucket_and_file(tmp_path):
    data = one_image_dataset(tmp_path)
    key = data.cache_key(0, (64, 64))
    assert key == data.cache_key(0, (64, 64))
    assert key != data.cache_key(0, (72, 56))
    stat = (tmp_path / "img.png").stat()
    os.utime(tmp_path / "img.png", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert key != data.cache_key(0, (64, 64))


def test_summary_on_demo_dataset(tmp_path):
    make_demo_dataset(tmp_path, count=6, size=64)
    (tmp_path / "notes.md").write_text("x", encoding="utf-8")
    data = ImageDataset(scan(tmp_path), config())
    text = data.summary()
    assert text.startswith("6 images (3 captioned), 3 buckets: ")
    assert "64x64 x2" in text and "72x56 x2" in text and "56x72 x2" in text
    assert text.endswith(", 1 non-image file skipped")


# --- masks ---------------------------------------------------------------------------------------


def grey_pattern(size: tuple[int, int], seed: int = 0) -> np.ndarray:
    """Random grey blocks of 10 px (height, width): edges and levels that resizing and cropping move."""
    rng = np.random.default_rng(seed)
    w, h = size
    blocks = rng.integers(0, 256, (h // 10 + 1, w // 10 + 1)).repeat(10, 0).repeat(10, 1)
    return blocks[:h, :w].astype(np.uint8)


def save_grey(path: Path, grey: np.ndarray, mode: str = "RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(grey) if mode == "L" else Image.fromarray(np.stack([grey] * 3, -1))
    image.save(path)
    return path


def as_bytes(values: torch.Tensor) -> torch.Tensor:
    return torch.round(values * 255)


@pytest.mark.parametrize("where", ["beside", "masks folder"])
def test_a_mask_follows_its_images_resize_crop_flip_and_bucket_pixel_for_pixel(tmp_path, where):
    # The image is its own mask (grey = mask value), so after every augmentation its pixels must equal the mask.
    sizes = {"wide.png": (170, 90), "tall.png": (70, 130), "square.png": (100, 100)}
    for name, size in sizes.items():
        grey = grey_pattern(size, seed=len(name))
        save_grey(tmp_path / name, grey)
        save_grey(tmp_path / (f"{name[:-4]}_mask.png" if where == "beside" else f"masks/{name}"), grey, mode="L")
    result = scan(tmp_path, crop="random", flip_p=0.5)
    assert [item.path.name for item in result.items] == sorted(sizes)  # a mask file is no training image
    assert all(item.mask_file is not None for item in result.items) and result.warnings == []
    data = ImageDataset(result, config(crop="random", flip_p=0.5))
    assert len(set(data.buckets)) == 3
    unflipped = ImageDataset(result, config(crop="random", flip_p=0.0))  # the same crops (every draw is made)
    crops, flips = set(), set()
    for index, bucket in enumerate(data.buckets):
        for draw in range(12):
            sample = data.prepare(index, bucket, draw=draw, seed=1)
            assert sample.mask.shape == (1, bucket[1], bucket[0]) and sample.mask.dtype == torch.float32
            assert torch.equal(as_bytes(sample.mask[0]), torch.round((sample.pixels[0] + 1) * 127.5))
            crops.add((index, sample.crop_top_left))
            flips.add(not torch.equal(sample.pixels, unflipped.prepare(index, bucket, draw=draw, seed=1).pixels))
    assert len(crops) > 6 and flips == {True, False}  # crops and flips happened, or the test would prove little


def test_flipped_and_cropped_masks_move_with_the_image(tmp_path):
    grey = grey_pattern((160, 64), seed=4)
    save_grey(tmp_path / "img.png", grey)
    save_grey(tmp_path / "img_mask.png", grey, mode="L")
    plain = ImageDataset(scan(tmp_path, crop="random"), config(crop="random", flip_p=0.0))
    flipped = ImageDataset(scan(tmp_path, crop="random"), config(crop="random", flip_p=1.0))
    a, b = plain.prepare(0, (64, 64), draw=1, seed=0), flipped.prepare(0, (64, 64), draw=1, seed=0)
    left = a.crop_top_left[1]
    assert left not in (0, 48)  # a random crop off the centre
    assert torch.equal(as_bytes(a.mask[0]), torch.from_numpy(grey[:, left:left + 64]).float())
    assert torch.equal(b.mask, a.mask.flip(-1))


def test_an_alpha_channel_is_the_mask_unless_a_mask_file_is_given(tmp_path):
    grey = grey_pattern((120, 80), seed=2)
    grey[0, 0] = 0  # some transparency for sure
    rgba = np.concatenate([np.full((80, 120, 3), 90, np.uint8), grey[..., None]], -1)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "cutout.png")
    save_grey(tmp_path / "file" / "cutout.png", grey)
    save_grey(tmp_path / "file" / "cutout_mask.png", grey, mode="L")
    Image.new("RGBA", (80, 80), (10, 20, 30, 255)).save(tmp_path / "opaque.png")  # an alpha channel, no transparency
    alpha, by_file = scan(tmp_path), scan(tmp_path / "file")
    assert [(i.path.name, i.alpha_mask, i.mask_file) for i in alpha.items] == [("cutout.png", True, None),
                                                                              ("opaque.png", False, None)]
    a = ImageDataset(alpha, config(crop="random", flip_p=0.5)).prepare(0, (64, 48), draw=3, seed=0)
    b = ImageDataset(by_file, config(crop="random", flip_p=0.5)).prepare(0, (64, 48), draw=3, seed=0)
    assert torch.equal(a.mask, b.mask)
    assert ImageDataset(alpha, config()).prepare(1, (64, 64), draw=0, seed=0).mask is None

    # a mask file wins over the alpha channel, and one beside the image over one in masks/
    save_grey(tmp_path / "cutout_mask.png", np.full((80, 120), 255, np.uint8), mode="L")
    save_grey(tmp_path / "masks" / "cutout.png", np.full((80, 120), 7, np.uint8), mode="L")
    [item, _] = scan(tmp_path).items
    assert item.mask_file == tmp_path / "cutout_mask.png" and not item.alpha_mask
    (tmp_path / "cutout_mask.png").unlink()
    assert scan(tmp_path).items[0].mask_file == tmp_path / "masks" / "cutout.png"
    # class images have no masks: nothing is looked up, a `_mask` file is just another image
    unmasked = scan_images(tmp_path, PROMPT, config(), masks=False)
    assert not any(item.masked for item in unmasked.items)


def test_class_images_and_images_without_a_mask_have_none(tmp_path):
    save(tmp_path / "a.png")
    save(tmp_path / "b_mask.png")  # no b.png: an image of its own
    result = scan(tmp_path)
    assert [(i.path.name, i.masked) for i in result.items] == [("a.png", False), ("b_mask.png", False)]
    assert ImageDataset(result, config()).prepare(0, (64, 64), draw=0, seed=0).mask is None


def test_bad_masks_are_named_with_the_fix_all_at_once(tmp_path):
    save(tmp_path / "small.png", size=(64, 64))
    save(tmp_path / "small_mask.png", size=(32, 32), colour=255, mode="L")
    save(tmp_path / "black.png")
    save(tmp_path / "masks" / "black.png", colour=0, mode="L")
    Image.new("RGBA", (64, 64), (255, 0, 0, 0)).save(tmp_path / "invisible.png")
    save(tmp_path / "broken.png")
    (tmp_path / "broken_mask.png").write_bytes(b"not a png")
    save(tmp_path / "fine.png")
    with pytest.raises(DatasetError) as e:
        scan(tmp_path)
    problems = e.value.problems
    assert len(problems) == 4, problems
    text = "\n".join(problems)
    assert f"{tmp_path / 'small_mask.png'}: the mask is 32x32 but its image small.png is 64x64" in text
    assert f"{tmp_path / 'masks' / 'black.png'}: the mask of black.png is all black" in text
    assert f"{tmp_path / 'invisible.png'}: fully transparent" in text
    assert f"{tmp_path / 'broken_mask.png'}: the mask of broken.png cannot be decoded" in text


def test_the_manifest_covers_the_masks(tmp_path):
    save(tmp_path / "a.png")
    save(tmp_path / "a_mask.png", colour=255, mode="L")
    save(tmp_path / "b.png")
    before = dataset_manifest(scan(tmp_path))
    assert before[1] == ["b.png", 64, 64, (tmp_path / "b.png").stat().st_size, 1, PROMPT]  # as without masks
    assert before[0][-2] == "a_mask.png"
    save(tmp_path / "a_mask.png", colour=254, mode="L")  # the same file size, another mask
    after = dataset_manifest(scan(tmp_path))
    assert manifest_differences(before, after) == ["changed (size, repeats, caption or mask): a.png"]
    (tmp_path / "a_mask.png").unlink()
    assert manifest_differences(before, dataset_manifest(scan(tmp_path))) == \
        ["changed (size, repeats, caption or mask): a.png"]
