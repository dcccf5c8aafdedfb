"""The node pack on a real ComfyUI server (headless, CPU, offline), driven over HTTP.

One server per module, started from ComfyUI's own source with this pack linked into its
custom_nodes. The shipped workflows are converted to the API format from the live
/object_info (no API copies that could drift) and executed through /prompt with a small
checkpoint ComfyUI recognises as SD1.5.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from comfyui_dreambooth_lora.nodes.config_build import SETTINGS_NODES
from comfyui_dreambooth_lora.trainer.run_folder import events_path
from comfyui_demo import small_sd15_checkpoint, small_sdxl_checkpoint
from comfyui_server import ComfyUIServer, execution_error, status_messages, truncate_copy, workflow_to_api

pytestmark = pytest.mark.comfyui

REPO = Path(__file__).resolve().parent.parent
WORKFLOWS = REPO / "example_workflows"
CATEGORY = "DreamBooth LoRA"
OUR_NODES = {"DreamBoothDataset", "DreamBoothDatasetFromImages", "DreamBoothBaseModel", *SETTINGS_NODES,
             "DreamBoothTrainLoRA", "DreamBoothSample", "DreamBoothLoadLoRA"}
NOT_LOADED = ("lora key not loaded", "NOT LOADED")
# Node ids of the shipped SD1.5-based workflows (tests/workflow_builder.py); SETTINGS: DreamBooth Memory & Speed.
BASE, DATASET, SETTINGS, TRAIN, CKPT, LORA_LOADER, KSAMPLER, LATENT, SAVE, SAMPLE = \
    "2", "3", "4", "5", "6", "7", "11", "10", "13", "14"


# --- fixtures -------------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def small_sd15(comfyui) -> Path:
    """The small SD1.5 checkpoint, built once and kept in .cache/ (about 15 s to build)."""
    return small_sd15_checkpoint()


@pytest.fixture(scope="session")
def small_sdxl(comfyui) -> Path:
    """The small SDXL-family checkpoint (Segmind Vega's depths), about 2 GiB, built once into .cache/ (~40 s)."""
    return small_sdxl_checkpoint()


def _link(source: Path, target: Path) -> None:
    try:
        target.symlink_to(source)
    except OSError:
        shutil.copy(source, target)


@pytest.fixture(scope="module")
def server(tmp_path_factory, small_sd15):
    from comfyui_dreambooth_lora.trainer.tiny import make_demo_dataset

    server = ComfyUIServer(tmp_path_factory.mktemp("comfyui"))
    server.prepare()
    checkpoints = server.models_dir / "checkpoints"
    _link(small_sd15, checkpoints / "small_sd15.safetensors")
    truncate_copy(small_sd15, checkpoints / "broken_download.safetensors")
    make_demo_dataset(server.input_dir / "my_dog", count=4, size=64, captions=True)
    bad = make_demo_dataset(server.input_dir / "bad_photos", count=2, size=64, captions=False)
    (bad / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    started = time.monotonic()
    server.start()
    server.startup_seconds = time.monotonic() - started
    yield server
    server.stop()


@pytest.fixture(scope="module")
def object_info(server) -> dict:
    return server.object_info()


def load_workflow(name: str) -> dict:
    return json.loads((WORKFLOWS / name).read_text(encoding="utf-8"))


def sd15_prompt(object_info: dict, name: str, *, workflow: str = "SD1.5 LoRA from your photos.json", steps: int = 6,
                checkpoint: str = "small_sd15.safetensors", **settings) -> dict:
    """A shipped workflow as an API prompt, pointed at a small checkpoint and sized for a CPU test."""
    prompt = workflow_to_api(load_workflow(workflow), object_info)
    prompt[BASE]["inputs"]["model"] = checkpoint
    prompt[DATASET]["inputs"].update(folder="my_dog", resolution=64)
    set_settings(prompt, object_info, **{"sample_steps": 3, "validation_prompts": "a photo of sks dog",
                                         "train_text_encoder": True, **settings})
    # A high learning rate, so that 6 steps change the image measurably.
    prompt[TRAIN]["inputs"].update(output_name=name, max_train_steps=steps, learning_rate=5e-3, rank=4, alpha=4.0)
    prompt[KSAMPLER]["inputs"].update(steps=3)
    prompt[LATENT]["inputs"].update(width=64, height=64)
    prompt[SAMPLE]["inputs"].update(width=64, height=64, steps=3)
    return prompt


def set_settings(prompt: dict, object_info: dict, **values) -> None:
    """Sets widgets of the prompt's settings nodes; a setting whose node the workflow lacks gets that node
    (at its defaults), chained in before Train LoRA's settings input."""
    for name, value in values.items():
        node_id = next((i for i, node in prompt.items()
                        if node["class_type"] in SETTINGS_NODES and name in node["inputs"]), None)
        if node_id is None:
            class_type = next(c for c in SETTINGS_NODES if name in widget_defaults(object_info, c))
            node_id = str(100 + len(prompt))
            chain = {"settings": prompt[TRAIN]["inputs"]["settings"]} if "settings" in prompt[TRAIN]["inputs"] else {}
            inputs = {**widget_defaults(object_info, class_type), **chain}
            prompt[node_id] = {"class_type": class_type, "inputs": inputs}
            prompt[TRAIN]["inputs"]["settings"] = [node_id, 0]
        prompt[node_id]["inputs"][name] = value


def only_ancestors(prompt: dict, node_id: str) -> dict:
    """The part of a prompt that `node_id` needs (the Train LoRA node is an output node, so it runs alone)."""
    keep, todo = set(), [node_id]
    while todo:
        current = todo.pop()
        if current in keep:
            continue
        keep.add(current)
        todo += [v[0] for v in prompt[current]["inputs"].values() if isinstance(v, list) and len(v) == 2]
    return {k: v for k, v in prompt.items() if k in keep}


def assert_success(entry: dict, server: ComfyUIServer) -> None:
    error = execution_error(entry)
    assert entry["status"]["status_str"] == "success", (
        f"{error and error.get('node_type')}: {error and error.get('exception_message')}\n" + server.log_tail())


def saved_image(server: ComfyUIServer, entry: dict, node_id: str) -> np.ndarray:
    image = entry["outputs"][node_id]["images"][0]
    folder = {"output": server.output_dir, "temp": server.temp_dir}[image["type"]]
    return np.asarray(Image.open(folder / image["subfolder"] / image["filename"]).convert("RGB"), dtype=np.int16)


def cached_nodes(entry: dict) -> set[str]:
    return {n for kind, data in status_messages(entry) if kind == "execution_cached" for n in data["nodes"]}


def widget_defaults(object_info: dict, class_type: str) -> dict:
    """Every widget of a node at its default value (an API prompt must name them all)."""
    values = {}
    for group in ("required", "optional"):
        for name, spec in object_info[class_type]["input"].get(group, {}).items():
            options = spec[1] if len(spec) > 1 else {}
            if "default" in options:
                values[name] = options["default"]
    return values


def read_events(run: Path) -> list[dict]:
    path = events_path(run)
    if not path.is_file():
        return []
    events = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return events


# --- the pack loads ----------------------------------------------------------------------------------------

def test_pack_loads_without_error_and_costs_startup_nothing(server):
    lines = [line for line in server.log().splitlines() if "comfyui-dreambooth-lora" in line and "seconds" in line]
    assert lines, server.log_tail()
    assert not any("IMPORT FAILED" in line for line in lines), "\n".join(lines)
    seconds = float(re.search(r"([\d.]+) seconds", lines[0]).group(1))
    assert seconds < 0.3, lines[0]


def test_object_info_lists_every_node_with_tooltips(object_info):
    ours = {name: info for name, info in object_info.items() if info.get("category") == CATEGORY}
    assert set(ours) == OUR_NODES
    for name, info in ours.items():
        assert info["description"] and info["display_name"].startswith("DreamBooth"), name
        for group in ("required", "optional"):
            for input_name, spec in info["input"].get(group, {}).items():
                assert len(spec) > 1 and spec[1].get("tooltip"), f"{name}.{input_name} has no tooltip"
        assert info["output_tooltips"] and all(info["output_tooltips"]), f"{name} has an output without a tooltip"
    train = ours["DreamBoothTrainLoRA"]
    assert train["output_node"] and train["output"][:2] == ["*", "LORA_MODEL"]


@pytest.mark.parametrize("name", sorted(p.name for p in WORKFLOWS.glob("*.json")))
def test_every_workflow_converts_and_uses_only_core_nodes_and_ours(object_info, name):
    workflow = load_workflow(name)
    prompt = workflow_to_api(workflow, object_info)
    assert any(n["type"] in ("Note", "MarkdownNote") for n in workflow["nodes"]), "a note tells the user what to do"
    for node in prompt.values():
        module = object_info[node["class_type"]]["python_module"]
        assert module == "nodes" or module.startswith("comfy_extras") or \
            module.startswith("custom_nodes.comfyui-dreambooth-lora"), f"{node['class_type']} is from {module}"
    for node in workflow["nodes"]:
        for value in node.get("widgets_values") or []:
            if isinstance(value, str):
                assert not value.startswith(("/", "~")) and not re.match(r"^[A-Za-z]:[\\/]", value), \
                    f"absolute path in {name}: {value!r}"
    trains = [n for n in prompt.values() if n["class_type"] == "DreamBoothTrainLoRA"]
    loaders = [n for n in prompt.values() if n["class_type"] == "DreamBoothLoadLoRA"]
    assert len(trains) == 1 and loaders and loaders[0]["inputs"]["lora_name"] == [TRAIN, 0]


# --- training through the SD1.5 workflow -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained(server, object_info):
    """The SD1.5 workflow run once: (prompt, history entry, seconds)."""
    prompt = sd15_prompt(object_info, "e2e_dog")
    listener = server.listen()
    started = time.monotonic()
    try:
        entry = server.wait(server.queue(prompt), timeout=1200)
    finally:
        listener.close()
    assert_success(entry, server)
    return prompt, entry, time.monotonic() - started, listener


def test_sd15_workflow_writes_a_lora_that_load_lora_applies_completely(server, trained):
    from safetensors import safe_open

    prompt, entry, seconds, _ = trained
    lora = server.models_dir / "loras" / "e2e_dog.safetensors"
    assert lora.is_file()
    with safe_open(str(lora), "pt") as f:
        keys = list(f.keys())
        metadata = f.metadata()
    assert any(k.startswith("lora_unet_") for k in keys) and any(k.startswith("lora_te_") for k in keys)
    assert metadata["ss_output_name"] == "e2e_dog" and metadata["modelspec.trigger_phrase"] == "a photo of sks dog"
    log = server.log()
    assert "Requested to load" in log and not any(text in log for text in NOT_LOADED)
    # the node's outputs: samples shown on the node, the Sample node's and KSampler's images saved
    assert entry["outputs"][TRAIN]["images"] and entry["outputs"][SAVE]["images"]
    assert entry["outputs"]["15"]["images"] and entry["outputs"]["16"]["images"]  # Sample preview, loss curve
    run = server.output_dir / "dreambooth_lora" / "runs" / "e2e_dog"
    assert (run / "run.json").is_file() and (run / "worker.log").is_file()
    # what the Base Model and Dataset nodes show
    assert "(sd1), epsilon, checkpoint: small_sd15.safetensors" in entry["outputs"][BASE]["text"][0]
    assert entry["outputs"][DATASET]["text"][0].startswith("4 images (2 captioned), 1 bucket: 64x64 x4")
    assert entry["outputs"][SETTINGS]["text"][0] == "no memory preset: the options as set"
    print(f"SD1.5 workflow: {seconds:.1f}s")


def test_training_shows_progress_loss_text_and_sample_previews(trained):
    _, _, _, listener = trained
    progress = [m["data"] for m in listener.messages if m["type"] == "progress" and m["data"].get("node") == TRAIN]
    assert progress and progress[-1]["value"] == progress[-1]["max"] == 6
    texts = listener.texts(TRAIN)
    assert any(re.match(r"step \d+/6  loss \d+\.\d{4}  ", t) for t in texts), texts
    assert any(t.startswith("done: e2e_dog.safetensors") for t in texts), texts
    for phase in ("starting the training worker", "loading small_sd15.safetensors", "training ",  # every phase
                  "writing the LoRA e2e_dog.safetensors", "making 1 sample image(s) at the end"):
        assert any(t.startswith(phase) for t in texts), (phase, texts)
    previews = [p for kind, p in listener.binary if kind == listener.PREVIEW_IMAGE]
    assert previews  # the validation sample, shown while the node runs
    assert Image.open(__import__("io").BytesIO(previews[0][4:])).size[0] > 0


def test_the_lora_changes_the_image_of_the_same_seed(server, trained):
    prompt, entry, _, _ = trained
    with_lora = saved_image(server, entry, SAVE)
    without = json.loads(json.dumps(prompt))
    without[LORA_LOADER]["inputs"].update(strength_model=0.0, strength_clip=0.0)
    log_before = len(server.log())
    entry2 = server.wait(server.queue(without), timeout=600)
    assert_success(entry2, server)
    assert "in worker" not in server.log()[log_before:], "an unchanged Train node must not train again"
    without_lora = saved_image(server, entry2, SAVE)
    assert with_lora.shape == without_lora.shape
    assert np.abs(with_lora - without_lora).mean() > 0.5


def test_the_lora_model_output_applies_with_load_lora_model(server, object_info, trained):
    prompt, entry, _, _ = trained
    graph = json.loads(json.dumps(prompt))
    graph.update({
        "100": {"class_type": "LoraModelLoader", "inputs": {"model": [CKPT, 0], "lora": [TRAIN, 1],
                                                            "strength_model": 1.0, "bypass": False}},
        "101": {"class_type": "KSampler", "inputs": {**prompt[KSAMPLER]["inputs"], "model": ["100", 0]}},
        "102": {"class_type": "VAEDecode", "inputs": {"samples": ["101", 0], "vae": [CKPT, 2]}},
        "103": {"class_type": "SaveImage", "inputs": {"images": ["102", 0], "filename_prefix": "lora_model"}},
    })
    log_before = len(server.log())
    entry2 = server.wait(server.queue(graph), timeout=600)
    assert_success(entry2, server)
    assert "in worker" not in server.log()[log_before:]  # cached (or reused): not trained again
    assert not any(text in server.log()[log_before:] for text in NOT_LOADED)
    assert saved_image(server, entry2, "103").shape == saved_image(server, entry, SAVE).shape


@pytest.mark.newest_only
def test_a_memory_preset_keeps_an_option_the_user_set_and_says_so(server, object_info):
    # With the SDXL workflow's preset, switching train_text_encoder on did nothing and said nothing.
    from safetensors import safe_open

    from comfyui_dreambooth_lora.nodes.config_build import memory_node_text

    prompt = only_ancestors(sd15_prompt(object_info, "preset_dog", steps=1, sample_at_end=False,
                                        memory_preset="8 GB", train_text_encoder=True), TRAIN)
    log_before = len(server.log())
    listener = server.listen()
    try:
        entry = server.wait(server.queue(prompt), timeout=600)
    finally:
        listener.close()
    assert_success(entry, server)
    report = "memory_preset 8 GB (SD1.x) sets gradient_checkpointing on, batch_size 1, train_text_encoder off, " \
             "offload_frozen_models on; kept as you set: train_text_encoder on (the preset's: off)"
    assert report in server.log()[log_before:] and report in listener.texts(TRAIN)
    assert entry["outputs"][SETTINGS]["text"][0] == memory_node_text("8 GB")  # what the preset sets, on the node
    with safe_open(str(server.models_dir / "loras" / "preset_dog.safetensors"), "pt") as f:
        assert any(k.startswith("lora_te_") for k in f.keys())  # the text encoder was trained


@pytest.mark.newest_only
def test_a_lora_retrained_under_its_name_shows_at_once(server, object_info):
    # ComfyUI's Load LoRA keeps the file it read first by path: after a retrain under the same name it
    # applied the old LoRA until ComfyUI restarted (a silent wrong picture).
    # The retrain is a LoKr, which the stock Load LoRA then applies completely (one run for both checks).
    from safetensors import safe_open

    name = "retrained_dog"
    first = only_ancestors(sd15_prompt(object_info, name, sample_at_end=False), SAVE)
    entry = server.wait(server.queue(first), timeout=900)
    assert_success(entry, server)
    before = saved_image(server, entry, SAVE)
    second = only_ancestors(sd15_prompt(object_info, name, sample_at_end=False, overwrite=True, network="lokr"), SAVE)
    second[TRAIN]["inputs"]["seed"] = first[TRAIN]["inputs"]["seed"] + 1
    second[DATASET]["inputs"]["flip_p"] = 1.0  # other data too: every image mirrored
    log_before = len(server.log())
    entry = server.wait(server.queue(second), timeout=900)
    assert_success(entry, server)
    log = server.log()[log_before:]
    assert "in worker" in log and not any(text in log for text in NOT_LOADED)  # trained again, applied completely
    after = saved_image(server, entry, SAVE)
    assert np.abs(after - before).mean() > 0.5
    loras = server.models_dir / "loras"
    with safe_open(str(loras / f"{name}.safetensors"), "pt") as f:
        assert f.metadata()["ss_network_module"] == "lycoris.kohya"
        assert any(k.startswith("lora_unet_") and k.endswith(".lokr_w1") for k in f.keys())
        assert any(k.startswith("lora_te_") and k.endswith(".lokr_w1") for k in f.keys())
    # what a fresh ComfyUI gives: the same file under a name nothing has read yet, in the stock Load LoRA
    shutil.copy(loras / f"{name}.safetensors", loras / f"{name}_fresh.safetensors")
    fresh = json.loads(json.dumps(second))
    fresh[LORA_LOADER] = {"class_type": "LoraLoader", "inputs": {
        **second[LORA_LOADER]["inputs"], "lora_name": f"{name}_fresh.safetensors"}}
    log_before = len(server.log())
    entry = server.wait(server.queue(only_ancestors(fresh, SAVE)), timeout=600)
    assert_success(entry, server)
    log = server.log()[log_before:]
    assert not any(text in log for text in NOT_LOADED) and "ERROR lokr" not in log
    assert np.array_equal(saved_image(server, entry, SAVE), after)


# --- cancel and resume -----------------------------------------------------------------------------------------

def test_interrupt_leaves_a_resumable_checkpoint_and_the_resume_workflow_finishes(server, object_info):
    name = "stopped_dog"
    prompt = only_ancestors(sd15_prompt(object_info, name, steps=100000, sample_at_end=False), TRAIN)
    run = server.output_dir / "dreambooth_lora" / "runs" / name
    prompt_id = server.queue(prompt)
    deadline = time.monotonic() + 600
    while not any(e["event"] == "step" for e in read_events(run)):
        assert time.monotonic() < deadline and server.alive, server.log_tail()
        time.sleep(0.2)
    server.interrupt()
    entry = server.wait(prompt_id, timeout=600)
    kinds = [kind for kind, _ in status_messages(entry)]
    assert "execution_interrupted" in kinds and "execution_success" not in kinds

    stopped = [e for e in read_events(run) if e["event"] == "stopped"]
    assert stopped, (run / "worker.log").read_text()
    stopped = stopped[-1]
    checkpoint = Path(stopped["checkpoint"])
    assert (checkpoint / "trainer_state.json").is_file() and (checkpoint / "lora_state.safetensors").is_file()
    assert [Path(p).parent for p in stopped["lora"]] == [server.models_dir / "loras"]
    assert all(Path(p).is_file() for p in stopped["lora"])
    assert server.get("/system_stats")  # the server keeps serving

    # The shipped resume workflow, same options, a few more steps: it continues from the checkpoint.
    resume = only_ancestors(sd15_prompt(object_info, name, workflow="Resume a cancelled training run.json",
                                        steps=stopped["step"] + 2, sample_at_end=False), TRAIN)
    assert resume[TRAIN]["inputs"]["resume"] is True
    entry = server.wait(server.queue(resume), timeout=600)
    assert_success(entry, server)
    starts = [e for e in read_events(run) if e["event"] == "start"]
    assert starts[-1]["start_step"] == stopped["step"]
    assert (server.models_dir / "loras" / f"{name}.safetensors").is_file()


@pytest.mark.newest_only
def test_a_busy_queue_of_runs_cancelled_and_failing_leaves_no_worker_and_no_memory_behind(server, object_info):
    """Five training prompts queued back to back: two cancelled at random moments, one failing on a corrupt
    image. The others finish with their LoRA, no worker process is left, the server's memory is as before."""
    import random

    import psutil

    seed = random.randrange(1 << 16)
    rng = random.Random(seed)  # the seed is in the failure message, to replay the same moments
    server_process = psutil.Process(server.pid)

    def workers() -> list[str]:
        return [" ".join(child.cmdline()) for child in server_process.children(recursive=True)
                if child.is_running() and child.status() != psutil.STATUS_ZOMBIE]

    def run(name: str, steps: int, folder: str = "my_dog") -> dict:
        prompt = only_ancestors(sd15_prompt(object_info, name, steps=steps, sample_at_end=False), TRAIN)
        prompt[DATASET]["inputs"]["folder"] = folder
        return prompt

    # warm-up: the first run loads what every run needs into the server (imports, the dataset node's cache)
    assert_success(server.wait(server.queue(run("queue_warmup", 1)), timeout=600), server)
    memory_before = server_process.memory_info().rss
    plan = [("queue_a", run("queue_a", 2)), ("queue_cancel_1", run("queue_cancel_1", 100000)),
            ("queue_bad", run("queue_bad", 2, folder="bad_photos")), ("queue_cancel_2", run("queue_cancel_2", 100000)),
            ("queue_b", run("queue_b", 2))]
    ids = {name: server.queue(prompt) for name, prompt in plan}  # all queued before the first one ends
    for name in ("queue_cancel_1", "queue_cancel_2"):
        deadline = time.monotonic() + 600
        while server.running_prompt() != ids[name]:
            assert time.monotonic() < deadline and server.alive, f"seed {seed}: {name} never ran\n" + server.log_tail()
            time.sleep(0.1)
        time.sleep(rng.uniform(0.0, 8.0))  # loading, class images or steps: any moment of the run
        server.interrupt(ids[name])
    entries = {name: server.wait(prompt_id, timeout=600) for name, prompt_id in ids.items()}

    for name in ("queue_a", "queue_b"):
        assert_success(entries[name], server)
        assert (server.models_dir / "loras" / f"{name}.safetensors").is_file(), f"seed {seed}: no LoRA for {name}"
    for name in ("queue_cancel_1", "queue_cancel_2"):
        kinds = [kind for kind, _ in status_messages(entries[name])]
        assert "execution_interrupted" in kinds, f"seed {seed}: {name} was not cancelled: {kinds}"
    error = execution_error(entries["queue_bad"])
    assert error is not None and "broken.png" in error["exception_message"], f"seed {seed}"

    deadline = time.monotonic() + 30  # a cancelled worker is given a few seconds to save and go
    while workers() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not workers(), f"seed {seed}: processes left behind: {workers()}"
    grown = (server_process.memory_info().rss - memory_before) / 2**20
    assert grown < 200, f"seed {seed}: the server grew by {grown:.0f} MiB over the queue"


# --- failures ------------------------------------------------------------------------------------------------------

@pytest.mark.newest_only
def test_a_worker_failure_is_a_node_error_with_the_cause(server, object_info):
    prompt = only_ancestors(sd15_prompt(object_info, "broken_run", steps=2, sample_at_end=False), TRAIN)
    prompt[BASE]["inputs"]["model"] = "broken_download.safetensors"  # header fine, data cut short
    entry = server.wait(server.queue(prompt), timeout=600)
    error = execution_error(entry)
    assert error is not None and error["node_type"] == "DreamBoothTrainLoRA"
    assert "broken_download.safetensors" in error["exception_message"]
    assert "incomplete" in error["exception_message"]  # the trainer's own explanation
    assert "Last lines of the training log" in error["exception_message"]
    assert server.alive and server.get("/system_stats")


@pytest.mark.newest_only
def test_a_corrupt_image_is_a_node_error_naming_the_file(server, object_info):
    prompt = only_ancestors(sd15_prompt(object_info, "bad_photos", steps=2), TRAIN)
    prompt[DATASET]["inputs"]["folder"] = "bad_photos"
    entry = server.wait(server.queue(prompt), timeout=600)
    error = execution_error(entry)
    assert error is not None and error["node_type"] == "DreamBoothDataset"
    assert "broken.png" in error["exception_message"] and "corrupt" in error["exception_message"]
    assert server.alive


@pytest.mark.newest_only
def test_unsafe_output_names_stay_inside_models_loras(server, object_info):
    prompt = only_ancestors(sd15_prompt(object_info, "../../escape", steps=1, sample_at_end=False), TRAIN)
    entry = server.wait(server.queue(prompt), timeout=600)
    assert_success(entry, server)
    assert (server.models_dir / "loras" / "____escape.safetensors").is_file()
    assert not (server.base / "escape.safetensors").exists()


@pytest.mark.newest_only
def test_the_same_graph_after_a_cache_reset_reuses_the_finished_run(server, trained):
    prompt, entry, _, _ = trained
    server.post("/free", {"free_memory": True})  # ComfyUI forgets its cached outputs, as after a restart
    log_before = len(server.log())
    started = time.monotonic()
    entry2 = server.wait(server.queue(only_ancestors(prompt, TRAIN)), timeout=600)
    assert_success(entry2, server)
    assert TRAIN not in cached_nodes(entry2)
    assert "e2e_dog: reused the finished run: e2e_dog.safetensors" in server.log()[log_before:]
    assert time.monotonic() - started < 30
    assert entry2["outputs"][TRAIN]["images"]  # the samples of the finished run are shown again


# --- the other nodes ------------------------------------------------------------------------------------------------

@pytest.mark.newest_only
def test_the_dataset_node_runs_again_when_a_file_changes(server, object_info):
    from comfyui_dreambooth_lora.trainer.tiny import draw_subject_image, make_demo_dataset

    folder = make_demo_dataset(server.input_dir / "changing", count=2, size=48, captions=False)
    dataset = {**widget_defaults(object_info, "DreamBoothDataset"), "folder": "changing"}
    prompt = {"1": {"class_type": "DreamBoothDataset", "inputs": dataset},
              "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 1]}}}
    first = server.wait(server.queue(prompt))
    assert_success(first, server)
    assert first["outputs"]["1"]["text"][0].startswith("2 images")
    second = server.wait(server.queue(prompt))
    assert "1" in cached_nodes(second)
    draw_subject_image((48, 48), seed=9).save(folder / "new.png")
    third = server.wait(server.queue(prompt))
    assert_success(third, server)
    assert "1" not in cached_nodes(third) and third["outputs"]["1"]["text"][0].startswith("3 images")


@pytest.mark.newest_only
def test_dataset_from_images_writes_the_images_and_captions(server, object_info):
    inputs = {**widget_defaults(object_info, "DreamBoothDatasetFromImages"), "name": "from images",
              "captions": "first caption\n\nthird caption"}
    prompt = {"1": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 48, "batch_size": 3,
                                                           "color": 0xFF0000}},
              "2": {"class_type": "DreamBoothDatasetFromImages", "inputs": {**inputs, "images": ["1", 0]}},
              "3": {"class_type": "PreviewImage", "inputs": {"images": ["2", 1]}}}
    entry = server.wait(server.queue(prompt))
    assert_success(entry, server)
    [folder] = (server.output_dir / "dreambooth_lora" / "datasets").glob("from_images_*")  # + a hash of the images
    assert sorted(p.name for p in folder.iterdir()) == ["image_0000.png", "image_0000.txt", "image_0001.png",
                                                         "image_0002.png", "image_0002.txt"]
    assert (folder / "image_0002.txt").read_text() == "third caption"
    assert Image.open(folder / "image_0001.png").size == (64, 48)
    assert entry["outputs"]["2"]["text"][0].startswith("3 images (2 captioned)")


@pytest.mark.newest_only
def test_dataset_from_images_learns_what_was_painted_in_load_images_mask_editor(server, object_info):
    # The mask editor saves the painted area as transparent; Load Image's MASK is 1 there: that part is learnt.
    rgba = np.zeros((32, 48, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 255
    rgba[:, :20, 3] = 0  # painted: the left 20 columns
    Image.fromarray(rgba, "RGBA").save(server.input_dir / "painted.png")
    inputs = {**widget_defaults(object_info, "DreamBoothDatasetFromImages"), "name": "painted"}
    prompt = {"1": {"class_type": "LoadImage", "inputs": {"image": "painted.png"}},
              "2": {"class_type": "DreamBoothDatasetFromImages",
                    "inputs": {**inputs, "images": ["1", 0], "masks": ["1", 1]}},
              "3": {"class_type": "PreviewImage", "inputs": {"images": ["2", 1]}}}
    entry = server.wait(server.queue(prompt))
    assert_success(entry, server)
    [folder] = (server.output_dir / "dreambooth_lora" / "datasets").glob("painted_*")
    mask = np.asarray(Image.open(folder / "image_0000_mask.png"))
    assert mask.shape == (32, 48) and (mask[:, :20] == 255).all() and (mask[:, 20:] == 0).all()
    assert entry["outputs"]["2"]["text"][0].startswith("1 image (0 captioned, 1 masked)")


@pytest.mark.newest_only
def test_an_unsupported_checkpoint_is_refused_by_the_base_model_node(server, object_info):
    import torch
    from safetensors.torch import save_file

    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 320)},
              str(server.models_dir / "checkpoints" / "some_lora.safetensors"))
    prompt = only_ancestors(sd15_prompt(object_info, "unsupported", steps=1), TRAIN)
    prompt[BASE]["inputs"]["model"] = "some_lora.safetensors"
    entry = server.wait(server.queue(prompt))
    error = execution_error(entry)
    assert error is not None and error["node_type"] == "DreamBoothBaseModel"
    assert "some_lora.safetensors" in error["exception_message"] and "LoRA" in error["exception_message"]


def test_sample_refuses_a_lora_that_fits_none_of_the_models_layers(server, object_info):
    # ComfyUI only logs such keys as "not loaded" and samples the plain base model: a LoRA that seems to do nothing
    import torch
    from safetensors.torch import save_file

    key = "lora_te2_text_model_encoder_layers_0_self_attn_q_proj"  # SDXL's second text encoder; SD1.5 has none
    save_file({f"{key}.lora_down.weight": torch.randn(4, 1280), f"{key}.lora_up.weight": torch.randn(1280, 4),
               f"{key}.alpha": torch.tensor(4.0)}, str(server.models_dir / "loras" / "sdxl_only.safetensors"))
    base = sd15_prompt(object_info, "mismatch", steps=1)
    sample = {k: v for k, v in base[SAMPLE]["inputs"].items() if k != "lora"}
    prompt = {"1": base[BASE], "2": {"class_type": "DreamBoothSample",
                                     "inputs": {**sample, "base_model": ["1", 0], "lora_name": "sdxl_only.safetensors"}},
              "3": {"class_type": "PreviewImage", "inputs": {"images": ["2", 0]}}}
    error = execution_error(server.wait(server.queue(prompt)))
    assert error is not None and error["node_type"] == "DreamBoothSample"
    assert "sdxl_only.safetensors" in error["exception_message"] and "none of its weights fit" in error["exception_message"]


def test_sample_samples_as_the_base_model_node_says_the_model_predicts(server, object_info):
    # a v-prediction model whose checkpoint has no `v_pred` key: trained as v_prediction, it was sampled as epsilon
    base = sd15_prompt(object_info, "prediction", steps=1)
    sample = {k: v for k, v in base[SAMPLE]["inputs"].items() if k != "lora"}
    images = {}
    for prediction in ("epsilon", "v_prediction"):
        prompt = {"1": {**base[BASE], "inputs": {**base[BASE]["inputs"], "prediction_type": prediction}},
                  "2": {"class_type": "DreamBoothSample", "inputs": {**sample, "base_model": ["1", 0], "lora_name": "[none]"}},
                  "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": f"pred_{prediction}"}}}
        entry = server.wait(server.queue(prompt))
        assert_success(entry, server)
        images[prediction] = saved_image(server, entry, "3")
    assert np.abs(images["epsilon"] - images["v_prediction"]).mean() > 0.5


@pytest.mark.newest_only
def test_dataset_folders_outside_the_input_folder_are_refused(server, object_info):
    prompt = only_ancestors(sd15_prompt(object_info, "outside", steps=1), TRAIN)
    for folder in ("../models", "/etc", "my_dog/../../models"):
        prompt[DATASET]["inputs"]["folder"] = folder
        with pytest.raises(Exception, match="value_not_in_list|not in"):
            server.queue(prompt)


@pytest.mark.newest_only
def test_the_prior_preservation_workflow_generates_class_images_once(server, object_info):
    prompt = only_ancestors(sd15_prompt(object_info, "prior_dog", workflow="SD1.5 LoRA with prior preservation.json",
                                        steps=2, sample_at_end=False, num_class_images=2, class_sample_steps=2,
                                        train_text_encoder=False), TRAIN)
    assert prompt[TRAIN]["inputs"]["with_prior_preservation"] is True
    entry = server.wait(server.queue(prompt), timeout=900)
    assert_success(entry, server)
    [class_dir] = (server.output_dir / "dreambooth_lora" / "class_images").glob("small_sd15_a_photo_of_dog_*")
    assert len(list(class_dir.glob("*.png"))) == 2
    from safetensors import safe_open

    with safe_open(str(server.models_dir / "loras" / "prior_dog.safetensors"), "pt") as f:
        assert float(f.metadata()["ss_prior_loss_weight"]) == 1.0


@pytest.mark.newest_only
def test_the_workflows_are_offered_as_the_packs_templates(server):
    templates = server.get("/workflow_templates")
    assert sorted(templates["comfyui-dreambooth-lora"]) == sorted(p.stem for p in WORKFLOWS.glob("*.json"))


@pytest.mark.slow
def test_the_sdxl_workflow_trains_an_sdxl_family_lora_that_load_lora_applies(server, object_info, small_sdxl):
    """Slow (minutes, ~10 GB of RAM): the SDXL workflow on an SDXL-family checkpoint ComfyUI detects as Segmind Vega."""
    _link(small_sdxl, server.models_dir / "checkpoints" / "small_sdxl.safetensors")
    prompt = sd15_prompt(object_info, "sdxl_dog", workflow="SDXL LoRA from your photos.json", steps=3,
                         checkpoint="small_sdxl.safetensors", sample_steps=2, train_text_encoder=False)
    assert prompt[SETTINGS]["inputs"]["memory_preset"] == "12 GB"
    log_before = len(server.log())
    entry = server.wait(server.queue(prompt), timeout=1800)
    assert_success(entry, server)
    assert "(sdxl)" in entry["outputs"][BASE]["text"][0]
    lora = server.models_dir / "loras" / "sdxl_dog.safetensors"
    from safetensors import safe_open

    with safe_open(str(lora), "pt") as f:
        assert f.metadata()["ss_base_model_version"] == "sdxl_base_v1-0"
        assert any(k.startswith("lora_unet_") for k in f.keys())
    log = server.log()[log_before:]
    assert "Requested to load SDXL" in log  # ComfyUI runs it as an SDXL-family model
    assert not any(text in log for text in NOT_LOADED)
    with_lora = saved_image(server, entry, SAVE)
    without = json.loads(json.dumps(prompt))
    without[LORA_LOADER]["inputs"].update(strength_model=0.0, strength_clip=0.0)
    entry2 = server.wait(server.queue(without), timeout=1800)
    assert_success(entry2, server)
    assert np.abs(with_lora - saved_image(server, entry2, SAVE)).mean() > 0.5
