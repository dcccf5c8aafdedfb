"""Norms that compute in their input's dtype under autocast (trainer/precision.py).

CUDA autocast is what they change, and these tests run without a GPU: CUDA autocast is switched
on over fake CUDA tensors (benchmarks/cuda_ops.py), which dispatch as on a GPU, with no kernels.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from comfyui_dreambooth_lora.trainer.precision import (GroupNormInInputDtype, LayerNormInInputDtype,
                                                       compute_norms_in_input_dtype)
from comfyui_dreambooth_lora.trainer.tiny import build_tiny_components

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import cuda_ops  # noqa: E402


def norms(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, (nn.GroupNorm, nn.LayerNorm))]


def unet_inputs(unet, dtype=torch.float32):
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(2, unet.config.in_channels, 8, 8, generator=generator).to(dtype)
    embeds = torch.randn(2, 77, unet.config.cross_attention_dim, generator=generator).to(dtype)
    return sample, torch.tensor([10, 900]), embeds


def test_norm_layers_change_class_but_not_their_weights_or_their_output_on_the_cpu():
    unet = build_tiny_components("sd1")["unet"]
    plain = copy.deepcopy(unet)
    expected = len(norms(unet))
    assert expected > 0 and compute_norms_in_input_dtype(unet) == expected
    assert {type(m) for m in norms(unet)} == {GroupNormInInputDtype, LayerNormInInputDtype}
    assert unet.state_dict().keys() == plain.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(unet.state_dict().values(), plain.state_dict().values()))
    with torch.no_grad():
        assert torch.equal(unet(*unet_inputs(unet)).sample, plain(*unet_inputs(plain)).sample)
        # CPU autocast already runs norms in bf16: the same maths
        unet.to(torch.bfloat16), plain.to(torch.bfloat16)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ours = unet(*unet_inputs(unet, torch.bfloat16)).sample
            theirs = plain(*unet_inputs(plain, torch.bfloat16)).sample
    assert ours.dtype == torch.bfloat16 and torch.equal(ours, theirs)


def test_under_cuda_autocast_the_unets_norms_stay_bf16_and_its_casts_go():
    outputs = {}

    def census(variant):
        unet = cuda_ops.trainer_unet("tiny", variant)
        dtypes = outputs[variant] = set()
        for module in norms(unet):
            module.register_forward_hook(lambda m, args, out: dtypes.add(out.dtype))
        return cuda_ops.forward_census(unet, batch=2, latent_size=8)

    ours, autocasts = census("ours"), census("fp32 norms")
    assert outputs == {"ours": {torch.bfloat16}, "fp32 norms": {torch.float32}}
    # per norm: its input, weight and bias up, and its output down again for the layer after it
    assert autocasts.num_casts - ours.num_casts >= 3 * len(norms(cuda_ops.trainer_unet("tiny")))
    assert ours.launches < autocasts.launches < autocasts.total and ours.output_dtype == torch.bfloat16


@pytest.mark.parametrize("norm", [nn.GroupNorm(2, 8), nn.LayerNorm(8)])
def test_mixed_dtypes_are_left_to_autocast(norm):
    # an fp32 input meeting bf16 weights: what autocast does with the plain layer (fp32), not an error
    from torch._subclasses.fake_tensor import FakeTensorMode

    ours = copy.deepcopy(norm)
    compute_norms_in_input_dtype(ours)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode, cuda_ops.cuda_autocast(torch.bfloat16):
        x = torch.randn(2, 8, 4, 8, device="cuda")
        results = []
        for layer in (norm, ours):
            state = {k: mode.from_tensor(v).to("cuda", torch.bfloat16) for k, v in layer.state_dict().items()}
            results.append(torch.func.functional_call(layer, state, (x,)))
    assert [r.dtype for r in results] == [torch.float32, torch.float32]


def test_compiles_without_graph_breaks_and_matches_eager():
    torch.manual_seed(0)
    block = nn.Sequential(nn.GroupNorm(4, 16), nn.SiLU(), nn.Conv2d(16, 16, 3, padding=1)).to(torch.bfloat16)
    compute_norms_in_input_dtype(block)
    x = torch.randn(2, 16, 8, 8, dtype=torch.bfloat16)
    torch._dynamo.reset()
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")  # fullgraph: a graph break raises
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(compiled(x), block(x))
