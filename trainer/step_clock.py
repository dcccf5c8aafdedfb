"""The time left of a run, for the CLI's progress line and the Train LoRA node's text."""

from __future__ import annotations


class StepClock:
    """The time a step takes, smoothed, for the time left: an exponential moving average of the
    steps' times, so one slow step (samples, a checkpoint) moves the estimate a little, not all of it.
    A run's first step carries its warm-up (CUDA graphs captured, the UNet compiled): the second
    starts the average afresh."""

    def __init__(self, smoothing: float = 0.1):
        self.smoothing = smoothing
        self.steps = 0
        self.seconds_per_step: float | None = None

    def add(self, seconds: float) -> None:
        """One more step, that took `seconds`."""
        self.steps += 1
        if self.seconds_per_step is None or self.steps <= 2:
            self.seconds_per_step = seconds
        else:
            self.seconds_per_step += self.smoothing * (seconds - self.seconds_per_step)

    def seconds_left(self, steps_left: int) -> float:
        return (self.seconds_per_step or 0.0) * max(steps_left, 0)


def duration(seconds: float) -> str:
    """`seconds` as a person reads a time left: 45s, 12min, 2h05."""
    seconds = int(seconds)
    if seconds < 90:
        return f"{seconds}s"
    if seconds < 5400:
        return f"{seconds // 60}min"
    return f"{seconds // 3600}h{(seconds % 3600) // 60:02d}"
