# Targets named in the README. Everything runs inside .venv, made on demand.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
BACKENDS ?= tensorflow jax torch
# The ten slowest tests of each backend close its report.
PYTEST_ARGS ?= --durations=10
# Test processes per backend (pytest-xdist): on 2 cores two of them overlap
# one's imports, process starts and waits with the other's compute, each
# with its share of the cores as threads (conftest.py). A test at a time to
# the first process free (the long process tests first), tests that share a
# module fixture as one group (`xdist_group`).
PYTEST_WORKERS ?= 2
# The quick start runs on any backend (make demo DEMO_BACKEND=jax).
DEMO_BACKEND ?= tensorflow
DEMO_ARGS ?=
SUDO := $(shell [ "$$(id -u)" -eq 0 ] || echo sudo)
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
# TensorFlow's oneDNN kernels, which it turns on by itself only on CPUs
# with AVX-512, for AVX2-only CPUs too. Exported to every command here (the suite imports TensorFlow before moco_keras could
# set it); a value in the environment wins.
export TF_ENABLE_ONEDNN_OPTS ?= 1

.PHONY: venv test lint demo fashion-mnist docs bench bench-gpu bench-suite clean

venv: $(VENV)/.installed

# Installed byte-compiled: where PYTHONDONTWRITEBYTECODE is set, a module
# pip did not compile is compiled again by every process that imports it.
$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[cpu,jax,torch,test,docs,onnx]"
	# keras-hub (export --format=keras_hub) without its dependency chain
	# tensorflow-text -> tensorflow, whose wheel clashes with tensorflow-cpu:
	# the packages its import needs, pinned, with --no-deps.
	$(BIN)/python -m pip install --quiet --no-deps -c constraints.txt \
	  keras-hub tensorflow-text kagglehub kagglesdk tokenizers sentencepiece \
	  huggingface_hub regex pyyaml
	touch $@

# The whole suite under every Keras backend; fails on any failure, including
# a run that collects no test (pytest exit code 5).
test: venv lint fashion-mnist
	@set -e; for backend in $(BACKENDS); do \
	  echo "=== KERAS_BACKEND=$$backend"; \
	  KERAS_BACKEND=$$backend $(BIN)/python -m pytest \
	    -n $(PYTEST_WORKERS) --dist loadgroup $(PYTEST_ARGS); \
	done

lint: venv
	$(BIN)/ruff check moco_keras tests bench
	$(BIN)/ruff format --check moco_keras tests bench

# The main job: MoCo v2 on Fashion-MNIST, then kNN accuracy (README, Results).
demo: venv fashion-mnist
	KERAS_BACKEND=$(DEMO_BACKEND) $(BIN)/python -m moco_keras.recipes.quickstart \
	  --workdir=runs/quickstart $(DEMO_ARGS)

# The CPU benchmarks, each table into its section of BENCHMARKS.md, the
# learning runs' records and plot into bench/results/ (hours on 2 cores,
# most of it the learning benchmark's four runs).
# BENCH_ARGS go to the learning benchmark, e.g. --configs=torch-plain,tensorflow
BENCH_ARGS ?=
bench: venv fashion-mnist
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[bench]"
	mkdir -p bench/results
	$(BIN)/python bench/pipeline.py --output=BENCHMARKS.md
	KERAS_BACKEND=tensorflow $(BIN)/python bench/shuffle.py --output=BENCHMARKS.md
	$(BIN)/python bench/train_step.py --model=cifar18 --runs=3 --output=BENCHMARKS.md
	$(BIN)/python bench/train_step.py --model=resnet50 --runs=2 --steps=4 \
	  --output=BENCHMARKS.md
	@set -e; for backend in torch tensorflow jax; do \
	  KERAS_BACKEND=$$backend $(BIN)/python bench/health_cost.py --rounds=12 \
	    --steps=3 --output=BENCHMARKS.md; \
	done
	@set -e; for backend in torch tensorflow jax; do \
	  KERAS_BACKEND=$$backend $(BIN)/python bench/float32_step.py \
	    --output=BENCHMARKS.md; \
	done
	$(BIN)/python bench/quickstart_v3.py --output=BENCHMARKS.md
	$(BIN)/python bench/learning.py --output=bench/results --markdown=BENCHMARKS.md \
	  $(BENCH_ARGS)

# The MoCo v2 step on one GPU per Keras backend against plain PyTorch, then the
# input pipeline on this host's cores (bench/gpu.py; under 8 minutes on one
# GPU). Backends not installed are skipped; so is the pipeline without
# TensorFlow. GPU_ARGS go to the script, e.g. --configs=jax-bf16,torch-plain-bf16
GPU_ARGS ?=
bench-gpu: venv
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[bench]"
	mkdir -p bench/results
	$(BIN)/python bench/gpu.py --output=BENCHMARKS.md $(GPU_ARGS)

# The docs site into build/site, warnings as errors (mkdocs.yml).
docs: venv
	$(BIN)/mkdocs build --strict --site-dir build/site

# The suite's time on a clean clone, as CI runs it (keep the machine idle).
bench-suite: venv
	$(BIN)/python bench/suite.py --output=BENCHMARKS.md

# Debian's dataset-fashion-mnist: the embedded default data.
fashion-mnist: $(FMNIST)

$(FMNIST):
	export DEBIAN_FRONTEND=noninteractive; \
	$(SUDO) apt-get install -y dataset-fashion-mnist || \
	  { $(SUDO) apt-get update && $(SUDO) apt-get install -y dataset-fashion-mnist; }

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
