"""One benchmark case in its own process: `python benchmarks/case.py SPEC.json RESULT.json`.

The spec names the trainer ("ours": `trainer.loop.train` as shipped, or "baseline": the
diffusers example in `baseline.py`), the model, resolution, steps and levers. The case runs
the trainer for real and writes what it measured: every step's `seconds_per_step` from the
events, the time from the call to the first step, peak RSS (the whole process, and sampled
during the steps), on a GPU peak allocated / reserved memory (while loading, which includes
making `make_class_images` more class images, while stepping, and with `sample` while the
end-of-run samples are made), the FLOPs of one training
step, and with `profile` the top ops of one steady-state step.

Levers (ours only) change one thing each, by monkeypatching the loop or by a config field,
so that the trainer code itself stays as it is:

  no_cache        cache_latents = "no": VAE and text encoders run every step
  bf16            mixed_precision = "bf16" (on the CPU: bf16 autocast, frozen weights in bf16)
  fp16            mixed_precision = "fp16" (GPU: fp16 autocast with loss scaling, frozen weights in fp16)
  fp32            mixed_precision = "no" (what 'auto' picks on a CPU without native bf16)
  channels_last   the UNet in channels-last memory format (the trainer's own layout on a GPU since 2026-11-26)
  no_channels_last  on a GPU: the UNet in the default (NCHW) layout again
  adamw_forloop   torch AdamW with foreach=False (the per-parameter loop)
  adamw_fused     torch AdamW with fused=True (also on the CPU)
  grad_ckpt       gradient_checkpointing = true
  no_sdpa         diffusers' classic AttnProcessor (explicit softmax(QK^T)V) instead of SDPA
  compile         compile_unet = true (torch.compile of the UNet, in place)
  cuda_graphs_yes cuda_graphs = "yes", also over a memory preset's "no" (the SDXL presets')
  loss_read_every_step  on a GPU: each step's loss read at the end of its own step, as before
                  2026-11-26 (the trainer reads it one step late there: trainer/loss_readout.py)
  no_cuda_graphs  cuda_graphs = "no" (the UNet eager; 'auto' replays its forward and backward as CUDA graphs
                  on a GPU since 2026-11-26)
  compile_cudagraphs  the UNet compiled with mode="reduce-overhead" (CUDA graphs replay the step's launches)
  cudnn_benchmark torch.backends.cudnn.benchmark = True (cuDNN times its convolution algorithms per shape)
  fp32_norms      the UNet's GroupNorm / LayerNorm computed in fp32, as CUDA autocast runs them (the
                  trainer computes them in bf16 since 2026-11-26: trainer/precision.py)
  peft_input_cast the UNet's LoRA layers cast their input to the fp32 LoRA weights again (peft's
                  default; the trainer turns it off since autocast casts straight back)
  load_bf16       with bf16 compute: read the frozen weights as bf16 straight from the files (no fp32 copy first)
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if __name__ == "__main__" and json.loads(Path(sys.argv[1]).read_text()).get("device") == "cpu":
    os.environ["CUDA_VISIBLE_DEVICES"] = ""  # a CPU case stays on the CPU on a machine with a GPU too

import torch  # noqa: E402

INSTANCE_PROMPT = "a photo of sks disc"
CLASS_PROMPT = "a photo of disc"
KNOWN_LEVERS = {"no_cache", "bf16", "fp16", "fp32", "cudnn_benchmark", "channels_last", "adamw_forloop", "adamw_fused", "grad_ckpt",
                "no_sdpa", "compile", "compile_cudagraphs", "no_cuda_graphs", "cuda_graphs_yes", "no_channels_last", "loss_read_every_step",
                "load_bf16", "peft_input_cast", "fp32_norms"}


class RssSampler(threading.Thread):
    """Peak resident set size (all of it, and its anonymous part) while loading and while stepping.

    Sampled every 20 ms from /proc/self/status. The anonymous part leaves out file pages
    mapped from the weight files (safetensors are memory-mapped while a model loads), which
    the kernel counts in the RSS but can drop at any time.
    """

    def __init__(self):
        super().__init__(daemon=True)
        self.phase = "load"
        self.peaks = {"load": [0, 0], "stepping": [0, 0]}  # phase -> [rss, anon] bytes
        self._halt = threading.Event()

    def sample(self):
        rss = anon = 0
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1]) * 1024
                elif line.startswith("RssAnon:"):
                    anon = int(line.split()[1]) * 1024
        peak = self.peaks[self.phase]
        peak[0], peak[1] = max(peak[0], rss), max(peak[1], anon)

    def run(self):
        while not self._halt.wait(0.02):
            self.sample()

    def stop(self):
        self._halt.set()


def busy_seconds() -> float:
    """CPU seconds all processes of the machine spent busy so far (from /proc/stat)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def ours_config(spec: dict, model_dir: Path, instance: Path, classes: Path, output: Path):
    from comfyui_dreambooth_lora.trainer.config import TrainConfig

    levers = set(spec.get("levers", []))
    mixed = next((m for m in ("bf16", "fp16") if m in levers), "no" if "fp32" in levers else "auto")
    values = dict(
        pretrained_model=str(model_dir), instance_dir=str(instance), instance_prompt=INSTANCE_PROMPT,
        with_prior_preservation=True, class_dir=str(classes), class_prompt=CLASS_PROMPT,
        num_class_images=spec["class_images"] + spec.get("make_class_images", 0), resolution=spec["resolution"], rank=4, alpha=4.0,
        lora_targets="attention", batch_size=1, max_train_steps=spec["steps"], learning_rate=1e-4,
        mixed_precision=mixed, cache_latents="no" if "no_cache" in levers else "auto",
        gradient_checkpointing="grad_ckpt" in levers, compile_unet="compile" in levers, checkpoint_every=0,
        cuda_graphs="no" if "no_cuda_graphs" in levers or "compile_cudagraphs" in levers else "auto",
        sample_at_end=bool(spec.get("sample")), sample_steps=4, class_sample_steps=4,
        output_dir=str(output), output_name="bench", overwrite=True, seed=0,
    )
    if spec.get("preset"):  # what the Train node's memory preset sets for this architecture
        from comfyui_dreambooth_lora.nodes.config_build import MEMORY_PRESETS

        values.update(MEMORY_PRESETS[spec["preset"]]["sdxl" if "sdxl" in spec["model"] else "sd1"])
    if "cuda_graphs_yes" in levers:  # after the preset, which turns them off for SDXL
        values["cuda_graphs"] = "yes"
    return TrainConfig(**values)


def apply_levers(levers: set[str]) -> None:
    """Monkeypatch the loop for the levers that are not config fields."""
    from comfyui_dreambooth_lora.trainer import loop

    place, build = loop.place_models, loop.build_optimizer

    def place_models(base, device, weight_dtype, **kwargs):
        place(base, device, weight_dtype, **kwargs)
        if "no_sdpa" in levers:
            from diffusers.models.attention_processor import AttnProcessor
            base.unet.set_attn_processor(AttnProcessor())
        if "channels_last" in levers:
            base.unet.to(memory_format=torch.channels_last)
        if "no_channels_last" in levers:
            base.unet.to(memory_format=torch.contiguous_format)
        if "fp32_norms" in levers:
            from comfyui_dreambooth_lora.trainer import precision
            plain = {precision.GroupNormInInputDtype: torch.nn.GroupNorm, precision.LayerNormInInputDtype: torch.nn.LayerNorm}
            for module in base.unet.modules():
                module.__class__ = plain.get(type(module), type(module))
        if "peft_input_cast" in levers:
            for module in base.unet.modules():
                if hasattr(module, "cast_input_dtype_enabled"):
                    module.cast_input_dtype_enabled = True
        if "compile_cudagraphs" in levers:
            base.unet.compile(mode="reduce-overhead")

    def build_optimizer(config, param_groups, device):
        if "adamw_forloop" in levers or "adamw_fused" in levers:
            fused = "adamw_fused" in levers
            return torch.optim.AdamW(param_groups, betas=(config.adam_beta1, config.adam_beta2),
                                     eps=config.adam_epsilon, weight_decay=config.weight_decay,
                                     foreach=False, fused=fused or None)
        return build(config, param_groups, device)

    loop.place_models = place_models
    loop.build_optimizer = build_optimizer
    if "loss_read_every_step" in levers:
        loop.read_loss_late = lambda device: False
    if "cudnn_benchmark" in levers:
        torch.backends.cudnn.benchmark = True
    if "load_bf16" in levers:
        load_frozen_weights_as(torch.bfloat16)


def load_frozen_weights_as(dtype) -> None:
    """Make diffusers' and transformers' from_pretrained read the weights in `dtype` (what models.py could ask)."""
    from diffusers import ModelMixin
    from transformers import PreTrainedModel

    diffusers_load = ModelMixin.from_pretrained.__func__
    transformers_load = PreTrainedModel.from_pretrained.__func__

    def load_diffusers(cls, *args, **kwargs):
        return diffusers_load(cls, *args, **{**kwargs, "torch_dtype": dtype})

    def load_transformers(cls, *args, **kwargs):
        return transformers_load(cls, *args, **{**kwargs, "dtype": dtype})

    ModelMixin.from_pretrained = classmethod(load_diffusers)
    PreTrainedModel.from_pretrained = classmethod(load_transformers)


class StepFlops:
    """Remembers the UNet and the inputs of the first training step, to count one step's FLOPs afterwards."""

    def __init__(self):
        self.captured = None

    def wrap(self, diffusion_loss):
        def wrapped(unet, noise_scheduler, latents, embeds, added, *args, **kwargs):
            if self.captured is None:
                self.captured = (unet, latents.detach(), embeds.detach(), added)
            return diffusion_loss(unet, noise_scheduler, latents, embeds, added, *args, **kwargs)
        return wrapped

    def count(self) -> int | None:
        """FLOPs of one UNet forward + backward at the captured shapes.

        On the CPU attention runs through the math kernel here, because the counter has no
        formula for the CPU flash kernel; on CUDA it counts the flash / efficient / cuDNN
        kernels themselves (the math kernel would keep fp32 attention matrices: ~24 GB for SDXL).
        """
        from torch.nn.attention import SDPBackend, sdpa_kernel
        from torch.utils.flop_counter import FlopCounterMode

        if self.captured is None:
            return None
        counter = FlopCounterMode(display=False)
        on_cpu = self.captured[1].device.type == "cpu"
        self._forward_backward(sdpa_kernel(SDPBackend.MATH) if on_cpu else contextlib.nullcontext(), counter)
        return int(counter.get_total_flops())

    def count_ops(self) -> int | None:
        """Ops dispatched to kernels (below autograd and autocast: backward ops and casts
        included) in one UNet forward + backward: on a GPU, the host's work per step."""
        from torch.utils._python_dispatch import TorchDispatchMode

        class Count(TorchDispatchMode):
            ops = 0

            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                self.ops += 1
                return func(*args, **(kwargs or {}))

        if self.captured is None:
            return None
        counter = Count()
        self._forward_backward(counter)
        return counter.ops

    def _forward_backward(self, *contexts) -> None:
        """One UNet forward + backward at the captured shapes, in the training precision, under `contexts`."""
        unet, latents, embeds, added = self.captured
        unet = getattr(unet, "unet", unet)  # the UNet itself where the loss called cuda_graphs' GraphedUNet
        unet = getattr(unet, "_orig_mod", unet)
        timesteps = torch.randint(0, 1000, (latents.shape[0],), device=latents.device)
        with contextlib.ExitStack() as stack:
            for context in contexts:
                stack.enter_context(context)
            stack.enter_context(torch.autocast(latents.device.type, dtype=latents.dtype,
                                               enabled=latents.dtype != torch.float32))
            out = unet(torch.randn_like(latents), timesteps, embeds, added_cond_kwargs=added).sample
            out.float().pow(2).mean().backward()
        unet.zero_grad(set_to_none=True)


def profile_listener(output: Path, at_step: int, events_log: list):
    """Profile from the step event of `at_step` to the next one: one steady-state step's work.

    Where the trainer reads each loss one step late (on a GPU: trainer/loss_readout.py), a step's
    event comes after the next step is queued, so the window holds the queueing and the GPU work of
    step `at_step + 2` (the profiler waits for the GPU when it stops), and must not end at the
    last step, whose event follows the one before it at once.
    """
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    state = {"prof": None}

    def listener(event):
        if event.get("event") != "step":
            return
        if event["step"] == at_step:
            state["prof"] = profile(activities=activities, record_shapes=False)
            state["prof"].__enter__()
        elif event["step"] == at_step + 1 and state["prof"] is not None:
            prof = state["prof"]
            prof.__exit__(None, None, None)
            averages = prof.key_averages()
            sort = "self_device_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
            (output / "profile.txt").write_text(averages.table(sort_by=sort, row_limit=40), encoding="utf-8")
            rows = []
            for a in averages:
                rows.append({"name": a.key, "count": a.count, "self_cpu_ms": a.self_cpu_time_total / 1e3,
                             "cpu_total_ms": a.cpu_time_total / 1e3,
                             "self_device_ms": getattr(a, "self_device_time_total", 0) / 1e3})
            events_log.append({"event": "profile", "rows": rows, "step_seconds": event["seconds_per_step"]})
    return listener


def annotate_phases() -> None:
    """record_function labels around the parts of a step (for the profile only; both trainers alike)."""
    from accelerate import Accelerator
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from torch.profiler import record_function
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    def label(cls, attr, name):
        original = getattr(cls, attr)

        def wrapped(*args, **kwargs):
            with record_function(name):
                return original(*args, **kwargs)
        setattr(cls, attr, wrapped)

    label(AutoencoderKL, "encode", "## vae.encode")
    label(CLIPTextModel, "forward", "## text_encoder")
    label(CLIPTextModelWithProjection, "forward", "## text_encoder_2")
    label(UNet2DConditionModel, "forward", "## unet.forward")
    label(Accelerator, "backward", "## backward")
    label(Accelerator, "clip_grad_norm_", "## clip_grad_norm")


def run(spec: dict) -> dict:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from models import ensure_images, ensure_model

    from comfyui_dreambooth_lora.trainer.events import EventWriter

    levers = set(spec.get("levers", []))
    unknown = levers - KNOWN_LEVERS
    if unknown:
        raise SystemExit(f"unknown levers: {sorted(unknown)}")
    cache = Path(spec["cache"])
    model_dir = ensure_model(spec["model"], cache)
    instance, classes = ensure_images(cache, spec["image_size"], spec["instance_images"], spec["class_images"],
                                      photos=spec.get("photos", False))
    workdir = Path(tempfile.mkdtemp(prefix="bench_", dir=spec.get("tmp")))
    if spec.get("make_class_images"):  # generated in a copy, so that the cached folder keeps its count
        classes = Path(shutil.copytree(classes, workdir / "classes"))
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()

    log: list[dict] = []
    events = EventWriter(workdir / "events.jsonl")
    events.listeners.append(log.append)
    if spec.get("profile"):
        annotate_phases()
        profiled = spec.get("profile_step", spec["warmup"] + 2)  # bench.steady_steps leaves it out
        events.listeners.append(profile_listener(Path(spec["result_dir"]), profiled - 1, log))
    sampler = RssSampler()
    sampler.start()

    cpu_marks: list[float] = []
    gpu_load_peak = [0, 0]  # allocated, reserved bytes before the first step
    gpu_step_peak = [0, 0]  # ... from the first step to the last (then the LoRA is written and sampled)
    machine_marks: list[tuple[float, float, float]] = []  # (wall, machine busy, own CPU) at start and last step

    def watch(event):  # process CPU time (all threads) at the start and at the end of every step
        if event.get("event") in ("start", "step"):
            cpu_marks.append(time.process_time())
            machine_marks[1:] = []
            machine_marks.append((time.perf_counter(), busy_seconds(), cpu_marks[-1]))
        if event.get("event") == "start":
            sampler.sample()
            sampler.phase = "stepping"
            if cuda:  # the peak while loading (all models on the GPU, latents being cached) apart
                gpu_load_peak[:] = [torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()]
                torch.cuda.reset_peak_memory_stats()
        if cuda and event.get("event") == "step" and event["step"] == event["total_steps"]:
            gpu_step_peak[:] = [torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()]
            torch.cuda.reset_peak_memory_stats()
    events.listeners.append(watch)

    # The libraries are imported before the clock starts (for both trainers alike): the time to the
    # first step is loading the model, setting up and the first step itself.
    import accelerate, diffusers, peft, transformers  # noqa: E401, F401
    from diffusers import AutoencoderKL, UNet2DConditionModel  # noqa: F401
    from transformers import CLIPTextModel, CLIPTokenizer  # noqa: F401

    flops = StepFlops()
    called = time.time()
    if spec["trainer"] == "ours":
        from comfyui_dreambooth_lora.trainer import loop
        apply_levers(levers)
        loop.diffusion_loss = flops.wrap(loop.diffusion_loss)
        config = ours_config(spec, model_dir, instance, classes, workdir / "run")
        samples_per_step = 2 * config.batch_size * config.gradient_accumulation_steps  # instance + class
        loop.train(config, events)
    else:
        from baseline import BaselineArgs, train
        if levers - {"bf16", "fp32"}:
            raise SystemExit("the baseline takes no levers but bf16 / fp32")
        mixed = "bf16" if "bf16" in levers else "no" if "fp32" in levers else "auto"
        samples_per_step = 2
        train(BaselineArgs(pretrained_model=str(model_dir), instance_dir=str(instance), class_dir=str(classes),
                           instance_prompt=INSTANCE_PROMPT, class_prompt=CLASS_PROMPT,
                           resolution=spec["resolution"], max_train_steps=spec["steps"],
                           num_class_images=spec["class_images"], mixed_precision=mixed), events)
    sampler.stop()
    shutil.rmtree(workdir, ignore_errors=True)  # the LoRA and checkpoint it wrote

    steps = [e for e in log if e.get("event") == "step"]
    (w0, b0, c0), (w1, b1, c1) = machine_marks[0], machine_marks[-1]
    # Cores kept busy by other processes while this case stepped: the benchmark's figures are only
    # comparable when this is near 0 (the machine may be shared with other jobs).
    other_cores = max(0.0, ((b1 - b0) - (c1 - c0)) / (w1 - w0)) if w1 > w0 else None
    start = next(e for e in log if e.get("event") == "start")
    result = {
        "spec": spec,
        "seconds_per_step": [e["seconds_per_step"] for e in steps],
        # CPU seconds of the process per step (from one step event to the next): about threads x wall
        # time when the threads keep busy; much more than the wall time's share shows spinning threads.
        "cpu_seconds_per_step": [b - a for a, b in zip(cpu_marks, cpu_marks[1:])],
        "losses": [e["loss"] for e in steps],
        "samples_per_step": samples_per_step,
        "load_seconds": start["time"] - called,
        "first_step_seconds": steps[0]["time"] - called if steps else None,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "train_rss_bytes": sampler.peaks["stepping"][0],
        "train_anon_bytes": sampler.peaks["stepping"][1],
        "load_rss_bytes": sampler.peaks["load"][0],
        "load_anon_bytes": sampler.peaks["load"][1],
        "device": torch.cuda.get_device_name() if cuda else cpu_name(),
        # where a step's event came once the next step was queued (the profile's window shifts by a step)
        "loss_read_late": spec["trainer"] == "ours" and cuda and "loss_read_every_step" not in levers,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "other_cores": other_cores,
    }
    if cuda:
        end_peak = [torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()]
        result["train_allocated_bytes"], result["train_reserved_bytes"] = gpu_step_peak
        if spec.get("sample"):  # the end-of-run samples (and writing the LoRA)
            result["sample_allocated_bytes"], result["sample_reserved_bytes"] = end_peak
        result["peak_allocated_bytes"] = max(gpu_load_peak[0], gpu_step_peak[0], end_peak[0])
        result["peak_reserved_bytes"] = max(gpu_load_peak[1], gpu_step_peak[1], end_peak[1])
    if levers & {"compile", "compile_cudagraphs"}:  # did it compile whole, and did CUDA graphs take?
        from torch._dynamo.utils import counters
        result["compile_counters"] = {"graph_breaks": dict(counters["graph_break"]),
                                      "cudagraph_skips": counters["inductor"]["cudagraph_skips"]}
    profile = next((e for e in log if e.get("event") == "profile"), None)
    if profile:
        result["profile"] = profile
    if spec.get("flops") and spec["trainer"] == "ours":
        try:  # a counter without a formula for some kernel must not lose the case's other figures
            result["step_flops"] = flops.count()
        except Exception as e:  # noqa: BLE001
            result["step_flops_error"] = f"{type(e).__name__}: {e}"
        result["step_ops"] = flops.count_ops()
    return result


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return f"CPU ({os.cpu_count()} cores)"


if __name__ == "__main__":
    spec = json.loads(Path(sys.argv[1]).read_text())
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    out = Path(sys.argv[2])
    result = run(spec)
    out.write_text(json.dumps(result, indent=1), encoding="utf-8")
