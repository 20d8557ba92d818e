# `make demo` and `make test` set everything up on a fresh machine (a venv in .venv) and run.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
export NO_ALBUMENTATIONS_UPDATE := 1

.PHONY: demo test lint install

$(VENV)/.installed: requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt -r requirements-dev.txt
	touch $@

install: $(VENV)/.installed

demo: install
	$(PY) -m tools.model_summary --all

lint: install
	$(PY) -m ruff check .

test: lint
	$(PY) -m pytest -q
