"""The run configuration's schema: one YAML file (args.yaml) parsed into typed dataclasses, one per section.

The file is grouped in sections (``model:``, ``data:``), one dataclass each. Any group or key may be left out to
get its default. ``--set group.key=value`` overrides a value from the command line; the value is parsed as YAML.

To add a setting, add a typed field with a default to its section dataclass; its type is checked from the hint
(utils/typed_yaml.py), and value constraints go in that section's ``check()``. To add a section, write such a
dataclass and add it as a field of ``Config``. Every value is checked here, once, at load time; the layers that
use it trust it. This module imports none of them: what it must know of them (the model's vocabulary, COCO's
metric names, Albumentations' transforms) is a table here or in utils/.

Every problem raises ConfigError reading ``SOURCE: group.key=VALUE: what is wrong / what would be right``, where
SOURCE is the file or ``--set``.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from utils.typed_yaml import ConfigError, Origin, build_config, choices, unknown, yaml_load

__all__ = ["ConfigError", "Config", "load_config", "config_from_dict", "config_to_dict", "save_config"]


MAX_CLASSES = 10_000  # YOLO9000 detects 9418
MAX_IMG_SIZE = 8192  # pixels; far beyond what fits in memory with any batch
MAX_WORKERS = 256
SCALE_BELOW = 8  # data.multiscale values below this are factors of data.img_size, the others pixels


# The model's vocabulary, the one table both this schema and models/ use: the encoders each architecture can be
# built with (yolov3-tiny has its own fixed backbone, named darknet53 here), Darknet's anchors in input pixels
# (w, h), which anchors each head uses, stride-32 head first (yolov3.cfg / yolov3-tiny.cfg `[yolo] anchors=` and
# `mask=`), and the heads' strides. Tiny's second mask 1,2,3 is Darknet's own choice (anchor 0 is used by no head);
# we keep it so that yolov3-tiny.weights work unchanged.
ENCODERS = {"yolov3": ("darknet53", "mobilenet_v3_large", "mobilenet_v3_small"), "yolov3-tiny": ("darknet53",)}
DARKNET_ANCHORS = {
    "yolov3": ((10, 13), (16, 30), (33, 23), (30, 61), (62, 45), (59, 119), (116, 90), (156, 198), (373, 326)),
    "yolov3-tiny": ((10, 14), (23, 27), (37, 58), (81, 82), (135, 169), (344, 319)),
}
ANCHOR_MASKS = {"yolov3": ((6, 7, 8), (3, 4, 5), (0, 1, 2)), "yolov3-tiny": ((3, 4, 5), (1, 2, 3))}
STRIDES = {"yolov3": (32, 16, 8), "yolov3-tiny": (32, 16)}

# COCOeval.stats in its order (cocoeval.py summarize()): AP at IoU .50:.95, .50, .75, by area; AR at 1/10/100 dets.
COCO_STATS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


def model_problem(arch: str, encoder: str, num_classes: int, anchors: list | None) -> tuple[str, Any, str] | None:
    """The one check of a model description (the config's and build_model's): None, or (key, value, problem)."""
    if arch not in ENCODERS:
        return "arch", arch, f"unknown architecture; use one of {choices(ENCODERS)}"
    if encoder not in ENCODERS[arch]:
        return "encoder", encoder, (f"does not exist for {arch}; use {choices(ENCODERS[arch])}"
                                    + (" (yolov3-tiny has its own fixed backbone)" if arch == "yolov3-tiny" else ""))
    if num_classes < 1:
        return "num_classes", num_classes, "must be at least 1"
    if num_classes > MAX_CLASSES:
        return "num_classes", num_classes, f"must be at most {MAX_CLASSES}"
    if anchors is not None:
        expected = len(DARKNET_ANCHORS[arch])
        if len(anchors) != expected:
            return "anchors", anchors, f"expected {expected} [w, h] pairs for {arch} (it needs {expected}: " \
                f"{len(ANCHOR_MASKS[arch][0])} per head), found {len(anchors)}"
        for pair in anchors:
            if len(pair) != 2 or min(pair) <= 0:
                return "anchors", anchors, f"anchor {pair!r} is not two positive numbers [w, h]"
    return None


@dataclass
class ModelConfig:
    """Network architecture and its initial weights."""

    arch: str = "yolov3"
    encoder: str = "darknet53"
    num_classes: int | None = None  # None: the training data's class count (main.py resolves it)
    anchors: list[list[int | float]] | str | None = None  # None: Darknet's; "auto": re-fit if they fit badly
    pretrained: bool = False  # load ImageNet weights into the encoder
    pretrained_path: str | None = None  # local encoder weights file instead of the default source

    def check(self, origin: Origin) -> None:
        """Raise ConfigError for values the model cannot be built with."""
        if isinstance(self.anchors, str) and self.anchors != "auto":
            origin.fail("anchors", self.anchors, 'expected null, "auto" or [w, h] pairs')
        anchors = None if isinstance(self.anchors, str) else self.anchors  # "auto" is resolved at the training start
        classes = 1 if self.num_classes is None else self.num_classes  # None: the data's, at least 1
        if problem := model_problem(self.arch, self.encoder, classes, anchors):
            origin.fail(*problem)
        if self.pretrained and self.pretrained_path is None and self.encoder == "darknet53":
            origin.fail("pretrained_path", None, "model.pretrained is true, and pretrained darknet53 loads "
                        "darknet53.conv.74 from this path; fetch it with models/weights/download_darknet_weights.sh "
                        "and give its path (or set model.pretrained: false)")
        if self.pretrained and self.pretrained_path is not None and not Path(self.pretrained_path).is_file():
            # darknet53 has no default source: only the download script or the user's own copy can help
            fix = ("fetch darknet53.conv.74 with `bash models/weights/download_darknet_weights.sh` (into "
                   "models/weights/) or give the path of a copy" if self.encoder == "darknet53" else
                   "give an existing weights file, or null for the default weights")
            origin.fail("pretrained_path", self.pretrained_path,
                        f"no such file {str(Path(self.pretrained_path).resolve())!r}; {fix}")


def _check_size(origin: Origin, key: str, value: Any, size: int) -> None:
    """Image sizes must be positive multiples of 32, the network's largest stride, up to MAX_IMG_SIZE."""
    if size > MAX_IMG_SIZE:
        origin.fail(key, value, f"{size} is larger than the {MAX_IMG_SIZE} pixels this project accepts")
    if size <= 0 or size % 32:
        below = size // 32 * 32
        fix = "use 32" if below < 32 else f"use {below} or {below + 32}"
        entry = "" if value == size else f"entry {size} "
        origin.fail(key, value, f"{entry}must be a positive multiple of 32; {fix}")


@dataclass
class DataConfig:
    """Where the COCO-format data lives and how batches are formed."""

    root: str = "data/coco"  # COCO 2017 layout, a YOLO data.yaml (or its folder) or a VOC folder: datasets/formats.py
    train_images: str | None = None  # None: <root>/images/train2017
    train_annotations: str | None = None  # None: <root>/annotations/instances_train2017.json
    val_images: str | None = None
    val_annotations: str | None = None
    img_size: int = 416  # the network downsamples by 32
    # [min, max] training sizes, step 32: pixels, or factors of img_size (values below SCALE_BELOW; min rounded up,
    # max down to multiples of 32: the default [0.75, 1.5] gives Darknet's 320-608 at 416, 256-480 at 320)
    multiscale: list[int | float] | None = field(default_factory=lambda: [0.75, 1.5])  # None: img_size only
    multiscale_every: int = 10  # optimiser steps (train.batch_size images) between size changes
    workers: int = 4
    timeout: float = 300.0  # seconds to wait for one batch from the workers before it is an error
    skip_bad_images: bool = False  # False: an unreadable image is an error; True: skipped with a warning
    min_box_size: float = 2.0  # input pixels; training boxes narrower/shorter after letterbox + augmentation go

    def check(self, origin: Origin) -> None:
        """Raise ConfigError for values the data pipeline cannot use."""
        _check_size(origin, "img_size", self.img_size, self.img_size)
        if self.multiscale is not None:
            if len(self.multiscale) != 2 or self.multiscale[0] > self.multiscale[1] or min(self.multiscale) <= 0:
                origin.fail("multiscale", self.multiscale, "expected [min, max] with 0 < min <= max, or null")
            if (max(self.multiscale) < SCALE_BELOW) != (min(self.multiscale) < SCALE_BELOW):
                origin.fail("multiscale", self.multiscale, f"give both as factors of data.img_size (below "
                            f"{SCALE_BELOW}) or both as pixels, not one of each")
            if max(self.multiscale) < SCALE_BELOW:
                low, high = self.train_size_range()
                if low > high:
                    origin.fail("multiscale", self.multiscale, f"x data.img_size {self.img_size} holds no multiple "
                                f"of 32 (from {low} up, to {high} down)")
                _check_size(origin, "multiscale", self.multiscale, high)
            else:
                for size in self.multiscale:
                    _check_size(origin, "multiscale", self.multiscale, size)
        if self.multiscale_every < 1:
            origin.fail("multiscale_every", self.multiscale_every, "must be at least 1")
        if not 0 <= self.workers <= MAX_WORKERS:
            origin.fail("workers", self.workers, f"must be 0 (load in the main process) to {MAX_WORKERS}")
        if self.timeout <= 0:
            origin.fail("timeout", self.timeout, "must be a positive number of seconds")
        if self.min_box_size < 0:
            origin.fail("min_box_size", self.min_box_size, "must be >= 0 pixels")

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
    """Default of one augment entry (a fresh dict per Config)."""
    return field(default_factory=lambda: {"p": p, **kwargs})


@dataclass
class AugmentConfig:
    """Training augmentation: each key is an Albumentations 2.x transform (datasets/transforms.py AUGMENTATIONS)
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

    def check(self, origin: Origin) -> None:
        """Build and apply each transform once so that a bad argument is reported now, naming its key."""
        from utils.augmentations import check_augmentation, make_augmentation  # Albumentations: slow to import

        defaults = dataclasses.asdict(AugmentConfig())
        for key, kwargs in dataclasses.asdict(self).items():
            try:
                make_augmentation(key, kwargs)
                if kwargs != defaults[key]:  # the defaults are known to work; applying costs up to 50 ms
                    check_augmentation(key, kwargs)
            except ValueError as e:
                origin.fail(key, kwargs, str(e))


OPTIMIZERS = ("adam", "sgd")
SCHEDULERS = ("steps", "cosine", "constant")
AMP_MODES = ("fp32", "fp16", "bf16", "auto")  # train.amp
EVAL_AMP_MODES = ("auto", "fp32", "bf16", "fp16")  # eval.amp (models/forms.py)
FREEZE = ("none", "encoder")


@dataclass
class TrainConfig:
    """Optimisation settings (Darknet's meaning of batch, subdivisions, burn_in and steps)."""

    batch_size: int = 64  # images per optimiser step
    subdivisions: int = 4  # micro-batches per step: batch_size / subdivisions images go through the model at once
    steps: int = 500200  # optimiser steps in all (Darknet's max_batches)
    optimizer: str = "adam"  # adam (the seed's) | sgd (the paper's, with momentum)
    lr: float = 0.001  # peak learning rate
    momentum: float = 0.9  # SGD momentum; Adam's beta1
    weight_decay: float = 0.0005  # not applied to BatchNorm weights and biases
    # warm-up steps: lr * ((step + 1) / burn_in) ** 4 (Darknet's burn_in, power 4), at most a tenth of the run
    # (BURN_IN_SHARE): a short run is not all warm-up
    burn_in: int = 1000
    scheduler: str = "steps"  # after burn-in: steps | cosine | constant
    # scheduler steps: at these optimiser steps (or, all below 1, fractions of train.steps) ...
    lr_steps: list[int | float] = field(default_factory=lambda: [400000, 450000])
    lr_scales: list[float] = field(default_factory=lambda: [0.1, 0.1])  # ... the lr is multiplied by these
    cosine_t0: int = 10000  # scheduler cosine: steps of the first cycle (after burn-in)
    cosine_t_mult: int = 2  # each next cycle is this many times longer
    cosine_eta_min: float = 0.00001  # lr at the bottom of each cycle
    amp: str = "fp16"  # mixed precision: fp16 (+ GradScaler; CUDA only, fp32 on the CPU) | bf16 | fp32 (none) |
    # auto (bf16 on a CPU with native bf16 and on CUDA GPUs with bf16, fp16 on other GPUs, else fp32)
    # clip the gradient norm (after unscaling) above this; null: never. The loss is a per-image sum, so healthy norms
    # are 25-4,500 (BENCHMARKS.md, Gradient norms) and this catches outliers only
    clip_grad_norm: float | None = 10000.0
    ema: bool = True  # keep an exponential moving average of the weights, used for evaluation
    ema_decay: float = 0.9999  # EMA decay, ramped up over the first steps (decay * (1 - exp(-step / 2000)))
    checkpoint_every: int = 1000  # steps between writes of last.pt (also written at exit)
    patience: int | None = None  # stop after this many evaluations without improvement; null: never
    max_bad_steps: int = 20  # stop after this many consecutive non-finite (skipped) steps
    sync_bn: bool = False  # under DDP: synchronise BatchNorm statistics across processes
    seed: int = 0  # seeds weights, data order and augmentation
    # minutes the whole run may take (null: no limit): the first steps are timed and train.steps is fitted so that
    # the whole schedule (absolute lr_steps and cosine_t0 scale with it), the evaluations and last.pt fit in
    time_limit: float | None = None
    freeze: str = "none"  # none | encoder: the encoder (backbone) does not train for the first freeze_steps steps
    freeze_steps: int = 0  # optimiser steps with `freeze` in force (its BatchNorm statistics frozen too)

    def check(self, origin: Origin) -> None:
        """Raise ConfigError for values training cannot use."""
        for key in ("batch_size", "steps", "cosine_t0", "cosine_t_mult", "checkpoint_every", "max_bad_steps"):
            if getattr(self, key) < 1:
                origin.fail(key, getattr(self, key), "must be at least 1")
        if self.subdivisions < 1 or self.batch_size % self.subdivisions:
            origin.fail("subdivisions", self.subdivisions,
                        f"must be >= 1 and divide train.batch_size ({self.batch_size})")
        for key, valid in (("optimizer", OPTIMIZERS), ("scheduler", SCHEDULERS), ("amp", AMP_MODES)):
            if getattr(self, key) not in valid:
                origin.fail(key, getattr(self, key), unknown(key, getattr(self, key), valid))
        if self.lr <= 0:
            origin.fail("lr", self.lr, "must be positive")
        for key in ("weight_decay", "cosine_eta_min", "burn_in"):
            if getattr(self, key) < 0:
                origin.fail(key, getattr(self, key), "must be >= 0")
        if not 0 <= self.momentum < 1:
            origin.fail("momentum", self.momentum, "must be in [0, 1)")
        if not 0 < self.ema_decay < 1:
            origin.fail("ema_decay", self.ema_decay, "must be in (0, 1)")
        if any(scale <= 0 for scale in self.lr_scales) or not math.isfinite(self.lr * math.prod(self.lr_scales)):
            origin.fail("lr_scales", self.lr_scales, f"must be positive, and train.lr ({self.lr}) times all of them "
                        "a finite number")
        if self.seed < 0:
            origin.fail("seed", self.seed, "must be >= 0")
        if len(self.lr_steps) != len(self.lr_scales) or sorted(self.lr_steps) != self.lr_steps:
            origin.fail("lr_steps", self.lr_steps, f"must be increasing and as many as train.lr_scales "
                        f"({self.lr_scales})")
        if any(v < 0 for v in self.lr_steps) or (any(v < 1 for v in self.lr_steps if v)
                                                 and any(v >= 1 for v in self.lr_steps)):
            origin.fail("lr_steps", self.lr_steps, "must be all steps (integers >= 0) or all fractions of "
                        "train.steps (below 1), not a mix")
        if any(v >= 1 and v != int(v) for v in self.lr_steps):
            origin.fail("lr_steps", self.lr_steps, "steps (values of 1 and more) must be whole numbers")
        if self.time_limit is not None and self.time_limit <= 0:
            origin.fail("time_limit", self.time_limit, "must be a positive number of minutes, or null for no limit")
        if self.freeze not in FREEZE:
            origin.fail("freeze", self.freeze, unknown("freeze", self.freeze, FREEZE))
        if self.freeze_steps < 0:
            origin.fail("freeze_steps", self.freeze_steps, "must be >= 0")
        if self.clip_grad_norm is not None and self.clip_grad_norm <= 0:
            origin.fail("clip_grad_norm", self.clip_grad_norm, "must be positive, or null for no clipping")
        if self.patience is not None and self.patience < 1:
            origin.fail("patience", self.patience, "must be at least 1, or null to never stop early")

    @property
    def micro_batch_size(self) -> int:
        """Images per forward/backward pass."""
        return self.batch_size // self.subdivisions


@dataclass
class LossConfig:
    """YOLOv3 loss (Darknet's yolo_layer.c) and the weight of each term."""

    ignore_threshold: float = 0.7  # no objectness penalty for predictions overlapping a ground truth above this IoU
    xy_weight: float = 1.0  # BCE on the in-cell centre offset
    wh_weight: float = 1.0  # squared error of log(w / anchor_w), log(h / anchor_h)
    obj_weight: float = 1.0  # objectness BCE
    cls_weight: float = 1.0  # multi-label class BCE

    def check(self, origin: Origin) -> None:
        """Raise ConfigError for values the loss cannot use."""
        if not 0 < self.ignore_threshold <= 1:
            origin.fail("ignore_threshold", self.ignore_threshold, "must be in (0, 1]")
        for key in ("xy_weight", "wh_weight", "obj_weight", "cls_weight"):
            if getattr(self, key) < 0:
                origin.fail(key, getattr(self, key), "must be >= 0")


@dataclass
class LoggingConfig:
    """Where runs are written and how often they report."""

    dir: str = "logs"  # run folders are created here: <dir>/<YYmmdd-HHMMSS>_<name>
    name: str = "yolov3"  # the run's name (no path separators)
    every: int = 20  # steps between log lines and TensorBoard scalars
    images: int = 4  # validation images drawn to TensorBoard at each evaluation (0: none)

    def check(self, origin: Origin) -> None:
        """Raise ConfigError for values logging cannot use."""
        if not self.name or any(c in self.name for c in "/\\:"):
            origin.fail("name", self.name, "must be non-empty without '/', '\\' or ':'")
        if self.every < 1:
            origin.fail("every", self.every, "must be at least 1")
        if self.images < 0:
            origin.fail("images", self.images, "must be >= 0")


EVAL_BACKENDS = ("pycocotools", "faster_coco_eval")


@dataclass
class EvalConfig:
    """COCO evaluation: post-processing of predictions and the COCO API that scores them."""

    batch_size: int = 16  # validation images per forward pass
    conf_threshold: float = 0.001  # score = objectness x class probability; COCO mAP wants a low threshold
    nms_iou: float = 0.6  # same-class boxes overlapping more than this are suppressed
    max_det: int = 100  # detections kept per image (COCO's maxDets)
    max_candidates: int = 10000  # best candidates per image entering NMS (bounds the time on untrained models)
    multi_label: bool = True  # every class above conf_threshold is a candidate, not only each box's best
    every: int = 5000  # training: optimiser steps between evaluations (and at the end)
    metric: str = "AP50"  # training: the number that decides best.pt and early stopping (one of COCO_STATS)
    subset: int | None = None  # evaluate the first N validation images only; None: all
    backend: str = "pycocotools"  # or faster_coco_eval (same numbers, faster; pip install faster-coco-eval)
    amp: str = "auto"  # inference precision: auto (a CPU: the fastest of fp32 / packed / bf16 where native, by a
    # probe; CUDA: fp32) | fp32 | bf16 (autocast) | fp16 (autocast, CUDA only; fp32 on a CPU)

    def check(self, origin: Origin) -> None:
        """Raise ConfigError for values evaluation cannot use."""
        for key in ("batch_size", "max_det", "max_candidates"):
            if getattr(self, key) < 1:
                origin.fail(key, getattr(self, key), "must be at least 1")
        if not 0 <= self.conf_threshold < 1:
            origin.fail("conf_threshold", self.conf_threshold, "must be in [0, 1)")
        if not 0 < self.nms_iou <= 1:
            origin.fail("nms_iou", self.nms_iou, "must be in (0, 1]")
        if self.subset is not None and self.subset < 1:
            origin.fail("subset", self.subset, "must be at least 1, or null for all images")
        if self.every < 1:
            origin.fail("every", self.every, "must be at least 1")
        if self.metric not in COCO_STATS:
            origin.fail("metric", self.metric, unknown("metric", self.metric, COCO_STATS))
        if self.backend not in EVAL_BACKENDS:
            origin.fail("backend", self.backend, unknown("backend", self.backend, EVAL_BACKENDS))
        if self.amp not in EVAL_AMP_MODES:
            origin.fail("amp", self.amp, unknown("amp", self.amp, EVAL_AMP_MODES))


@dataclass
class DetectConfig:
    """Inference tools (detect.py, visualization.py, export.py --nms); the rest of post-processing is eval's."""

    conf_threshold: float = 0.25  # score a detection needs to be drawn or written (eval.conf_threshold is for mAP)

    def check(self, origin: Origin) -> None:
        """Raise ConfigError for values inference cannot use."""
        if not 0 <= self.conf_threshold < 1:
            origin.fail("conf_threshold", self.conf_threshold, "must be in [0, 1)")


@dataclass
class Config:
    """The whole run configuration, one field per YAML group."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    detect: DetectConfig = field(default_factory=DetectConfig)


def config_from_dict(d: dict, source: str = "<dict>", overrides: Sequence[str] = ()) -> Config:
    """Validate a nested dict (as in args.yaml or a checkpoint), apply overrides, and build a Config."""
    return build_config(Config, d, source, overrides)


def load_config(path: str | Path = "args.yaml", overrides: Sequence[str] = ()) -> Config:
    """Read a YAML config file, apply "group.key=value" overrides, validate, and build a Config."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config file: {e}") from e
    try:
        raw = yaml_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from e
    return config_from_dict(raw, str(path), overrides)


def config_to_dict(cfg: Config) -> dict:
    """Return cfg as plain nested dicts and lists, safe for yaml.safe_dump and config_from_dict."""
    return dataclasses.asdict(cfg)


def save_config(cfg: Config, path: str | Path) -> None:
    """Write cfg to path as YAML that load_config reads back to an equal Config."""
    Path(path).write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))


