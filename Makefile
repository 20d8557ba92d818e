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

# The demo: synthetic shapes (written once into data/shapes at 160 px), YOLOv3-tiny trained at 160 px on the CPU,
# about 10 minutes on 2 cores; the run folder lands in logs/ (TensorBoard: .venv/bin/tensorboard --logdir logs).
# Its settings, and why each, are the overlay configs/demo.yaml.
# train.amp=auto: bf16 autocast where the CPU has native bf16 (AVX512-BF16 / AMX; the bf16 training step measured
# faster there, BENCHMARKS.md), fp32 elsewhere; evaluation picks its form by a probe (eval.amp auto). The first log
# line says which ran. DEMO_AMP=fp32 (or bf16) chooses by hand: make demo DEMO_AMP=fp32
DEMO_AMP ?= auto

data/shapes/annotations/instances_val2017.json: | install
	$(PY) -m datasets.shapes --out data/shapes --train 2000 --val 200 --size 160

demo: install data/shapes/annotations/instances_val2017.json
	MALLOC_MMAP_THRESHOLD_=1000000000 MALLOC_TRIM_THRESHOLD_=1000000000 \
		$(PY) main.py --device cpu --config configs/demo.yaml --set train.amp=$(DEMO_AMP)

lint: install
	$(PY) -m ruff check .

test: lint
	$(PY) -m pytest -q
