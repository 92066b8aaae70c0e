# addsr-pl: AddSR (adversarial diffusion distillation for blind SR) on PyTorch Lightning + Hydra.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch pins for these machines; the package itself only asks for a range (setup.cfg).
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1
# Without an NVIDIA driver (no nvidia-smi), torch comes from PyTorch's CPU wheel index (about 1 GB
# instead of 7 GB of CUDA wheels); when that index cannot be reached within a few seconds the default
# index is used. TORCH_CPU_INDEX= (empty) always takes the default index.
TORCH_CPU_INDEX ?= $(if $(shell command -v nvidia-smi 2>/dev/null),,https://download.pytorch.org/whl/cpu)
PYTEST_ARGS ?=
# test processes (pytest-xdist): one per core, at most 4 (each holds torch and tiny trainings: about
# 2 GB); PYTEST_WORKERS=0 runs the suite in this process
PYTEST_WORKERS ?= $(shell n=$$(nproc 2>/dev/null || echo 1); echo $$(( n < 4 ? n : 4 )))

.DEFAULT_GOAL := help

help: ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  \033[36m%-12s\033[0m %s\n", $$1, $$2}'

$(VENV)/.install.stamp: setup.cfg pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	@if [ -n "$(TORCH_CPU_INDEX)" ]; then \
		echo "no nvidia-smi: torch's CPU build from $(TORCH_CPU_INDEX)"; \
		$(PY) -m pip install -q --no-deps --timeout 5 --retries 0 --index-url $(TORCH_CPU_INDEX) $(TORCH_PINS) \
			|| echo "$(TORCH_CPU_INDEX) cannot be reached: torch from the default index"; \
	fi
	$(PY) -m pip install -q $(TORCH_PINS)
	$(PY) -m pip install -q -e ".[dev]"
	@touch $@

install: $(VENV)/.install.stamp ## create .venv when missing and install the package with its dev extras

test: install ## run the test suite (tiny models, CPU), one test process per core
	$(PY) -m pytest -n $(PYTEST_WORKERS) --dist worksteal $(PYTEST_ARGS)

test-fast: install ## the test suite without the slow cases
	$(PY) -m pytest -n $(PYTEST_WORKERS) --dist worksteal -m "not slow" $(PYTEST_ARGS)

lint: install ## ruff lint and format check
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/ruff format --check src tests bench

format: install ## apply ruff's fixes and formatting
	$(VENV)/bin/ruff check --fix src tests bench
	$(VENV)/bin/ruff format src tests bench

demo: install ## the main job on its embedded default: tiny AddSR student distilled from the committed tiny teacher on rendered text pages (CPU), then outputs/demo/report.html
	$(PY) -m addsr_pl.demo

demo-teacher: install ## retrain the demo's committed tiny teacher (assets/demo_teacher, about 40 minutes on 2 cores)
	$(PY) -m addsr_pl.demo make_teacher=true output_dir=outputs/demo_teacher

# What bench/gpu_check.sh needs beyond what the GPU machines have (torch, timm, transformers, lightning),
# as wheels for their Python; pinned to the versions tested here.
WHEELHOUSE ?= .wheelhouse
GPU_PYTHON_VERSION ?= 3.12
GPU_WHEELS ?= diffusers==0.42.1 hydra-core==1.3.8 omegaconf==2.3.1 kornia==0.9.0 kornia_rs==0.2.0
GPU_SDISTS ?= antlr4-python3-runtime==4.9.3
GPU_PLATFORMS ?= manylinux_2_28_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64

wheelhouse: install ## download the wheels bench/gpu_check.sh installs offline on a GPU machine into .wheelhouse/
	$(PY) -m pip download -q --no-deps --only-binary=:all: --python-version $(GPU_PYTHON_VERSION) \
		--implementation cp $(addprefix --platform ,$(GPU_PLATFORMS)) -d $(WHEELHOUSE) $(GPU_WHEELS)
	$(PY) -m pip wheel -q --no-deps -w $(WHEELHOUSE) $(GPU_SDISTS)
	@ls $(WHEELHOUSE)

gpu-check: ## bash bench/gpu_check.sh on a CUDA machine (OUT=outputs/gpu_check); --smoke runs it on the CPU
	PYTHON=$(PY) bash bench/gpu_check.sh

clean: ## remove caches and outputs (keeps .venv)
	rm -rf .pytest_cache .ruff_cache outputs multirun build dist src/*.egg-info
	find . -name __pycache__ -type d -prune -not -path "./$(VENV)/*" -exec rm -rf {} +

.PHONY: help install test test-fast lint format demo demo-teacher clean wheelhouse gpu-check
