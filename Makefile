# turbolm: `make demo` trains on the embedded corpus, `make test` runs the test suite.
# Both create (or reuse) the virtual environment $(VENV) and install the project into it.

VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.turbolm-installed
PYTHON ?= python3
# The CUDA sources compile (not run) wherever nvcc exists; sm_80 + sm_90 as shipped.
export CUDA_HOME ?= $(shell [ -x /usr/local/cuda/bin/nvcc ] && echo /usr/local/cuda)
export TORCH_CUDA_ARCH_LIST ?= 8.0;9.0
export MAX_JOBS ?= 2

.PHONY: install demo demo-finetune test test-all lint format clean

$(STAMP): pyproject.toml setup.py
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP)

DEMO_RUN ?= runs/demo
# The demo first builds the C++ kernels (CPU only, about a minute, unless a GPU is present), so
# that training, eval and generation run them: `auto` never starts a compiler on its own on a
# CPU machine. Without a working compiler the demo still runs, on the torch backends.
DEMO_ENV ?= TURBOLM_EXT_CUDA=$(if $(wildcard /dev/nvidia0),1,0)

demo: install
	@$(DEMO_ENV) $(PY) -m turbolm.ext > /dev/null \
		|| echo "turbolm: the C++ kernels could not be built; the demo runs on the torch backends"
	$(DEMO_ENV) $(VENV)/bin/turbolm train train.out_dir=$(DEMO_RUN) --overwrite
	$(DEMO_ENV) $(VENV)/bin/turbolm eval --checkpoint $(DEMO_RUN)
	$(DEMO_ENV) $(VENV)/bin/turbolm generate --checkpoint $(DEMO_RUN) --prompt 'def ' \
		--max-new-tokens 200 --seed 0

DEMO_FT ?= runs/demo-finetune

# Pretrain a small Transformer on the embedded corpus, LoRA-fine-tune it to tell which stdlib
# package a chunk of source comes from (split by file), evaluate on held-out files: prints
# per-class / macro precision, recall, F1, the confusion matrix and the majority baseline.
demo-finetune: install
	$(PY) -m turbolm.finetune.demo --out $(DEMO_FT)/task
	$(VENV)/bin/turbolm train -c configs/finetune_demo_base.yaml train.out_dir=$(DEMO_FT)/base --overwrite
	$(VENV)/bin/turbolm finetune -c configs/finetune_demo.yaml --checkpoint $(DEMO_FT)/base \
		--data $(DEMO_FT)/task/train.jsonl --val-data $(DEMO_FT)/task/val.jsonl \
		train.out_dir=$(DEMO_FT)/lora --overwrite
	$(VENV)/bin/turbolm eval --checkpoint $(DEMO_FT)/base --adapter $(DEMO_FT)/lora \
		--data $(DEMO_FT)/task/test.jsonl

test: install
	$(VENV)/bin/pytest -q

test-all: install
	$(VENV)/bin/pytest -q -m 'slow or not slow'

lint: install
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

format: install
	$(VENV)/bin/ruff format . && $(VENV)/bin/ruff check --fix .

clean:
	rm -rf build *.egg-info .pytest_cache .ruff_cache
