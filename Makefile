# Quickstart: `make demo` and `make test`; both set up .venv on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch first, so no resolver picks another build. On a GPU cluster pass the build for your CUDA, e.g.
#   make setup TORCH_SPEC="torch torchvision --index-url https://download.pytorch.org/whl/cu128"
# or install torch into the venv yourself and pass TORCH_SPEC= (empty) to keep it.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
DATA_DIR ?= data/synthetic
PYTEST_ARGS ?=

.PHONY: setup demo data test test-unit test-all slurm-deps bench-data gpu-report gpu-wheels clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	if [ -n "$(TORCH_SPEC)" ]; then $(PY) -m pip install $(TORCH_SPEC); fi
	$(PY) -m pip install -e '.[dev]'
	touch $@

# The built-in synthetic dataset: 64 px shapes with captions, LAION-style metadata and broken-free shards.
data: $(DATA_DIR)/train/00007.tar $(DATA_DIR)/val/00000.tar

$(DATA_DIR)/train/00007.tar: | setup
	$(PY) scripts/make_synthetic_shards.py --out $(DATA_DIR)/train --num-samples 4000 --size 64 --seed 0 --shard-size 500

$(DATA_DIR)/val/00000.tar: | setup
	$(PY) scripts/make_synthetic_shards.py --out $(DATA_DIR)/val --num-samples 256 --size 64 --seed 1 --shard-size 256

demo: setup data
	HF_HUB_OFFLINE=1 WANDB_MODE=offline $(PY) scripts/demo.py --data $(DATA_DIR)

test: setup
	HF_HUB_OFFLINE=1 WANDB_MODE=offline $(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

# Unit tests alone (pure functions and networks, no training run): about two minutes.
test-unit: setup
	HF_HUB_OFFLINE=1 WANDB_MODE=offline $(PY) -m pytest -q -m "not slow" tests/unit $(PYTEST_ARGS)

test-all: setup
	HF_HUB_OFFLINE=1 WANDB_MODE=offline $(PY) -m pytest -q $(PYTEST_ARGS)

# The real-Slurm test needs these (root, Debian/Ubuntu); without them it is skipped.
slurm-deps:
	@if command -v slurmctld >/dev/null && command -v munged >/dev/null; then echo "slurm: installed"; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends slurmctld slurmd slurm-client munge \
	  || (apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
	      slurmctld slurmd slurm-client munge); \
	else echo "slurm: not installed and no root apt-get; tests/integration/test_slurm.py will be skipped"; fi

bench-data: setup
	$(PY) scripts/bench_data.py

# The GPU report (scripts/gpu_report.py): speed, memory and input-side cases on one GPU in a 6-minute budget,
# written to runs/gpu_report/report.md and .json. GPU_REPORT_ARGS=--smoke runs each case at tiny size on the CPU.
# On a GPU machine without package access whose python3 has torch, lightning and timm (a lent benchmark box): run
# `make gpu-wheels` where PyPI is reachable, bring .whl/ along, and there `make gpu-report GPU_WHEELS=.whl`.
GPU_REPORT_ARGS ?=
GPU_WHEELS ?=
GPU_REPORT_PY ?= $(if $(GPU_WHEELS),python3,$(PY))
GPU_SITE := /tmp/wuerstchen-site
gpu-report: $(if $(GPU_WHEELS),,setup)
	$(if $(GPU_WHEELS),$(GPU_REPORT_PY) -m pip install -q --no-index --no-deps --no-compile --upgrade \
	  --target $(GPU_SITE) $(GPU_WHEELS)/*.whl &&) \
	PYTHONPATH=$(if $(GPU_WHEELS),$(GPU_SITE):)$(CURDIR) HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 \
	  $(GPU_REPORT_PY) scripts/gpu_report.py $(GPU_REPORT_ARGS)

# The project's pure-Python dependencies a torch-only GPU image lacks, as wheels in .whl/ (for GPU_WHEELS above).
GPU_WHEEL_SPECS ?= hydra-core==1.3.8 omegaconf==2.3.1 webdataset==1.0.2 braceexpand==0.1.7 ftfy==6.3.1 \
	wcwidth==0.9.4 open_clip_torch==3.3.0
gpu-wheels: setup
	$(PY) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	  --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl $(GPU_WHEEL_SPECS)
	$(PY) -m pip wheel -q --no-deps -w .whl antlr4-python3-runtime==4.9.3   # omegaconf's parser: an sdist only

clean:
	rm -rf runs $(DATA_DIR) .pytest_cache
