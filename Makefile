# Convenience targets; README.md holds the two canonical set-up commands.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: venv demo test lint format bench ci native

venv:
	python3 -m venv $(VENV) && $(PY) -m pip install -q -e '.[test,dev]'

demo:
	$(PY) -m atpo_jax.launch --config=configs/search_qa.py

test:
	$(PY) -m pytest -q

lint:
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

format:
	$(VENV)/bin/ruff format . && $(VENV)/bin/ruff check --fix .

bench:
	$(PY) benchmarks/kernels.py

# Build the native CPU kernel into the cache now instead of on first use (ATPO_JAX_NATIVE).
native:
	$(PY) -c "from atpo_jax.kernels import native; print(native.build_run_mean())"

ci:
	.ci/run
