# Two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
export HF_HUB_OFFLINE := 1

.PHONY: setup demo test test-slow test-all comfyui bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml requirements-dev.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements-dev.txt
	$(BIN)/python -m pip install --quiet -e .
	touch $@

comfyui: setup
	$(BIN)/python tests/comfyui_source.py

## demo: train a LoRA on a small local model and generated pictures (CPU, ~2 min)
demo: setup
	$(BIN)/python -m comfyui_dreambooth_lora.trainer demo --output demo_output

## test: what CI runs (unit tests on tiny models + tests against ComfyUI's code)
test: comfyui
	$(BIN)/python -m pytest -m "not slow" -q

## test-slow: the tests too slow for CI
test-slow: comfyui
	$(BIN)/python -m pytest -m slow -q

test-all: comfyui
	$(BIN)/python -m pytest -q

## bench: speed and memory of our trainer against the diffusers example (2 CPU cores: ~4 min; README "Performance")
bench: setup
	$(BIN)/python benchmarks/bench.py

clean:
	rm -rf demo_output .pytest_cache
