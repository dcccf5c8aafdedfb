"""Small SD1.x / SDXL models and picture datasets made locally, for the demo and the tests.

Nothing here is downloaded: the models are built from configs with seeded random
weights, the tokenizer is a byte-level CLIP tokenizer with no merges (one token per
character), and the images are drawn with PIL.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from PIL import Image, ImageDraw

CHAR_VOCAB_SIZE = 514  # 256 byte symbols, the same with "</w>", and the two specials


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP's reversible byte -> printable-character table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    extra = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + extra)
            extra += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def write_char_tokenizer(folder: Path, pad_token: str | None = None) -> Path:
    """Write a CLIP tokenizer whose tokens are single characters (no BPE merges)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    chars = list(_bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    config = {"model_max_length": 77, "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
              "unk_token": "<|endoftext|>", "pad_token": pad_token or "<|endoftext|>"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return folder


def tiny_text_encoder_config(projection: bool = False, hidden_act: str = "quick_gelu"):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(hidden_size=32, intermediate_size=64, num_attention_heads=1, num_hidden_layers=2,
                          vocab_size=CHAR_VOCAB_SIZE, max_position_embeddings=77, projection_dim=32,
                          hidden_act=hidden_act, bos_token_id=512, eos_token_id=513, pad_token_id=513)


def build_tiny_components(arch: str, seed: int = 0) -> dict:
    """UNet, VAE and text encoder(s) of a tiny SD1.x or SDXL model with seeded random weights."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    if arch not in ("sd1", "sdxl"):
        raise ValueError(f"arch must be 'sd1' or 'sdxl', got {arch!r}")
    torch.manual_seed(seed)
    common = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                  block_out_channels=(32, 64), norm_num_groups=8, attention_head_dim=(1, 1))
    if arch == "sd1":
        unet = UNet2DConditionModel(**common, cross_attention_dim=32,
                                    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    else:
        unet = UNet2DConditionModel(**common, cross_attention_dim=64, use_linear_projection=True,
                                    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
                                    transformer_layers_per_block=(1, 1), addition_embed_type="text_time",
                                    addition_time_embed_dim=8, projection_class_embeddings_input_dim=8 * 6 + 32)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
                        block_out_channels=(8, 16, 32, 32), norm_num_groups=8, sample_size=32,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        scaling_factor=0.18215 if arch == "sd1" else 0.13025)
    calibrate_vae(vae)
    parts = {"unet": unet, "vae": vae}
    if arch == "sd1":
        parts["text_encoder"] = CLIPTextModel(tiny_text_encoder_config())
    else:
        parts["text_encoder"] = CLIPTextModel(tiny_text_encoder_config())
        parts["text_encoder_2"] = CLIPTextModelWithProjection(tiny_text_encoder_config(hidden_act="gelu"))
    return parts


def calibrate_vae(vae) -> None:
    """Make a random VAE's latents carry the picture, as a trained SD VAE's do.

    A randomly initialised encoder gives latents whose scaled mean is ~0.04 against a
    posterior standard deviation of ~0.2, so the UNet would see almost nothing of the
    image and a test of what the LoRA learns from pictures would measure noise. We
    scale the encoder's mean channels so that scaled latents of drawn pictures have unit
    standard deviation (the decoder is scaled back, so decoding is unchanged) and make
    the posterior almost deterministic.
    """
    import torch

    pictures = [draw_subject_image((32, 32), seed=i, subject=i % 2 == 0) for i in range(8)]
    pixels = torch.stack([torch.frombuffer(bytearray(p.tobytes()), dtype=torch.uint8).view(32, 32, 3)
                          for p in pictures]).permute(0, 3, 1, 2).float() / 127.5 - 1
    channels = vae.config.latent_channels
    with torch.no_grad():
        spread = vae.encode(pixels).latent_dist.mean.std().item() * vae.config.scaling_factor
        gain = 1.0 / spread
        vae.quant_conv.weight[:channels] *= gain
        vae.quant_conv.bias[:channels] *= gain
        vae.quant_conv.weight[channels:] = 0.0
        vae.quant_conv.bias[channels:] = -20.0  # log-variance: posterior std ~5e-5
        vae.post_quant_conv.weight /= gain


def sd_noise_scheduler_config(prediction_type: str = "epsilon") -> dict:
    """The DDPM training schedule every SD1.x / SDXL model uses."""
    return {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
            "prediction_type": prediction_type, "clip_sample": False,
            "steps_offset": 1, "timestep_spacing": "leading"}


def save_tiny_diffusers_model(folder: Path, arch: str = "sd1", seed: int = 0,
                              prediction_type: str = "epsilon") -> Path:
    """Write a tiny model as a diffusers folder (model_index.json, one subfolder per part)."""
    from diffusers import DDPMScheduler

    folder = Path(folder)
    parts = build_tiny_components(arch, seed)
    for name, module in parts.items():
        module.save_pretrained(folder / name)
    write_char_tokenizer(folder / "tokenizer")
    if arch == "sdxl":
        write_char_tokenizer(folder / "tokenizer_2", pad_token="!")
    DDPMScheduler(**sd_noise_scheduler_config(prediction_type)).save_pretrained(folder / "scheduler")
    pipeline = "StableDiffusionPipeline" if arch == "sd1" else "StableDiffusionXLPipeline"
    index = {"_class_name": pipeline, "scheduler": ["diffusers", "DDPMScheduler"],
             "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
             "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"]}
    if arch == "sdxl":
        index.update(text_encoder_2=["transformers", "CLIPTextModelWithProjection"],
                     tokenizer_2=["transformers", "CLIPTokenizer"])
    (folder / "model_index.json").write_text(json.dumps(index, indent=2), encoding="utf-8")
    return folder


def draw_subject_image(size: tuple[int, int], seed: int, subject: bool = True) -> Image.Image:
    """A picture of the demo 'subject' (a red disc with a yellow star) on a varied background.

    With `subject=False` it draws a 'class' picture: the same kind of scene with a
    differently coloured disc, the stand-in for other members of the class.
    """
    rng = random.Random(seed)
    w, h = size
    bg = tuple(rng.randint(40, 200) for _ in range(3))
    image = Image.new("RGB", size, bg)
    draw = ImageDraw.Draw(image)
    for _ in range(3):  # background clutter
        x0, y0 = rng.randint(0, w), rng.randint(0, h)
        draw.rectangle([x0, y0, x0 + w // 4, y0 + h // 4], fill=tuple(rng.randint(0, 255) for _ in range(3)))
    r = min(w, h) // 3
    cx, cy = rng.randint(r, w - r), rng.randint(r, h - r)
    colour = (220, 30, 30) if subject else tuple(rng.randint(0, 255) for _ in range(3))
    draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
    if subject:
        s = r // 2
        draw.polygon([(cx, cy - s), (cx + s // 3, cy), (cx, cy + s), (cx - s // 3, cy)], fill=(250, 230, 0))
    return image


def make_demo_dataset(folder: Path, count: int = 6, size: int = 64, captions: bool = True) -> Path:
    """Write `count` subject images of mixed aspect ratios (and caption files) into `folder`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    shapes = [(size, size), (size * 5 // 4, size), (size, size * 5 // 4)]
    for i in range(count):
        image = draw_subject_image(shapes[i % len(shapes)], seed=i)
        image.save(folder / f"subject_{i:02d}.png")
        if captions and i % 2 == 0:
            (folder / f"subject_{i:02d}.txt").write_text("a photo of sks disc, outdoors", encoding="utf-8")
    return folder
