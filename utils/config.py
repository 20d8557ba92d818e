"""The run configuration: one schema (pydantic v2 models, one per YAML group) that holds every default, YAML files that
overlay it, and `--set` overrides applied last.

`args.yaml` is the schema's defaults written out with comments (tests/test_no_dead_keys.py keeps the two equal). A
`--config` file (args.yaml, configs/darknet.yaml, configs/demo.yaml or your own) is an overlay on those defaults: a
group or key left out keeps its default, and a mapping-valued key (an `augment:` entry) changes only the entries it
names. ``--set group.key=value`` (the value parsed as YAML; ``group.key.entry=value`` for one entry of a mapping)
comes last.

To add a setting, add a typed field with its default (and its Field bounds) to its section; checks across fields go in
the section's model validator, which reports with ``fail(key, value, problem)``. Every value is checked here, once,
at load time; the layers that use it trust it. Unknown keys are errors (extra="forbid"), types are strict (an int is
accepted where a float is meant, as YAML writes 1.0 as 1), and no value holds nan or infinity. The model's vocabulary
(models/tables.py) and the augmentations (datasets/augmentations.py) are leaf modules the validators import when they
run: the one import of this layer from those above (tests/test_layering.py allows exactly these two).

Loading (files, overlays, --set) is utils/config_load.py. Every problem raises ConfigError reading
``SOURCE: group.key=VALUE: what is wrong / what would be right``, where SOURCE is the file or ``--set`` that gave the
value; pydantic's ValidationError is turned into that one line.
"""
from __future__ import annotations

import difflib
import math
import typing
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal, NoReturn

from pydantic import BaseModel, ConfigDict, Field, model_validator

MAX_IMG_SIZE = 8192  # pixels; far beyond what fits in memory with any batch
MAX_WORKERS = 256
SCALE_BELOW = 8  # data.multiscale values below this are factors of data.img_size, the others pixels

Optimizer = Literal["adam", "sgd"]
Recipe = Literal["auto", "coco", "transfer"]
Scheduler = Literal["steps", "cosine", "constant"]
TrainAmp = Literal["fp32", "fp16", "bf16", "auto"]
EvalAmp = Literal["auto", "fp32", "bf16", "fp16"]  # models/forms.py
Freeze = Literal["none", "encoder"]
# COCOeval.stats in its order (cocoeval.py summarize()): AP at IoU .50:.95, .50, .75, by area; AR at 1/10/100 dets.
Metric = Literal["AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl"]
Backend = Literal["pycocotools", "faster_coco_eval"]
OPTIMIZERS, COCO_STATS = typing.get_args(Optimizer), typing.get_args(Metric)


class ConfigError(ValueError):
    """A config value that cannot be used; the message says where it came from and why."""


def unknown(what: str, name: Any, valid: Iterable[str]) -> str:
    """"unknown WHAT 'name'; did you mean ...? valid WHATs: ..." for a name that is not among `valid`."""
    valid = list(valid)
    close = difflib.get_close_matches(str(name), valid, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return f"unknown {what} {name!r}; {hint}valid {what}s: {', '.join(valid)}"


class Invalid(ValueError):
    """A validator's finding about one key of its section; load time turns it into ConfigError naming the source."""

    def __init__(self, key: str, value: Any, problem: str) -> None:
        super().__init__(f"{key}={value!r}: {problem}")
        self.key, self.value, self.problem = key, value, problem


def fail(key: str, value: Any, problem: str) -> NoReturn:
    """Raise Invalid for `key` of the section being validated (the group and the source are added at load time)."""
    raise Invalid(key, value, problem)


class Section(BaseModel):
    """One YAML group: unknown keys are errors, types strict (an int accepted for a float), no nan or infinity."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class ModelConfig(Section):
    """Network architecture and its initial weights."""

    arch: str = "yolov3"  # models/tables.py ENCODERS: the architectures and the encoders each can be built with
    encoder: str = "darknet53"
    num_classes: int | None = None  # None: the training data's class count (main.py resolves it); 1 .. MAX_CLASSES
    # None: Darknet's anchors for the arch; "auto": re-fit them when they fit the training boxes badly
    anchors: list[list[int | float]] | Literal["auto"] | None = None
    pretrained: bool = False  # load ImageNet weights into the encoder
    pretrained_path: str | None = None  # local encoder weights file instead of the default source

    @model_validator(mode="after")
    def _check(self) -> ModelConfig:
        """Values the model cannot be built with: the model's own check (models/tables.py), then the weights file."""
        from models.tables import model_problem  # a leaf module (imports nothing of ours)

        anchors = None if self.anchors == "auto" else self.anchors  # "auto" is resolved at the training start
        classes = 1 if self.num_classes is None else self.num_classes  # None: the data's, at least 1
        if problem := model_problem(self.arch, self.encoder, classes, anchors):
            fail(*problem)
        if self.pretrained and self.pretrained_path is None and self.encoder == "darknet53":
            fail("pretrained_path", None, "model.pretrained is true, and pretrained darknet53 loads darknet53.conv.74 "
                 "from this path; fetch it with models/weights/download_darknet_weights.sh and give its path (or set "
                 "model.pretrained: false)")
        if self.pretrained and self.pretrained_path is not None and not Path(self.pretrained_path).is_file():
            # darknet53 has no default source: only the download script or the user's own copy can help
            fix = ("fetch darknet53.conv.74 with `bash models/weights/download_darknet_weights.sh` (into "
                   "models/weights/) or give the path of a copy" if self.encoder == "darknet53" else
                   "give an existing weights file, or null for the default weights")
            fail("pretrained_path", self.pretrained_path,
                 f"no such file {str(Path(self.pretrained_path).resolve())!r}; {fix}")
        return self


def _check_size(key: str, value: Any, size: int) -> None:
    """Image sizes must be positive multiples of 32, the network's largest stride, up to MAX_IMG_SIZE."""
    if size > MAX_IMG_SIZE:
        fail(key, value, f"{size} is larger than the {MAX_IMG_SIZE} pixels this project accepts")
    if size <= 0 or size % 32:
        below = size // 32 * 32
        fix = "use 32" if below < 32 else f"use {below} or {below + 32}"
        fail(key, value, f"{'' if value == size else f'entry {size} '}must be a positive multiple of 32; {fix}")


class DataConfig(Section):
    """Where the COCO-format data lives and how batches are formed."""

    root: str = "data/coco"  # COCO 2017 layout, a YOLO data.yaml (or its folder) or a VOC folder: datasets/formats.py
    train_images: str | None = None  # None: <root>/images/train2017
    train_annotations: str | None = None  # None: <root>/annotations/instances_train2017.json
    val_images: str | None = None
    val_annotations: str | None = None
    img_size: int = 416  # the network downsamples by 32
    # [min, max] training sizes, step 32: pixels, or factors of img_size (values below SCALE_BELOW; min rounded up,
    # max down to multiples of 32: the default [0.75, 1.5] gives Darknet's 320-608 at 416, 256-480 at 320)
    multiscale: list[int | float] | None = Field(default_factory=lambda: [0.75, 1.5])  # None: img_size only
    multiscale_every: int = Field(10, ge=1)  # optimiser steps (train.batch_size images) between size changes
    # DataLoader worker processes; 0: load in the main process; auto: on a CPU min(4, the cores this process may use),
    # as more only contend with the training step; on a GPU the cores less one, per local process, at most 16
    workers: int | Literal["auto"] = "auto"
    timeout: float = Field(300.0, gt=0)  # seconds to wait for one batch from the workers before it is an error
    skip_bad_images: bool = False  # False: an unreadable image is an error; True: skipped with a warning
    min_box_size: float = Field(2.0, ge=0)  # input pixels; training boxes narrower/shorter after augmentation go

    @model_validator(mode="after")
    def _check(self) -> DataConfig:
        """Sizes the network cannot take."""
        _check_size("img_size", self.img_size, self.img_size)
        if self.workers != "auto" and not 0 <= self.workers <= MAX_WORKERS:
            fail("workers", self.workers, f"must be auto or 0-{MAX_WORKERS} worker processes")
        if (scales := self.multiscale) is not None:
            if len(scales) != 2 or scales[0] > scales[1] or min(scales) <= 0:
                fail("multiscale", scales, "expected [min, max] with 0 < min <= max, or null")
            if (max(scales) < SCALE_BELOW) != (min(scales) < SCALE_BELOW):
                fail("multiscale", scales, f"give both as factors of data.img_size (below {SCALE_BELOW}) or both as "
                     "pixels, not one of each")
            if max(scales) < SCALE_BELOW:
                low, high = self.train_size_range()
                if low > high:
                    fail("multiscale", scales, f"x data.img_size {self.img_size} holds no multiple of 32 (from {low} "
                         f"up, to {high} down)")
                _check_size("multiscale", scales, high)
            else:
                for size in scales:
                    _check_size("multiscale", scales, size)
        return self

    def train_size_range(self) -> tuple[int, int]:
        """data.multiscale in pixels (factors x img_size; min rounded up, max down to multiples of 32), or
        (img_size, img_size) without multi-scale."""
        if self.multiscale is None:
            return self.img_size, self.img_size
        low, high = self.multiscale
        if max(self.multiscale) < SCALE_BELOW:
            return 32 * math.ceil(low * self.img_size / 32 - 1e-9), 32 * math.floor(high * self.img_size / 32 + 1e-9)
        return int(low), int(high)

    def split_paths(self, split: str) -> tuple[Path, Path]:
        """(image folder, annotation file) of split "train" or "val", defaulting from root's COCO 2017 layout."""
        images, annotations = getattr(self, f"{split}_images"), getattr(self, f"{split}_annotations")
        root = Path(self.root)
        return (Path(images) if images else root / "images" / f"{split}2017",
                Path(annotations) if annotations else root / "annotations" / f"instances_{split}2017.json")


def _augment(p: float, **kwargs: Any) -> Any:
    """Default of one augment entry (a fresh dict per config)."""
    return Field(default_factory=lambda: {"p": p, **kwargs})


class AugmentConfig(Section):
    """Training augmentation: each key is an Albumentations 2.x transform (datasets/augmentations.py AUGMENTATIONS)
    with its arguments; p is its probability and p: 0 switches it off."""

    multiplicative_noise: dict[str, Any] = _augment(0.2, multiplier=[0.9, 1.1], per_channel=True)
    clahe: dict[str, Any] = _augment(0.1, clip_limit=4.0)
    posterize: dict[str, Any] = _augment(0.1, num_bits=4)
    to_gray: dict[str, Any] = _augment(0.05)
    random_brightness_contrast: dict[str, Any] = _augment(0.3, brightness_limit=0.2, contrast_limit=0.2)
    rgb_shift: dict[str, Any] = _augment(0.2, r_shift_limit=15, g_shift_limit=15, b_shift_limit=15)
    color_jitter: dict[str, Any] = _augment(0.3, brightness=0.2, contrast=0.2, saturation=0.5, hue=0.02)
    gauss_noise: dict[str, Any] = _augment(0.1, std_range=[0.02, 0.08])
    random_fog: dict[str, Any] = _augment(0.0, fog_coef_range=[0.1, 0.3])  # 225 ms per application at 416
    coarse_dropout: dict[str, Any] = _augment(0.1, num_holes_range=[1, 4], hole_height_range=[0.05, 0.15],
                                              hole_width_range=[0.05, 0.15])
    horizontal_flip: dict[str, Any] = _augment(0.5)
    affine: dict[str, Any] = _augment(0.5, scale=[0.75, 1.25], translate_percent=[-0.1, 0.1])

    @model_validator(mode="after")
    def _check(self) -> AugmentConfig:
        """Build and apply each transform once so that a bad argument is reported now, naming its key."""
        from datasets.augmentations import check_augmentation, make_augmentation  # a leaf module; Albumentations

        for key, field in type(self).model_fields.items():
            kwargs = getattr(self, key)
            try:
                make_augmentation(key, kwargs)
                if kwargs != field.default_factory():  # the defaults are known to work; applying costs up to 50 ms
                    check_augmentation(key, kwargs)
            except ValueError as e:
                fail(key, kwargs, str(e))
        return self


class TrainConfig(Section):
    """Optimisation settings (Darknet's meaning of batch, subdivisions, burn_in and steps)."""

    # auto: `transfer` for a start from trained weights (--weights, model.pretrained) on fewer than 10,000 training
    # images, `coco` otherwise; the transfer recipe changes the values below left at their defaults
    # (utils/recipe.py; the first log lines say which runs and what it set)
    recipe: Recipe = "auto"
    batch_size: int = Field(64, ge=1)  # images per optimiser step
    subdivisions: int = Field(4, ge=1)  # micro-batches per step: batch_size / subdivisions images at once
    steps: int = Field(500200, ge=1)  # optimiser steps in all (Darknet's max_batches)
    optimizer: Optimizer = "adam"  # adam (the seed's) | sgd (the paper's, with momentum)
    lr: float = Field(0.001, gt=0)  # peak learning rate
    momentum: float = Field(0.9, ge=0, lt=1)  # SGD momentum; Adam's beta1
    weight_decay: float = Field(0.0005, ge=0)  # not applied to BatchNorm weights and biases
    # warm-up steps: lr * ((step + 1) / burn_in) ** 4 (Darknet's burn_in, power 4), at most a tenth of the run
    # (BURN_IN_SHARE): a short run is not all warm-up
    burn_in: int = Field(1000, ge=0)
    scheduler: Scheduler = "steps"  # after burn-in: steps | cosine | constant
    # scheduler steps: at these optimiser steps (or, all below 1, fractions of train.steps) ...
    lr_steps: list[int | float] = Field(default_factory=lambda: [400000, 450000])
    lr_scales: list[float] = Field(default_factory=lambda: [0.1, 0.1])  # ... the lr is multiplied by these
    cosine_t0: int = Field(10000, ge=1)  # scheduler cosine: steps of the first cycle (after burn-in)
    cosine_t_mult: int = Field(2, ge=1)  # each next cycle is this many times longer
    cosine_eta_min: float = Field(0.00001, ge=0)  # lr at the bottom of each cycle
    # mixed precision: auto (bf16 on a CPU with native bf16 and on CUDA GPUs with bf16, fp16 with GradScaler on other
    # GPUs, else fp32) | fp16 (+ GradScaler; CUDA only, fp32 on the CPU) | bf16 | fp32 (none)
    amp: TrainAmp = "auto"
    # clip the gradient norm (after unscaling) above this; null: never. The loss is a per-image sum, so healthy norms
    # are 25-4,500 (BENCHMARKS.md, Gradient norms) and this catches outliers only
    clip_grad_norm: float | None = 10000.0  # > 0
    ema: bool = True  # keep an exponential moving average of the weights, used for evaluation
    ema_decay: float = Field(0.9999, gt=0, lt=1)  # ramped up over the first steps (decay * (1 - exp(-step / ema_ramp)))
    ema_ramp: float = Field(2000.0, gt=0)  # optimiser steps: the EMA decay's ramp (YOLOv5's tau)
    checkpoint_every: int = Field(1000, ge=1)  # steps between writes of last.pt (also written at exit)
    patience: int | None = None  # stop after this many evaluations without improvement; null: never
    max_bad_steps: int = Field(20, ge=1)  # stop after this many consecutive non-finite (skipped) steps
    sync_bn: bool = False  # under DDP: synchronise BatchNorm statistics across processes
    seed: int = Field(0, ge=0)  # seeds weights, data order and augmentation
    # minutes the whole run may take (null: no limit): the first steps are timed and train.steps is fitted so that
    # the whole schedule (absolute lr_steps and cosine_t0 scale with it), the evaluations and last.pt fit in
    time_limit: float | None = None  # > 0
    # end a run started from a whole trained model with the mix (1 - a) * start + a * trained (a in 0, .25, .5,
    # .75, 1) with the best AP + AP50 on the validation set among those not below the start in AP, AP50 and
    # eval.metric (WiSE-FT: engine/merge.py); the transfer recipe turns it on
    keep_start: bool = False
    freeze: Freeze = "none"  # none | encoder: the encoder (backbone) does not train for the first freeze_steps steps
    freeze_steps: int = Field(0, ge=0)  # optimiser steps with `freeze` in force (its BatchNorm statistics frozen too)
    encoder_lr_scale: float = Field(1.0, ge=0, le=1)  # the encoder's lr is train.lr times this (discriminative lr)

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        """The batch split and the lr schedule's steps and scales."""
        if self.batch_size % self.subdivisions:
            fail("subdivisions", self.subdivisions, f"must be >= 1 and divide train.batch_size ({self.batch_size})")
        if any(scale <= 0 for scale in self.lr_scales) or not math.isfinite(self.lr * math.prod(self.lr_scales)):
            fail("lr_scales", self.lr_scales, f"must be positive, and train.lr ({self.lr}) times all of them a finite "
                 "number")
        for key, low, null in (("time_limit", 0, "a positive number of minutes, or null for no limit"),
                               ("clip_grad_norm", 0, "positive, or null for no clipping"),
                               ("patience", 1, "at least 1, or null to never stop early")):
            if (value := getattr(self, key)) is not None and (value <= 0 if low == 0 else value < low):
                fail(key, value, f"must be {null}")
        steps = self.lr_steps
        if len(steps) != len(self.lr_scales) or sorted(steps) != steps:
            fail("lr_steps", steps, f"must be increasing and as many as train.lr_scales ({self.lr_scales})")
        if any(v < 0 for v in steps) or (any(v < 1 for v in steps if v) and any(v >= 1 for v in steps)):
            fail("lr_steps", steps, "must be all steps (integers >= 0) or all fractions of train.steps (below 1), "
                 "not a mix")
        if any(v >= 1 and v != int(v) for v in steps):
            fail("lr_steps", steps, "steps (values of 1 and more) must be whole numbers")
        return self

    @property
    def micro_batch_size(self) -> int:
        """Images per forward/backward pass."""
        return self.batch_size // self.subdivisions


class LossConfig(Section):
    """YOLOv3 loss (Darknet's yolo_layer.c) and the weight of each term."""

    ignore_threshold: float = Field(0.7, gt=0, le=1)  # no objectness penalty above this IoU with a ground truth
    xy_weight: float = Field(1.0, ge=0)  # BCE on the in-cell centre offset
    wh_weight: float = Field(1.0, ge=0)  # squared error of log(w / anchor_w), log(h / anchor_h)
    obj_weight: float = Field(1.0, ge=0)  # objectness BCE
    cls_weight: float = Field(1.0, ge=0)  # multi-label class BCE


class LoggingConfig(Section):
    """Where runs are written and how often they report."""

    dir: str = "logs"  # run folders are created here: <dir>/<YYmmdd-HHMMSS>_<name>
    name: str = "yolov3"  # the run's name (no path separators)
    every: int = Field(20, ge=1)  # steps between log lines and TensorBoard scalars
    images: int = Field(4, ge=0)  # validation images drawn to TensorBoard at each evaluation (0: none)

    @model_validator(mode="after")
    def _check(self) -> LoggingConfig:
        """A run name that is one folder name."""
        if not self.name or any(c in self.name for c in "/\\:"):
            fail("name", self.name, "must be non-empty without '/', '\\' or ':'")
        return self


class EvalConfig(Section):
    """COCO evaluation: post-processing of predictions and the COCO API that scores them."""

    batch_size: int = Field(16, ge=1)  # validation images per forward pass
    conf_threshold: float = Field(0.001, ge=0, lt=1)  # score = objectness x class probability; mAP wants it low
    nms_iou: float = Field(0.6, gt=0, le=1)  # same-class boxes overlapping more than this are suppressed
    max_det: int = Field(100, ge=1)  # detections kept per image (COCO's maxDets)
    max_candidates: int = Field(10000, ge=1)  # best candidates per image entering NMS (bounds untrained models' time)
    multi_label: bool = True  # every class above conf_threshold is a candidate, not only each box's best
    every: int = Field(5000, ge=1)  # training: optimiser steps between evaluations (and at the end)
    metric: Metric = "AP50"  # training: the number that decides best.pt and early stopping
    subset: int | None = None  # evaluate the first N validation images only (>= 1); None: all
    backend: Backend = "pycocotools"  # or faster_coco_eval (same numbers, faster; pip install faster-coco-eval)
    amp: EvalAmp = "auto"  # inference precision: auto (a CPU: the fastest of fp32 / packed / bf16 / packed bf16 where
    # native, by a probe; CUDA: fp32) | fp32 | bf16 (autocast or packed) | fp16 (autocast, CUDA only; fp32 on a CPU)

    @model_validator(mode="after")
    def _check(self) -> EvalConfig:
        """A subset of at least one image."""
        if self.subset is not None and self.subset < 1:
            fail("subset", self.subset, "must be at least 1, or null for all images")
        return self


class DetectConfig(Section):
    """Inference tools (detect.py, visualization.py, export.py --nms); the rest of post-processing is eval's."""

    conf_threshold: float = Field(0.25, ge=0, lt=1)  # score a detection needs to be drawn or written


class Config(BaseModel):
    """The whole run configuration, one field per YAML group."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    detect: DetectConfig = Field(default_factory=DetectConfig)
