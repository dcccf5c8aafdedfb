"""The real SD1.5 and SDXL architectures with random weights, saved once as diffusers folders.

Speed and memory do not depend on the weights, so nothing is downloaded: the UNet, VAE and
CLIP text encoders are built from the published configs (written out below) with seeded
random weights and saved under the cache folder (`.cache/bench/` by default), with the
character-level tokenizer of `trainer.tiny` (its ids are < 514, the encoders keep the real
49408-token vocabulary). The tiny test models come from `trainer.tiny` as they are.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from comfyui_dreambooth_lora.trainer.tiny import (draw_subject_image, save_tiny_diffusers_model,
                                                  sd_noise_scheduler_config, write_char_tokenizer)

CLIP_VOCAB = 49408

# runwayml/stable-diffusion-v1-5 unet/config.json
SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32, norm_eps=1e-5, act_fn="silu",
    flip_sin_to_cos=True, freq_shift=0, downsample_padding=1, mid_block_scale_factor=1,
)
# stable-diffusion-xl-base-1.0 unet/config.json
SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816, norm_num_groups=32, norm_eps=1e-5, act_fn="silu",
    flip_sin_to_cos=True, freq_shift=0, downsample_padding=1, mid_block_scale_factor=1,
)
# The SD VAE (kl-f8), shared by SD1.5 and SDXL up to the latent scaling factor.
VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    norm_num_groups=32, act_fn="silu",
)
# CLIP ViT-L/14 text tower (SD1.5, SDXL's first encoder) and OpenCLIP ViT-bigG/14 (SDXL's second).
# bos/eos/pad are the character tokenizer's ids (512, 513), so pooling finds its end token.
CLIP_L = dict(vocab_size=CLIP_VOCAB, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
              num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768,
              bos_token_id=512, eos_token_id=513, pad_token_id=513)
CLIP_G = dict(vocab_size=CLIP_VOCAB, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
              num_attention_heads=20, max_position_embeddings=77, hidden_act="gelu", projection_dim=1280,
              bos_token_id=512, eos_token_id=513, pad_token_id=513)

MODELS = ("tiny", "tiny_sdxl", "sd15", "sdxl")


def default_cache() -> Path:
    return Path(__file__).resolve().parent.parent / ".cache" / "bench"


def build_real_model(arch: str, folder: Path, seed: int = 0) -> Path:
    """Write the SD1.5 ('sd15') or SDXL ('sdxl') architecture with random weights as a diffusers folder."""
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    torch.manual_seed(seed)
    sdxl = arch == "sdxl"
    parts = {
        "unet": lambda: UNet2DConditionModel(**(SDXL_UNET if sdxl else SD15_UNET)),
        "vae": lambda: AutoencoderKL(**VAE, sample_size=1024 if sdxl else 512,
                                     scaling_factor=0.13025 if sdxl else 0.18215),
        "text_encoder": lambda: CLIPTextModel(CLIPTextConfig(**CLIP_L)),
    }
    if sdxl:
        parts["text_encoder_2"] = lambda: CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_G))
    # Random initialisation of SDXL's 3.5 billion parameters takes minutes on a few CPU cores and
    # seconds on a GPU; the weights are saved from wherever they were made.
    where = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    for name, make in parts.items():  # one part in memory at a time
        with where:
            module = make()
        module.save_pretrained(tmp / name)
        del module
    if where.type == "cuda":
        torch.cuda.empty_cache()  # else the benchmark case that built the model counts its blocks as reserved
    write_char_tokenizer(tmp / "tokenizer")
    index = {"_class_name": "StableDiffusionXLPipeline" if sdxl else "StableDiffusionPipeline",
             "scheduler": ["diffusers", "DDPMScheduler"], "unet": ["diffusers", "UNet2DConditionModel"],
             "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "CLIPTextModel"],
             "tokenizer": ["transformers", "CLIPTokenizer"]}
    if sdxl:
        write_char_tokenizer(tmp / "tokenizer_2", pad_token="!")
        index.update(text_encoder_2=["transformers", "CLIPTextModelWithProjection"],
                     tokenizer_2=["transformers", "CLIPTokenizer"])
    DDPMScheduler(**sd_noise_scheduler_config()).save_pretrained(tmp / "scheduler")
    (tmp / "model_index.json").write_text(json.dumps(index, indent=2), encoding="utf-8")
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return folder


def ensure_model(name: str, cache: Path) -> Path:
    """The diffusers folder of model `name` (one of MODELS), built on first use."""
    folder = Path(cache) / "models" / name
    if (folder / "model_index.json").exists():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    print(f"[bench] building the {name} model with random weights in {folder} (once)", flush=True)
    if name.startswith("tiny"):
        tmp = folder.with_name(name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        save_tiny_diffusers_model(tmp, "sdxl" if name == "tiny_sdxl" else "sd1")
        tmp.rename(folder)
        return folder
    return build_real_model(name, folder)


PHOTO = (3024, 4032)  # a 12-megapixel phone photo, portrait


def ensure_images(cache: Path, size: int, instance: int = 2, classes: int = 2,
                  photos: bool = False) -> tuple[Path, Path]:
    """Instance and class pictures (drawn, not downloaded), written once.

    Class images are `size` px PNGs, as generated at the training resolution. Instance images
    are `size` px PNGs too, or with `photos` 12 MP JPEGs (3024x4032) that every use must
    decode and shrink, as users' photos are.
    """
    root = Path(cache) / "data" / f"{size}px_{instance}i_{classes}c{'_photos' if photos else ''}"
    inst, cls = root / "instance", root / "class"
    if not (root / ".done").exists():
        for folder, count, subject in ((inst, instance, True), (cls, classes, False)):
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                seed = i + (0 if subject else 1000)
                if subject and photos:
                    draw_subject_image(PHOTO, seed=seed).save(folder / f"subject_{i:02d}.jpg", quality=90)
                else:
                    draw_subject_image((size, size), seed=seed, subject=subject).save(
                        folder / f"{'subject' if subject else 'class'}_{i:02d}.png")
        (root / ".done").write_text("", encoding="utf-8")
    return inst, cls
