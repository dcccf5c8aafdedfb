# Two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
OLDEST := .venv-oldest
export HF_HUB_OFFLINE := 1
# Only for this repository's own test venv, and only when it has no torch yet: a CPU-capable
# trio that ComfyUI's start-up (torchvision, torchaudio) accepts. The pack never installs torch.
TORCH_FOR_TESTS ?= torch==2.14.1 torchvision==0.29.1 torchaudio==2.11.*

COMFYUI_REQUIREMENTS := .cache/ComfyUI/requirements.txt

.PHONY: setup newest demo test test-oldest test-slow test-all comfyui comfyui-demo screenshots bench gpu-wheels clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml requirements.txt requirements-dev.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -c "import torch, torchvision, torchaudio" 2>/dev/null || \
		$(BIN)/python -m pip install --quiet $(TORCH_FOR_TESTS)
	$(BIN)/python -m pip install --quiet -r requirements-dev.txt
	$(BIN)/python -m pip install --quiet -e .
	touch $@

comfyui: setup
	$(BIN)/python tests/comfyui_source.py

## newest: upgrade .venv to the newest release of every dependency of the pack, of ComfyUI and of the
## tests (torch, torchvision and torchaudio stay as they are: ComfyUI's to choose); `make test` runs it
newest: comfyui
	$(BIN)/python -c "import importlib.metadata as m; \
		print('\n'.join(f'{n}=={m.version(n)}' for n in ('torch', 'torchvision', 'torchaudio')))" > $(VENV)/torch-pins.txt
	$(BIN)/python -m pip install --quiet --upgrade --upgrade-strategy eager -c $(VENV)/torch-pins.txt \
		-r $(COMFYUI_REQUIREMENTS) -r requirements-dev.txt -r requirements.txt

## demo: train a LoRA on a small local model and generated pictures (CPU, ~1 min)
demo: setup
	$(BIN)/python -m comfyui_dreambooth_lora.trainer demo --output demo_output

## comfyui-demo: a real ComfyUI with this pack, a small model and demo photos on http://127.0.0.1:8188 (CPU,
## offline); open it, choose the SD1.5 template, press Run. PORT=... to change the port; Ctrl+C stops it.
PORT ?= 8188
comfyui-demo: comfyui
	$(BIN)/python tests/comfyui_demo.py --port $(PORT)

## screenshots: the README's pictures (docs/images/), taken in ComfyUI's real frontend (needs chromium; ~5 min)
screenshots: comfyui
	$(BIN)/python tests/screenshots.py

PYTEST_NEWEST := $(BIN)/python -m pytest -m "not slow" -q
FRONTEND_TESTS := tests/test_frontend.py
PYTEST_OLDEST := DREAMBOOTH_LORA_OLDEST=$(OLDEST)/constraints.txt $(OLDEST)/bin/python -m pytest -m "not slow" -q \
                 -p no:cacheprovider

## test: what CI runs (unit tests on tiny models + tests against ComfyUI's code), at the newest
## published version of every dependency and, side by side, at the oldest ones pyproject.toml allows
test: newest $(OLDEST)/.installed
	$(BIN)/python -m ruff check .
	# Two lanes at once, one torch thread each: a test keeps about one core busy on average (servers, workers
	# and imports wait). Lane 1: the suite at the newest versions, except the real-frontend tests. Lane 2: the
	# suite at the floors, then the real-frontend tests (newest versions); the lanes take about as long. Lane
	# 2's output goes to $(OLDEST)/test.log and $(VENV)/test_frontend.log, printed when both have ended.
	@echo "the suite at the newest versions; at the floors and the real frontend, side by side, into logs"
	( OMP_NUM_THREADS=1 $(PYTEST_OLDEST) > $(OLDEST)/test.log 2>&1; floors=$$?; \
	  OMP_NUM_THREADS=1 $(PYTEST_NEWEST) -p no:cacheprovider $(FRONTEND_TESTS) > $(VENV)/test_frontend.log 2>&1; \
	  frontend=$$?; test $$floors -eq 0 && test $$frontend -eq 0 ) & lane2=$$!; \
	OMP_NUM_THREADS=1 $(PYTEST_NEWEST) --ignore=$(FRONTEND_TESTS); newest=$$?; \
	wait $$lane2; lane2=$$?; \
	echo "--- the same tests at the dependency floors (.venv-oldest):"; cat $(OLDEST)/test.log; \
	echo "--- the real-frontend tests (.venv):"; cat $(VENV)/test_frontend.log; \
	test $$newest -eq 0 && test $$lane2 -eq 0

## test-oldest: the same tests in .venv-oldest alone, at the floor of every dependency range (tests/oldest_versions.py)
test-oldest: comfyui $(OLDEST)/.installed
	$(PYTEST_OLDEST)

$(OLDEST)/.installed: pyproject.toml requirements-dev.txt tests/oldest_versions.py $(VENV)/.installed
	# A copy of .venv made of hard links: torch (about 5 GB with its CUDA libraries) is stored on disk
	# once, and pip replaces files rather than writing into them, so downgrading here leaves .venv whole.
	test -x $(OLDEST)/bin/python || cp -al $(VENV) $(OLDEST) || { rm -rf $(OLDEST); $(PYTHON) -m venv $(OLDEST); }
	# The copied stamp is .venv's own file: touching one would date both.
	rm -f $@
	$(OLDEST)/bin/python -c "import torch, torchvision, torchaudio" 2>/dev/null || \
		$(OLDEST)/bin/python -m pip install --quiet $(TORCH_FOR_TESTS)
	$(BIN)/python tests/oldest_versions.py > $(OLDEST)/constraints.txt
	$(OLDEST)/bin/python -m pip install --quiet -c $(OLDEST)/constraints.txt -r requirements-dev.txt -e .
	touch $@

## test-slow: the tests too slow for CI
test-slow: comfyui
	$(BIN)/python -m pytest -m slow -q

test-all: comfyui
	$(BIN)/python -m pytest -q

## bench: speed and memory of our trainer against the diffusers example (2 CPU cores: ~4 min; benchmarks/README.md)
bench: setup
	$(BIN)/python benchmarks/bench.py

## gpu-wheels: diffusers, transformers, peft, accelerate (this venv's versions) as wheels in .whl/, to carry to a lent GPU machine (benchmarks/gpu_session.sh)
gpu-wheels: setup
	rm -rf .whl
	$(BIN)/python -m pip download --quiet --no-deps --only-binary=:all: -d .whl importlib_metadata \
		$$($(BIN)/python -c "import importlib.metadata as m; \
		print(' '.join(f'{n}=={m.version(n)}' for n in ('diffusers', 'transformers', 'peft', 'accelerate')))")

clean:
	rm -rf demo_output .pytest_cache
