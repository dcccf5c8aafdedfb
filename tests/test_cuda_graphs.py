"""cuda_graphs: which calls capture, what falls back, and how the loop uses the graphs.

CUDA graphs themselves need a GPU (benchmarks/gpu_smoke.py compares graphed and eager
training there); here the capture is a stand-in that runs the UNet eagerly, so these tests
check the bookkeeping around it: one capture per input shape, a new capture after
`release`, the eager UNet after a failed capture, and the loop's use of all three.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from comfyui_dreambooth_lora.trainer import loop
from comfyui_dreambooth_lora.trainer.config import TrainConfig
from comfyui_dreambooth_lora.trainer.cuda_graphs import GraphedUNet
from comfyui_dreambooth_lora.trainer.events import read_events
from comfyui_dreambooth_lora.trainer.lora import add_lora, lora_parameters
from comfyui_dreambooth_lora.trainer.tiny import build_tiny_components, make_demo_dataset
from comfyui_dreambooth_lora.trainer.run_folder import events_path

from test_training import lora_file, losses, make_config


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    return make_demo_dataset(tmp_path_factory.mktemp("photos"), count=4, size=32, captions=False)


class StandInCapture:
    """Stands in for `torch.cuda.make_graphed_callables` on the CPU, with what matters of a replay:
    the output and the gradients land in fixed buffers of the capture, handed out as aliases
    (as torch's graphed callables do), and the graphed module refers to itself, as torch's does
    (its forward becomes a closure over it). Records each capture and autocast's cache state."""

    def __init__(self, fail: bool = False):
        self.shapes: list[tuple[int, ...]] = []
        self.autocast_cache: list[bool] = []
        self.captured: list = []  # weak references to the graphed callables
        self.fail = fail

    def __call__(self, module, static_inputs, pool=None, allow_unused_input=False):
        import weakref

        if self.fail:
            raise RuntimeError("operation not permitted when stream is capturing\nmore lines")
        self.shapes.append(tuple(static_inputs[0].shape))
        self.autocast_cache.append(torch.is_autocast_cache_enabled())
        surface = tuple(static_inputs) + tuple(module.parameters())
        grad_buffers = [torch.zeros_like(t) if t.requires_grad else None for t in surface]
        output_buffer = []
        eager_forward = module.forward

        class Replay(torch.autograd.Function):
            @staticmethod
            def forward(ctx, *inputs):
                with torch.enable_grad():
                    ctx.inputs = [t.detach().requires_grad_(t.requires_grad) for t in inputs[:len(static_inputs)]]
                    ctx.output = eager_forward(*ctx.inputs)
                if not output_buffer:
                    output_buffer.append(torch.empty_like(ctx.output))
                output_buffer[0].copy_(ctx.output)
                return output_buffer[0].detach()

            @staticmethod
            def backward(ctx, grad_output):
                wanted = [t for t in (*ctx.inputs, *surface[len(static_inputs):]) if t.requires_grad]
                grads = iter(torch.autograd.grad(ctx.output, wanted, grad_output, allow_unused=True))
                for buffer in grad_buffers:
                    if buffer is not None:
                        grad = next(grads)
                        buffer.copy_(grad if grad is not None else torch.zeros_like(buffer))
                return tuple(b.detach() if b is not None else None for b in grad_buffers)

        def graphed(*args):
            return Replay.apply(*args, *surface[len(static_inputs):])
        module.forward = graphed  # a cycle, as torch makes one: module -> forward -> module
        graphed.module = module
        self.captured.append(weakref.ref(module))
        return module


def lora_unet(arch: str) -> torch.nn.Module:
    unet = build_tiny_components(arch, seed=0)["unet"]
    config = TrainConfig.from_dict(dict(pretrained_model="m", instance_dir="i", instance_prompt="p", rank=4))
    add_lora(unet, [], config)
    with torch.no_grad():  # LoRA B starts at zero: make the LoRA act, so its gradients show the graph's inputs
        for p in lora_parameters(unet):
            p.normal_(std=0.1)
    return unet.train()


def unet_inputs(unet, arch: str, size: int, batch: int = 2):
    generator = torch.Generator().manual_seed(size)
    config = unet.config
    sample = torch.randn(batch, config.in_channels, size, size, generator=generator)
    timesteps = torch.randint(0, 1000, (batch,), generator=generator)
    embeds = torch.randn(batch, 77, config.cross_attention_dim, generator=generator)
    added = None
    if arch == "sdxl":
        pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        added = {"text_embeds": torch.randn(batch, pooled, generator=generator),
                 "time_ids": torch.tensor([[size * 8, size * 8, 0, 0, size * 8, size * 8]] * batch, dtype=torch.float32)}
    return sample, timesteps, embeds, added


def prediction_and_grads(call, unet, inputs):
    for p in lora_parameters(unet):
        p.grad = None
    sample, timesteps, embeds, added = inputs
    prediction = call(sample, timesteps, embeds, added_cond_kwargs=added).sample
    prediction.square().mean().backward()
    return prediction.detach(), [p.grad.clone() for p in lora_parameters(unet)]


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_one_capture_per_input_shape_and_the_same_prediction_and_gradients_as_the_unet(arch):
    unet = lora_unet(arch)
    capture, logged = StandInCapture(), []
    graphed = GraphedUNet(unet, log=lambda message, level="warning": logged.append((level, message)), capture=capture)
    for size in (8, 8, 16, 8):
        inputs = unet_inputs(unet, arch, size)
        expected, expected_grads = prediction_and_grads(unet, unet, inputs)
        got, got_grads = prediction_and_grads(graphed, unet, inputs)
        torch.testing.assert_close(got, expected)
        for g, e in zip(got_grads, expected_grads):
            torch.testing.assert_close(g, e)
    assert capture.shapes == [(2, 4, 8, 8), (2, 4, 16, 16)]
    assert [level for level, _ in logged] == ["info", "info"] and "2x4x16x16" in logged[1][1]

    graphed.release()  # as before sampling, which may move the UNet: the next call captures anew
    assert all(ref() is None for ref in capture.captured)  # their memory is free, though they refer to themselves
    graphed(*unet_inputs(unet, arch, 8)[:3], added_cond_kwargs=unet_inputs(unet, arch, 8)[3])
    assert capture.shapes[-1] == (2, 4, 8, 8) and len(capture.shapes) == 3


def test_a_failed_capture_is_reported_once_and_the_unet_runs_eagerly():
    unet = lora_unet("sd1")
    capture, logged = StandInCapture(fail=True), []
    graphed = GraphedUNet(unet, log=lambda message, level="warning": logged.append((level, message)), capture=capture)
    for size in (8, 16):
        inputs = unet_inputs(unet, "sd1", size)
        expected, _ = prediction_and_grads(unet, unet, inputs)
        got, _ = prediction_and_grads(graphed, unet, inputs)
        torch.testing.assert_close(got, expected)
    assert len(logged) == 1 and logged[0][0] == "warning"
    assert "training goes on without CUDA graphs" in logged[0][1] and "more lines" not in logged[0][1]
    assert graphed.graphs == {}


def test_cuda_graphs_on_the_cpu_say_they_have_no_effect_and_change_nothing(tiny_sd1, photos, tmp_path):
    plain = make_config(tiny_sd1, photos, tmp_path / "plain", max_train_steps=3)
    asked = dataclasses.replace(plain, output_dir=str(tmp_path / "asked"), cuda_graphs="yes")
    loop.train(plain)
    loop.train(asked)
    messages = [e["message"] for e in read_events(events_path(tmp_path / "asked")) if e["event"] == "log"]
    assert any("cuda_graphs = 'yes', but they are not used: they need a CUDA GPU" in m for m in messages), messages
    assert losses(asked) == losses(plain)
    for key, value in lora_file(plain).items():
        assert torch.equal(lora_file(asked)[key], value), key


def test_the_loop_trains_through_the_graphs_and_releases_them_before_each_sampling(tiny_sd1, photos, tmp_path,
                                                                                   monkeypatch):
    # bf16 autocast on the CPU stands in for CUDA's: the capture must see autocast's cache off.
    # Two micro-batches per step: the graphs' gradient buffers must not become the parameters' .grad.
    eager = make_config(tiny_sd1, photos, tmp_path / "eager", max_train_steps=4, sample_every=2, sample_at_end=True,
                        sample_steps=2, mixed_precision="bf16", cuda_graphs="no", gradient_accumulation_steps=2)
    graphed = dataclasses.replace(eager, output_dir=str(tmp_path / "graphed"), cuda_graphs="yes")
    capture, order = StandInCapture(), []

    def graphed_unet(unet, config, accelerator, events):  # as on a GPU
        return GraphedUNet(unet, log=events.log, capture=capture) if config.cuda_graphs == "yes" else None

    real_release, real_sample = GraphedUNet.release, loop.sample_on_device
    monkeypatch.setattr(loop, "graphed_unet", graphed_unet)
    monkeypatch.setattr(GraphedUNet, "release", lambda self: (order.append("release"), real_release(self)))
    monkeypatch.setattr(loop, "sample_on_device",
                        lambda *a, **k: (order.append(f"sample {a[3]}"), real_sample(*a, **k))[1])
    loop.train(eager)
    order.clear()
    capture.shapes.clear()
    loop.train(graphed)

    assert order == ["release", "sample 2", "release", "sample 4", "release"]  # the last when train() ends
    assert capture.shapes and capture.autocast_cache == [False] * len(capture.shapes)
    events = read_events(events_path(tmp_path / "graphed"))
    kinds = ["capture" if e["event"] == "log" and "captured" in e["message"] else e["event"] for e in events]
    # captured before step 1, and again after the samples of step 2 (which released the graphs)
    assert kinds.index("capture") < kinds.index("step")
    after_sample = kinds[kinds.index("sample"):]
    assert after_sample.index("capture") < after_sample.index("step")
    assert losses(graphed) == losses(eager)


@pytest.mark.parametrize("option, device, distributed, precision, changes, used, said", [
    ("auto", "cuda", "NO", "bf16", {}, True, None),
    ("auto", "cpu", "NO", "bf16", {}, False, None),  # a CPU run asked nothing of them: silent
    ("yes", "cpu", "NO", "bf16", {}, False, "they need a CUDA GPU"),
    ("no", "cuda", "NO", "bf16", {}, False, None),
    ("auto", "cuda", "MULTI_GPU", "bf16", {}, False, "they are for one process"),
    ("auto", "cuda", "NO", "bf16", {"compile_unet": True}, False, "compile_unet is on"),
    # checked on an H100 (gpu_smoke.py): the same losses and weights as eager, fresh dropout masks
    ("auto", "cuda", "NO", "fp16", {"train_text_encoder": True, "use_dora": True, "lora_dropout": 0.1}, True, None),
    ("auto", "cuda", "NO", "no", {}, False, "'yes' turns them on"),
    ("yes", "cuda", "NO", "no", {}, True, None),
    ("auto", "cuda", "NO", "bf16", {"network": "lokr"}, False, "not yet checked on a GPU ('yes' turns them on)"),
    ("yes", "cuda", "NO", "bf16", {"network": "loha"}, True, None),
])
def test_when_the_trainer_uses_cuda_graphs(option, device, distributed, precision, changes, used, said):
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    config = TrainConfig.from_dict(dict(pretrained_model="m", instance_dir="i", instance_prompt="p",
                                        cuda_graphs=option, **changes))
    accelerator = SimpleNamespace(device=torch.device(device), distributed_type=DistributedType[distributed],
                                  mixed_precision=precision)
    logged = []
    events = SimpleNamespace(log=lambda message, level="warning": logged.append(message))
    graphs = loop.graphed_unet(torch.nn.Linear(1, 1), config, accelerator, events)
    assert isinstance(graphs, GraphedUNet) == used
    assert (said is None and not logged) or (len(logged) == 1 and said in logged[0]), logged


def test_the_unet_trains_channels_last_on_a_gpu_and_in_its_own_layout_on_the_cpu():
    # cuDNN converts NCHW activations to NHWC and back around every convolution (19% of an SD1.5
    # step's GPU time); on the CPU channels-last cost 2 GB more in fp32.
    assert loop.unet_memory_format(torch.device("cuda")) == torch.channels_last
    conv = torch.nn.Conv2d(4, 8, 3)
    torch.nn.Module.to(conv, torch.device("cpu"), memory_format=loop.unet_memory_format(torch.device("cpu")))
    assert conv.weight.is_contiguous()
