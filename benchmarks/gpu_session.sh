#!/usr/bin/env bash
# The GPU benchmark on a lent GPU machine (the `device` tool), in one call. That machine's
# Python has torch, but not diffusers, and other versions of transformers and peft. Here
# first: `make gpu-wheels` (diffusers, transformers, peft and accelerate at this venv's
# versions, into the git-ignored .whl/). Then run, with `.whl` carried, from the repository
# root there, with the command's timeout a minute above BUDGET:
#
#     BUDGET=460 bash benchmarks/gpu_session.sh
#
# It runs the trainer's GPU paths on the tiny models first (gpu_smoke.py, ~30 s; its lines go
# to $OUT/smoke.txt, and a failure is reported, not fatal: the benchmark's own cases show which
# paths work), then `bench.py --gpu-session` until BUDGET seconds after it began: ours and
# the baseline at SD1.5 512 / SDXL 1024 (FLOPs, MFU, a profiled step), the levers that bear most
# on the speed targets, the memory presets, then the other levers. The table, results.json and every case's log and profile
# (one tar) land in $OUT, also when the time runs out.
set -euo pipefail
began=$(date +%s)
BUDGET=${BUDGET:-460}
PYTHON=${PYTHON:-python3}
"$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
# The repository root is the package folder (pyproject's package-dir): make it importable by its name.
mkdir -p /tmp/pkg
ln -sfn "$PWD" /tmp/pkg/comfyui_dreambooth_lora
export PYTHONPATH=/tmp/site:/tmp/pkg${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
if ! "$PYTHON" -c "import transformers, peft, diffusers" 2>/dev/null; then
    # the carried transformers may want newer helpers than the machine has: use the machine's own
    echo "gpu_session: the carried transformers/peft do not import here; using the machine's"
    rm -rf /tmp/site/transformers* /tmp/site/peft*
fi
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv || true
# An eager step is bound by the host dispatching ops (README, Performance): the host CPU matters (less with CUDA graphs).
echo "host: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) cores"
"$PYTHON" - <<'PY'
import importlib.metadata as m, torch
print("torch", torch.__version__, "cuda", torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else "")
for name in ("diffusers", "transformers", "peft", "accelerate", "safetensors", "tokenizers", "huggingface_hub"):
    print(name, m.version(name))
PY
if [[ -z "${SKIP_SMOKE:-}" ]]; then  # its lines also go to $OUT: the reply's tail holds only the benchmark's end
    "$PYTHON" benchmarks/gpu_smoke.py ${SMOKE_ONLY:+--only "$SMOKE_ONLY"} 2>&1 | tee "${OUT:-/tmp}/smoke.txt" | grep --line-buffered "^gpu_smoke\|Error" \
        || echo "gpu_session: gpu_smoke failed (see smoke.txt); the benchmark runs anyway"
fi
cache=${BENCH_CACHE:-/tmp/bench}
results=$cache/results/session-$began  # this call's own: a warm machine keeps the last call's
save() {
    if [[ -n "${OUT:-}" && -d "$results" ]]; then
        cp "$results"/results.json "$results"/table.md "$OUT"/ 2>/dev/null || true
        tar -czf "$OUT"/cases.tgz -C "$results" . 2>/dev/null || true
    fi
}
trap save EXIT
"$PYTHON" benchmarks/bench.py --gpu-session --retry-busy 0 --cache "$cache" --results "$results" \
    --stop-at $((began + BUDGET)) "$@"
