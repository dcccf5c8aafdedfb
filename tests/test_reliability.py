"""Nothing lost at any moment: a full disk, a failing step, stale temporary files, a second Ctrl-C,
portable output names and what a resume checks."""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from comfyui_dreambooth_lora.trainer import checkpoints, fileio, loop
from comfyui_dreambooth_lora.trainer.events import EventWriter, read_events
from comfyui_dreambooth_lora.trainer.run_folder import checkpoints_dir, events_path
from test_training import assert_same_lora, checkpoint_names, make_config


def no_temp_files(folder: Path) -> bool:
    return not [p for p in Path(folder).rglob("*") if p.name.endswith(".tmp") or p.name.startswith(".tmp_step")]


# --- a full disk -------------------------------------------------------------------------------------

def test_a_checkpoint_that_does_not_fit_stops_the_run_naming_folder_sizes_and_last_checkpoint(tiny_sd1, photos,
                                                                                             tmp_path, monkeypatch):
    config = make_config(tiny_sd1, photos, tmp_path / "run", max_train_steps=6, checkpoint_every=2)
    events = EventWriter(events_path(config.output_dir))
    real_free = fileio.free_bytes

    def disk_fills_after_the_first_checkpoint(event):
        if event["event"] == "checkpoint":
            monkeypatch.setattr(fileio, "free_bytes", lambda folder: 1000)

    events.listeners.append(disk_fills_after_the_first_checkpoint)
    with pytest.raises(loop.OutOfDiskSpace) as e:
        loop.train(config, events=events)
    message = str(e.value)
    root = checkpoints_dir(config.output_dir)
    assert f"writing checkpoint step_00000004 in {root} needs about" in message and "0.0 MB free" in message
    assert f"resume = true continues from the last good checkpoint, {root / 'step_00000002'}" in message
    assert checkpoint_names(config) == ["step_00000002"] and no_temp_files(config.output_dir)
    assert real_free(tmp_path) > 0
    error = read_events(events_path(config.output_dir))[-1]
    assert error["event"] == "error" and error["kind"] == "OutOfDiskSpace"


@pytest.mark.parametrize("failure", [
    RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 1472 vs 1366"),  # torch.save's
    RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed"),
    OSError(28, "No space left on device"),
], ids=["torch unexpected pos", "torch file write failed", "ENOSPC"])
def test_a_checkpoint_write_failing_for_space_is_a_disk_full_error_and_leaves_no_half(tiny_sd1, photos, tmp_path,
                                                                                      monkeypatch, failure):
    config = make_config(tiny_sd1, photos, tmp_path / "run", max_train_steps=4, checkpoint_every=2)
    real_save, calls = torch.save, {"n": 0}

    def save(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise failure
        return real_save(*args, **kwargs)

    monkeypatch.setattr(checkpoints.torch, "save", save)
    with pytest.raises(loop.OutOfDiskSpace, match=r"out of disk space: writing checkpoint step_00000004 in .*"
                                                  r"last good checkpoint, .*step_00000002"):
        loop.train(config)
    assert checkpoint_names(config) == ["step_00000002"] and no_temp_files(config.output_dir)


@pytest.mark.parametrize("failure", ["ENOSPC", "SafetensorError"])
def test_an_export_failing_for_space_keeps_the_old_lora(tiny_sd1, photos, tmp_path, monkeypatch, failure):
    import safetensors.torch
    from safetensors import SafetensorError

    config = make_config(tiny_sd1, photos, tmp_path / "run", max_train_steps=1)
    loop.train(config)
    path = Path(config.output_dir) / "test_lora.safetensors"
    old = path.read_bytes()

    real_save = safetensors.torch.save_file

    def full(state, filename, *args, **kwargs):
        if ".test_lora.safetensors." not in filename:  # the checkpoint's copy
            return real_save(state, filename, *args, **kwargs)
        if failure == "ENOSPC":
            raise OSError(errno.ENOSPC, "No space left on device")
        raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "
                              "\"No space left on device\" })")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    with pytest.raises(loop.OutOfDiskSpace, match=rf"writing the LoRA test_lora.safetensors in {tmp_path / 'run'}"):
        loop.train(dataclasses.replace(config, overwrite=True))
    assert path.read_bytes() == old and no_temp_files(config.output_dir)


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MB tmpfs (mounting needs root: skipped elsewhere)."""
    folder = tmp_path / "small_disk"
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(folder)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode(errors='replace').strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "--lazy", str(folder)], check=True)  # (a failed write's handle may still be open)


def fill(folder: Path, leave: int) -> None:
    """Fill `folder`'s disk but `leave` bytes."""
    (folder / "filler").write_bytes(b"\0" * max(fileio.free_bytes(folder) - leave, 0))


def test_cli_on_a_full_disk_exits_3_with_one_message_and_no_traceback(tiny_sd1, photos, tmp_path, small_disk):
    config = make_config(tiny_sd1, photos, small_disk / "run", max_train_steps=2, checkpoint_every=1)
    (tmp_path / "run.json").write_text(json.dumps(config.to_dict()))
    fill(small_disk, leave=200 * 1024)  # room for the event log, not for a checkpoint with its headroom
    done = subprocess.run([sys.executable, "-m", "comfyui_dreambooth_lora.trainer", "train", "--config",
                           str(tmp_path / "run.json")], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 3, done.stderr
    assert "Traceback" not in done.stderr
    assert f"out of disk space: writing checkpoint step_00000001 in {small_disk / 'run' / 'checkpoints'}" in done.stderr
    assert "no checkpoint was written yet" in done.stderr
    assert no_temp_files(small_disk) and not (small_disk / "run" / "test_lora.safetensors").exists()


def test_a_write_that_fills_a_real_disk_is_reported_and_leaves_no_half_file(tiny_sd1, photos, small_disk,
                                                                             monkeypatch):
    # The free-space check passes (it is told the disk is empty); the write itself then fails with ENOSPC.
    config = make_config(tiny_sd1, photos, small_disk / "run", max_train_steps=2, checkpoint_every=1)
    fill(small_disk, leave=60 * 1024)
    monkeypatch.setattr(fileio, "ensure_free_space", lambda *args: None)
    monkeypatch.setattr(checkpoints, "ensure_free_space", lambda *args: None)
    with pytest.raises(loop.OutOfDiskSpace, match=r"out of disk space: writing checkpoint step_00000001"):
        loop.train(config)
    assert no_temp_files(small_disk) and not list(checkpoints_dir(small_disk / "run").iterdir())


# --- a step that fails ---------------------------------------------------------------------------

EXACT_RESUME = dict(max_train_steps=7, gradient_accumulation_steps=2, batch_size=2, lr_scheduler="cosine",
                    lr_warmup_steps=2, flip_p=0.5, lora_dropout=0.1, checkpoint_every=3, snr_gamma=5.0)


def fail_at(monkeypatch, step: int, error: BaseException, micro_batches: int = 1, micro: int = 0) -> None:
    """Make micro-batch `micro` of training step `step` raise `error` (in the loss, where memory runs out)."""
    real, calls = loop.diffusion_loss, {"n": 0}

    def loss(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == (step - 1) * micro_batches + micro + 1:
            raise error
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, "diffusion_loss", loss)


def test_a_step_that_raises_leaves_a_checkpoint_of_the_step_before_that_resumes_exactly(tiny_sd1, photos, tmp_path,
                                                                                        monkeypatch):
    whole = make_config(tiny_sd1, photos, tmp_path / "whole", **EXACT_RESUME)
    loop.train(whole)

    parts = make_config(tiny_sd1, photos, tmp_path / "parts", **EXACT_RESUME)
    with monkeypatch.context() as patch:  # the second micro-batch of step 6: the first one's gradients are half a step
        fail_at(patch, 6, RuntimeError("a CUDA kernel failed"), micro_batches=2, micro=1)
        with pytest.raises(loop.StepFailed) as e:
            loop.train(parts)
    root = checkpoints_dir(parts.output_dir)
    assert str(e.value).startswith("step 6 failed (RuntimeError: a CUDA kernel failed). The 5 steps done are saved in "
                                   f"{root / 'step_00000005'}; resume = true continues from there.")
    assert not e.value.out_of_memory and isinstance(e.value.__cause__, RuntimeError)
    assert checkpoint_names(parts) == ["step_00000003", "step_00000005"]
    assert loop.train(dataclasses.replace(parts, resume=True)).step == 7
    assert_same_lora(whole, parts)


def test_running_out_of_memory_names_the_options_that_help(tiny_sd1, photos, tmp_path, monkeypatch):
    config = make_config(tiny_sd1, photos, tmp_path / "run", max_train_steps=4, checkpoint_every=2)
    fail_at(monkeypatch, 2, torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    with pytest.raises(loop.StepFailed) as e:
        loop.train(config)
    assert e.value.out_of_memory and "saved in" in str(e.value) and checkpoint_names(config) == ["step_00000001"]
    for option in ("memory_preset", "gradient_checkpointing", "batch_size", "offload_frozen_models", "cache_latents"):
        assert option in str(e.value)


def test_a_failure_right_after_a_checkpoint_or_before_any_step_writes_nothing_new(tiny_sd1, photos, tmp_path,
                                                                                  monkeypatch):
    config = make_config(tiny_sd1, photos, tmp_path / "run", max_train_steps=4, checkpoint_every=2)
    fail_at(monkeypatch, 3, RuntimeError("boom"))
    with pytest.raises(loop.StepFailed, match=r"The 2 steps done are in the checkpoint .*step_00000002; resume"):
        loop.train(config)
    assert checkpoint_names(config) == ["step_00000002"]
    fail_at(monkeypatch, 1, RuntimeError("boom"))
    with pytest.raises(loop.StepFailed, match="No step was done; nothing was written"):
        loop.train(make_config(tiny_sd1, photos, tmp_path / "fresh", max_train_steps=4))
    assert not checkpoints_dir(tmp_path / "fresh").exists()


def test_an_emergency_checkpoint_that_fails_too_says_so_and_keeps_the_previous_one(tiny_sd1, photos, tmp_path,
                                                                                   monkeypatch):
    config = make_config(tiny_sd1, photos, tmp_path / "run", max_train_steps=6, checkpoint_every=2)
    fail_at(monkeypatch, 4, RuntimeError("boom"))
    real_save, calls = checkpoints.torch.save, {"n": 0}

    def save(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(5, "Input/output error")
        return real_save(*args, **kwargs)

    monkeypatch.setattr(checkpoints.torch, "save", save)
    with pytest.raises(loop.StepFailed, match=r"Saving the 3 steps done failed too \(.*Input/output error\); the "
                                              r"last good checkpoint, .*step_00000002, is kept"):
        loop.train(config)
    assert checkpoint_names(config) == ["step_00000002"] and no_temp_files(config.output_dir)


# --- leftovers -----------------------------------------------------------------------------------

def test_start_up_removes_the_temp_files_a_killed_run_left_and_only_those(tiny_sd1, photos, tmp_path):
    loras, run = tmp_path / "loras", tmp_path / "run"
    config = make_config(tiny_sd1, photos, run, max_train_steps=4, checkpoint_every=2, lora_dir=str(loras))
    loop.train(config)
    # A process killed while it writes the final LoRA (atomic_write's own temporary name):
    killed = subprocess.run([sys.executable, "-c", "import os, sys; from comfyui_dreambooth_lora.trainer import fileio; "
                             "fileio.atomic_write(sys.argv[1], lambda tmp: (tmp.write_bytes(b'half'), os._exit(9)))",
                             str(loras / "test_lora.safetensors")])
    assert killed.returncode == 9
    ours = [*loras.glob(".test_lora.safetensors.*.tmp"),
            loras / ".test_lora_step000003.safetensors.abcdefgh.tmp",  # a stopped run's partial LoRA
            run / ".test_lora.diffusers.safetensors.a1b2c3d4.tmp",
            run / "samples" / ".step_000002_00.png.zz_zz_zz.tmp"]
    foreign = [loras / ".other_lora.safetensors.abcdefgh.tmp",        # another LoRA's, maybe being written now
               loras / ".test_lora.safetensors.tmp",                 # not what mkstemp makes
               loras / ".test_lora.safetensors.ABCDEFGH.tmp",
               loras / "test_lora.safetensors.abcdefgh.tmp",
               loras / ".test_lora.safetensors.abcdefgh.tmp.bak",
               run / "notes.tmp"]
    assert len(ours) == 4
    for path in ours[1:] + foreign:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"half a LoRA")
    half_checkpoint = checkpoints_dir(run) / ".tmp_step_00000003_4242"
    half_checkpoint.mkdir()
    (half_checkpoint / "optimizer.pt").write_bytes(b"half")

    result = loop.train(dataclasses.replace(config, resume=True, max_train_steps=5))
    assert result.status == "done"
    assert [p for p in ours if p.exists()] == [] and not half_checkpoint.exists()
    assert [p for p in foreign if not p.exists()] == []
    logs = [e["message"] for e in read_events(events_path(run)) if e["event"] == "log"]
    assert any(m.startswith("removed 5 temporary file(s) an interrupted run left") for m in logs)


# --- a second Ctrl-C ------------------------------------------------------------------------------

SLOW_LOADING_CLI = """
import sys, time
from comfyui_dreambooth_lora.trainer import cli, loop

real_load = loop.load_base_model


def slow_load(*args, **kwargs):  # a large checkpoint read from a slow disk
    time.sleep(float(sys.argv[1]))
    return real_load(*args, **kwargs)


loop.load_base_model = slow_load
sys.exit(cli.main(sys.argv[2:]))
"""


def start_cli_loading_slowly(request, config, tmp_path: Path, seconds: float) -> subprocess.Popen:
    """The real CLI process, with a model load that takes `seconds`; returns once it is loading.
    Its stdout and stderr go to files (`read_output`). Killed at the end of the test if still running."""
    (tmp_path / "run.json").write_text(json.dumps(config.to_dict()))
    (tmp_path / "slow_cli.py").write_text(SLOW_LOADING_CLI)
    with open(tmp_path / "stdout.txt", "w") as stdout, open(tmp_path / "stderr.txt", "w") as stderr:
        proc = subprocess.Popen([sys.executable, str(tmp_path / "slow_cli.py"), str(seconds), "train", "--config",
                                 str(tmp_path / "run.json"), "--events", "stdout"], stdout=stdout, stderr=stderr,
                                env={**os.environ, "HF_HUB_OFFLINE": "1"})
    request.addfinalizer(lambda: proc.poll() is None and proc.kill())
    wait_for_output(tmp_path / "stdout.txt", '{"event": "loading"', proc)
    return proc


def wait_for_output(path: Path, text: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    """Wait until `text` appears in the output file `path` of the running `proc`."""
    deadline = time.monotonic() + timeout
    while text not in path.read_text(errors="replace"):
        if proc.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"{text!r} never came: {path.parent.joinpath('stderr.txt').read_text(errors='replace')}")
        time.sleep(0.1)


def test_a_second_sigint_after_the_grace_period_ends_the_cli_at_once(tiny_sd1, photos, tmp_path, request):
    from comfyui_dreambooth_lora.trainer.stop import GRACE_SECONDS

    config = make_config(tiny_sd1, photos, tmp_path / "run", max_train_steps=5)
    proc = start_cli_loading_slowly(request, config, tmp_path, seconds=300)
    proc.send_signal(signal.SIGINT)
    wait_for_output(tmp_path / "stderr.txt", "SIGINT: stopping after this step, then saving; SIGINT again", proc)
    proc.send_signal(signal.SIGINT)  # within the grace period: the same request (a key pressed twice)
    time.sleep(GRACE_SECONDS + 0.5)
    assert proc.poll() is None  # still loading: a first Ctrl-C waits for a point where it can stop cleanly
    asked = time.monotonic()
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=10) == 130
    assert time.monotonic() - asked < 5
    stderr = (tmp_path / "stderr.txt").read_text()
    assert "SIGINT again: ended at once; no checkpoint was written" in stderr and "Traceback" not in stderr
    assert not checkpoints_dir(tmp_path / "run").exists()


def test_a_stop_while_the_model_loads_ends_the_run_before_training_saying_nothing_was_written(tiny_sd1, photos,
                                                                                             tmp_path, request):
    config = make_config(tiny_sd1, photos, tmp_path / "run", max_train_steps=5, with_prior_preservation=True,
                         class_prompt="a photo of a disc", class_dir=str(tmp_path / "class"), num_class_images=2,
                         class_sample_steps=1)
    proc = start_cli_loading_slowly(request, config, tmp_path, seconds=2)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0
    assert "stopped before training; nothing written" in (tmp_path / "stderr.txt").read_text()
    kinds = [e["event"] for e in read_events(events_path(tmp_path / "run"))]
    assert kinds == ["loading", "stopped"]  # no class images were made, no step was taken
    assert not (tmp_path / "class").exists() and not checkpoints_dir(tmp_path / "run").exists()


# --- portable names ---------------------------------------------------------------------------------

def train_config(**options):
    from comfyui_dreambooth_lora.trainer.config import TrainConfig

    return TrainConfig.from_dict({"pretrained_model": "model.safetensors", "instance_dir": "photos",
                                  "instance_prompt": "a photo of sks dog", **options})


@pytest.mark.parametrize("name, problem", [
    ("con", "device name on Windows"), ("NUL", "device name on Windows"), ("aux.lora", "device name on Windows"),
    ("com1", "device name on Windows"), ("LPT9.v2", "device name on Windows"), ("prn .x", "device name on Windows"),
    ("com\u00b9", "device name on Windows"),
    ("my_dog.", "ends with a dot or a space"), ("my_dog ", "ends with a dot or a space"),
    ("dog?", "which Windows does not allow"), ("a|b", "which Windows does not allow"),
    ("x<y>", "which Windows does not allow"), ('say "hi"', "which Windows does not allow"),
])
def test_names_windows_cannot_have_are_refused_on_every_platform(name, problem):
    from comfyui_dreambooth_lora.trainer.config import ConfigError

    with pytest.raises(ConfigError, match=f"output_name: .*{problem}"):
        train_config(output_name=name)


@pytest.mark.parametrize("name", ["console", "conx", "auxiliary", "com10", "lpt", "my.dog", "nul_lora", "con_"])
def test_names_that_only_look_like_device_names_are_accepted(name):
    train_config(output_name=name)


def test_paths_longer_than_windows_allows_are_refused_naming_the_option(tmp_path):
    from comfyui_dreambooth_lora.trainer.config import ConfigError, WINDOWS_MAX_PATH

    folder = tmp_path / ("d" * max(1, 150 - len(str(tmp_path))))
    fits = WINDOWS_MAX_PATH - len(f"{folder}/.") - len("_step000000.diffusers.safetensors.abcdefgh.tmp")
    train_config(output_dir=str(folder), output_name="n" * fits)
    with pytest.raises(ConfigError, match=r"output_dir: the run would write .* \(260 characters\), longer than "
                                          r"Windows allows \(259\); choose a shorter output_name or a shorter "
                                          r"output_dir"):
        train_config(output_dir=str(folder), output_name="n" * (fits + 1))
    with pytest.raises(ConfigError, match=r"lora_dir: the run would write"):
        train_config(output_dir=str(tmp_path), lora_dir=str(folder), output_name="n" * (fits + 1))


@pytest.mark.parametrize("name", ["con", "NUL.x", "my_dog.", "my_dog. ", "lpt1 "])
def test_the_nodes_name_sanitiser_leaves_windows_names_for_the_config_to_refuse(name):
    # The node maps only what cannot be a file name anywhere (folders, drives, an extension); the
    # names above it must not turn into something else silently: the config refuses them, as in the CLI.
    from comfyui_dreambooth_lora.nodes import config_build
    from comfyui_dreambooth_lora.trainer.config import ConfigError

    sanitized = config_build.sanitize_output_name(name)
    assert sanitized == name.strip()
    with pytest.raises(ConfigError, match="output_name"):
        train_config(output_name=sanitized)


# --- what a resume checks -------------------------------------------------------------------------

def test_resume_refuses_changed_class_images_and_names_them(tiny_sd1, photos, tmp_path):
    from comfyui_dreambooth_lora.trainer.checkpoints import ResumeError
    from comfyui_dreambooth_lora.trainer.tiny import draw_subject_image

    class_dir = tmp_path / "class"
    class_dir.mkdir()
    for i in range(3):
        draw_subject_image((32, 32), seed=50 + i, subject=False).save(class_dir / f"c{i}.png")
    config = make_config(tiny_sd1, photos, tmp_path / "run", max_train_steps=2, with_prior_preservation=True,
                         class_prompt="a photo of disc", class_dir=str(class_dir), num_class_images=3)
    loop.train(config)
    draw_subject_image((40, 32), seed=99, subject=False).save(class_dir / "c1.png")  # another picture, same name
    with pytest.raises(ResumeError) as e:  # was taken silently
        loop.train(dataclasses.replace(config, resume=True, max_train_steps=3))
    assert (f"the class images in {class_dir} changed since it was written (changed (size, repeats, caption or mask): "
            "c1.png)") in str(e.value)


def test_resume_finds_a_moved_base_model_by_its_file_and_refuses_another(tiny_sd1, photos, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    from comfyui_dreambooth_lora.trainer.checkpoints import ResumeError

    config = make_config(tiny_sd1, photos, tmp_path / "run", max_train_steps=2)
    loop.train(config)
    moved = Path(shutil.copytree(tiny_sd1, tmp_path / "models" / "renamed_model"))
    result = loop.train(dataclasses.replace(config, pretrained_model=str(moved), resume=True, max_train_steps=3))
    assert result.status == "done" and result.step == 3  # was refused: "pretrained_model: checkpoint has ..."

    weights = next((moved / "unet").glob("*.safetensors"))
    tensors = load_file(weights)
    name = next(iter(tensors))
    tensors[name] = tensors[name] + 0.01  # another model (a fine-tune of the same architecture)
    save_file(tensors, weights)
    with pytest.raises(ResumeError, match=rf"the base model changed: the file {moved} is not the one it trained on "
                                          r"\(SHA-256 [0-9a-f]{12}\.\.\., now [0-9a-f]{12}\.\.\.\)"):
        loop.train(dataclasses.replace(config, pretrained_model=str(moved), resume=True, max_train_steps=4))
    shutil.rmtree(checkpoints_dir(config.output_dir) / "step_00000003")  # back to the first run's checkpoint
    with pytest.raises(ResumeError, match=rf"the base model changed: it trained on {tiny_sd1} \(SHA-256 [0-9a-f]{{12}}"
                                          rf"\.\.\.\); pretrained_model {moved} is another file"):
        loop.train(dataclasses.replace(config, pretrained_model=str(moved), resume=True, max_train_steps=4))


def test_the_cli_time_left_is_smoothed_so_one_slow_step_does_not_swing_it(capsys):
    from comfyui_dreambooth_lora.trainer.cli import ProgressPrinter

    printer = ProgressPrinter()
    for step in range(1, 21):
        printer({"event": "step", "step": step, "total_steps": 100, "loss": 0.1, "lr": 1e-4, "seconds_per_step": 1.0})
    printer({"event": "step", "step": 21, "total_steps": 100, "loss": 0.1, "lr": 1e-4, "seconds_per_step": 31.0})
    last = capsys.readouterr().err.split("\r")[-1]
    # 79 steps left at the smoothed 4 s/step: about 5 minutes, not the 41 minutes of the slow step alone
    assert "4.00 s/step" in last and "~5min left" in last, last
