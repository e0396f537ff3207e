# Convenience targets; README.md holds the two canonical set-up commands.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: venv demo test lint format bench ci

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

ci:
	.ci/run
