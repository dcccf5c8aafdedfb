"""The UNet's forward and backward as CUDA graphs: thousands of kernel launches replayed as two.

On a GPU the LoRA step is bound by the host: Python and torch dispatch some 24,000 ops per
SD1.5 step while the GPU finishes its kernels in a third of the time (benchmarks/README.md).
A CUDA graph records the kernels of one forward and one backward once, and each step then
replays them with a single launch each, so the GPU no longer waits for the host.

A graph replays fixed memory: its inputs, activations and outputs live at the addresses they
had when it was captured. Hence the rules this module keeps:
- one graph per input shape (a new bucket shape captures a new one; all share one memory pool,
  which is safe because each graph's forward and backward run back to back and their outputs
  are consumed before another graph runs);
- the UNet's parameters must not move after a capture: `release` drops the graphs before
  anything that may move them (sampling with offloaded models), and the next step captures anew;
- autocast must not cache casts across a capture (the trainer's accelerator turns the cache off),
  or a graph would keep reading the LoRA weights' cast from before the first optimizer step;
- the graphed backward hands out its own fixed gradient buffers, which autograd adopts as a
  parameter's `.grad` when that is None, and the next replay overwrites. With one micro-batch
  per step that is harmless (the optimizer reads `.grad` before the next replay); with
  gradient accumulation the last micro-batch's gradient would be added to itself. So there
  each trained parameter keeps a `.grad` of its own (`own_gradients`), and autograd adds into it.
A capture that fails (an op that cannot be captured) is reported once, and the run goes on
without graphs.
"""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass
from typing import Callable

import torch


@dataclass
class UNetOutput:
    """What the loss reads of the UNet's output (diffusers' `UNet2DConditionOutput` has the same `sample`)."""
    sample: torch.Tensor


class _UNetPrediction(torch.nn.Module):
    """The UNet's call with tensors only, the form `make_graphed_callables` takes."""

    def __init__(self, unet: torch.nn.Module, sdxl: bool):
        super().__init__()
        self.unet = unet  # a submodule, so its trainable parameters get the graph's gradients
        self.sdxl = sdxl

    def forward(self, sample, timestep, encoder_hidden_states, *added: torch.Tensor) -> torch.Tensor:
        added_cond = {"text_embeds": added[0], "time_ids": added[1]} if self.sdxl else None
        return self.unet(sample, timestep, encoder_hidden_states, added_cond_kwargs=added_cond).sample


class GraphedUNet:
    """Calls like the UNet in training (`unet(noisy, t, embeds, added_cond_kwargs=...)`), replaying
    CUDA graphs of its forward and backward, captured on the first call with each input shape."""

    def __init__(self, unet: torch.nn.Module, log: Callable[..., None],
                 capture: Callable = torch.cuda.make_graphed_callables):
        self.unet = unet
        self.log = log  # EventWriter.log(message, level)
        self.capture = capture
        self.graphs: dict[tuple, Callable] = {}
        self.pool = None
        self.failed = False

    def __call__(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                 added_cond_kwargs: dict | None = None) -> UNetOutput:
        args = (sample, timestep, encoder_hidden_states)
        if added_cond_kwargs is not None:
            args += (added_cond_kwargs["text_embeds"], added_cond_kwargs["time_ids"])
        key = tuple((a.shape, a.dtype, a.requires_grad) for a in args)
        if not self.failed and key not in self.graphs:
            self._capture_or_give_up(key, args, sdxl=added_cond_kwargs is not None)
        if self.failed:
            return self.unet(sample, timestep, encoder_hidden_states, added_cond_kwargs=added_cond_kwargs)
        return UNetOutput(sample=self.graphs[key](*args))

    def _capture_or_give_up(self, key: tuple, args: tuple[torch.Tensor, ...], sdxl: bool) -> None:
        started = time.perf_counter()
        try:
            self.graphs[key] = self._capture(args, sdxl)
        except Exception as e:  # noqa: BLE001 - any capture failure leaves the eager UNet, which works
            self.failed = True
            self.release()
            self.log(f"cuda_graphs: capturing the UNet failed, training goes on without CUDA graphs "
                     f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")
            return
        self.log(f"cuda_graphs: captured the UNet's forward and backward for inputs of shape "
                 f"{'x'.join(map(str, args[0].shape))} in {time.perf_counter() - started:.1f} s", level="info")

    def _capture(self, args: tuple[torch.Tensor, ...], sdxl: bool) -> Callable:
        if self.pool is None:  # (no CUDA: the tests' stand-in capture)
            self.pool = torch.cuda.graph_pool_handle() if torch.cuda.is_available() else None
        # The graph's own input buffers: each replay copies the step's inputs into them.
        static_inputs = tuple(a.detach().clone().requires_grad_(a.requires_grad) for a in args)
        graphed = self.capture(_UNetPrediction(self.unet, sdxl), static_inputs, pool=self.pool,
                               allow_unused_input=True)
        if torch.cuda.is_available():  # the warm-up's activations stay cached beside the graph's own otherwise
            torch.cuda.empty_cache()
        return graphed

    def release(self) -> None:
        """Drop every graph and its memory; the next call captures again (after the UNet may have moved)."""
        self.graphs.clear()
        self.pool = None
        gc.collect()  # a graphed module refers to itself (its forward is a closure over it): only gc frees it
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def own_gradients(parameters: list[torch.nn.Parameter]) -> None:
    """Give each parameter a zero `.grad` that autograd adds into, instead of adopting the graph's
    gradient buffer (see the module docstring); keep it with `zero_grad(set_to_none=False)`."""
    for p in parameters:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
