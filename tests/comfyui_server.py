"""A real ComfyUI server for the tests: headless, on the CPU, on 127.0.0.1, offline.

`ComfyUIServer(base_dir).start()` runs ComfyUI's own `main.py` (the source from
`comfyui_source.py`) with a temporary `--base-directory` that holds `custom_nodes/` with
this pack linked in, `models/`, `input/` and `output/`; an in-memory database; and an
empty front-end root, so nothing is fetched, or with `frontend_root=frontend_static_dir()`
the real frontend (`comfyui-frontend-package`). `stop()` ends it. Also a helper to turn a
UI-format workflow into the API format from the live `/object_info`.

    with ComfyUIServer(tmp_path) as server:
        info = server.object_info()
        prompt_id = server.queue(api_prompt)
        entry = server.wait(prompt_id)
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
PACK_LINK_NAME = "comfyui-dreambooth-lora"
# Nodes that live only in the front end (no class on the server): dropped from API prompts.
FRONTEND_ONLY_NODES = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode", "Label (rgthree)"}
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}


def frontend_static_dir() -> Path | None:
    """The real frontend's files from the installed `comfyui-frontend-package`, or None when it is not installed."""
    try:
        import comfyui_frontend_package
    except ImportError:
        return None
    static = Path(comfyui_frontend_package.__file__).parent / "static"
    return static if (static / "index.html").is_file() else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerError(RuntimeError):
    pass


class ComfyUIServer:
    def __init__(self, base_dir: Path, *, port: int | None = None, extra_args: tuple[str, ...] = (),
                 env: dict[str, str] | None = None, startup_timeout: float = 180.0,
                 frontend_root: Path | None = None):
        from comfyui_source import comfyui_dir

        self.comfyui = comfyui_dir()
        self.base = Path(base_dir)
        self.port = port or free_port()
        self.extra_args = extra_args
        self.env = env
        self.startup_timeout = startup_timeout
        self.frontend_root = Path(frontend_root) if frontend_root else self.base / "frontend"
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = self.base / "comfyui.log"
        self.client_id = uuid.uuid4().hex
        self._process: subprocess.Popen | None = None
        self._log = None

    # --- folders -------------------------------------------------------------------------------
    @property
    def input_dir(self) -> Path:
        return self.base / "input"

    @property
    def output_dir(self) -> Path:
        return self.base / "output"

    @property
    def temp_dir(self) -> Path:
        """Where "temp" images (previews) go: ComfyUI puts them into a `temp/` inside --temp-directory."""
        return self.base / "temp" / "temp"

    @property
    def models_dir(self) -> Path:
        return self.base / "models"

    def prepare(self) -> None:
        """The base directory: custom_nodes with the pack linked, models/, input/, output/, a front-end root."""
        for sub in ("custom_nodes", "input", "output", "models/checkpoints", "models/loras", "models/diffusers",
                    "user", "temp", "frontend"):
            (self.base / sub).mkdir(parents=True, exist_ok=True)
        link = self.base / "custom_nodes" / PACK_LINK_NAME
        if not link.exists():
            try:
                link.symlink_to(REPO, target_is_directory=True)
            except OSError:  # no symlinks (Windows without developer mode): a copy of the package files
                shutil.copytree(REPO, link, ignore=shutil.ignore_patterns(".venv", ".cache", ".git", "*.pyc",
                                                                          "__pycache__", "demo_output"))
        index = self.base / "frontend" / "index.html"
        if not index.exists():
            index.write_text("<!doctype html><title>ComfyUI (tests: no front end)</title>", encoding="utf-8")

    # --- lifecycle -----------------------------------------------------------------------------
    def start(self) -> "ComfyUIServer":
        self.prepare()
        env = dict(os.environ if self.env is None else self.env)
        env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1", DO_NOT_TRACK="1")
        command = [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
                   "--disable-auto-launch", "--base-directory", str(self.base),
                   "--database-url", "sqlite:///:memory:", "--front-end-root", str(self.frontend_root),
                   "--temp-directory", str(self.base / "temp"), *self.extra_args]
        self._log = open(self.log_path, "ab")
        kwargs: dict[str, Any] = {"start_new_session": True} if os.name != "nt" else {}
        self._process = subprocess.Popen(command, cwd=self.comfyui, stdout=self._log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, env=env, **kwargs)
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise ServerError(f"ComfyUI exited with code {self._process.returncode} while starting:\n"
                                  + self.log_tail())
            try:
                self.get("/system_stats", timeout=2)
                return self
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                time.sleep(0.3)
        self.stop()
        raise ServerError(f"ComfyUI did not answer within {self.startup_timeout:.0f}s:\n" + self.log_tail())

    def stop(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.send_signal(signal.SIGINT if os.name != "nt" else signal.SIGTERM)
            try:  # it exits in about 3 s; one that a browser's connection keeps waiting is not worth 20 s
                self._process.wait(timeout=8)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait(timeout=20)
        if self._log is not None:
            self._log.close()
            self._log = None

    @property
    def alive(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def __enter__(self) -> "ComfyUIServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # --- the log -----------------------------------------------------------------------------
    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace") if self.log_path.exists() else ""

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log().splitlines()[-lines:])

    # --- HTTP --------------------------------------------------------------------------------
    def get(self, path: str, timeout: float = 30) -> Any:
        with urllib.request.urlopen(self.url + path, timeout=timeout) as response:
            return json.loads(response.read() or b"null")

    def post(self, path: str, data: Any | None = None, timeout: float = 30) -> Any:
        body = json.dumps(data if data is not None else {}).encode("utf-8")
        request = urllib.request.Request(self.url + path, data=body, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                text = response.read()
        except urllib.error.HTTPError as e:
            raise ServerError(f"POST {path}: HTTP {e.code}: {e.read().decode('utf-8', 'replace')}") from None
        try:
            return json.loads(text or b"null")
        except json.JSONDecodeError:
            return text.decode("utf-8", "replace")

    def object_info(self) -> dict[str, Any]:
        return self.get("/object_info", timeout=120)

    def queue(self, prompt: dict[str, Any]) -> str:
        """Queue an API-format prompt; its id. Validation errors raise ServerError with ComfyUI's answer."""
        answer = self.post("/prompt", {"prompt": prompt, "client_id": self.client_id})
        if not isinstance(answer, dict) or "prompt_id" not in answer:
            raise ServerError(f"prompt refused: {answer}")
        return answer["prompt_id"]

    def history(self, prompt_id: str) -> dict[str, Any] | None:
        return self.get(f"/history/{prompt_id}").get(prompt_id)

    def wait(self, prompt_id: str, timeout: float = 900) -> dict[str, Any]:
        """The history entry once the prompt has finished (successfully or not)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            entry = self.history(prompt_id)
            if entry and entry.get("status", {}).get("completed") is not None and \
                    entry["status"].get("status_str") in ("success", "error"):
                return entry
            if not self.alive:
                raise ServerError("ComfyUI died while running the prompt:\n" + self.log_tail())
            time.sleep(0.5)
        raise ServerError(f"prompt {prompt_id} did not finish within {timeout:.0f}s:\n" + self.log_tail())

    def listen(self) -> "WebSocketListener":
        """Collect what the server sends this client over /ws (progress, text, previews) until closed."""
        return WebSocketListener(f"ws://127.0.0.1:{self.port}/ws?clientId={self.client_id}").start()

    def interrupt(self, prompt_id: str | None = None) -> None:
        """Cancel what runs now; with `prompt_id`, only when that prompt is the one running."""
        self.post("/interrupt", {"prompt_id": prompt_id} if prompt_id else {})

    def running_prompt(self) -> str | None:
        """The id of the prompt being executed, or None."""
        running = self.get("/queue").get("queue_running") or []
        return running[0][1] if running else None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def running(self) -> bool:
        queue = self.get("/queue")
        return bool(queue.get("queue_running"))


class WebSocketListener:
    """A /ws client in a thread: `messages` holds JSON messages, `binary` (event type, payload) pairs."""

    TEXT, PREVIEW_IMAGE = 3, 1

    def __init__(self, url: str):
        import threading

        self.url = url
        self.messages: list[dict[str, Any]] = []
        self.binary: list[tuple[int, bytes]] = []
        self._connected = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> "WebSocketListener":
        self._thread.start()
        if not self._connected.wait(30):
            raise ServerError(f"could not connect to {self.url}")
        return self

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def texts(self, node_id: str) -> list[str]:
        """The progress texts sent for a node."""
        out = []
        for kind, payload in self.binary:
            if kind == self.TEXT:
                size = int.from_bytes(payload[:4], "big")
                if payload[4:4 + size].decode() == node_id:
                    out.append(payload[4 + size:].decode("utf-8", "replace"))
        return out

    def _run(self) -> None:
        import asyncio

        import aiohttp

        async def main() -> None:
            async with aiohttp.ClientSession() as session:
                async with session.ws_connect(self.url) as ws:
                    self._connected.set()
                    while not self._stop.is_set():
                        try:
                            msg = await ws.receive(timeout=0.2)
                        except asyncio.TimeoutError:
                            continue
                        if msg.type == aiohttp.WSMsgType.TEXT:
                            self.messages.append(json.loads(msg.data))
                        elif msg.type == aiohttp.WSMsgType.BINARY:
                            self.binary.append((int.from_bytes(msg.data[:4], "big"), bytes(msg.data[4:])))
                        elif msg.type in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR):
                            return

        asyncio.run(main())


# --- workflows --------------------------------------------------------------------------------------

def status_messages(entry: dict[str, Any]) -> list[tuple[str, dict]]:
    return [(kind, data) for kind, data in entry.get("status", {}).get("messages", [])]


def execution_error(entry: dict[str, Any]) -> dict[str, Any] | None:
    for kind, data in status_messages(entry):
        if kind == "execution_error":
            return data
    return None


def _input_spec(info: dict[str, Any], name: str) -> tuple[Any, dict[str, Any]]:
    for group in ("required", "optional"):
        spec = info["input"].get(group, {}).get(name)
        if spec is not None:
            options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
            return spec[0], options
    raise KeyError(name)


def is_widget(input_type: Any, options: dict[str, Any]) -> bool:
    if options.get("forceInput"):
        return False
    return isinstance(input_type, list) or input_type in WIDGET_TYPES


def widget_names(info: dict[str, Any]) -> list[tuple[str, bool]]:
    """(name, has a control_after_generate value) of a node's widgets, in widgets_values order."""
    order = info.get("input_order") or {g: list(info["input"].get(g, {})) for g in ("required", "optional")}
    names = []
    for group in ("required", "optional"):
        for name in order.get(group, []):
            input_type, options = _input_spec(info, name)
            if is_widget(input_type, options):
                names.append((name, bool(options.get("control_after_generate"))))
    return names


def workflow_to_api(workflow: dict[str, Any], object_info: dict[str, Any]) -> dict[str, Any]:
    """A UI-format workflow (nodes, links, positional widgets_values) as an API-format prompt.

    Widget values are matched to input names through the live `/object_info` (input order,
    and the extra value a `control_after_generate` widget stores); links become
    `[source node id, output slot]`. Front-end-only nodes (notes) and muted or bypassed
    nodes are left out. Raises ValueError when the workflow does not fit the server's nodes.
    """
    links = {link[0]: link for link in workflow.get("links", [])}
    prompt: dict[str, Any] = {}
    for node in workflow["nodes"]:
        class_type = node["type"]
        if class_type in FRONTEND_ONLY_NODES or node.get("mode", 0) in (2, 4):
            continue
        if class_type not in object_info:
            raise ValueError(f"node {node['id']}: {class_type} is not a node of this ComfyUI (is its pack installed?)")
        info = object_info[class_type]
        values = node.get("widgets_values") or []
        if isinstance(values, dict):
            raise ValueError(f"node {node['id']}: dict widgets_values are not supported")
        inputs: dict[str, Any] = {}
        position = 0
        for name, has_control in widget_names(info):
            if position >= len(values):
                raise ValueError(f"node {node['id']} ({class_type}): widgets_values has {len(values)} values, "
                                 f"but the node's widgets need more (at {name!r})")
            inputs[name] = values[position]
            position += 2 if has_control else 1
        if position != len(values):
            raise ValueError(f"node {node['id']} ({class_type}): widgets_values has {len(values)} values, the "
                             f"node's widgets use {position}")
        for slot in node.get("inputs", []) or []:
            link_id = slot.get("link")
            if link_id is None:
                continue
            link = links[link_id]
            inputs[slot["name"]] = [str(link[1]), link[2]]
        prompt[str(node["id"])] = {"class_type": class_type, "inputs": inputs}
    # links from dropped front-end-only nodes cannot be followed
    for node_id, node in prompt.items():
        for name, value in node["inputs"].items():
            if isinstance(value, list) and len(value) == 2 and value[0] not in prompt:
                raise ValueError(f"node {node_id}: input {name} comes from node {value[0]}, which is not executable")
    return prompt


# --- a checkpoint ComfyUI recognises as SD1.5, small enough for CPU tests -------------------------------

SMALL_SD15_VERSION = 2


def write_small_sd15_checkpoint(path: Path, seed: int = 0) -> Path:
    """A single-file SD1.5-layout checkpoint ComfyUI detects as SD1.5 (about 600 MiB in fp16).

    ComfyUI recognises SD1.5 by 320 base channels and 768-wide cross-attention; the UNet is
    cut down to two levels (320, 640) with one res block and one transformer each. The text
    encoder is CLIP-L's full shape (12 layers): ComfyUI always builds 12 and leaves the ones
    a file lacks uninitialised, which makes every prompt embedding NaN and every image
    black. The VAE has SD's own shape (ComfyUI assumes it). Our trainer reads the file as a
    pruned SD1.x (BK-SDM-like). Keys are converted with ComfyUI's own converters
    (`ldm_checkpoints`), so ComfyUI's source must be on sys.path.
    """
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from ldm_checkpoints import ldm_checkpoint, write_checkpoint

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(sample_size=8, cross_attention_dim=768, attention_head_dim=8, layers_per_block=1,
                                block_out_channels=(320, 640),
                                down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))
    vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        sample_size=64)
    text_encoder = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                                num_attention_heads=12, vocab_size=49408, max_position_embeddings=77,
                                                hidden_act="quick_gelu"))
    checkpoint = ldm_checkpoint({"unet": unet, "vae": vae, "text_encoder": text_encoder}, "sd1")
    checkpoint = {k: v.half() if v.is_floating_point() else v for k, v in checkpoint.items()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.safetensors")
    write_checkpoint(checkpoint, tmp)
    os.replace(tmp, path)
    return path


def truncate_copy(source: Path, target: Path, keep_bytes: int = 1 << 20) -> Path:
    """A copy of a safetensors file with its header intact and its data cut short (a broken download)."""
    with open(source, "rb") as f:
        header_size = int.from_bytes(f.read(8), "little")
        f.seek(0)
        data = f.read(8 + header_size + keep_bytes)
    Path(target).write_bytes(data)
    return Path(target)


SMALL_SDXL_VERSION = 1


def write_small_sdxl_checkpoint(path: Path, seed: int = 0) -> Path:
    """A single-file SDXL-layout checkpoint ComfyUI detects as SDXL-family (Segmind Vega), about 2 GiB in fp16.

    ComfyUI recognises the SDXL family by 320 base channels, 2048-wide cross-attention,
    2816 `adm_in_channels` and a known transformer depth; Segmind Vega's ([0, 0, 1, 1, 2, 2],
    no attention in the middle block) is the smallest. Its levels are kept at 320 channels
    (ComfyUI reads the channel multipliers from the weights). Both text encoders have their
    full shapes (CLIP-L, OpenCLIP bigG): ComfyUI leaves layers a file lacks uninitialised.
    """
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from ldm_checkpoints import ldm_checkpoint, write_checkpoint

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8, block_out_channels=(320, 320, 320), layers_per_block=2, attention_head_dim=5,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 1, 2), mid_block_type="UNetMidBlock2D", cross_attention_dim=2048,
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816)
    vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        sample_size=64, scaling_factor=0.13025)
    clip_l = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                          num_attention_heads=12, vocab_size=49408, max_position_embeddings=77,
                                          hidden_act="quick_gelu"))
    clip_g = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                                                        num_attention_heads=20, vocab_size=49408,
                                                        max_position_embeddings=77, hidden_act="gelu",
                                                        projection_dim=1280))
    parts = {"unet": unet, "vae": vae, "text_encoder": clip_l, "text_encoder_2": clip_g}
    checkpoint = ldm_checkpoint(parts, "sdxl")
    del parts, unet, vae, clip_l, clip_g
    checkpoint = {k: v.half() if v.is_floating_point() else v for k, v in checkpoint.items()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.safetensors")
    write_checkpoint(checkpoint, tmp)
    os.replace(tmp, path)
    return path
