"""`make bench`: our trainer against the diffusers DreamBooth LoRA example, on the same work.

Each case runs in its own process (`case.py`), so the peak RSS is that case's alone, and
runs the trainer for real: `trainer.loop.train` with its shipped defaults ("ours"), or the
example's per-step work written out in `baseline.py` ("baseline"). The work: rank-4 LoRA on
the UNet attention projections, 1 instance + 1 class image per step (prior preservation,
class images already on disk), on the real SD1.5 (and SDXL) architectures with random
weights, and on the tiny test model.

    python benchmarks/bench.py              # the default run (CPU: tiny + SD1.5 256 px; GPU: + SD1.5 512, SDXL 1024)
    python benchmarks/bench.py --levers     # SD1.5 256 px on the CPU: each optimisation on its own
    python benchmarks/bench.py --profile    # one steady-state step of ours (and the baseline) under torch.profiler
    python benchmarks/bench.py --sdxl-cpu   # also SDXL at 256 px on the CPU (~16 GB RAM, slow)
    python benchmarks/bench.py --quick      # the tiny model only
    python benchmarks/bench.py --presets    # peak memory with each memory preset (GPU: SD1.5 512, SDXL 1024)
    python benchmarks/bench.py --repeat 3   # every real-model case 3 times, interleaved (default 2)
    python benchmarks/bench.py --gpu-session --stop-at T  # a lent GPU, one call: the pairs, presets, GPU levers

Figures: seconds per step (median of the steady state: the first `warmup` steps, which
include start-up work such as filling the latent cache, are left out; min-max beside it),
samples per second (instance + class images per step), time from calling the trainer to the end
of its first step (model loading included), peak RSS of the process (and the peak while
stepping), on a GPU peak allocated / reserved memory and the model FLOPs utilisation: the
FLOPs of one UNet forward + backward (counted with torch.utils.flop_counter) per second,
against the card's dense bf16 peak. Results are printed and written to
`.cache/bench/results/<time>/` (results.json, table.md, one log per case).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from models import default_cache  # noqa: E402

# Dense bf16 tensor-core peaks (FLOP/s), by a substring of torch.cuda.get_device_name().
GPU_BF16_PEAK = [("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("GH200", 989e12), ("A100", 312e12),
                 ("L40S", 362e12), ("L4", 121e12), ("A10G", 70e12), ("RTX 4090", 165e12), ("RTX 3090", 71e12)]

BUSY = 0.5  # cores used by other processes during a case above which its figures are suspect

LEVERS = [  # (label, levers): each changes one thing against "ours" as shipped (auto precision: bf16 on CPUs with it)
    ("ours", []),
    ("ours, no latent/text cache", ["no_cache"]),
    ("ours, fp32 (mixed_precision no)", ["fp32"]),
    ("ours + channels_last", ["channels_last"]),
    ("ours, fp32 + channels_last", ["fp32", "channels_last"]),
    ("ours, weights loaded as bf16", ["load_bf16"]),
    ("ours, AdamW for-loop", ["adamw_forloop"]),
    ("ours, AdamW fused", ["adamw_fused"]),
    ("ours + gradient checkpointing", ["grad_ckpt"]),
    ("ours, attention without SDPA", ["no_sdpa"]),
    ("ours + peft's input cast (before 2026-11-26)", ["peft_input_cast"]),
    ("baseline", None),
]
PHOTO_LEVERS = [("ours", []), ("baseline", None)]


def case(group: str, label: str, trainer: str, model: str, resolution: int, steps: int, warmup: int,
         levers: list[str] | None = None, **extra) -> dict:
    device = "cuda" if group.endswith("GPU") else "cpu"
    return {"group": group, "label": label, "trainer": trainer, "model": model, "resolution": resolution,
            "device": device,
            "image_size": resolution, "instance_images": 2, "class_images": 2, "steps": steps, "warmup": warmup,
            "levers": levers or [], **extra}


def plan(args, cuda: bool) -> list[dict]:
    """The cases of this run, in the order they run (ours and the baseline interleaved per round)."""
    cases = []
    pair = lambda group, model, res, steps, warmup, **kw: [  # noqa: E731
        case(group, "ours", "ours", model, res, steps, warmup, flops=True, **kw),
        case(group, "baseline", "baseline", model, res, steps, warmup, **kw)]
    def rounds(make):  # every round runs the cases of `make()`, in reverse order every other round
        return [c for r in range(args.repeat) for c in (make() if r % 2 == 0 else make()[::-1])]

    if args.gpu_session:
        return gpu_session_plan()
    if args.profile:
        group = "profile: SD1.5 256 px, CPU"
        cases += [case(group, "ours", "ours", "sd15", 256, 5, 2, profile=True),
                  case(group, "ours, fp32", "ours", "sd15", 256, 5, 2, ["fp32"], profile=True),
                  case(group, "baseline", "baseline", "sd15", 256, 5, 2, profile=True)]
        return cases  # on a GPU, every case of the SD1.5 512 / SDXL 1024 pairs profiles a step near its end
    if args.presets:
        from comfyui_dreambooth_lora.nodes.config_build import MEMORY_PRESETS

        models = ([("SD1.5 512 px, GPU", "sd15", 512), ("SDXL 1024 px, GPU", "sdxl", 1024)] if cuda else
                  [("tiny SD1.x, 64 px, CPU", "tiny", 64), ("tiny SDXL, 64 px, CPU", "tiny_sdxl", 64)])
        for group, model, res in models:
            cases += [case(f"presets: {group}", f"ours, preset {name}", "ours", model, res, 6, 2, preset=name,
                           instance_images=4, class_images=4)
                      for name in MEMORY_PRESETS]
        return cases
    if args.levers:
        def lever_cases():
            out = []
            compiled = [("ours + torch.compile", ["compile"]), ("ours, fp32 + torch.compile", ["fp32", "compile"])]
            for label, levers in LEVERS + (compiled if args.compile else []):
                trainer = "baseline" if levers is None else "ours"
                out.append(case("levers: SD1.5 256 px, CPU", label, trainer, "sd15", 256, args.steps or 7, 2,
                                levers, flops=label == "ours"))
            group = "levers: SD1.5 256 px, CPU, 12 MP JPEG instance photos"
            for label, levers in PHOTO_LEVERS:
                out.append(case(group, label, "baseline" if levers is None else "ours", "sd15", 256,
                                args.steps or 7, 2, levers, photos=True))
            return out
        return rounds(lever_cases)

    cases += pair("tiny SD1.x, 64 px, CPU", "tiny", 64, 25, 5)
    cases += pair("tiny SDXL, 64 px, CPU", "tiny_sdxl", 64, 25, 5)
    if args.quick:
        return cases
    if not (cuda and args.gpu_only):
        cases += rounds(lambda: pair("SD1.5 256 px, CPU", "sd15", 256, args.steps or 8, 2))
        if args.fp32_row:
            cases.append(case("SD1.5 256 px, CPU", "ours, fp32 (mixed_precision no)", "ours", "sd15", 256,
                              args.steps or 8, 2, ["fp32"]))
        if args.sdxl_cpu:
            cases += pair("SDXL 256 px, CPU", "sdxl", 256, args.steps or 5, 2)
    if cuda:
        cases += rounds(lambda: gpu_pair("SD1.5 512 px, GPU", "sd15", 512, 40))
        cases += rounds(lambda: gpu_pair("SDXL 1024 px, GPU", "sdxl", 1024, 30))
    return cases


def gpu_pair(group: str, model: str, resolution: int, steps: int) -> list[dict]:
    """Ours and the baseline on a GPU, each profiled over one step near the end (the window ends at
    the next-to-last step's event: reading late, ours's last event follows at once;
    case.profile_listener), which the figures leave out."""
    return [case(group, "ours", "ours", model, resolution, steps, 10, flops=True, profile=True, profile_step=steps - 1),
            case(group, "baseline", "baseline", model, resolution, steps, 10, profile=True, profile_step=steps - 1)]


GPU_LEVERS = [  # (model, resolution, label, levers), against "ours" in the same group of the pairs
    ("sd15", 512, "ours reading the loss every step (before 2026-11-26)", ["loss_read_every_step"]),
    ("sdxl", 1024, "ours reading the loss every step (before 2026-11-26)", ["loss_read_every_step"]),
    ("sd15", 512, "ours without CUDA graphs (before 2026-11-26)", ["no_cuda_graphs"]),
    ("sdxl", 1024, "ours without CUDA graphs (before 2026-11-26)", ["no_cuda_graphs"]),
    ("sd15", 512, "ours without channels_last (before 2026-11-26)", ["no_channels_last"]),  # with graphs: +9%
    ("sdxl", 1024, "ours without channels_last (before 2026-11-26)", ["no_channels_last"]),
    ("sd15", 512, "ours, norms in fp32 (before 2026-11-26)", ["fp32_norms"]),
    ("sdxl", 1024, "ours, norms in fp32 (before 2026-11-26)", ["fp32_norms"]),
    ("sd15", 512, "ours + torch.compile, CUDA graphs", ["compile_cudagraphs"]),  # minutes of compiling
    ("sd15", 512, "ours + torch.compile", ["compile"]),  # measured 2026-11-26 (run 2): 0.49x
    ("sdxl", 1024, "ours + torch.compile, CUDA graphs", ["compile_cudagraphs"]),
    ("sd15", 512, "ours + peft's input cast (before 2026-11-26)", ["peft_input_cast"]),
    ("sdxl", 1024, "ours + peft's input cast (before 2026-11-26)", ["peft_input_cast"]),
    ("sd15", 512, "ours, no latent/text cache", ["no_cache"]),
    ("sd15", 512, "ours, fp16", ["fp16"]),
    ("sd15", 512, "ours + gradient checkpointing", ["grad_ckpt"]),
    ("sd15", 512, "ours + cudnn.benchmark", ["cudnn_benchmark"]),  # measured 2026-11-26: +19%
]
# The presets whose peak memory the targets name first (SD1.5 < 6 GB, SDXL < 12 GB), then the rest.
GPU_PRESET_ORDER = [("sdxl", "8 GB"), ("sd15", "8 GB"), ("sdxl", "12 GB"), ("sd15", "12 GB"), ("sdxl", "16 GB"),
                    ("sdxl", "24 GB"), ("sd15", "16 GB"), ("sd15", "24 GB")]
FIRST_LEVERS = 8  # before the presets: what the speed figures rest on


def gpu_session_plan() -> list[dict]:
    """Everything a lent GPU is for, most wanted first (`--stop-at` cuts the tail): ours and the
    baseline at SD1.5 512 / SDXL 1024 (with FLOPs and a profiled step), the GPU levers that
    bear on the unmet speed targets, the memory presets, then the other levers."""
    groups = {"sd15": "SD1.5 512 px, GPU", "sdxl": "SDXL 1024 px, GPU"}
    resolution = {"sd15": 512, "sdxl": 1024}
    presets = [case(f"presets: {groups[model]}", f"ours, preset {name}{' + CUDA graphs' if graphs else ''}", "ours",
                    model, resolution[model], 6, 2, ["cuda_graphs_yes"] if graphs else [],
                    preset=name, instance_images=4, class_images=4, make_class_images=2, sample=True)
               for graphs in (False, True) for model, name in GPU_PRESET_ORDER
               if not graphs or model == "sdxl"]  # as users run them: class images made, samples at the end
    # (the SDXL presets with CUDA graphs: whether they could keep them, which they turn off unmeasured)
    levers = [case(groups[model], label, "ours", model, res, 40 if model == "sd15" else 30, 10, changes,
                   flops=not any("compile" in c for c in changes))  # FLOPs and ops/step of the eager UNet
              for model, res, label, changes in GPU_LEVERS]
    return (gpu_pair(groups["sd15"], "sd15", 512, 40) + gpu_pair(groups["sdxl"], "sdxl", 1024, 30)
            + levers[:FIRST_LEVERS] + presets + levers[FIRST_LEVERS:])


def run_case(spec: dict, cache: Path, out_dir: Path, index: int, timeout: float, cut_by_budget: bool = False) -> dict:
    """Run one case in its own process; a case that outlives `timeout` is failed (or, with
    `cut_by_budget`, cut: the run's time was up, which is not the case's fault)."""
    name = f"{index:02d}_{spec['trainer']}_{spec['model']}_{spec['resolution']}"
    spec = {**spec, "cache": str(cache), "result_dir": str(out_dir / name), "tmp": str(cache / "tmp")}
    (out_dir / name).mkdir(parents=True, exist_ok=True)
    (cache / "tmp").mkdir(parents=True, exist_ok=True)
    spec_file, result_file, log_file = (out_dir / name / f for f in ("spec.json", "result.json", "log.txt"))
    spec_file.write_text(json.dumps(spec, indent=1), encoding="utf-8")
    load_before = os.getloadavg()[0]
    started = time.time()
    print(f"[bench] {spec['group']}: {spec['label']} ({spec['steps']} steps) ...", end=" ", flush=True)
    try:
        with open(log_file, "w") as log:
            proc = subprocess.run([sys.executable, str(HERE / "case.py"), str(spec_file), str(result_file)],
                                  stdout=log, stderr=subprocess.STDOUT, timeout=timeout, cwd=HERE.parent)
        ok = proc.returncode == 0 and result_file.exists()
    except subprocess.TimeoutExpired:
        ok = False
        if cut_by_budget:
            print(f"cut after {time.time() - started:.0f} s: the run's time is up", flush=True)
            return {"spec": spec, "failed": True, "cut": True, "wall_seconds": time.time() - started}
    wall = time.time() - started
    if not ok:
        tail = log_file.read_text(errors="replace").splitlines()[-15:]
        print(f"FAILED after {wall:.0f} s; log: {log_file}\n    " + "\n    ".join(tail), flush=True)
        return {"spec": spec, "failed": True, "wall_seconds": wall}
    result = json.loads(result_file.read_text())
    result.update(spec=spec, wall_seconds=wall, load_average=[load_before, os.getloadavg()[0]])
    steady, cpu = steady_steps(result), steady_steps(result, "cpu_seconds_per_step")
    others = result.get("other_cores")
    print(f"{statistics.median(steady):.3f} s/step (CPU {statistics.median(cpu) if cpu else 0:.2f} s), "
          f"{wall:.0f} s wall, other processes busy {others if others is not None else float('nan'):.2f} cores",
          flush=True)
    return result


# --- the table ---------------------------------------------------------------------------------

def gpu_peak(device: str, override: float | None) -> float | None:
    if override:
        return override * 1e12
    return next((peak for key, peak in GPU_BF16_PEAK if key in device), None)


def steady_steps(result: dict, key: str = "seconds_per_step") -> list[float]:
    """The steps after the warm-up, less the profiled one (the profiler slows it down) and, where
    the trainer read each loss one step late (ours on a GPU), the one after it too, which the
    profiler's start and stop also fall into (case.profile_listener)."""
    spec = result["spec"]
    profiled = spec.get("profile_step", spec["warmup"] + 2) if spec.get("profile") else None
    slowed = set() if profiled is None else {profiled, profiled + 1} if result.get("loss_read_late") else {profiled}
    return [t for step, t in enumerate(result.get(key, []), start=1) if step > spec["warmup"] and step not in slowed]


def summarise(results: list[dict], peak_override: float | None) -> list[dict]:
    """One row per (group, label): steady-state steps of all its runs pooled."""
    rows: dict[tuple, dict] = {}
    for r in results:
        key = (r["spec"]["group"], r["spec"]["label"])
        row = rows.setdefault(key, {
            "group": key[0], "label": key[1], "trainer": r["spec"]["trainer"], "runs": 0, "failed": 0, "cut": 0,
            "steady": [], "run_medians": [], "cpu": [], "first": [], "rss": [], "train_rss": [], "alloc": [], "train_alloc": [],
            "sample_alloc": [],
            "reserved": [], "others": [], "losses": None, "flops": None, "ops": None, "device": None})
        if r.get("failed"):
            row["failed"] += 1
            row["cut"] += bool(r.get("cut"))
            continue
        steady = steady_steps(r)
        row["runs"] += 1
        row["steady"] += steady
        row["cpu"] += steady_steps(r, "cpu_seconds_per_step")
        row["run_medians"].append(statistics.median(steady))
        row["first"].append(r["first_step_seconds"])
        row["rss"].append(r["peak_rss_bytes"])
        row["train_rss"].append(r["train_rss_bytes"])
        row["device"] = r["device"]
        row["samples_per_step"] = r.get("samples_per_step", 2)
        row["losses"] = row["losses"] or r.get("losses")
        if r.get("other_cores") is not None:
            row["others"].append(r["other_cores"])
        if "peak_allocated_bytes" in r:
            row["alloc"].append(r["peak_allocated_bytes"])
            if "train_allocated_bytes" in r:  # results from before 2026-11-26 have no split
                row["train_alloc"].append(r["train_allocated_bytes"])
            if "sample_allocated_bytes" in r:
                row["sample_alloc"].append(r["sample_allocated_bytes"])
            row["reserved"].append(r["peak_reserved_bytes"])
        if r.get("step_flops"):
            row["flops"] = r["step_flops"]
        if r.get("step_ops"):
            row["ops"] = r["step_ops"]
    out = list(rows.values())
    for row in out:  # the UNet work is the same for every row of a group: share the count
        if row["flops"] is None:
            row["flops"] = next((o["flops"] for o in out if o["group"] == row["group"] and o["flops"]), None)
    for row in out:
        row["median"] = statistics.median(row["steady"]) if row["steady"] else None
        row["cpu_median"] = statistics.median(row["cpu"]) if row["cpu"] else None
    for row in out:
        if not row["steady"]:
            continue
        base = next((o for o in out if o["group"] == row["group"] and o["label"] == "baseline" and o["steady"]), None)
        row["vs_baseline"] = row["median"] / base["median"] if base else None
        ref = next((o for o in out if o["group"] == row["group"] and o["label"] == "ours" and o["losses"]), None)
        row["loss_delta"] = None
        if row["trainer"] == "ours" and ref and row["losses"] and len(row["losses"]) == len(ref["losses"]):
            row["loss_delta"] = max(abs(a - b) / abs(b) for a, b in zip(row["losses"], ref["losses"]))
        row["best_vs_baseline"] = min(row["steady"]) / min(base["steady"]) if base else None
        row["rss_vs_baseline"] = max(row["rss"]) / max(base["rss"]) if base else None
        gpu = bool(row["alloc"])
        peak = gpu_peak(row["device"] or "", peak_override) if gpu else None
        row["tflops"] = row["flops"] / row["median"] / 1e12 if row["flops"] else None
        row["mfu"] = row["tflops"] * 1e12 / peak if (peak and row["tflops"]) else None
    return out


def table(rows: list[dict]) -> str:
    gpu = any(r["alloc"] for r in rows)
    head = ["case", "trainer", "s/step median (min-max, n)", "vs baseline: median / min", "CPU s/step", "samples/s",
            "1st step s", "peak RSS GB", "RSS stepping GB", "TFLOP/s", "ops/step", "loss vs ours", "others busy"]
    if gpu:
        head += ["alloc GB", "alloc stepping GB", "alloc sampling GB", "reserved GB", "MFU"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    gb = lambda xs: f"{max(xs) / 2**30:.2f}" if xs else "-"  # noqa: E731
    for r in rows:
        if not r["steady"]:
            why = "cut: the run's time was up" if r["cut"] == r["failed"] else "failed"
            lines.append(f"| {r['group']} | {r['label']} | {why} |" + " |" * (len(head) - 3))
            continue
        spread = f"{r['median']:.3f} ({min(r['steady']):.3f}-{max(r['steady']):.3f}, n={len(r['steady'])})"
        ratio = lambda x: f"{x:.2f}x" if x else "-"  # noqa: E731
        cells = [r["group"], r["label"], spread, f"{ratio(r['vs_baseline'])} / {ratio(r['best_vs_baseline'])}",
                 f"{r['cpu_median']:.2f}" if r["cpu_median"] else "-",
                 f"{r['samples_per_step'] / r['median']:.2f}", f"{statistics.median(r['first']):.1f}", gb(r["rss"]), gb(r["train_rss"]),
                 f"{r['tflops']:.3f}" if r["tflops"] else "-", str(r["ops"] or "-"),
                 f"{100 * r['loss_delta']:.2f}%" if r["loss_delta"] is not None else "-",
                 (f"{max(r['others']):.2f}" + (" BUSY" if max(r["others"]) > BUSY else "")) if r["others"] else "-"]
        if gpu:
            cells += [gb(r["alloc"]), gb(r["train_alloc"]), gb(r["sample_alloc"]), gb(r["reserved"]),
                      f"{100 * r['mfu']:.1f}%" if r["mfu"] else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def is_kernel(row: dict) -> bool:
    """A GPU activity (kernel, memcpy, memset) of a profile: device time and no host time of its own.
    Not aten ops (their device time repeats their kernels') nor annotations ("## unet.forward",
    "Optimizer.step#AdamW.step"), whose device rows span the kernels inside them."""
    name = row["name"]
    annotation = name.startswith("##") or ("#" in name and " " not in name and "::" not in name)
    return row["self_device_ms"] > 0 and row["self_cpu_ms"] == 0 and not name.startswith("aten::") and not annotation


def profile_report(results: list[dict], top: int) -> str:
    """The profiled step: host time per labelled phase, then the top kernels by GPU time (with a
    GPU; their sum against the step's time says how busy the GPU was) or the top ops by CPU time."""
    out = []
    for r in results:
        prof = r.get("profile")
        if not prof:
            continue
        rows = prof["rows"]
        kernels = [x for x in rows if is_kernel(x)]
        step = f"{r['spec']['label']} ({r['spec']['group']}): one step of {prof['step_seconds']:.3f} s under the profiler"
        if kernels:
            busy = sum(x["self_device_ms"] for x in kernels)
            out.append(f"\n{step}; {sum(x['count'] for x in kernels)} GPU activities (kernels, copies) took "
                       f"{busy:.1f} ms; {sum(x['count'] for x in rows if x['name'].startswith('aten::'))} aten calls")
            listed, where, total = kernels, "device", busy
        else:
            total = sum(x["self_cpu_ms"] for x in rows)
            out.append(f"\n{step}; {total / 1e3:.2f} s self CPU time in ops")
            listed, where = [x for x in rows if not x["name"].startswith("## ")], "cpu"
        out.append("  phase                      CPU total ms")
        for x in sorted((x for x in rows if (x["name"].startswith("## ") or x["name"].startswith("Optimizer."))
                         and x["cpu_total_ms"] > 0), key=lambda x: -x["cpu_total_ms"]):
            out.append(f"  {x['name']:<26} {x['cpu_total_ms']:10.1f}  ({x['count']} calls)")
        out.append(f"  {'kernel' if kernels else 'op':<56} {'self ' + where.upper() + ' ms':>10}   share  calls")
        for x in sorted(listed, key=lambda x: -x[f"self_{where}_ms"])[:top]:
            ms = x[f"self_{where}_ms"]
            out.append(f"  {x['name'][:56]:<56} {ms:10.1f}  {100 * ms / max(total, 1e-9):5.1f}%  {x['count']:5d}")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the tiny model only")
    parser.add_argument("--levers", action="store_true", help="SD1.5 256 px on the CPU, one optimisation at a time")
    parser.add_argument("--compile", action="store_true", help="with --levers: also torch.compile (slow to compile)")
    parser.add_argument("--profile", action="store_true", help="profile one steady-state step (SD1.5 256 px, CPU)")
    parser.add_argument("--presets", action="store_true",
                        help="peak memory with each Train node memory preset (GPU: SD1.5 512 / SDXL 1024; CPU: tiny)")
    parser.add_argument("--sdxl-cpu", action="store_true", help="also SDXL at 256 px on the CPU")
    parser.add_argument("--gpu-only", action="store_true", help="on a GPU machine: leave out the real-model CPU cases")
    parser.add_argument("--gpu-session", action="store_true",
                        help="on a lent GPU: the SD1.5 512 / SDXL 1024 pairs, the presets, then the GPU levers")
    parser.add_argument("--stop-at", type=float, default=0,
                        help="a time (seconds since the epoch) by which every case has ended: later cases are "
                             "skipped, and each case's timeout is the time left")
    parser.add_argument("--no-fp32-row", dest="fp32_row", action="store_false",
                        help="leave out the 'ours, fp32' row of the default CPU run")
    parser.add_argument("--only", default="",
                        help="run only the cases whose 'group: label' contains this text (or one of several, "
                             "split by '|'; '=text' matches the whole 'group: label')")
    parser.add_argument("--repeat", type=int, default=2, help="run each real-model case N times, interleaved")
    parser.add_argument("--steps", type=int, default=0, help="steps per real-model CPU case (default 8; levers 7)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads per case (default: torch's own)")
    parser.add_argument("--retry-busy", type=int, default=1,
                        help="rerun a real-model case up to N times when other processes kept more than "
                             f"{BUSY} cores busy while it stepped; the least disturbed run counts")
    parser.add_argument("--top", type=int, default=20, help="ops listed per profile")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the GPU's dense bf16 peak, if not known")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per case")
    parser.add_argument("--cache", type=Path, default=None, help="models, images, results (default .cache/bench)")
    parser.add_argument("--report", type=Path, default=None,
                        help="print the table and profiles of a saved results.json (or .json.gz) and exit")
    parser.add_argument("--results", type=Path, default=None,
                        help="the folder for this run's table, results.json and logs (default CACHE/results/<time>)")
    args = parser.parse_args(argv)
    if args.report:
        print(render_saved(args.report, args.peak_tflops, args.top))
        return 0

    import torch

    cuda = torch.cuda.is_available()
    cache = (args.cache or default_cache()).resolve()
    out_dir = (args.results or cache / "results" / time.strftime("%Y%m%d-%H%M%S")).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    wanted = args.only.split("|")
    cases = [{**c, "threads": args.threads} for c in plan(args, cuda)
             if any(f"{c['group']}: {c['label']}" == w[1:] if w.startswith("=") else w in f"{c['group']}: {c['label']}"
                    for w in wanted)]
    print(f"[bench] {len(cases)} cases; torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{'GPU ' + torch.cuda.get_device_name() if cuda else 'CPU only'}; results in {out_dir}", flush=True)
    started = time.time()
    results, discarded, skipped = [], [], []
    text = ""

    def time_left() -> float:
        return args.stop_at - time.time() if args.stop_at else args.timeout

    def no_time_for(spec: dict) -> bool:
        return bool(args.stop_at) and time_left() < MIN_CASE_SECONDS.get(spec["model"], 45)

    for i, spec in enumerate(cases):
        if no_time_for(spec):
            skipped.append(f"{spec['group']}: {spec['label']}")
            continue
        result = run_case(spec, cache, out_dir, i, min(args.timeout, time_left()), cut_by_budget=bool(args.stop_at))
        for retry in range(args.retry_busy if not spec["model"].startswith("tiny") else 0):
            if result.get("failed") or (result.get("other_cores") or 0) <= BUSY or no_time_for(spec):
                break
            print("[bench]   the machine was busy with other work during that case; running it again", flush=True)
            again = run_case(spec, cache, out_dir, i + 100 * (retry + 1), min(args.timeout, time_left()),
                             cut_by_budget=bool(args.stop_at))
            if not again.get("failed") and again["other_cores"] < result["other_cores"]:
                result, again = again, result
            discarded.append(again)
        results.append(result)
        # after every case, so that a run cut short still leaves its figures
        text = write_report(out_dir, results, discarded, skipped, args.peak_tflops, args.top, started)
    if skipped:
        print(f"[bench] no time left for {len(skipped)} cases: " + "; ".join(skipped), flush=True)
        text = write_report(out_dir, results, discarded, skipped, args.peak_tflops, args.top, started)
    print("\n" + text)
    return 1 if any(r.get("failed") and not r.get("cut") for r in results) else 0


# With --stop-at, a case starts only with this much time left: loading, warm-up and its steps.
MIN_CASE_SECONDS = {"sd15": 45, "sdxl": 70}


def render_saved(path: Path, peak_tflops: float | None, top: int) -> str:
    """The table and profiles of a results.json written by an earlier run (gzipped or not)."""
    import gzip

    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    saved = json.loads(raw)
    results = saved["results"]
    device = next((r["device"] for r in results if r.get("device")), "?")
    torch_version = next((r["torch"] for r in results if r.get("torch")), "?")
    text = f"{device}, torch {torch_version} (from {path.name})\n\n{table(summarise(results, peak_tflops))}\n"
    if saved.get("skipped"):
        text += "\nskipped (no time left): " + "; ".join(saved["skipped"]) + "\n"
    return text + profile_report(results, top) + "\n"


def write_report(out_dir: Path, results: list[dict], discarded: list[dict], skipped: list[str],
                 peak_tflops: float | None, top: int, started: float) -> str:
    """table.md and results.json of the cases run so far; returns the table's text."""
    import torch

    rows = summarise(results, peak_tflops)
    device = next((r["device"] for r in results if r.get("device")), "?")
    text = (f"{time.strftime('%Y-%m-%d')}, {device}, torch {torch.__version__}; "
            f"{time.time() - started:.0f} s in all\n\n{table(rows)}\n")
    if skipped:
        text += "\nskipped (no time left): " + "; ".join(skipped) + "\n"
    for r in results:
        if r.get("step_flops_error"):
            text += f"\nFLOPs not counted for {r['spec']['group']}: {r['spec']['label']}: {r['step_flops_error']}\n"
        if r.get("compile_counters"):  # a graph break or a skipped CUDA graph explains a slow compiled row
            breaks, skips = r["compile_counters"]["graph_breaks"], r["compile_counters"]["cudagraph_skips"]
            text += (f"\ncompiled {r['spec']['group']}: {r['spec']['label']}: {sum(breaks.values())} graph breaks"
                     + (f" ({'; '.join(breaks)})" if breaks else "") + f", {skips} graphs not CUDA-graphed\n")
    prof = profile_report(results, top)
    if prof:
        text += prof + "\n"
    (out_dir / "table.md").write_text(text, encoding="utf-8")
    everything = {"results": results, "discarded": discarded, "skipped": skipped, "rows": rows}
    (out_dir / "results.json").write_text(json.dumps(everything, indent=1, default=str), encoding="utf-8")
    return text


if __name__ == "__main__":
    sys.exit(main())
