# Everyday commands. `make test` and `make demo` set everything up on first use.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
DEMO_MINUTES ?= 20
DEMO_PORT ?= 8000

.PHONY: setup test test-slow lint demo bench data clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, so that the dependencies below never pull a multi-GB CUDA build by accident
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	bash data_scripts/install_debian_packages.sh
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

lint: setup
	$(VENV)/bin/ruff check nmt serve tests data_scripts benchmarks
	$(VENV)/bin/ruff format --check nmt serve tests data_scripts benchmarks
	$(VENV)/bin/mypy nmt serve

test: lint
	$(VENV)/bin/pytest -q

test-slow: setup
	$(VENV)/bin/pytest -q -m slow

data: setup
	$(PY) data_scripts/bible.py --out data/bible-es-en

demo: setup
	bash data_scripts/demo.sh $(DEMO_MINUTES) $(DEMO_PORT)

bench: setup
	$(PY) -m benchmarks.run

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
