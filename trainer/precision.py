"""Norm layers that compute in their input's dtype under autocast.

CUDA autocast runs every GroupNorm and LayerNorm in fp32: it casts the bf16 activation and the
norm's weight and bias up, returns fp32, and the next convolution or linear layer casts the
result back down (each of the q, k and v projections separately). In an SD UNet that is most of
the casts one forward dispatches, and nearly all of their memory traffic: for one SD1.5 512 px
forward, 796 casts moving 2.8 GB; for SDXL 1024 px, 2,572 casts moving 19 GB (benchmarks/README.md;
`benchmarks/cuda_ops.py` counts them without a GPU). The backward casts the
gradients the same way.

Computing the norm in bf16 is what CPU autocast already does, and torch's bf16/fp16 norm kernels
accumulate their mean and variance in fp32, so only the output's rounding moves earlier (before
the SiLU that follows a GroupNorm rather than after it). Measured on the CPU with the SD1.5
architecture against an fp32 reference, a bf16 step's output error went from 1.16% to 1.24% and
its LoRA-gradient error from 1.13% to 1.17% (cosine to the reference 0.99997 either way): the
bf16 matmuls dominate both.
"""

from __future__ import annotations

import torch
from torch import nn


class _InInputDtype:
    """Mixin: run the norm with autocast off when its input and weight share a dtype (no casts)."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if self.weight is None or input.dtype != self.weight.dtype:  # mixed dtypes: autocast decides
            return super().forward(input)
        with torch.autocast(input.device.type, enabled=False):  # a no-op where autocast is off
            return super().forward(input)


class GroupNormInInputDtype(_InInputDtype, nn.GroupNorm):
    """nn.GroupNorm that computes in its input's dtype under autocast (state dict unchanged)."""


class LayerNormInInputDtype(_InInputDtype, nn.LayerNorm):
    """nn.LayerNorm that computes in its input's dtype under autocast (state dict unchanged)."""


_IN_INPUT_DTYPE = {nn.GroupNorm: GroupNormInInputDtype, nn.LayerNorm: LayerNormInInputDtype}


def compute_norms_in_input_dtype(model: nn.Module) -> int:
    """Make `model`'s GroupNorm and LayerNorm layers compute in their input's dtype under autocast.

    The layers change class in place, so parameter names, the state dict and hooks stay as they
    are; subclasses of the two (other norms) are left alone. Returns how many layers changed.
    """
    changed = 0
    for module in model.modules():
        replacement = _IN_INPUT_DTYPE.get(type(module))
        if replacement is not None:
            module.__class__ = replacement
            changed += 1
    return changed

