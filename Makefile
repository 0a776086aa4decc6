# Targets named in the README. Everything runs inside .venv, made on demand.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
BACKENDS ?= tensorflow jax torch
PYTEST_ARGS ?=

.PHONY: venv test test-one lint clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[cpu,jax,torch,test]"
	touch $@

# The whole suite under every Keras backend; fails on any failure, including
# a run that collects no test (pytest exit code 5).
test: venv lint
	@set -e; for backend in $(BACKENDS); do \
	  echo "=== KERAS_BACKEND=$$backend"; \
	  KERAS_BACKEND=$$backend $(BIN)/python -m pytest $(PYTEST_ARGS); \
	done

lint: venv
	$(BIN)/ruff check moco_keras tests
	$(BIN)/ruff format --check moco_keras tests

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
