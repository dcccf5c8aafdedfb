"""What a loaded base model is: its parts, what it was trained to predict, its training noise schedule."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PREDICTION_TYPES = ("auto", "epsilon", "v_prediction")

# The DDPM schedule SD1.x and SDXL were trained with.
TRAINING_SCHEDULE = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
                     "beta_schedule": "scaled_linear", "clip_sample": False, "steps_offset": 1,
                     "timestep_spacing": "leading"}


class ModelError(ValueError):
    """A base model that cannot be loaded or trained. The message names the file, says what it is and what to do."""


@dataclass
class ModelInfo:
    """What a base model is, as far as training cares."""

    arch: str             # "sd1" | "sdxl"
    variant: str          # human text: "SD1.x", "SDXL", "SSD-1B", ...
    prediction_type: str  # "epsilon" | "v_prediction"


@dataclass
class BaseModel:
    """A loaded base model: every part fp32, on the CPU, in eval mode, frozen."""

    info: ModelInfo
    unet: Any                 # diffusers UNet2DConditionModel
    vae: Any                  # diffusers AutoencoderKL
    text_encoders: list       # [CLIPTextModel] (sd1) or [CLIPTextModel, CLIPTextModelWithProjection] (sdxl)
    tokenizers: list          # matching CLIPTokenizer(s); SDXL's second pads with "!"
    noise_scheduler: Any      # diffusers DDPMScheduler: the training schedule, prediction_type set
    source: Path
    name: str                 # file or folder name without extension
    _sha256: str | None = field(default=None, init=False, repr=False)

    def sha256(self) -> str:
        """SHA-256 of the checkpoint file (for a diffusers folder: of its UNet weights). Computed once."""
        if self._sha256 is None:
            files = [self.source] if self.source.is_file() else unet_weight_files(self.source)
            digest = hashlib.sha256()
            for file in files:
                with open(file, "rb") as f:
                    for chunk in iter(lambda: f.read(1 << 24), b""):
                        digest.update(chunk)
            self._sha256 = digest.hexdigest()
        return self._sha256



def check_prediction_type(prediction_type: str) -> None:
    """ValueError unless `prediction_type` is one of PREDICTION_TYPES."""
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")


def resolve_prediction(requested: str, detected: str) -> str:
    """The prediction type to train with: the one asked for, or for "auto" the one the model says."""
    # An explicit choice wins: merges sometimes lose their marker key, and the user knows the model.
    return detected if requested == "auto" else requested


def training_noise_scheduler(prediction_type: str, config: dict | None = None, zero_terminal_snr: bool = False):
    """The DDPM schedule to train with: SD's standard one, updated by a diffusers folder's scheduler `config`."""
    from diffusers import DDPMScheduler

    # A folder's scheduler config (whatever its class) overrides the standard values it names.
    config = {**TRAINING_SCHEDULE, **(config or {}), "prediction_type": prediction_type}
    if zero_terminal_snr:
        config.update(rescale_betas_zero_snr=True)
    return DDPMScheduler.from_config(config)


def unet_weight_files(folder: Path) -> list[Path]:
    """The UNet weight files of a diffusers folder (what its hash is computed from)."""
    files = sorted((folder / "unet").glob("diffusion_pytorch_model*.safetensors")) or \
        sorted((folder / "unet").glob("diffusion_pytorch_model*.bin"))
    if not files:
        raise ModelError(f"{folder.name}: no UNet weights in unet/; the diffusers folder is incomplete.")
    return files
