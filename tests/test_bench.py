"""The benchmark's own arithmetic (benchmarks/bench.py): which steps count, what a GPU profile's
busy time is, the ratios and MFU of the table, and a run cut short by --stop-at. No case runs here."""

from __future__ import annotations

import gzip
import json
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import bench  # noqa: E402


def result(label: str, seconds: list[float], warmup: int = 2, **extra) -> dict:
    spec = bench.case("SD1.5 512 px, GPU", label, "baseline" if label == "baseline" else "ours", "sd15", 512,
                      len(seconds), warmup, **extra.pop("spec", {}))
    return {"spec": spec, "seconds_per_step": seconds, "losses": [1.0] * len(seconds), "first_step_seconds": 5.0,
            "peak_rss_bytes": 2**30, "train_rss_bytes": 2**30, "device": "NVIDIA H200", **extra}


def test_steady_steps_leave_out_the_warm_up_and_the_profiled_step_and_the_next_where_read_late():
    plain = result("ours", [9.0, 8.0, 1.0, 2.0, 3.0, 4.0])
    assert bench.steady_steps(plain) == [1.0, 2.0, 3.0, 4.0]
    profiled = result("ours", [9.0, 8.0, 1.0, 2.0, 7.0, 3.0], spec=dict(profile=True, profile_step=5))
    assert bench.steady_steps(profiled) == [1.0, 2.0, 3.0]
    read_late = result("ours", [9.0, 8.0, 1.0, 2.0, 7.0, 6.0], spec=dict(profile=True, profile_step=5),
                       loss_read_late=True)  # ours on a GPU: the profiler also slows the step after
    assert bench.steady_steps(read_late) == [1.0, 2.0]
    by_default = result("ours", [9.0, 8.0, 1.0, 7.0, 3.0], spec=dict(profile=True))  # warmup + 2
    assert bench.steady_steps(by_default) == [1.0, 3.0]


def test_gpu_busy_time_counts_kernels_once():
    rows = [  # as key_averages gives them: the op, its kernel, annotations spanning kernels, host-only calls
        {"name": "aten::mm", "count": 1, "self_cpu_ms": 0.1, "self_device_ms": 2.0},
        {"name": "sm90_xmma_gemm_bf16", "count": 1, "self_cpu_ms": 0.0, "self_device_ms": 2.0},
        {"name": "void at::native::kernel<{lambda()#3}::operator()>", "count": 4, "self_cpu_ms": 0.0,
         "self_device_ms": 1.0},
        {"name": "## unet.forward", "count": 1, "self_cpu_ms": 0.0, "self_device_ms": 3.0},
        {"name": "Optimizer.step#AdamW.step", "count": 1, "self_cpu_ms": 0.0, "self_device_ms": 0.5},
        {"name": "cudaLaunchKernel", "count": 5, "self_cpu_ms": 0.2, "self_device_ms": 0.0},
    ]
    rows = [{**r, "cpu_total_ms": r["self_cpu_ms"]} for r in rows]
    assert [r["name"][:4] for r in rows if bench.is_kernel(r)] == ["sm90", "void"]
    report = bench.profile_report([{**result("ours", [1.0] * 4),
                                    "profile": {"rows": rows, "step_seconds": 0.01}}], top=5)
    assert "5 GPU activities (kernels, copies) took 3.0 ms; 1 aten calls" in report


def test_table_ratios_and_mfu():
    ours = result("ours", [0.0, 0.0, 0.1, 0.1, 0.1], step_flops=int(9.89e12), peak_allocated_bytes=4 * 2**30,
                  peak_reserved_bytes=5 * 2**30, train_allocated_bytes=3 * 2**30, spec=dict(flops=True))
    base = result("baseline", [0.0, 0.0, 0.2, 0.2, 0.2], peak_allocated_bytes=2**30, peak_reserved_bytes=2**30)
    rows = {r["label"]: r for r in bench.summarise([ours, base], None)}
    assert rows["ours"]["vs_baseline"] == pytest.approx(0.5)
    assert rows["ours"]["mfu"] == pytest.approx(0.1)  # 98.9 TFLOP/s against the H200's 989
    assert rows["baseline"]["flops"] == rows["ours"]["flops"]  # the same UNet work, shared in the group
    line = next(x for x in bench.table(list(rows.values())).splitlines() if "| ours |" in x)
    assert "| 4.00 | 3.00 | - | 5.00 | 10.0% |" in line  # alloc, alloc stepping, alloc sampling, reserved, MFU


def test_a_run_past_its_stop_time_skips_its_cases_and_says_so(tmp_path):
    code = bench.main(["--quick", "--cache", str(tmp_path), "--results", str(tmp_path / "out"),
                       "--stop-at", str(time.time() - 1)])
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert code == 0 and saved["results"] == []
    assert saved["skipped"] == ["tiny SD1.x, 64 px, CPU: ours", "tiny SD1.x, 64 px, CPU: baseline",
                                "tiny SDXL, 64 px, CPU: ours", "tiny SDXL, 64 px, CPU: baseline"]
    assert "skipped (no time left)" in (tmp_path / "out" / "table.md").read_text()


def test_a_saved_run_renders_again(tmp_path):
    ours = result("ours", [0.0, 0.0, 0.1, 0.1])
    path = tmp_path / "run.json.gz"
    path.write_bytes(gzip.compress(json.dumps({"results": [ours], "skipped": ["x: y"]}).encode()))
    text = bench.render_saved(path, None, top=5)
    assert "| SD1.5 512 px, GPU | ours | 0.100 (0.100-0.100, n=2) |" in text and "skipped (no time left): x: y" in text


def test_the_report_says_where_a_compiled_case_broke_its_graph_or_skipped_cuda_graphs(tmp_path):
    compiled = result("ours + torch.compile, CUDA graphs", [0.0, 0.0, 0.1, 0.1],
                      compile_counters={"graph_breaks": {"a data-dependent branch": 2}, "cudagraph_skips": 1})
    text = bench.write_report(tmp_path, [result("ours", [0.0, 0.0, 0.1, 0.1]), compiled], [], [], None, 5, time.time())
    assert ("compiled SD1.5 512 px, GPU: ours + torch.compile, CUDA graphs: 2 graph breaks (a data-dependent branch), "
            "1 graphs not CUDA-graphed") in text
    assert text.count("compiled ") == 1


def test_host_gap_measures_one_gap_per_step_after_the_first_ten(tmp_path):
    import host_gap

    gaps = host_gap.measure("sd1", 14, tmp_path)
    assert len(gaps) == 3 and all(0 < g < 1000 for g in gaps)  # steps 12-14: read of 11 -> call of 12, ...
