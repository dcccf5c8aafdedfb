"""Each step's loss, read on the host one step late on a GPU, so the GPU does not wait for the host.

Reading a GPU loss (`.item()`) waits for everything queued before it. Read at the end of its own
step, that leaves the GPU idle while the host prepares the next one: the step event, the stop
check, the next batch, its noise, up to the launch of the UNet. With the UNet replayed as a CUDA
graph the GPU no longer waits for the host within a step, and this wait between steps is what is
left. So on a GPU a step's loss is copied to the host as soon as it is queued (a copy that does
not block, behind a CUDA event) and read only after the next step is queued, by which time the
GPU has long finished it.

`flush` reads whatever is pending. The loop calls it before anything that saves, samples or
stops, so a step whose loss was not finite is reported before any file holds its weights.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch


@dataclass
class StepLoss:
    """One optimizer step, as the step event reports it."""
    step: int
    loss: float
    lr: float
    seconds: float  # how long this step held the run: from its start, or the previous read if later


class LossReadout:
    """The losses of the steps queued so far, in step order, each read once.

    `late=True` (on a GPU) keeps one step's loss pending: `push` then hands back the previous
    step's. `late=False` hands back the step just pushed, after waiting for it.
    """

    def __init__(self, late: bool, clock: Callable[[], float] = time.perf_counter):
        self.late = late
        self._clock = clock
        self._pending: list[tuple[int, torch.Tensor, torch.cuda.Event | None, float, float]] = []
        self._last_read = float("-inf")

    def push(self, step: int, loss: torch.Tensor, lr: float, started: float) -> list[StepLoss]:
        """Queue `step`'s loss (a 0-d tensor, still being computed on a GPU); returns the steps now read."""
        ready = None
        loss = loss.detach()
        if loss.is_cuda:
            loss = loss.to("cpu", non_blocking=True)  # into pinned memory, once the GPU gets there
            ready = torch.cuda.Event()
            ready.record()
        self._pending.append((step, loss, ready, lr, started))
        return self._read(keep=1 if self.late else 0)

    def flush(self) -> list[StepLoss]:
        """Read every pending step (waiting for the GPU to finish them)."""
        return self._read(keep=0)

    def _read(self, keep: int) -> list[StepLoss]:
        read = []
        while len(self._pending) > keep:
            step, loss, ready, lr, started = self._pending.pop(0)
            if ready is not None:
                ready.synchronize()
            now = self._clock()
            read.append(StepLoss(step, float(loss), lr, now - max(started, self._last_read)))
            self._last_read = now
        return read
