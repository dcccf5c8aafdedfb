"""The ops and casts one UNet forward dispatches on the CUDA path, counted without a GPU.

On a GPU the SD training step is bound by the host dispatching ops (benchmarks/README.md), and
casts were a large share of them. This counts them on any machine: the UNet is built on the
meta device, its weights become fake CUDA tensors (torch's FakeTensorMode: shapes and dtypes,
no memory, no kernels), CUDA autocast is switched on as accelerate switches it on, and a
dispatch mode counts every op that reaches a kernel (below autograd and autocast; views and
detaches too, which launch none). SDPA counts as one op, as on a GPU where it is one
flash-attention kernel (fake tensors would take its math path, with casts of their own).
Only the forward: autograd's engine needs a real device for the backward, which mirrors it.

    .venv/bin/python benchmarks/cuda_ops.py [sd15] [sdxl] [tiny] [tiny_sdxl]

prints, per model and variant, the forward's ops (and those that are not views, each of
which may launch a kernel), its casts and the bytes they move.
"""

from __future__ import annotations

import collections
import contextlib
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))


@dataclass
class Census:
    """What one forward dispatched: ops by name, and the casts (`aten._to_copy`) with their traffic."""
    ops: collections.Counter = field(default_factory=collections.Counter)
    launches: int = 0  # ops that are not views: each may launch a kernel
    casts: collections.Counter = field(default_factory=collections.Counter)  # (from, to, shape) -> count
    cast_bytes: int = 0
    output_dtype: torch.dtype | None = None

    @property
    def total(self) -> int:
        return sum(self.ops.values())

    @property
    def num_casts(self) -> int:
        return self.ops["aten._to_copy.default"]


@torch.library.custom_op("cuda_ops::attention", mutates_args=())
def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    raise NotImplementedError("only ever called on fake tensors")


@_attention.register_fake
def _(q, k, v):
    return torch.empty_like(q)


@contextlib.contextmanager
def _attention_as_one_op():
    real = F.scaled_dot_product_attention

    def one_op(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kwargs):
        if attn_mask is not None or is_causal or dropout_p:
            return real(q, k, v, attn_mask, dropout_p, is_causal, scale=scale, **kwargs)
        return _attention(q, k, v)

    F.scaled_dot_product_attention = one_op
    try:
        yield
    finally:
        F.scaled_dot_product_attention = real


@contextlib.contextmanager
def cuda_autocast(dtype: torch.dtype):
    """CUDA autocast switched on without a GPU (for fake CUDA tensors); `torch.autocast("cuda")`
    refuses there, and these switches are what it sets."""
    was_enabled, was_dtype = torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda")
    torch.set_autocast_enabled("cuda", True)
    torch.set_autocast_dtype("cuda", dtype)
    try:
        yield
    finally:
        torch.set_autocast_enabled("cuda", was_enabled)
        torch.set_autocast_dtype("cuda", was_dtype)
        torch.clear_autocast_cache()


def forward_census(unet: nn.Module, batch: int, latent_size: int, dtype: torch.dtype = torch.bfloat16) -> Census:
    """Count what one forward of `unet` (frozen weights in `dtype`, LoRA weights as they are)
    dispatches on CUDA under `dtype` autocast, for `batch` latents of `latent_size` squared.

    `unet` may live on any device, the meta device included; it is not changed.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils._python_dispatch import TorchDispatchMode

    census = Census()

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            name = str(func)
            if not name.startswith("prim."):
                census.ops[name] += 1
                census.launches += not (func.is_view or func is torch.ops.aten._unsafe_view.default)
                if func is torch.ops.aten._to_copy.default:
                    source = args[0]
                    census.casts[(source.dtype, out.dtype, tuple(source.shape))] += 1
                    census.cast_bytes += source.numel() * (source.element_size() + out.element_size())
            return out

    config = unet.config
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    with mode:
        state = {}
        for name, tensor in unet.state_dict(keep_vars=True).items():
            trained = isinstance(tensor, nn.Parameter) and tensor.requires_grad
            fake = mode.from_tensor(tensor).to("cuda", dtype=tensor.dtype if trained or not tensor.is_floating_point()
                                                else dtype)
            state[name] = nn.Parameter(fake) if trained else fake
        sample = torch.randn(batch, config.in_channels, latent_size, latent_size, device="cuda", dtype=dtype)
        embeds = torch.randn(batch, 77, config.cross_attention_dim, device="cuda", dtype=dtype)
        timesteps = torch.randint(0, 1000, (batch,), device="cuda")
        added = None
        if config.addition_embed_type == "text_time":
            pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
            added = {"text_embeds": torch.randn(batch, pooled, device="cuda", dtype=dtype),
                     "time_ids": torch.randn(batch, 6, device="cuda", dtype=dtype)}
        with _attention_as_one_op(), cuda_autocast(dtype), Count():
            out = torch.func.functional_call(unet, state, (sample, timesteps, embeds),
                                             {"added_cond_kwargs": added}).sample
        census.output_dtype = out.dtype
    return census


def trainer_unet(model: str, variant: str = "ours") -> nn.Module:
    """The UNet of `model` on the meta device with the trainer's LoRA (rank 4, attention) and, per
    `variant`, its precision settings: 'ours' as the trainer runs a bf16 step, 'fp32 norms' with
    CUDA autocast's own fp32 norms, 'peft input cast' with peft's cast of the LoRA input kept."""
    from diffusers import UNet2DConditionModel

    from comfyui_dreambooth_lora.trainer.config import TrainConfig
    from comfyui_dreambooth_lora.trainer.lora import add_lora, skip_lora_input_casts
    from comfyui_dreambooth_lora.trainer.precision import compute_norms_in_input_dtype
    from comfyui_dreambooth_lora.trainer.tiny import build_tiny_components
    from models import SD15_UNET, SDXL_UNET

    if model in ("tiny", "tiny_sdxl"):
        unet = build_tiny_components("sdxl" if model == "tiny_sdxl" else "sd1")["unet"]
    else:
        with torch.device("meta"):
            unet = UNet2DConditionModel(**(SDXL_UNET if model == "sdxl" else SD15_UNET))
    config = TrainConfig(pretrained_model="-", instance_dir="-", instance_prompt="-", rank=4, alpha=4.0,
                         lora_targets="attention")
    add_lora(unet, [], config)
    if variant != "peft input cast":
        skip_lora_input_casts(unet)
    if variant != "fp32 norms":
        compute_norms_in_input_dtype(unet)
    return unet


RESOLUTION = {"sd15": 512, "sdxl": 1024, "tiny": 64, "tiny_sdxl": 64}
VARIANTS = ("ours", "fp32 norms", "peft input cast")


def main(argv: list[str]) -> None:
    for model in argv or ["sd15", "sdxl"]:
        counted = {}
        for variant in VARIANTS:
            census = counted[variant] = forward_census(trainer_unet(model, variant), batch=2,
                                                       latent_size=RESOLUTION[model] // 8)
            print(f"{model} {RESOLUTION[model]} px, batch 2, bf16, {variant}: {census.total} ops "
                  f"({census.launches} not views), {census.num_casts} casts moving {census.cast_bytes / 1e9:.3f} GB",
                  flush=True)
        heavy = sorted(counted["ours"].casts.items(), key=lambda kv: -kv[1] * torch.Size(kv[0][2]).numel())[:4]
        print("  ours, largest casts:", "; ".join(f"{n} x {str(a)[6:]} -> {str(b)[6:]} {list(s)}"
                                               for (a, b, s), n in heavy))


if __name__ == "__main__":
    main(sys.argv[1:])
