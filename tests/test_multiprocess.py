"""Scale-out through accelerate: 2 CPU processes (gloo) train what 1 process trains with the same global batch."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from comfyui_dreambooth_lora.trainer import loop
from comfyui_dreambooth_lora.trainer.events import read_events
from comfyui_dreambooth_lora.trainer.tiny import make_demo_dataset
from comfyui_dreambooth_lora.trainer.run_folder import events_path, stop_path

from comfyui_server import free_port
from test_training import make_config


def launch(config, tmp_path: Path, processes: int, wait: bool = True, script: Path | None = None):
    """The trainer's CLI under `accelerate launch` (or `script CONFIG`, a stand-in that runs it)."""
    path = tmp_path / f"{Path(config.output_dir).name}.json"
    path.write_text(json.dumps(config.to_dict()))
    program = [str(script), str(path)] if script else ["-m", "comfyui_dreambooth_lora.trainer", "train", "--config",
                                                       str(path)]
    # accelerate's multi-process launcher (torchrun); ACCELERATE_USE_CPU makes the processes talk over gloo.
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
               str(free_port()), *program]  # a fixed port failed when make test's two lanes launched at once
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true"}
    if not wait:  # in a session of its own, so the launcher and its workers can be killed together
        return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                                start_new_session=True)
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)


def test_two_processes_match_one_process_with_the_same_global_batch(tiny_sd1, tmp_path, monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")  # the one-process run on the CPU too, also where a GPU is
    photos = make_demo_dataset(tmp_path / "photos", count=4, size=32, captions=False)
    common = dict(max_train_steps=4, learning_rate=3e-3, flip_p=0.5, checkpoint_every=2)
    two = make_config(tiny_sd1, photos, tmp_path / "two", **common)
    result = launch(two, tmp_path, processes=2)
    assert result.returncode == 0, result.stderr[-3000:]
    one = make_config(tiny_sd1, photos, tmp_path / "one", gradient_accumulation_steps=2, **common)
    loop.train(one)

    a = load_file(Path(one.output_dir) / "test_lora.safetensors")
    b = load_file(Path(two.output_dir) / "test_lora.safetensors")
    assert a.keys() == b.keys()
    changed = 0
    for key in a:
        torch.testing.assert_close(b[key].float(), a[key].float(), rtol=0, atol=2e-3)  # fp16 file
        changed += int("lora_up" in key and a[key].abs().max() > 0)
    assert changed > 0
    steps_one = [e["loss"] for e in read_events(events_path(one.output_dir)) if e["event"] == "step"]
    steps_two = [e["loss"] for e in read_events(events_path(two.output_dir)) if e["event"] == "step"]
    assert len(steps_two) == 4  # only the main process writes events
    for x, y in zip(steps_one, steps_two):
        assert abs(x - y) < 1e-4

    # The checkpoint written by 2 processes resumes in 1 process.
    resumed = loop.train(dataclasses.replace(two, resume=True, max_train_steps=6))
    assert resumed.status == "done" and resumed.step == 6
    start = [e for e in read_events(events_path(two.output_dir)) if e["event"] == "start"][-1]
    assert start["start_step"] == 4


def test_two_processes_offloading_with_class_images_made_on_the_way_match_one_process(tiny_sd1, tmp_path, monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")  # the one-process run on the CPU too, also where a GPU is
    # offload_frozen_models fills the cache with the UNet waiting in CPU memory before `prepare`
    # wraps it; the main process brings it over to make the class images first.
    photos = make_demo_dataset(tmp_path / "photos", count=4, size=32, captions=False)
    common = dict(max_train_steps=4, learning_rate=3e-3, offload_frozen_models=True, with_prior_preservation=True,
                  class_prompt="a photo of disc", class_dir=str(tmp_path / "class"), num_class_images=2,
                  class_sample_steps=2)
    two = make_config(tiny_sd1, photos, tmp_path / "two", **common)
    result = launch(two, tmp_path, processes=2)
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(list((tmp_path / "class").glob("*.png"))) == 2
    one = make_config(tiny_sd1, photos, tmp_path / "one", gradient_accumulation_steps=2, **common)
    loop.train(one)
    steps_one = [e["loss"] for e in read_events(events_path(one.output_dir)) if e["event"] == "step"]
    steps_two = [e["loss"] for e in read_events(events_path(two.output_dir)) if e["event"] == "step"]
    assert len(steps_two) == len(steps_one) == 4
    for x, y in zip(steps_one, steps_two):
        assert abs(x - y) < 1e-4


def test_a_stop_while_the_main_process_makes_class_images_stops_every_process(tiny_sd1, tmp_path):
    # Only the main process generates; the others wait for it. A stop seen there must reach them
    # (before, the main process left and the others waited in a collective until it timed out).
    photos = make_demo_dataset(tmp_path / "photos", count=2, size=32, captions=False)
    config = make_config(tiny_sd1, photos, tmp_path / "run", max_train_steps=4, with_prior_preservation=True,
                         class_prompt="a photo of disc", class_dir=str(tmp_path / "class"), num_class_images=500,
                         class_sample_steps=1)
    process = launch(config, tmp_path, processes=2, wait=False)
    events = events_path(config.output_dir)
    deadline = time.monotonic() + 240
    while not (events.exists() and any(e["event"] == "class_images" for e in read_events(events))):
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()[1][-3000:]
        time.sleep(0.2)
    stop_path(config.output_dir).touch()
    try:
        _, stderr = process.communicate(timeout=120)
    finally:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert process.returncode == 0, stderr[-3000:]
    assert read_events(events)[-1]["event"] == "stopped"
    assert 0 < len(list((tmp_path / "class").glob("*.png"))) < 500


def test_the_cli_takes_its_process_group_down_before_the_process_exits(tiny_sd1, tmp_path):
    # Left to the interpreter's exit, gloo's threads once aborted a worker after a clean stop
    # ("terminate called without an active exception"), failing the whole launch.
    photos = make_demo_dataset(tmp_path / "photos", count=2, size=32, captions=False)
    config = make_config(tiny_sd1, photos, tmp_path / "run", max_train_steps=1)
    script = f"""
import json, torch.distributed as dist
from comfyui_dreambooth_lora.trainer.cli import run_training
from comfyui_dreambooth_lora.trainer.config import TrainConfig
dist.init_process_group("gloo", store=dist.FileStore({str(tmp_path / "store")!r}, 1), rank=0, world_size=1)
code = run_training(TrainConfig(**json.loads({json.dumps(json.dumps(config.to_dict()))})))
print("exit", code, "group left:", dist.is_initialized())
"""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "ACCELERATE_USE_CPU": "true"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert "exit 0 group left: False" in result.stdout, result.stderr[-3000:]


POISONED_TRAINER = """
import os, runpy, sys
from comfyui_dreambooth_lora.trainer import loop
loop.read_loss_late = lambda device: True  # as on a GPU
real, calls = loop.diffusion_loss, {"n": 0}
def poisoned(*args, **kwargs):
    calls["n"] += 1
    loss = real(*args, **kwargs)
    return loss * float("nan") if calls["n"] == 3 else loss  # step 3, on every process
loop.diffusion_loss = poisoned
try:
    sys.argv = ["trainer", "train", "--config", sys.argv[1]]
    runpy.run_module("comfyui_dreambooth_lora.trainer", run_name="__main__")
finally:
    print(f"rank {os.environ['RANK']} left after loss call {calls['n']}", file=sys.stderr, flush=True)
"""


def test_a_nan_loss_read_late_stops_every_process_at_the_same_step(tiny_sd1, tmp_path):
    # Only the main process read the pending loss before a sample step: it stopped at step 3 while
    # the others went on into step 4's all-reduce (which, over NCCL, hangs until a timeout).
    photos = make_demo_dataset(tmp_path / "photos", count=4, size=32, captions=False)
    config = make_config(tiny_sd1, photos, tmp_path / "run", max_train_steps=6, sample_every=3, sample_steps=1)
    script = tmp_path / "poisoned_trainer.py"
    script.write_text(POISONED_TRAINER, encoding="utf-8")
    result = launch(config, tmp_path, processes=2, script=script)
    assert result.returncode != 0
    assert sorted(re.findall(r"rank (\d) left after loss call (\d+)", result.stderr)) == [("0", "3"), ("1", "3")]
    errors = [e for e in read_events(events_path(config.output_dir)) if e["event"] == "error"]
    assert len(errors) == 1 and errors[0]["step"] == 3 and "at step 3" in errors[0]["message"]
