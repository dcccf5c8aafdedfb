#!/usr/bin/env bash
# The GPU benchmark on a lent GPU machine (the `device` tool), whose Python has torch,
# transformers, peft and accelerate but not diffusers. Here first: `make gpu-wheels`
# (diffusers and what it needs that the machine lacks, into the git-ignored .whl/). Then
# run, with `.whl` carried, from the repository root there:
#
#     bash benchmarks/gpu_session.sh --only "SD1.5 512"     # ~ours + baseline, one round
#     bash benchmarks/gpu_session.sh --only "SDXL 1024"
#     bash benchmarks/gpu_session.sh --presets
#
# Each piece fits the tool's 10-minute command limit; the models built on the first call
# stay in /tmp/bench while the machine is warm. The table and results.json land in $OUT.
set -euo pipefail
PYTHON=${PYTHON:-python3}
"$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
# The repository root is the package folder (pyproject's package-dir): make it importable by its name.
mkdir -p /tmp/pkg
ln -sfn "$PWD" /tmp/pkg/comfyui_dreambooth_lora
export PYTHONPATH=/tmp/site:/tmp/pkg${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
"$PYTHON" - <<'PY'
import importlib.metadata as m, torch
print("torch", torch.__version__, "cuda", torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else "")
for name in ("diffusers", "transformers", "peft", "accelerate", "safetensors"):
    print(name, m.version(name))
PY
extra=()
[[ " $* " == *" --presets "* ]] || extra=(--gpu-only --repeat 1)
"$PYTHON" benchmarks/bench.py "${extra[@]}" --cache "${BENCH_CACHE:-/tmp/bench}" "$@"
if [[ -n "${OUT:-}" ]]; then
    latest=$(ls -td "${BENCH_CACHE:-/tmp/bench}"/results/*/ | head -1)
    cp "$latest"/results.json "$latest"/table.md "$OUT"/ 2>/dev/null || true
fi
