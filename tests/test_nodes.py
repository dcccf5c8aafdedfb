"""The node pack's parts that need no ComfyUI: widgets -> TrainConfig, the worker process, pictures.

The worker tests run the real worker script (the pack imported from its folder under its
package name) and the real trainer CLI on a tiny model, so the process handling the Train
LoRA node relies on (events, graceful stop, failures with their cause) is checked here in
seconds; `test_nodes_comfyui.py` then runs the same through a real ComfyUI server.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from PIL import Image

from comfyui_dreambooth_lora.nodes import config_build as cb
from comfyui_dreambooth_lora.nodes import pictures
from comfyui_dreambooth_lora.nodes.progress import RunProgress
from comfyui_dreambooth_lora.trainer.step_clock import StepClock
from comfyui_dreambooth_lora.nodes.run_reuse import (NOT_WEIGHT_OPTIONS, check_run_can_start, find_finished_run,
                                                     forget_finished_run, record_finished_run, run_identity)
from comfyui_dreambooth_lora.nodes.worker import (KILL_GRACE_SECONDS, PACK_DIR, WORKER_MAIN, WorkerError, WorkerProcess,
                                                  check_num_processes, supervise, worker_command, worker_environment)
from comfyui_dreambooth_lora.trainer.config import ConfigError, TrainConfig, check_output_name, save_config
from comfyui_dreambooth_lora.trainer.events import read_events
from comfyui_dreambooth_lora.trainer.run_folder import events_path, pid_path, stop_path
from comfyui_dreambooth_lora.trainer.tiny import draw_subject_image, make_demo_dataset

REPO = Path(__file__).resolve().parent.parent


# --- the root package stays light --------------------------------------------------------------------

def test_root_package_imports_nothing_heavy_and_has_the_v3_entry_point():
    code = ("import sys, comfyui_dreambooth_lora as p; import inspect; "
            "heavy = [m for m in ('torch', 'diffusers', 'peft', 'transformers', 'accelerate', 'comfy_api') "
            "if m in sys.modules]; print(heavy, inspect.iscoroutinefunction(p.comfy_entrypoint))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[] True"


# --- widgets -> TrainConfig ----------------------------------------------------------------------------

@pytest.mark.parametrize("name, expected", [
    ("my_dog", "my_dog"),
    ("  my dog.safetensors ", "my dog"),
    ("../../etc/passwd", "____etc_passwd"),
    ("a/b\\c:d", "a_b_c_d"),
    ("..", "_"),
    (" . ", None),
    ("", None),
    ("C:\\evil", "C__evil"),
])
def test_output_names_are_sanitised(name, expected):
    if expected is None:
        with pytest.raises(ValueError):
            cb.sanitize_output_name(name)
    else:
        assert cb.sanitize_output_name(name) == expected
        assert not check_output_name(expected)  # and the trainer accepts it


def _inputs(tmp_path: Path, arch: str = "sd1", **train):
    base = {"path": str(tmp_path / "model.safetensors"), "name": "model.safetensors", "kind": "checkpoint",
            "arch": arch, "variant": arch, "prediction_type": "epsilon"}
    dataset = {"folder": str(tmp_path / "photos"), "instance_prompt": "a photo of sks dog",
               "class_prompt": "a photo of dog", "caption_mode": "file_or_prompt", "repeats": 2, "resolution": 0,
               "buckets": True, "crop": "center", "flip_p": 0.5}
    widgets = dict(output_name="my_dog", max_train_steps=120, learning_rate=2e-4, rank=8, alpha=4.0, seed=3,
                   resume=False, with_prior_preservation=False)
    widgets.update(train)
    return base, dataset, widgets


def test_build_train_config_maps_every_node_input(tmp_path):
    base, dataset, widgets = _inputs(tmp_path)
    settings = {"memory_preset": cb.PRESET_NONE,
                "options": {"batch_size": 2, "validation_prompts": "one\n\n two \n", "sample_steps": 5}}
    config = cb.build_train_config(base=base, dataset=dataset, settings=settings, train=widgets,
                                   run_dir=tmp_path / "run", lora_dir=tmp_path / "loras", tokenizer="/tok")
    assert config.pretrained_model == base["path"] and config.tokenizer == "/tok"
    assert (config.instance_dir, config.instance_prompt) == (dataset["folder"], "a photo of sks dog")
    assert (config.repeats, config.flip_p, config.resolution) == (2, 0.5, 512)  # 0 = the architecture's own
    assert (config.max_train_steps, config.learning_rate, config.rank, config.alpha, config.seed) == (120, 2e-4, 8, 4.0, 3)
    assert config.batch_size == 2 and config.sample_steps == 5
    assert config.validation_prompts == ["one", "two"]
    assert (config.output_dir, config.lora_dir, config.output_name) == (str(tmp_path / "run"), str(tmp_path / "loras"),
                                                                        "my_dog")
    assert config.resume is False and not config.with_prior_preservation


def test_sdxl_resolution_resume_prior_and_diffusers_tokenizer(tmp_path):
    base, dataset, widgets = _inputs(tmp_path, "sdxl", resume=True, with_prior_preservation=True)
    base["kind"] = "diffusers"
    config = cb.build_train_config(base=base, dataset=dataset, settings=None, train=widgets, run_dir=tmp_path / "r",
                                   lora_dir=tmp_path / "l", tokenizer="/tok", class_dir=tmp_path / "class",
                                   class_images_available=7)
    assert config.resolution == 1024 and config.resume is True
    assert config.tokenizer == ""  # a diffusers folder brings its own
    assert config.with_prior_preservation and config.class_prompt == "a photo of dog"
    assert config.class_dir == str(tmp_path / "class") and config.num_class_images == 7


def _settings(*nodes: tuple[str, dict]) -> dict:
    """The settings a chain of settings nodes makes, as their `execute` does."""
    settings = None
    for node_id, values in nodes:
        settings = cb.add_settings(settings, node_id, values)
    return settings


MEMORY, OPTIMIZER, NETWORK, DATA, OUTPUT = cb.SETTINGS_NODES


@pytest.mark.parametrize("preset", list(cb.MEMORY_PRESETS))
@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_memory_presets_set_the_options_left_at_their_defaults(tmp_path, preset, arch):
    base, dataset, widgets = _inputs(tmp_path, arch)
    settings = _settings((MEMORY, {"memory_preset": preset, "mixed_precision": "fp16"}))
    config = cb.build_train_config(base=base, dataset=dataset, settings=settings, train=widgets,
                                   run_dir=tmp_path / "r", lora_dir=tmp_path / "l")
    for key, value in cb.MEMORY_PRESETS[preset][arch].items():
        assert getattr(config, key) == value
    assert config.mixed_precision == "fp16"  # not a memory setting: the user's choice stays
    assert cb.memory_preset_report(settings, arch) == (f"memory_preset {preset} ({cb.ARCH_NAMES[arch]}) sets "
                                                        f"{cb.preset_summary(preset, arch)}")


def test_a_memory_preset_keeps_what_the_user_set_and_says_so(tmp_path):
    # The SDXL workflow's 12 GB preset turned train_text_encoder off silently when the user switched it on.
    base, dataset, widgets = _inputs(tmp_path, "sdxl")
    settings = _settings((NETWORK, {"train_text_encoder": True}), (MEMORY, {"memory_preset": "12 GB",
                                                                          "batch_size": 3}))
    config = cb.build_train_config(base=base, dataset=dataset, settings=settings, train=widgets,
                                   run_dir=tmp_path / "r", lora_dir=tmp_path / "l")
    assert config.train_text_encoder and config.batch_size == 3  # chosen: kept
    assert config.gradient_checkpointing and config.offload_frozen_models and config.cuda_graphs == "no"  # defaults
    report = cb.memory_preset_report(settings, "sdxl")
    assert report.startswith("memory_preset 12 GB (SDXL) sets gradient_checkpointing on, batch_size 1, "
                             "train_text_encoder off")
    assert report.endswith("; kept as you set: batch_size 3 (the preset's: 1), train_text_encoder on (the preset's: "
                           "off)")
    assert cb.memory_preset_report(_settings((NETWORK, {"train_text_encoder": True})), "sdxl") == ""  # no preset
    text = cb.memory_node_text("12 GB")  # what the node shows before the base model is known
    for arch, shown in cb.ARCH_NAMES.items():
        assert f"{shown}: {cb.preset_summary('12 GB', arch)}" in text
    assert "Options you set away from their defaults keep your value" in text
    for preset in cb.MEMORY_PRESETS:  # the node's description lists what each preset sets
        assert f"{preset}: SD1.x: {cb.preset_summary(preset, 'sd1')}; SDXL: " in cb.SETTINGS_NODES[MEMORY].description


def test_settings_nodes_chain_in_any_order_and_one_node_twice_is_an_error(tmp_path):
    memory = (MEMORY, {"memory_preset": "16 GB", "num_gpus": 2, "batch_size": 2})
    output = (OUTPUT, {"sample_steps": 7, "validation_prompts": "a\nb"})
    optimizer = (OPTIMIZER, {"optimizer": "prodigy"})
    one, other = _settings(memory, output, optimizer), _settings(optimizer, output, memory)
    for settings in (one, other):
        assert settings["memory_preset"] == "16 GB" and settings["num_gpus"] == 2
        assert settings["options"] == {"batch_size": 2, "sample_steps": 7, "validation_prompts": "a\nb",
                                       "optimizer": "prodigy"}
    first = _settings(memory)
    cb.add_settings(first, OUTPUT, {"sample_steps": 9})  # a new dict: ComfyUI caches the one that came in
    assert first == _settings(memory)
    with pytest.raises(ValueError, match=r"two DreamBooth Memory & Speed nodes are chained into one settings input; "
                                         r"remove one of them"):
        _settings(memory, output, memory)


def test_each_option_lives_in_one_settings_node_of_a_dozen_widgets_at_most():
    names = {f for f in TrainConfig.__dataclass_fields__}
    widgets = [w.name for node in cb.SETTINGS_NODES.values() for w in node.widgets]
    assert len(widgets) == len(set(widgets))  # one node per option
    assert {w for w in widgets if w not in names} == {"memory_preset", "num_gpus"}
    assert set(cb.DATASET_OPTIONS) <= names and not set(cb.DATASET_OPTIONS) & set(widgets)
    assert all(len(node.widgets) <= 12 for node in cb.SETTINGS_NODES.values())
    assert "prediction_type" not in widgets  # on DreamBooth Base Model only
    for node in cb.SETTINGS_NODES.values():
        for widget in node.widgets:
            spec = cb.widget_spec(widget)
            assert spec["tooltip"] and spec["type"] in (bool, int, float, str, list)
            if spec["choices"]:
                assert spec["default"] in spec["choices"]


def test_bad_values_are_config_errors_naming_the_option(tmp_path):
    base, dataset, widgets = _inputs(tmp_path)
    dataset["instance_prompt"] = " "
    with pytest.raises(ConfigError, match="instance_prompt"):
        cb.build_train_config(base=base, dataset=dataset, settings=None, train=widgets, run_dir=tmp_path,
                              lora_dir=tmp_path)


def test_base_model_prediction_type_reaches_the_trainer(tmp_path):
    # A v-prediction model whose detection misses it: set on Base Model, it must reach the trainer.
    base, dataset, widgets = _inputs(tmp_path)
    for choice in ("v_prediction", "epsilon", "auto"):  # 'auto': the trainer detects it
        config = cb.build_train_config(base={**base, "prediction_type_choice": choice}, dataset=dataset,
                                       settings=_settings((MEMORY, {"batch_size": 2})), train=widgets,
                                       run_dir=tmp_path / "r", lora_dir=tmp_path / "l")
        assert config.prediction_type == choice


def test_export_format_diffusers_alone_is_refused_before_training(tmp_path):
    # Train LoRA's outputs are the kohya file: 'diffusers' alone trained the whole run, then failed.
    base, dataset, widgets = _inputs(tmp_path)
    for export_format in ("kohya", "both"):
        config = cb.build_train_config(base=base, dataset=dataset, settings=_settings((OUTPUT, {"export_format":
                                                                                          export_format})),
                                       train=widgets, run_dir=tmp_path / "r", lora_dir=tmp_path / "l")
        assert config.export_format == export_format
    settings = _settings((OUTPUT, {"export_format": "diffusers"}))
    with pytest.raises(ValueError, match=r"export_format 'diffusers' is not one of kohya, both in DreamBooth Samples "
                                         r"& Checkpoints"):
        cb.build_train_config(base=base, dataset=dataset, settings=settings, train=widgets, run_dir=tmp_path / "r",
                              lora_dir=tmp_path / "l")


def test_generated_class_images_folders_differ_per_model_prompt_and_resolution(tmp_path):
    base, dataset, _ = _inputs(tmp_path)

    def folder(model="SD15/model.safetensors", prompt="a photo of dog", resolution=0) -> str:
        return cb.class_images_folder_name({**base, "name": model},
                                           {**dataset, "class_prompt": prompt, "resolution": resolution})

    assert folder() == folder() and folder().startswith("model_a_photo_of_dog_")  # readable, and reused
    names = {folder(), folder(model="SDXL/model.safetensors"), folder(prompt="фото собаки"),
             folder(prompt="фото кошки"), folder(prompt="犬の写真"), folder(resolution=768)}
    assert len(names) == 6
    assert folder(resolution=512) == folder()  # 0 is SD1.x's 512


# --- pictures ----------------------------------------------------------------------------------------------

def test_pictures(tmp_path):
    photos = make_demo_dataset(tmp_path / "p", count=5, size=40, captions=False)
    grid = pictures.preview_grid(sorted(photos.glob("*.png")))
    assert grid.size == (3 * pictures.GRID_CELL, 2 * pictures.GRID_CELL)
    tensor = pictures.to_image_tensor([grid])
    assert tuple(tensor.shape) == (1, grid.height, grid.width, 3) and 0 <= float(tensor.min()) <= float(tensor.max()) <= 1
    assert pictures.from_image_tensor(tensor)[0].size == grid.size
    events = [{"event": "start", "start_step": 0}, {"event": "step", "step": 1, "loss": 0.5},
              {"event": "step", "step": 2, "loss": 0.4},
              {"event": "start", "start_step": 0}, {"event": "step", "step": 1, "loss": 0.9},  # a new run
              {"event": "start", "start_step": 1}, {"event": "step", "step": 2, "loss": 0.7}]  # resumed
    assert pictures.losses_of_run(events) == [(1, 0.9), (2, 0.7)]
    curve = pictures.loss_curve([(i, 1.0 / i) for i in range(1, 50)])
    assert curve.size == (640, 360) and len(curve.getcolors(100000)) > 3
    assert pictures.loss_curve([]).size == (640, 360)


# --- the worker process --------------------------------------------------------------------------------------

def fake_worker(tmp_path: Path, script: str) -> WorkerProcess:
    """A worker running `script` (which may read the run folder as sys.argv[1])."""
    run = tmp_path / "run"
    command = [sys.executable, "-c", textwrap.dedent(script), str(run)]
    return WorkerProcess(command, run, worker_environment())


def follow(worker: WorkerProcess, timeout: float = 120, on_event=None) -> list[dict]:
    deadline = time.monotonic() + timeout
    while not worker.finished:
        assert time.monotonic() < deadline, "worker did not finish:\n" + worker.log_tail()
        event = worker.poll(0.05)
        if event is not None and on_event is not None:
            on_event(worker, event)
    worker.wait()
    worker.close()
    return worker.events


def test_worker_events_log_and_success(tmp_path):
    worker = fake_worker(tmp_path, """
        import json, sys
        print(json.dumps({"event": "start", "total_steps": 2}), flush=True)
        print("a stray print from a library", flush=True)
        print("a warning on stderr", file=sys.stderr, flush=True)
        print(json.dumps({"event": "step", "step": 1, "loss": 0.5}), flush=True)
        print(json.dumps({"event": "done", "step": 2, "lora": []}), flush=True)
    """)
    worker.start()
    events = follow(worker)
    assert [e["event"] for e in events] == ["start", "step", "done"]
    assert worker.failure() is None and worker.returncode == 0
    log = (tmp_path / "run" / "worker.log").read_text()
    assert "a stray print" in log and "a warning on stderr" in log


def test_worker_failure_carries_the_error_event_and_the_log_tail(tmp_path):
    worker = fake_worker(tmp_path, """
        import json, sys
        for i in range(100):
            print(f"log line {i}", file=sys.stderr)
        print(json.dumps({"event": "error", "message": "cannot use the images in x: y.png is corrupt", "kind": "DatasetError"}))
        print("error: cannot use the images", file=sys.stderr)
        sys.exit(2)
    """)
    worker.start()
    follow(worker)
    failure = worker.failure()
    assert isinstance(failure, WorkerError) and failure.returncode == 2
    assert "y.png is corrupt" in str(failure) and "DatasetError" in str(failure)
    assert "log line 99" in failure.log_tail and "log line 10\n" not in failure.log_tail  # only the tail


def test_worker_crash_without_events_names_the_exception(tmp_path):
    worker = fake_worker(tmp_path, "raise MemoryError('CUDA out of memory. Tried to allocate 2 GiB')")
    worker.start()
    follow(worker)
    failure = worker.failure()
    assert failure is not None and "out of memory" in failure.message


def test_worker_stop_file_and_kill(tmp_path):
    script = """
        import json, os, sys, time
        run = sys.argv[1]
        for step in range(1, 10000):
            time.sleep(0.05)
            print(json.dumps({"event": "step", "step": step, "loss": 1.0}), flush=True)
            if os.path.exists(os.path.join(run, "STOP")):
                print(json.dumps({"event": "stopped", "step": step, "checkpoint": "c"}), flush=True)
                sys.exit(0)
    """
    worker = fake_worker(tmp_path, script)
    worker.start()
    events = follow(worker, on_event=lambda w, e: w.request_stop() if e.get("step") == 3 else None)
    assert events[-1]["event"] == "stopped" and worker.failure() is None

    worker = fake_worker(tmp_path, script.replace('os.path.join(run, "STOP")', '"/nonexistent"'))
    worker.start()
    events = follow(worker, on_event=lambda w, e: w.kill() if e.get("step") == 3 else None)
    failure = worker.failure()
    assert failure is not None and "signal" in failure.message


def test_cancel_stops_then_kills_but_a_double_click_is_one_cancel(tmp_path):
    worker = fake_worker(tmp_path, "import time; time.sleep(600)")
    worker.start()
    try:
        assert worker.cancel() == "stop" and stop_path(tmp_path / "run").is_file()
        assert worker.cancel() == "ignored" and worker.returncode is None  # at once: the same click twice
        worker.stop_requested_at -= KILL_GRACE_SECONDS  # the first Cancel was seconds ago
        assert worker.cancel() == "kill"  # a deliberate second Cancel
        assert worker.wait(timeout=30) == -9
    finally:
        worker.close()


STOPPABLE_WORKER = """
    import json, os, sys, time
    run = sys.argv[1]
    for step in range(1, 10000):
        time.sleep(0.05)
        print(json.dumps({"event": "step", "step": step, "loss": 1.0}), flush=True)
        if os.path.exists(os.path.join(run, "STOP")):
            print(json.dumps({"event": "stopped", "step": step, "checkpoint": "c", "lora": ["p.safetensors"]}),
                  flush=True)
            sys.exit(0)
"""


class Cancel(Exception):
    """ComfyUI's InterruptProcessingException, in these tests."""


def test_supervise_answers_cancel_with_a_stop_and_raises_it_when_the_worker_stopped(tmp_path):
    worker, said, shown = fake_worker(tmp_path, STOPPABLE_WORKER), [], []
    presses = iter([])

    def show(event):
        nonlocal presses
        shown.append(event)
        if event.get("step") == 3:
            presses = iter([Cancel("first"), Cancel("double-click")])  # two presses at once

    worker.start()
    outcome = supervise(worker, show, lambda: next(presses, None), said.append)
    assert not outcome.finished and shown[-1]["event"] == "stopped"
    assert said[0].startswith("stopping: finishing the step") and "double-click" in said[1]
    assert worker.returncode == 0 and not (tmp_path / "run" / "worker.pid").exists()  # a stop, not a kill
    with pytest.raises(Cancel, match="first"):  # the queue item stops, as Cancel asks
        outcome.events_or_raise(said.append)


def test_supervise_maps_a_finish_a_failure_and_a_stop_from_outside(tmp_path):
    finished = fake_worker(tmp_path, """
        import json
        print(json.dumps({"event": "done", "step": 2, "lora": ["/loras/dog.safetensors"]}), flush=True)
    """)
    finished.start()
    outcome = supervise(finished, lambda e: None, lambda: None, print)
    assert outcome.finished and [e["event"] for e in outcome.events_or_raise(print)] == ["done"]
    said = []
    with pytest.raises(Cancel):  # Cancel after the last step: the run is complete, the queue item still stops
        type(outcome)(outcome.worker, Cancel()).events_or_raise(said.append)
    assert said == ["cancelled after the last step: dog.safetensors is complete; queue again to use it (nothing is "
                    "trained again)"]

    failing = fake_worker(tmp_path, "raise SystemExit('error: no images in x')")
    failing.start()
    with pytest.raises(WorkerError, match="no images in x"):
        supervise(failing, lambda e: None, lambda: None, print).events_or_raise(print)

    stopped = fake_worker(tmp_path, STOPPABLE_WORKER)
    stopped.start()
    stop_path(tmp_path / "run").touch()  # a STOP file written by hand
    with pytest.raises(RuntimeError, match="stopped from outside.*p.safetensors.*resume on"):
        supervise(stopped, lambda e: None, lambda: None, print).events_or_raise(print)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_process_left_holding_the_workers_output_neither_blocks_the_node_nor_outlives_it(tmp_path, monkeypatch):
    # The node waited for the streams to end, i.e. for that process to exit, however long it ran.
    import comfyui_dreambooth_lora.nodes.worker as worker_module

    monkeypatch.setattr(worker_module, "READ_GRACE_SECONDS", 1.0)
    worker = fake_worker(tmp_path, """
        import json, subprocess, sys
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])  # inherits stdout
        print(json.dumps({"event": "child", "pid": child.pid}), flush=True)
    """)
    worker.start()
    started = time.monotonic()
    try:
        events = follow(worker, timeout=60)
    finally:
        worker.close()
    assert worker.returncode == 0 and time.monotonic() - started < 30
    [child] = [e["pid"] for e in events if e.get("event") == "child"]
    deadline = time.monotonic() + 10
    while _running(child) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _running(child)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("psutil_there", [True, False], ids=["psutil", "/proc"])
def test_a_worker_running_in_a_run_folder_is_found_and_a_stale_pid_file_is_not(tmp_path, monkeypatch, psutil_there):
    # A worker a restarted ComfyUI left behind kept writing STOP files: a new run in its folder stopped at once.
    from comfyui_dreambooth_lora.nodes.worker import running_worker
    from comfyui_dreambooth_lora.nodes.worker_main import process_alive

    if not psutil_there:
        monkeypatch.setitem(sys.modules, "psutil", None)  # import psutil: ImportError
    worker = fake_worker(tmp_path, "import time; time.sleep(600)")
    worker.start()
    try:
        assert running_worker(tmp_path / "run") == worker.pid and process_alive(worker.pid)
    finally:
        worker.kill()
        worker.close()
    assert running_worker(tmp_path / "run") is None and not pid_path(tmp_path / "run").exists()
    assert not process_alive(worker.pid)
    pid_path(tmp_path / "run").write_text(str(os.getpid()))  # a pid that runs, but is no worker of it
    assert running_worker(tmp_path / "run") is None


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie waits for init to reap it
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_kill_ends_the_processes_the_worker_started_in_sessions_of_their_own(tmp_path):
    # as accelerate's launcher starts each training process (torch elastic: start_new_session=True)
    worker = fake_worker(tmp_path, """
        import json, subprocess, sys, time
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True)
        print(json.dumps({"event": "child", "pid": child.pid}), flush=True)
        time.sleep(600)
    """)
    worker.start()
    children = []
    events = follow(worker, timeout=60, on_event=lambda w, e: (children.append(e["pid"]), w.kill()))
    assert [e["event"] for e in events] == ["child"] and worker.returncode == -9
    deadline = time.monotonic() + 10
    while _running(children[0]) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _running(children[0])


@pytest.mark.parametrize("platform, error, gone", [("posix", errno.EPIPE, True), ("nt", errno.EINVAL, True),
                                                   ("posix", errno.EINVAL, False), ("posix", errno.ENOSPC, False)])
def test_worker_output_survives_its_reader_going_away_also_as_windows_reports_it(monkeypatch, platform, error, gone):
    # Only BrokenPipeError counted: on Windows the write after ComfyUI died raised EINVAL and failed the run.
    from comfyui_dreambooth_lora.nodes import worker_main

    class Pipe:
        def write(self, text):
            raise OSError(error, os.strerror(error))

    monkeypatch.setattr(worker_main.os, "name", platform)
    noticed = []
    stream = worker_main.GuardedStream(Pipe(), lambda: noticed.append(True))
    if gone:
        assert stream.write("step 3\n") == 7 and noticed == [True]
    else:
        with pytest.raises(OSError):
            stream.write("step 3\n")


def test_worker_main_asks_for_a_stop_when_comfyui_is_gone(tmp_path):
    """Under the launcher the worker's parent outlives ComfyUI: ComfyUI's pid (from the environment) is watched."""
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    code = ("import sys, time; from comfyui_dreambooth_lora.nodes import worker_main as m; "
            "m.watch_parent(m.ParentGone(sys.argv[1]), interval=0.05); time.sleep(1); print('after')")
    env = {**os.environ, "DREAMBOOTH_LORA_PARENT_PID": str(gone.pid)}
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], env=env, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0 and stop_path(tmp_path).is_file()
    assert out.stdout == ""  # our output goes to /dev/null from then on
    env["DREAMBOOTH_LORA_PARENT_PID"] = str(os.getpid())  # alive: no stop
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "alive")], env=env, capture_output=True,
                         text=True, timeout=60)
    assert out.stdout == "after\n" and not stop_path(tmp_path / "alive").exists()


def test_worker_main_names_the_stop_file_as_the_run_folder_does():
    """worker_main.py runs before the pack can be imported, so it holds a copy of the STOP file's name."""
    from comfyui_dreambooth_lora.nodes import worker_main
    from comfyui_dreambooth_lora.trainer import run_folder

    assert worker_main.STOP_FILE_NAME == run_folder.STOP_FILE


# --- the real worker: worker_main.py + trainer CLI on a tiny model --------------------------------------------------

@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_sd1):
    root = tmp_path_factory.mktemp("worker")
    photos = make_demo_dataset(root / "photos", count=3, size=32, captions=False)

    def config(name: str, **overrides) -> Path:
        values = dict(pretrained_model=str(tiny_sd1), instance_dir=str(photos), instance_prompt="a photo of sks disc",
                      resolution=32, bucket_step=16, rank=2, alpha=2.0, max_train_steps=4, checkpoint_every=0,
                      sample_at_end=False, output_dir=str(root / name), output_name=name, lora_dir=str(root / "loras"))
        values.update(overrides)
        cfg = TrainConfig(**values)
        cfg.validate()
        (root / name).mkdir(exist_ok=True)
        save_config(cfg, root / name / "run.json")
        return root / name

    return root, config


def test_real_worker_imports_the_pack_from_its_folder_and_trains(tiny_run):
    root, config = tiny_run
    run = config("done_run", sample_at_end=True, sample_steps=2)
    worker = WorkerProcess(worker_command(run / "run.json", run), run, worker_environment(force_cpu=True))
    worker.start()
    events = follow(worker, timeout=300)
    assert worker.failure() is None, worker.log_tail()
    kinds = [e["event"] for e in events]
    assert kinds[:2] == ["loading", "start"] and kinds.count("step") == 4 and "sample" in kinds and kinds[-1] == "done"
    assert (root / "loras" / "done_run.safetensors").is_file()
    assert worker_command(run / "run.json", run) == [sys.executable, str(WORKER_MAIN), str(PACK_DIR), str(run),
                                                     "train", "--config", str(run / "run.json"), "--events", "stdout"]
    assert PACK_DIR == REPO and WORKER_MAIN.is_file()


def test_real_worker_trains_on_two_processes_through_accelerate_launch(tiny_run):
    """num_processes=2 (the Train node's num_gpus): two CPU processes over gloo, as two GPUs would run."""
    root, config = tiny_run
    run = config("two_processes", checkpoint_every=2)
    command = worker_command(run / "run.json", run, num_processes=2)
    launcher, script = command[:command.index(str(WORKER_MAIN))], command[command.index(str(WORKER_MAIN)):]
    assert launcher[:5] == [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                            str(run / "accelerate_launch.json")]
    assert launcher[5:14] == ["--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--dynamo_backend", "no",
                              "--main_process_port", launcher[13]] and 1024 < int(launcher[13]) < 65536
    assert script == worker_command(run / "run.json", run)[1:]  # the same script and arguments as on one GPU
    # A user's `accelerate config` default made for another trainer (one GPU id, a second machine) is not read.
    hf_home = root / "hf_home"
    (hf_home / "accelerate").mkdir(parents=True)
    (hf_home / "accelerate" / "default_config.yaml").write_text(
        "compute_environment: LOCAL_MACHINE\ndistributed_type: MULTI_GPU\ngpu_ids: '0'\nnum_machines: 1\n"
        "machine_rank: 1\nnum_processes: 1\nmixed_precision: fp16\nuse_cpu: false\ndebug: false\n")
    env = {**worker_environment(force_cpu=True), "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1",
           "HF_HOME": str(hf_home)}
    check_num_processes(2, gpus_found=0, comfy_on_cpu=True, env=env)  # the test hook the node's check allows
    worker = WorkerProcess(command, run, env)
    worker.start()
    events = follow(worker, timeout=300)
    assert worker.failure() is None and worker.returncode == 0, worker.log_tail()
    kinds = [e["event"] for e in events]
    # only the main process prints events: nothing twice
    assert kinds.count("loading") == kinds.count("start") == kinds.count("done") == 1, kinds
    assert [e["step"] for e in events if e["event"] == "step"] == [1, 2, 3, 4]
    assert [e["step"] for e in events if e["event"] == "checkpoint"] == [2, 4] and kinds[-1] == "done"
    assert (root / "loras" / "two_processes.safetensors").is_file()
    assert len([e for e in read_events(events_path(run)) if e["event"] == "step"]) == 4


def test_worker_command_checks_the_number_of_processes(tmp_path):
    for bad in (0, 17):
        with pytest.raises(ValueError, match="num_processes"):
            worker_command(tmp_path / "run.json", tmp_path, num_processes=bad)
    assert worker_command(tmp_path / "run.json", tmp_path, python="/py", num_processes=1)[:2] == ["/py",
                                                                                                   str(WORKER_MAIN)]
    assert worker_command(tmp_path / "run.json", tmp_path, python="/py", num_processes=16)[:8] == [
        "/py", "-m", "accelerate.commands.launch", "--config_file", str(tmp_path / "accelerate_launch.json"),
        "--multi_gpu", "--num_processes", "16"]


def test_more_gpus_than_found_is_a_clear_error():
    no_hook = {"ACCELERATE_USE_CPU": "false"}
    check_num_processes(1, gpus_found=0, comfy_on_cpu=True, env=no_hook)  # one process: the trainer picks the device
    check_num_processes(2, gpus_found=2, env=no_hook)
    check_num_processes(2, gpus_found=8, env={})
    with pytest.raises(ValueError, match=r"num_gpus is 4, but only 2 CUDA GPUs were found") as error:
        check_num_processes(4, gpus_found=2, env=no_hook)
    assert "to 2 or less" in str(error.value)
    with pytest.raises(ValueError, match=r"only 1 CUDA GPU was found"):
        check_num_processes(2, gpus_found=1, env=no_hook)
    with pytest.raises(ValueError, match=r"no CUDA GPU was found"):
        check_num_processes(2, gpus_found=0, env=no_hook)
    with pytest.raises(ValueError, match=r"ComfyUI runs on the CPU"):
        check_num_processes(2, gpus_found=2, comfy_on_cpu=True, env=no_hook)
    for bad in (0, 17):
        with pytest.raises(ValueError, match="between 1 and 16"):
            check_num_processes(bad, gpus_found=32, env=no_hook)
    # ACCELERATE_USE_CPU=true: any number of CPU processes (how the tests run several processes)
    check_num_processes(3, gpus_found=0, comfy_on_cpu=True, env={"ACCELERATE_USE_CPU": "true"})
    check_num_processes(2, gpus_found=0, env={"ACCELERATE_USE_CPU": "True"})


def test_num_gpus_travels_beside_the_trainconfig_options(tmp_path):
    base, dataset, widgets = _inputs(tmp_path)
    settings = _settings((MEMORY, {"batch_size": 2, "num_gpus": 4}))
    config = cb.build_train_config(base=base, dataset=dataset, settings=settings, train=widgets,
                                   run_dir=tmp_path / "run", lora_dir=tmp_path / "loras")
    assert config.batch_size == 2 and "num_gpus" not in config.to_dict()


def test_real_worker_stops_gracefully_with_a_checkpoint(tiny_run):
    root, config = tiny_run
    run = config("stopped_run", max_train_steps=100000)
    worker = WorkerProcess(worker_command(run / "run.json", run), run, worker_environment(force_cpu=True))
    worker.start()
    events = follow(worker, timeout=300, on_event=lambda w, e: w.request_stop() if e["event"] == "step" else None)
    assert worker.failure() is None, worker.log_tail()
    stopped = worker.last("stopped")
    assert stopped is not None and events[-1] is stopped
    assert Path(stopped["checkpoint"]).is_dir() and all(Path(p).is_file() for p in stopped["lora"])
    assert stopped["step"] < 100


def test_real_worker_bad_input_is_a_failure_with_the_cause(tiny_run, tmp_path):
    root, config = tiny_run
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    run = config("bad_run", instance_dir=str(bad))
    worker = WorkerProcess(worker_command(run / "run.json", run), run, worker_environment(force_cpu=True))
    worker.start()
    follow(worker, timeout=300)
    failure = worker.failure()
    assert failure is not None and failure.returncode == 2
    assert "broken.png" in failure.message and "corrupt" in failure.message


def finished_run_folder(tmp_path: Path, options: dict, steps: int = 4) -> tuple[Path, dict]:
    """A run folder whose run finished `steps` steps with `options` (its LoRA beside it); its identity."""
    identity = run_identity(options, tmp_path / "model.safetensors", "abc", None, num_gpus=1)
    (tmp_path / "dog.safetensors").write_bytes(b"lora")
    record_finished_run(tmp_path, identity)
    events_path(tmp_path).write_text(json.dumps({"event": "done", "step": steps}) + "\n", encoding="utf-8")
    return tmp_path / "dog.safetensors", identity


@pytest.mark.parametrize("changes", [{}, {"overwrite": True}, {"resume": True}])
def test_a_finished_run_is_reused_also_with_overwrite_or_resume_on(tmp_path, changes):
    # With overwrite or resume on (the resume workflow), the same graph queued after a restart ran
    # the worker again (minutes for the same LoRA: loading, export, end samples).
    options = TrainConfig(max_train_steps=4).to_dict()
    lora, identity = finished_run_folder(tmp_path, options)
    again = run_identity({**options, **changes}, tmp_path / "model.safetensors", "abc", None, num_gpus=1)
    found = find_finished_run(tmp_path, lora, again, 4)
    assert found is not None and found.changed == sorted(changes)
    assert find_finished_run(tmp_path, lora, {**identity, "dataset": "other"}, 4) is None
    assert find_finished_run(tmp_path, lora, {**identity, "num_gpus": 2}, 4) is None  # another global batch
    longer = run_identity({**options, "max_train_steps": 6}, tmp_path / "model.safetensors", "abc", None, 1)
    assert find_finished_run(tmp_path, lora, longer, 6) is None  # resume with more steps: trains on
    forget_finished_run(tmp_path)  # a new run started in the folder
    assert find_finished_run(tmp_path, lora, identity, 4) is None


def test_options_that_leave_the_weights_alone_reuse_the_run_and_say_so(tmp_path):
    # Changing only a validation prompt after a finished run reloaded the model, made samples and
    # rewrote the LoRA (minutes).
    options = TrainConfig(max_train_steps=4, validation_prompts=["a photo of sks dog"]).to_dict()
    lora, _ = finished_run_folder(tmp_path, options)

    def reuse(**changes):
        identity = run_identity({**options, **changes}, tmp_path / "model.safetensors", "abc", None, num_gpus=1)
        return find_finished_run(tmp_path, lora, identity, 4)

    found = reuse(validation_prompts=["a photo of sks dog on the beach"], sample_steps=10, checkpoint_every=1,
                  keep_checkpoints=5)
    assert found is not None
    assert found.changed == ["checkpoint_every", "keep_checkpoints", "sample_steps", "validation_prompts"]
    message = found.message()
    assert "dog.safetensors" in message and "nothing is trained again" in message
    assert "sample_steps, validation_prompts" in message and "DreamBooth Sample" in message
    assert "keep_checkpoints" not in message  # (not a sample option: nothing to point at)
    assert "DreamBooth Sample" not in reuse(checkpoint_every=1).message()
    # what changes the weights or the file trains again
    for changes in ({"rank": 4}, {"save_dtype": "bf16"}, {"export_format": "both"}, {"learning_rate": 2e-4},
                    {"gradient_checkpointing": True}, {"mixed_precision": "bf16"}):
        assert reuse(**changes) is None, changes


def test_sample_guidance_counts_where_it_makes_class_images(tmp_path):
    options = TrainConfig(max_train_steps=4, with_prior_preservation=True, class_prompt="a dog",
                          class_dir=str(tmp_path / "c")).to_dict()
    lora, _ = finished_run_folder(tmp_path, options)
    guided = run_identity({**options, "sample_guidance": 3.0}, tmp_path / "model.safetensors", "abc", None, 1)
    assert find_finished_run(tmp_path, lora, guided, 4) is None
    assert NOT_WEIGHT_OPTIONS and "sample_guidance" in NOT_WEIGHT_OPTIONS  # (without prior preservation it does not)


def test_a_new_run_may_not_replace_a_lora_or_mix_with_old_checkpoints_silently(tmp_path):
    lora = tmp_path / "dog.safetensors"
    check_run_can_start(tmp_path / "run", lora, resume=False, overwrite=False)  # nothing there
    lora.write_bytes(b"lora")
    with pytest.raises(ValueError, match="already exists.*overwrite on"):
        check_run_can_start(tmp_path / "run", lora, resume=False, overwrite=False)
    check_run_can_start(tmp_path / "run", lora, resume=False, overwrite=True)
    check_run_can_start(tmp_path / "run", lora, resume=True, overwrite=False)


@pytest.mark.comfyui
def test_sample_seeds_stay_in_the_seed_widgets_range(comfyui):
    from comfyui_dreambooth_lora.nodes.comfy_nodes import prompt_seed

    assert [prompt_seed(1234, i) for i in range(3)] == [1234, 1235, 1236]
    assert prompt_seed(2**64 - 1, 1) == 0  # the widget's maximum: torch.manual_seed(2**64) overflowed


# --- folder choices (ComfyUI's folder_paths, no server) ---------------------------------------------------------

@pytest.mark.comfyui
def test_dataset_and_model_choices_stay_inside_their_folders(comfyui, tmp_path):
    import folder_paths

    from comfyui_dreambooth_lora.nodes import comfy_nodes

    old_input = folder_paths.get_input_directory()
    (tmp_path / "input" / "my_dog" / "10_sks dog").mkdir(parents=True)
    (tmp_path / "input" / ".hidden").mkdir()
    (tmp_path / "input" / "dog: best shots").mkdir()  # listed on Linux and macOS, and was refused
    (tmp_path / "input" / "A: portraits").mkdir()  # like a Windows drive, which it is not here
    (tmp_path / "secret").mkdir()
    folder_paths.set_input_directory(str(tmp_path / "input"))
    try:
        assert comfy_nodes.dataset_folder_options()[:4] == ["A: portraits", "dog: best shots", "my_dog",
                                                             "my_dog/10_sks dog"]
        assert ".hidden" not in comfy_nodes.dataset_folder_options()
        assert comfy_nodes.resolve_dataset_folder("my_dog") == tmp_path / "input" / "my_dog"
        for name in ("dog: best shots", "A: portraits"):
            assert comfy_nodes.resolve_dataset_folder(name) == tmp_path / "input" / name
        for bad in ("../secret", str(tmp_path / "secret"), "my_dog/../../secret", "", "C:/x", "missing"):
            with pytest.raises(ValueError):
                comfy_nodes.resolve_dataset_folder(bad)
        assert comfy_nodes.allowed_dataset_folder(tmp_path / "input" / "my_dog")
        assert not comfy_nodes.allowed_dataset_folder(tmp_path / "secret")
        assert not comfy_nodes.allowed_dataset_folder(tmp_path / "input")  # the input folder itself
        assert not comfy_nodes.allowed_base_model("/etc/passwd")
        for bad in ("[diffusers] ../x", "[diffusers] ", "../../etc/passwd"):
            with pytest.raises(Exception):
                comfy_nodes.resolve_base_model(bad)
    finally:
        folder_paths.set_input_directory(old_input)


@pytest.mark.comfyui
def test_train_node_takes_num_gpus_from_the_settings_and_checks_it(comfyui, monkeypatch):
    from comfyui_dreambooth_lora.nodes import comfy_nodes

    monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)
    assert comfy_nodes.settings_num_gpus(None) == 1  # no settings node connected
    assert comfy_nodes.settings_num_gpus(cb.DEFAULT_SETTINGS) == 1
    assert comfy_nodes.settings_num_gpus({"memory_preset": cb.PRESET_NONE, "options": {}, "num_gpus": 1}) == 1
    with pytest.raises(ValueError, match="num_gpus is 2, but ComfyUI runs on the CPU"):  # the fixture's --cpu
        comfy_nodes.settings_num_gpus({"memory_preset": cb.PRESET_NONE, "options": {}, "num_gpus": 2})
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")
    assert comfy_nodes.settings_num_gpus({"memory_preset": cb.PRESET_NONE, "options": {}, "num_gpus": 2}) == 2


class Shown:
    """Stand-ins for ComfyUI's progress bar and node text, and a clock the test moves."""

    def __init__(self):
        self.texts, self.bar, self.logged, self.now = [], [], [], 100.0

    def progress(self, total: int) -> RunProgress:
        return RunProgress(total, update_bar=lambda step, steps, image: self.bar.append((step, steps, image)),
                           send_text=self.texts.append, load_preview=lambda path: f"image of {path}",
                           log=self.logged.append, clock=lambda: self.now)


def test_progress_text_shows_what_the_run_says_until_its_next_event():
    # e.g. "compile_unet: step 1 compiles the UNet ...": minutes without a step would look like a hang.
    shown = Shown()
    progress = shown.progress(total=10)
    progress.show({"event": "start", "total_steps": 10, "model": "sd1", "num_images": 4, "device": "cuda:0"})
    progress.show({"event": "log", "level": "info", "message": "compile_unet: step 1 compiles the UNet"})
    assert shown.texts[-1] == "compile_unet: step 1 compiles the UNet" and shown.logged == [shown.texts[-1]]
    progress.show({"event": "step", "step": 1, "total_steps": 10, "loss": 0.1, "seconds_per_step": 2.0})
    assert shown.texts[-1].startswith("compile")  # step texts come at most 4 a second
    shown.now += 1
    progress.show({"event": "step", "step": 2, "total_steps": 10, "loss": 0.1, "seconds_per_step": 2.0})
    assert shown.texts[-1] == "step 2/10  loss 0.1000  2.00 s/step  ~16s left" and shown.bar[-1] == (2, 10, None)


def test_a_kept_note_stays_above_every_later_text():
    # What the memory preset set was replaced at once by "starting the training worker ...".
    shown = Shown()
    progress = shown.progress(total=10)
    progress.text("memory preset 12 GB: gradient checkpointing on", force=True)
    progress.keep("memory preset 12 GB: gradient checkpointing on")
    progress.text("starting the training worker ...", force=True)
    progress.show({"event": "start", "total_steps": 10, "model": "sd1", "num_images": 4, "device": "cpu"})
    assert shown.texts == ["memory preset 12 GB: gradient checkpointing on",
                           "memory preset 12 GB: gradient checkpointing on\nstarting the training worker ...",
                           "memory preset 12 GB: gradient checkpointing on\ntraining sd1 on 4 images (cpu)"]


def test_progress_text_names_every_phase_of_a_run():
    shown = Shown()
    progress = shown.progress(total=4)
    events = [
        ({"event": "loading", "model": "/models/checkpoints/v1-5.safetensors"}, "loading v1-5.safetensors ..."),
        ({"event": "class_images", "done": 100, "total": 100}, "making class images: 100/100"),
        ({"event": "start", "total_steps": 4, "start_step": 2, "model": "sd1", "num_images": 3, "device": "cpu"},
         "training sd1 on 3 images (cpu), resumed at step 2"),
        ({"event": "sampling", "step": 2, "count": 2}, "making 2 sample image(s) at step 2 ..."),
        ({"event": "sample", "step": 2, "paths": ["s.png"]}, "samples at step 2 done"),
        ({"event": "checkpoint", "step": 4, "path": "c"}, "checkpoint at step 4 written"),
        ({"event": "exporting", "step": 4, "lora": "/loras/dog.safetensors"}, "writing the LoRA dog.safetensors ..."),
        ({"event": "sampling", "step": 4, "count": 1}, "making 1 sample image(s) at the end ..."),
        ({"event": "done", "step": 4, "lora": ["/loras/dog.safetensors"]}, "done: dog.safetensors"),
    ]
    for event, text in events:
        progress.show(event)
        assert shown.texts[-1] == text
    assert ("image of s.png" in [image for _, _, image in shown.bar]) and shown.bar[-1] == (4, 4, None)


def test_the_stop_text_names_the_partial_lora_the_checkpoint_and_how_to_continue():
    shown = Shown()
    shown.progress(total=100).show({"event": "stopped", "step": 7, "checkpoint": "/runs/dog/checkpoints/step_00000007",
                                    "lora": ["/loras/dog_step000007.safetensors"]})
    text = shown.texts[-1]
    assert "step 7" in text and "dog_step000007.safetensors" in text and "step_00000007" in text
    assert "resume on" in text and shown.logged == [text]
    shown.progress(total=100).show({"event": "stopped", "step": 0, "checkpoint": None, "lora": []})
    assert "nothing was written" in shown.texts[-1]


def test_the_time_left_is_smoothed_not_the_last_steps():
    clock = StepClock(smoothing=0.1)
    clock.add(30.0)  # the first step: warm-up (CUDA graphs, compiling)
    assert clock.seconds_left(10) == 300.0
    for _ in range(20):
        clock.add(1.0)
    assert clock.seconds_left(10) == pytest.approx(10.0)
    clock.add(11.0)  # one slow step (samples were made) moves the estimate a tenth of the way
    assert clock.seconds_left(10) == pytest.approx(20.0)
    clock.add(1.0)
    assert clock.seconds_left(10) == pytest.approx(19.0)


# --- the node classes on ComfyUI folders in tmp_path (no server) ------------------------------------------------

@pytest.fixture
def comfy_folders(comfyui, tmp_path, tiny_sd1, monkeypatch):
    """ComfyUI's input, output and model folders in tmp_path (the tiny model as `[diffusers] tiny`, 3 photos in
    input/photos), for calling the nodes' `execute` as ComfyUI does."""
    import folder_paths
    from comfy_api.latest import io

    from comfyui_dreambooth_lora.nodes import comfy_nodes

    for folder in ("input", "output", "models/diffusers", "models/loras", "models/checkpoints"):
        (tmp_path / folder).mkdir(parents=True)
    (tmp_path / "models" / "diffusers" / "tiny").symlink_to(tiny_sd1, target_is_directory=True)
    make_demo_dataset(tmp_path / "input" / "photos", count=3, size=32, captions=False)
    monkeypatch.setattr(folder_paths, "input_directory", str(tmp_path / "input"))
    monkeypatch.setattr(folder_paths, "output_directory", str(tmp_path / "output"))
    monkeypatch.setattr(folder_paths, "filename_list_cache", {})
    for kind in ("diffusers", "loras", "checkpoints"):
        extensions = folder_paths.folder_names_and_paths[kind][1]
        monkeypatch.setitem(folder_paths.folder_names_and_paths, kind, ([str(tmp_path / "models" / kind)], extensions))
    hidden = io.HiddenHolder.from_dict({io.Hidden.unique_id: "1"})
    for node in comfy_nodes.NODES:
        monkeypatch.setattr(node, "hidden", hidden, raising=False)
    return tmp_path


def _dataset_widgets(**changes) -> dict:
    widgets = dict(instance_prompt="a photo of sks disc", class_prompt="a photo of disc", caption_mode="file_or_prompt",
                   repeats=1, resolution=32, buckets=True, crop="center", flip_p=0.0)
    return {**widgets, **changes}


@pytest.mark.comfyui
def test_base_model_node_passes_its_prediction_type_widget(comfy_folders, tmp_path):
    from comfyui_dreambooth_lora.nodes import comfy_nodes

    base = comfy_nodes.DreamBoothBaseModel.execute("[diffusers] tiny", "v_prediction").args[0]
    _, dataset, widgets = _inputs(tmp_path)
    config = cb.build_train_config(base=base, dataset=dataset, settings=None, train=widgets, run_dir=tmp_path / "r",
                                   lora_dir=tmp_path / "l")
    assert config.prediction_type == "v_prediction"


# Each node's widgets in the order of a saved workflow's `widgets_values` ("control_after_generate": the value
# the frontend stores after a seed). A change here changes the saved-workflow format: make it on purpose.
WIDGETS = {
    "DreamBoothDataset": ["folder", "instance_prompt", "class_prompt", "caption_mode", "repeats", "resolution",
                          "buckets", "crop", "flip_p"],
    "DreamBoothDatasetFromImages": ["name", "captions", "instance_prompt", "class_prompt", "caption_mode", "repeats",
                                    "resolution", "buckets", "crop", "flip_p"],
    "DreamBoothBaseModel": ["model", "prediction_type"],
    "DreamBoothMemorySettings": ["memory_preset", "mixed_precision", "gradient_checkpointing", "batch_size",
                                 "gradient_accumulation_steps", "cache_latents", "offload_frozen_models",
                                 "compile_unet", "cuda_graphs", "num_gpus"],
    "DreamBoothOptimizerSettings": ["optimizer", "lr_scheduler", "lr_warmup_steps", "max_grad_norm", "weight_decay",
                                    "snr_gamma", "noise_offset"],
    "DreamBoothNetworkSettings": ["train_text_encoder", "text_encoder_lr", "lora_targets", "lora_dropout", "use_dora",
                                  "network", "lokr_factor", "lokr_decompose_both"],
    "DreamBoothDataSettings": ["caption_dropout", "shuffle_captions", "keep_tokens", "upscale", "bucket_step",
                               "num_class_images", "prior_loss_weight", "class_sample_steps", "mask_floor"],
    "DreamBoothOutputSettings": ["validation_prompts", "sample_every", "sample_at_end", "sample_steps",
                                 "sample_guidance", "sample_seed", "sample_resolution", "checkpoint_every",
                                 "keep_checkpoints", "save_dtype", "export_format", "overwrite"],
    "DreamBoothTrainLoRA": ["output_name", "max_train_steps", "learning_rate", "rank", "alpha", "seed",
                            "control_after_generate", "resume", "with_prior_preservation"],
    "DreamBoothSample": ["lora_name", "strength_model", "strength_clip", "prompt", "negative_prompt", "seed",
                         "control_after_generate", "steps", "cfg", "width", "height", "sampler_name", "scheduler"],
    "DreamBoothLoadLoRA": ["lora_name", "strength_model", "strength_clip"],
}


def _saved_widgets(node) -> list[str]:
    from comfyui_server import widget_names

    return [entry for name, control in widget_names(node.GET_NODE_INFO_V1())
            for entry in ([name, "control_after_generate"] if control else [name])]


@pytest.mark.comfyui
def test_every_nodes_widgets_are_pinned_in_saved_workflow_order(comfyui):
    from comfyui_dreambooth_lora.nodes import comfy_nodes

    assert {node.GET_NODE_INFO_V1()["name"]: _saved_widgets(node) for node in comfy_nodes.NODES} == WIDGETS


def _sentences(text: str) -> int:
    return len(re.split(r"(?<=[.!?])\s+(?=[A-Z])", text.strip()))


@pytest.mark.comfyui
def test_tooltips_are_short_and_carry_no_measurements(comfyui):
    from comfyui_dreambooth_lora.nodes import comfy_nodes

    measured = re.compile(r"\d\s*(GB|GiB|MB|s/step|ms)\b|\b(H100|H200|A100|RTX)\b|\d+x (faster|sooner)")
    for node in comfy_nodes.NODES:
        info = node.GET_NODE_INFO_V1()
        tips = {f"{info['name']}.{name}": spec[1]["tooltip"] for group in ("required", "optional")
                for name, spec in info["input"].get(group, {}).items()}
        tips.update({f"{info['name']} output {i}": tip for i, tip in enumerate(info["output_tooltips"])})
        for where, tip in tips.items():
            assert _sentences(tip) <= 2, f"{where}: {tip}"
            assert not measured.search(tip), f"{where}: {tip}"


@pytest.mark.comfyui
def test_settings_nodes_draw_their_table_entries(comfyui):
    from comfyui_dreambooth_lora.nodes import comfy_nodes

    output = comfy_nodes.DreamBoothOutputSettings.GET_NODE_INFO_V1()["input"]["required"]
    assert output["export_format"][1]["options"] == ["kohya", "both"]  # Train LoRA outputs the kohya file
    prompts = output["validation_prompts"][1]
    assert prompts["multiline"] and prompts["placeholder"].startswith("validation prompts, one per line")
    memory = comfy_nodes.DreamBoothMemorySettings.GET_NODE_INFO_V1()
    assert memory["input"]["optional"]["settings"][0] == "DREAMBOOTH_SETTINGS"
    assert memory["input"]["required"]["num_gpus"][1]["max"] == 16
    out = comfy_nodes.DreamBoothMemorySettings.execute(memory_preset="8 GB", mixed_precision="auto", num_gpus=1)
    assert out.args[0] == {"memory_preset": "8 GB", "num_gpus": 1, "options": {"mixed_precision": "auto"},
                           "nodes": ["DreamBoothMemorySettings"]}
    assert out.ui.as_dict()["text"][0] == cb.memory_node_text("8 GB")
    chained = comfy_nodes.DreamBoothOutputSettings.execute(settings=out.args[0], sample_steps=3).args[0]
    assert chained["options"] == {"mixed_precision": "auto", "sample_steps": 3} and chained["memory_preset"] == "8 GB"


@pytest.mark.comfyui
def test_dataset_fingerprint_covers_only_what_the_trainer_reads(comfyui, tmp_path):
    from comfyui_dreambooth_lora.nodes.comfy_nodes import folder_fingerprint

    photos = make_demo_dataset(tmp_path / "photos", count=3, size=32, captions=False)
    (photos / "10_sks disc").mkdir()
    make_demo_dataset(photos / "10_sks disc", count=1, size=32, captions=False)
    sorted(photos.glob("*.png"))[1].with_suffix(".txt").write_text("a caption")
    before = folder_fingerprint(photos)
    # what the fingerprint was before hidden files were left out: finished runs recorded it
    lines = []
    for dirpath, dirs, files in os.walk(photos):
        dirs.sort()
        for name in sorted(files):
            stat = os.stat(os.path.join(dirpath, name))
            lines.append(f"{os.path.relpath(os.path.join(dirpath, name), photos)}|{stat.st_size}|{stat.st_mtime_ns}\n")
    assert before == hashlib.sha256("".join(lines).encode()).hexdigest()
    # what file browsers and tools leave behind: an unchanged dataset must not look changed
    (photos / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (photos / "Thumbs.db").write_bytes(b"thumbs")
    (photos / "desktop.ini").write_text("[.ShellClassInfo]")
    (photos / ".ipynb_checkpoints").mkdir()
    (photos / ".ipynb_checkpoints" / "x.png").write_bytes(b"png")
    (photos / "rejected").mkdir()  # not an `N_name` folder: the trainer does not read it
    (photos / "rejected" / "y.png").write_bytes(b"png")
    assert folder_fingerprint(photos) == before
    image = sorted(photos.glob("*.png"))[0]
    for change in (lambda: image.with_suffix(".txt").write_text("a caption"),
                   lambda: (photos / "10_sks disc" / "extra.jpg").write_bytes(image.read_bytes()),
                   lambda: os.utime(image, ns=(0, 0))):
        change()
        assert folder_fingerprint(photos) != before
        before = folder_fingerprint(photos)


@pytest.mark.comfyui
def test_dataset_from_images_keeps_its_files_and_gives_other_images_their_own_folder(comfy_folders):
    import torch

    from comfyui_dreambooth_lora.nodes import comfy_nodes

    def from_images(images, captions=""):
        return comfy_nodes.DreamBoothDatasetFromImages.execute(images, "my_subject", captions,
                                                               **_dataset_widgets()).args[0]

    red, blue = torch.zeros(3, 32, 32, 3), torch.zeros(5, 32, 32, 3)
    red[..., 0], blue[..., 2] = 1.0, 1.0
    subject = from_images(red)
    folder = Path(subject["folder"])
    assert folder.parent == comfy_folders / "output" / "dreambooth_lora" / "datasets"
    assert folder.name.startswith("my_subject_")
    for path in folder.iterdir():
        os.utime(path, ns=(0, 0))  # written long ago
    written = comfy_nodes.folder_fingerprint(folder)
    # ComfyUI restarted: the node runs again on the same images and must not rewrite them
    again = from_images(red)
    assert again["folder"] == subject["folder"] and again["fingerprint"] == written
    # a second node with the same name, other images (e.g. the class images): a folder of its own
    klass = from_images(blue)
    assert klass["folder"] != subject["folder"] and klass["num_images"] == 5
    assert len(list(folder.glob("*.png"))) == 3 and comfy_nodes.folder_fingerprint(folder) == written
    assert from_images(red, "a red disc")["folder"] not in (subject["folder"], klass["folder"])


@pytest.mark.comfyui
def test_dataset_from_images_trains_where_a_mask_is_1_and_shows_the_masks(comfy_folders):
    # ComfyUI's MASK is 1 where the mask editor painted (Load Image: 1 - alpha): that is what is learnt.
    import numpy as np
    import torch

    from comfyui_dreambooth_lora.nodes import comfy_nodes
    from comfyui_dreambooth_lora.trainer.data import load_mask, scan_images

    def from_images(images, masks=None):
        return comfy_nodes.DreamBoothDatasetFromImages.execute(images, "masked", "", **_dataset_widgets(),
                                                               masks=masks)

    images = torch.full((2, 32, 48, 3), 0.8)
    masks = torch.zeros(2, 32, 48)
    masks[:, :, :24] = 1.0  # painted: the left half
    masks[1, :, 24:] = 0.5
    out = from_images(images, masks)
    dataset, preview = out.args[0], out.args[1]
    folder = Path(dataset["folder"])
    assert sorted(p.name for p in folder.iterdir()) == ["image_0000.png", "image_0000_mask.png", "image_0001.png",
                                                         "image_0001_mask.png"]
    assert out.args[2].startswith("2 images (0 captioned, 2 masked)")
    written = np.asarray(Image.open(folder / "image_0001_mask.png"))
    assert written.shape == (32, 48) and written[0, 0] == 255 and written[0, -1] == 128
    # the preview: what a mask keeps is the image, what it ignores is darker
    cell = preview[0].numpy()[:, :pictures.GRID_CELL]  # the first image's
    row = cell[cell.shape[0] // 2]
    shown = row[row.sum(-1) > 0.1]  # the letterboxed thumbnail
    assert np.allclose(shown[2], 0.8, atol=0.01) and shown[-3].sum() < 0.6 * shown[2].sum()
    assert from_images(images).args[0]["folder"] != dataset["folder"]  # without masks: another dataset
    assert Path(from_images(images, masks).args[0]["folder"]) == folder  # the same images and masks: the same folder
    # one mask for all images
    one = from_images(images, masks[:1]).args[0]
    assert len(list(Path(one["folder"]).glob("*_mask.png"))) == 2

    with pytest.raises(ValueError, match=r"mask 1 is 64x64 but image 1 is 48x32.*Load Image gives a 64x64"):
        from_images(images, torch.zeros(1, 64, 64))  # Load Image's MASK of an image with nothing painted
    with pytest.raises(ValueError, match=r"mask 2 is empty \(all 0\)"):
        from_images(images, torch.stack([masks[0], torch.zeros(32, 48)]))
    with pytest.raises(ValueError, match=r"3 masks for 2 images"):
        from_images(images, torch.ones(3, 32, 48))
    [item, _] = scan_images(folder, "x", TrainConfig(resolution=32)).items  # what the trainer reads
    assert np.asarray(load_mask(item))[0, 0] == 255 and np.asarray(load_mask(item))[0, -1] == 0


def test_a_dataset_folders_fingerprint_covers_its_masks(tmp_path):
    from comfyui_dreambooth_lora.nodes.comfy_nodes import dataset_files, folder_fingerprint

    draw_subject_image((32, 32), seed=1).save(tmp_path / "a.png")
    draw_subject_image((32, 32), seed=2).save(tmp_path / "b.png")
    before = folder_fingerprint(tmp_path)
    Image.new("L", (32, 32), 255).save(tmp_path / "a_mask.png")
    (tmp_path / "masks").mkdir()
    Image.new("L", (32, 32), 255).save(tmp_path / "masks" / "b.png")
    assert [p.relative_to(tmp_path).as_posix() for p in dataset_files(tmp_path)] == ["a.png", "a_mask.png", "b.png",
                                                                                      "masks/b.png"]
    after = folder_fingerprint(tmp_path)
    assert after != before
    Image.new("L", (32, 32), 100).save(tmp_path / "masks" / "b.png")
    assert folder_fingerprint(tmp_path) != after


@pytest.mark.comfyui
def test_cancel_after_the_last_step_records_the_finished_run(comfy_folders, monkeypatch):
    # Cancel while the LoRA is being written: the run is complete, so queueing again must reuse it.
    import comfy.model_management as mm

    from comfyui_dreambooth_lora.nodes import comfy_nodes

    base = comfy_nodes.DreamBoothBaseModel.execute("[diffusers] tiny", "auto").args[0]
    dataset = comfy_nodes.DreamBoothDataset.execute("photos", **_dataset_widgets()).args[0]
    settings = {"memory_preset": cb.PRESET_NONE, "options": {"bucket_step": 16, "checkpoint_every": 0,
                                                             "sample_at_end": False}}
    steps = 2
    cancels = []
    show = RunProgress.show

    def show_and_note_the_last_checkpoint(progress, event):
        show(progress, event)
        if event.get("event") == "checkpoint" and event["step"] == steps:  # the trainer no longer looks at STOP
            cancels.append("due")

    def cancel_after_the_last_step():
        if cancels == ["due"]:
            cancels.append("pressed")
            raise mm.InterruptProcessingException()

    monkeypatch.setattr(RunProgress, "show", show_and_note_the_last_checkpoint)
    monkeypatch.setattr(mm, "throw_exception_if_processing_interrupted", cancel_after_the_last_step)

    def train(settings=settings):
        return comfy_nodes.DreamBoothTrainLoRA.execute(base, dataset, "disc", steps, 1e-4, 2, 2.0, 1, False, False,
                                                       settings)

    with pytest.raises(mm.InterruptProcessingException):  # the queue item stops, as Cancel asks
        train()
    run = comfy_folders / "output" / "dreambooth_lora" / "runs" / "disc"
    assert cancels == ["due", "pressed"] and [e["event"] for e in read_events(events_path(run))][-1] == "done"
    assert (run / "node_run.json").is_file()
    log = (run / "worker.log").read_text()
    assert train().args[0] == "disc.safetensors"  # queued again: reused, not refused as 'already exists'
    assert (run / "worker.log").read_text() == log  # and not trained again
    other_prompt = {**settings, "options": {**settings["options"], "validation_prompts": "a photo of sks disc"}}
    assert train(other_prompt).args[0] == "disc.safetensors"  # a sample option alone: reused too
    assert (run / "worker.log").read_text() == log


@pytest.mark.comfyui
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_train_lora_refuses_a_run_folder_a_leftover_worker_still_runs_in(comfy_folders):
    from comfyui_dreambooth_lora.nodes import comfy_nodes

    base = comfy_nodes.DreamBoothBaseModel.execute("[diffusers] tiny", "auto").args[0]
    dataset = comfy_nodes.DreamBoothDataset.execute("photos", **_dataset_widgets()).args[0]
    run = comfy_folders / "output" / "dreambooth_lora" / "runs" / "disc"
    leftover = WorkerProcess([sys.executable, "-c", "import time; time.sleep(600)", str(run)], run)
    leftover.start()  # as a worker started before a restart of ComfyUI, still finishing its step
    try:
        with pytest.raises(ValueError, match=rf"a training worker \(pid {leftover.pid}\) still runs in .*disc"):
            comfy_nodes.DreamBoothTrainLoRA.execute(base, dataset, "disc", 2, 1e-4, 2, 2.0, 1, True, False,
                                                    {"memory_preset": cb.PRESET_NONE, "options": {"bucket_step": 16}})
    finally:
        leftover.kill()
        leftover.close()


@pytest.mark.comfyui
def test_sample_runs_again_when_its_lora_file_is_replaced(comfy_folders):
    import torch
    from safetensors.torch import save_file

    from comfyui_dreambooth_lora.nodes import comfy_nodes

    lora = comfy_folders / "models" / "loras" / "dog.safetensors"
    save_file({"x": torch.zeros(2)}, str(lora))

    def fingerprint(**inputs):  # as ComfyUI calls it: linked inputs (base_model always) come as None
        return comfy_nodes.DreamBoothSample.fingerprint_inputs(base_model=None, **inputs)
    before = fingerprint(lora_name="dog.safetensors")
    assert fingerprint(lora_name="dog.safetensors") == before
    save_file({"x": torch.ones(3)}, str(lora))  # retrained under the same name: ComfyUI served the cached images
    assert fingerprint(lora_name="dog.safetensors") != before
    assert fingerprint(lora_name=None) == fingerprint(lora_name="[none]")  # linked, or no LoRA: the graph decides


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads the process's memory maps")
@pytest.mark.comfyui
def test_train_outputs_do_not_keep_the_lora_file_mapped(comfy_folders):
    # ComfyUI keeps a node's outputs; on Windows a mapped file cannot be replaced by the next run of that name
    from types import SimpleNamespace

    import torch
    from safetensors.torch import save_file

    from comfyui_dreambooth_lora.nodes import comfy_nodes

    lora = comfy_folders / "models" / "loras" / "mapped.safetensors"
    save_file({"lora_unet_x.lora_down.weight": torch.ones(4, 8)}, str(lora))
    (comfy_folders / "run").mkdir()
    plan = SimpleNamespace(run_dir=comfy_folders / "run", lora_path=lora)
    outputs = comfy_nodes.train_outputs(plan, [], comfy_nodes.DreamBoothTrainLoRA)
    assert torch.equal(outputs.args[1]["lora_unet_x.lora_down.weight"], torch.ones(4, 8))
    assert str(lora) not in Path("/proc/self/maps").read_text()


@pytest.mark.comfyui
def test_sample_follows_the_base_model_nodes_prediction_type_both_ways(comfyui):
    from types import SimpleNamespace

    import comfy.model_sampling as ms

    from comfyui_dreambooth_lora.nodes.comfy_nodes import sampled_as_predicted

    class VPred(ms.ModelSamplingDiscrete, ms.V_PREDICTION):
        pass

    class Eps(ms.ModelSamplingDiscrete, ms.EPS):
        pass

    class Model:  # the part of ComfyUI's ModelPatcher the function uses
        def __init__(self, sampling, patches=None):
            self.sampling, self.patches, self.model = sampling, dict(patches or {}), SimpleNamespace(model_config=None)

        def get_model_object(self, name):
            return self.patches.get(name, self.sampling)

        def clone(self):
            return Model(self.sampling, self.patches)

        def add_object_patch(self, name, obj):
            self.patches[name] = obj

    v, e = Model(VPred(None)), Model(Eps(None))
    assert sampled_as_predicted(v, "v_prediction") is v and sampled_as_predicted(e, "epsilon") is e
    assert sampled_as_predicted(v, "") is v  # nothing said: as ComfyUI loaded it
    assert isinstance(sampled_as_predicted(e, "v_prediction").get_model_object("model_sampling"), ms.V_PREDICTION)
    # V_PREDICTION subclasses EPS: an isinstance check took a v-prediction model for an epsilon one
    assert not isinstance(sampled_as_predicted(v, "epsilon").get_model_object("model_sampling"), ms.V_PREDICTION)


@pytest.mark.comfyui
def test_load_lora_reads_a_replaced_file_again_and_runs_again_when_it_changes(comfy_folders):
    # ComfyUI's Load LoRA caches by path: a LoRA retrained under its name was not applied until a restart.
    import torch
    from safetensors.torch import save_file

    from comfyui_dreambooth_lora.nodes import comfy_nodes

    lora = comfy_folders / "models" / "loras" / "dog.safetensors"
    save_file({"lora_unet_x.alpha": torch.tensor(1.0)}, str(lora))
    node = comfy_nodes.DreamBoothLoadLoRA
    before = node.fingerprint_inputs(model=None, clip=None, lora_name="dog.safetensors")
    assert comfy_nodes.read_lora_file(str(lora))["lora_unet_x.alpha"] == 1.0
    save_file({"lora_unet_x.alpha": torch.tensor(2.0)}, str(lora))  # retrained: the same size
    os.utime(lora, ns=(time.time_ns(), time.time_ns() + 10**9))  # (a coarse clock could give the same time)
    assert node.fingerprint_inputs(model=None, clip=None, lora_name="dog.safetensors") != before
    assert comfy_nodes.read_lora_file(str(lora))["lora_unet_x.alpha"] == 2.0
    assert node.fingerprint_inputs(model=None, clip=None, lora_name=None) is None  # linked: Train LoRA decides
    assert node.execute("model", "clip", "dog.safetensors", 0.0, 0.0).args == ("model", "clip")
    for i in range(comfy_nodes.LORA_CACHE_SIZE + 2):  # a bounded cache
        other = lora.with_name(f"other_{i}.safetensors")
        save_file({"x": torch.zeros(1)}, str(other))
        comfy_nodes.read_lora_file(str(other))
    assert len(comfy_nodes.read_loras) == comfy_nodes.LORA_CACHE_SIZE and str(lora) not in comfy_nodes.read_loras


@pytest.mark.comfyui
def test_train_lora_trains_a_diffusers_folder_saved_by_transformers_5(comfy_folders):
    # transformers 5 saves a tokenizer as tokenizer.json alone; such a folder was refused as "a single-file
    # checkpoint" with no tokenizer
    from test_models import keep_only_tokenizer_json

    from comfyui_dreambooth_lora.nodes import comfy_nodes
    from comfyui_dreambooth_lora.trainer.tiny import save_tiny_diffusers_model

    folder = save_tiny_diffusers_model(comfy_folders / "models" / "diffusers" / "today", "sd1")
    keep_only_tokenizer_json(folder / "tokenizer")
    assert not (folder / "tokenizer" / "vocab.json").exists()
    base = comfy_nodes.DreamBoothBaseModel.execute("[diffusers] today", "auto").args[0]
    dataset = comfy_nodes.DreamBoothDataset.execute("photos", **_dataset_widgets()).args[0]
    settings = {"memory_preset": cb.PRESET_NONE, "options": {"bucket_step": 16, "sample_at_end": False}}
    out = comfy_nodes.DreamBoothTrainLoRA.execute(base, dataset, "today", 2, 1e-4, 2, 2.0, 1, False, False, settings)
    assert out.args[0] == "today.safetensors"
    assert (comfy_folders / "models" / "loras" / "today.safetensors").is_file()
