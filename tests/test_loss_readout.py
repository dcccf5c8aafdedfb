"""Reading each step's loss one step late (on a GPU): the same events, nothing saved unread."""

from __future__ import annotations


import pytest
import torch

from comfyui_dreambooth_lora.trainer import loop
from comfyui_dreambooth_lora.trainer.events import EventWriter, read_events
from comfyui_dreambooth_lora.trainer.loss_readout import LossReadout
from comfyui_dreambooth_lora.trainer.run_folder import checkpoints_dir, events_path
from comfyui_dreambooth_lora.trainer.stop import StopRequest
from test_training import StopAtStep, make_config


def test_late_readout_hands_back_the_previous_step_and_flush_the_rest():
    readout = LossReadout(late=True)
    assert readout.push(1, torch.tensor(0.5), lr=1e-4, started=0.0) == []
    [first] = readout.push(2, torch.tensor(0.25), lr=2e-4, started=0.0)
    assert (first.step, first.loss, first.lr) == (1, 0.5, 1e-4)
    [second] = readout.flush()
    assert (second.step, second.loss, second.lr) == (2, 0.25, 2e-4)
    assert readout.flush() == []


def test_prompt_readout_hands_back_the_step_just_pushed():
    readout = LossReadout(late=False)
    assert [s.step for s in readout.push(1, torch.tensor(0.5), lr=0.0, started=0.0)] == [1]
    assert readout.flush() == []


def test_a_gpu_loss_is_copied_without_blocking_behind_an_event_and_read_only_after_it(monkeypatch):
    # Stand-ins for a CUDA loss and event (no GPU here), which log what happens in which order.
    log = []

    class HostCopy:  # what `.to("cpu", non_blocking=True)` returns: valid once its event completed
        def __init__(self, value, step):
            self.value, self.step = value, step

        def __float__(self):
            assert ("wait", self.step) in log, f"step {self.step}'s loss read before its copy was waited for"
            log.append(("read", self.step))
            return self.value

    class CudaLoss:
        is_cuda = True

        def __init__(self, value, step):
            self.value, self.step = value, step

        def detach(self):
            return self

        def to(self, device, non_blocking=False):
            assert device == "cpu" and non_blocking
            log.append(("copy", self.step))
            return HostCopy(self.value, self.step)

    class Event:
        def record(self):
            self.step = log[-1][1]  # after the copy just queued
            log.append(("record", self.step))

        def synchronize(self):
            log.append(("wait", self.step))

    monkeypatch.setattr(torch.cuda, "Event", Event)
    readout = LossReadout(late=True)
    assert readout.push(1, CudaLoss(0.5, 1), lr=0.0, started=0.0) == []
    [one] = readout.push(2, CudaLoss(0.25, 2), lr=0.0, started=0.0)
    [two] = readout.flush()
    assert (one.step, one.loss, two.step, two.loss) == (1, 0.5, 2, 0.25)
    assert log == [("copy", 1), ("record", 1), ("copy", 2), ("record", 2), ("wait", 1), ("read", 1),
                   ("wait", 2), ("read", 2)]


def test_seconds_per_step_is_the_time_between_reads_once_reads_lag_behind_the_steps():
    clock = iter([10.0, 12.0, 14.0, 30.0])
    readout = LossReadout(late=True, clock=lambda: next(clock))
    readout.push(1, torch.tensor(1.0), lr=0.0, started=3.0)
    [one] = readout.push(2, torch.tensor(1.0), lr=0.0, started=9.0)  # read at 10: since step 1 started
    [two] = readout.push(3, torch.tensor(1.0), lr=0.0, started=11.0)  # read at 12: since step 1 was read
    [three] = readout.flush()  # read at 14
    readout.push(4, torch.tensor(1.0), lr=0.0, started=20.0)  # begun after a checkpoint that took 14 to 20
    [four] = readout.flush()  # read at 30: since step 4 started, leaving the checkpoint out
    assert [one.seconds, two.seconds, three.seconds, four.seconds] == [7.0, 2.0, 2.0, 10.0]


def run_events(config, late: bool, monkeypatch, **train_args) -> list[dict]:
    monkeypatch.setattr(loop, "read_loss_late", lambda device: late)
    loop.train(config, **train_args)
    return read_events(events_path(config.output_dir))


def what_happened(events: list[dict]) -> list[tuple]:
    """The events in order, less their times (and the paths, which name the run folder)."""
    return [(e["event"], e.get("step"), e.get("loss")) for e in events if e["event"] not in ("log", "loading", "start")]


def test_reading_losses_late_writes_the_same_events_in_the_same_order(tiny_sd1, photos, tmp_path, monkeypatch):
    common = dict(max_train_steps=5, checkpoint_every=2, sample_every=3, sample_steps=1, sample_at_end=True)
    prompt = run_events(make_config(tiny_sd1, photos, tmp_path / "prompt", **common), False, monkeypatch)
    late = run_events(make_config(tiny_sd1, photos, tmp_path / "late", **common), True, monkeypatch)
    assert what_happened(late) == what_happened(prompt)
    kinds = [(kind, step) for kind, step, _ in what_happened(late)]
    assert kinds == [("step", 1), ("step", 2), ("checkpoint", 2), ("step", 3), ("sampling", 3), ("sample", 3),
                     ("step", 4), ("checkpoint", 4), ("step", 5), ("checkpoint", 5), ("exporting", 5), ("sampling", 5),
                     ("sample", 5), ("done", 5)]


@pytest.mark.parametrize("late", [False, True])
def test_a_nan_loss_at_a_checkpoint_step_is_caught_before_the_checkpoint(tiny_sd1, photos, tmp_path, monkeypatch,
                                                                        late):
    # Read late, step 4's loss would otherwise be read in step 5, after step 4's checkpoint was written.
    config = make_config(tiny_sd1, photos, tmp_path / "run", max_train_steps=6, checkpoint_every=2)
    real, calls = loop.diffusion_loss, {"n": 0}

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        loss = real(*args, **kwargs)
        return loss * float("nan") if calls["n"] == 4 else loss

    monkeypatch.setattr(loop, "diffusion_loss", poisoned)
    with pytest.raises(loop.TrainingError, match="at step 4.*step_00000002"):
        run_events(config, late, monkeypatch)
    assert sorted(p.name for p in checkpoints_dir(config.output_dir).iterdir()) == ["step_00000002"]
    events = read_events(events_path(config.output_dir))
    assert [e["step"] for e in events if e["event"] == "step"] == [1, 2, 3]
    assert [e["step"] for e in events if e["event"] == "error"] == [4]  # the step whose loss it was


def test_a_stop_with_losses_read_late_reports_every_step_before_it_saves(tiny_sd1, photos, tmp_path, monkeypatch):
    config = make_config(tiny_sd1, photos, tmp_path / "run", max_train_steps=8)
    events = EventWriter(events_path(config.output_dir))
    stop = StopRequest(handle_signals=False)
    events.listeners.append(StopAtStep(stop, 2))  # step 2's event comes once step 3 is queued
    happened = what_happened(run_events(config, True, monkeypatch, events=events, stop=stop))
    assert [(kind, step) for kind, step, _ in happened] == [("step", 1), ("step", 2), ("step", 3), ("checkpoint", 3),
                                                            ("stopped", 3)]


def test_a_failure_read_late_still_reports_the_steps_before_it(tiny_sd1, photos, tmp_path, monkeypatch):
    # Step 3's event waited for step 4's push, which an error in step 4 (out of memory, say) never reached.
    config = make_config(tiny_sd1, photos, tmp_path / "run", max_train_steps=6)
    real, calls = loop.diffusion_loss, {"n": 0}

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:
            raise RuntimeError("CUDA out of memory (a stand-in)")
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, "diffusion_loss", failing)
    with pytest.raises(RuntimeError, match="stand-in"):
        run_events(config, True, monkeypatch)
    events = read_events(events_path(config.output_dir))
    assert [(e["event"], e.get("step")) for e in events if e["event"] in ("step", "error")] == [
        ("step", 1), ("step", 2), ("step", 3), ("error", 4)]  # the error names the step that failed
