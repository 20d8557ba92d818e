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
# Short from-scratch training: a higher lr and only the colour/geometry augmentations that help in 900 steps.
# Training runs at the images' own 160 px (multiscale [160, 160]); evaluation letterboxes them to 224 px
# (data.img_size), where the many small shapes are easier to find: AP50 0.66 at 160, 0.71 at 192, 0.73 at 224.
# train.amp=auto: bf16 autocast where the CPU has native bf16 (AVX512-BF16 / AMX; the bf16 training step measured
# faster there, BENCHMARKS.md), fp32 elsewhere; evaluation picks its form by a probe (eval.amp auto). The first log
# line says which ran. DEMO_AMP=fp32 (or bf16) chooses by hand: make demo DEMO_AMP=fp32
DEMO_AMP ?= auto
# train.clip_grad_norm=10 rescales every step (the norm here is 20-35): with Adam, a normalised gradient; the demo was
# tuned with it (AP50 0.73; 0.70 with args.yaml's 10000, BENCHMARKS.md "The demo").
DEMO_SET := data.root=data/shapes model.num_classes=6 model.arch=yolov3-tiny data.img_size=224 \
	data.multiscale=[160,160] data.workers=2 train.batch_size=16 train.subdivisions=1 train.steps=900 \
	train.lr=0.002 train.burn_in=50 train.lr_steps=[750,850] train.amp=$(DEMO_AMP) train.checkpoint_every=100 \
	eval.every=450 logging.every=50 logging.name=demo augment.multiplicative_noise.p=0 augment.clahe.p=0 \
	augment.posterize.p=0 augment.to_gray.p=0 augment.gauss_noise.p=0 augment.coarse_dropout.p=0 \
	augment.affine.p=0.3 train.clip_grad_norm=10

data/shapes/annotations/instances_val2017.json: | install
	$(PY) -m datasets.shapes --out data/shapes --train 2000 --val 200 --size 160

demo: install data/shapes/annotations/instances_val2017.json
	MALLOC_MMAP_THRESHOLD_=1000000000 MALLOC_TRIM_THRESHOLD_=1000000000 \
		$(PY) main.py --device cpu --set $(DEMO_SET)

lint: install
	$(PY) -m ruff check .

test: lint
	$(PY) -m pytest -q
