"""A model from a weights file (.pt checkpoint or Darknet .weights), and a model started from one with another
number of classes: the transfer that fine-tuning on your own data starts with."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from models import YOLO, build_model
from models.darknet import DarknetSizeError, conv_layer_tensors, save_darknet_weights
from models.runtime import EXPORTED_SUFFIXES, load_exported
from models.tables import ANCHOR_MASKS, ENCODERS
from models.yolo import HeadOutput
from utils.checkpoint import CheckpointError, checkpoint_weights, load_checkpoint
from utils.config import Config, ConfigError, ModelConfig
from utils.config_load import config_from_dict


def load_model(path: str | Path, cfg: Config) -> tuple[YOLO, Config]:
    """A model from a training checkpoint (.pt: its own model config, EMA weights when present), a Darknet
    .weights file (built from cfg.model) or an exported .onnx / OpenVINO .xml (models/runtime.py ExportedModel: the
    file's own model config and, for a fixed-size file, its input size); returns it with the config that describes
    it."""
    path = Path(path)
    if path.suffix in EXPORTED_SUFFIXES:  # an export.py file, run in its runtime (models/runtime.py)
        return load_exported(path, cfg)
    if path.suffix != ".pt":
        # a Darknet file holds COCO's 80 classes unless the config says otherwise; "auto" anchors are for training
        anchors = None if isinstance(cfg.model.anchors, str) else cfg.model.anchors
        model = build_model(cfg.model.arch, cfg.model.encoder, cfg.model.num_classes or 80, anchors)
        part = model.load_darknet_weights(path)
        if part != "full model":
            raise CheckpointError(f"{path} holds only the {part} backbone; evaluation needs a full model")
        model_cfg = cfg.model.model_copy(update={"num_classes": model.num_classes, "anchors": anchors})
        return model, cfg.model_copy(update={"model": model_cfg})  # the class count the model was built with
    model, model_cfg = model_from_checkpoint(load_checkpoint(path), path)
    return model, cfg.model_copy(update={"model": model_cfg})


def model_from_checkpoint(state: dict, path: Path) -> tuple[YOLO, ModelConfig]:
    """The model a loaded checkpoint describes (its config's model section) with its weights (EMA's if any)."""
    try:
        model_cfg = config_from_dict(state["config"], str(path)).model
    except ConfigError as e:
        raise CheckpointError(f"{path}: its stored config is invalid: {e}") from e
    weights = checkpoint_weights(state)
    if model_cfg.num_classes is None:  # a config that left it to the data (main.py stores the count): the heads'
        out = weights.get("head32.out.weight")
        if out is None:
            raise CheckpointError(f"{path}: its config leaves model.num_classes unset and it holds no head32 weights")
        per_anchor = out.shape[0] // len(ANCHOR_MASKS[model_cfg.arch][0])
        model_cfg = model_cfg.model_copy(update={"num_classes": per_anchor - 5})
    model = build_model(model_cfg.arch, model_cfg.encoder, model_cfg.num_classes, model_cfg.anchors)
    model.class_names = state.get("class_names")  # the training data's, in class order (None in older checkpoints)
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        raise CheckpointError(f"{path}: weights do not fit the {model_cfg.arch}/{model_cfg.encoder} model its config "
                              f"describes: {e}") from e
    return model, model_cfg


# PASCAL VOC's names for COCO classes (a dataset converted from VOC keeps them); compared after normalize_name
NAME_ALIASES = {"tvmonitor": "tv", "sofa": "couch", "motorbike": "motorcycle", "aeroplane": "airplane"}


def normalize_name(name: str) -> str:
    """A class name for matching: lower case, no spaces, underscores or hyphens, VOC aliases mapped to COCO's."""
    key = "".join(c for c in name.lower() if c not in " _-")
    return normalize_name(NAME_ALIASES[key]) if key in NAME_ALIASES else key


@dataclass
class Transfer:
    """What start_from put into a model, for the one printed summary."""

    source: str  # the file and what it held
    loaded: int = 0  # tensors copied whole
    values: int = 0  # numbers copied, head rows included
    heads: int = 0  # output convs whose box and objectness rows were kept
    anchors: int = 0  # anchors per head
    from_old: dict[str, str] = field(default_factory=dict)  # new class -> old class whose rows it starts from
    fresh_classes: list[str] = field(default_factory=list)
    fresh: list[str] = field(default_factory=list)  # tensors left as initialised (no source tensor of that shape)
    note: str = ""  # what else started fresh (a backbone prefix: every later layer)

    def __str__(self) -> str:
        """One paragraph: loaded, kept, started fresh."""
        text = f"{self.source}: loaded {self.loaded} tensors whole ({self.values:,} values in all)"
        if self.heads:
            old = ", ".join(f"{new}<-{old}" if normalize_name(new) != normalize_name(old) or new != old else new
                            for new, old in self.from_old.items())
            text += (f"; {self.heads} head output convs: box and objectness rows of {self.anchors} anchors kept, "
                     f"{len(self.from_old)} classes from their old rows ({old or 'none'}), "
                     f"{len(self.fresh_classes)} started fresh ({', '.join(self.fresh_classes) or 'none'})")
        if self.fresh:
            text += f"; {len(self.fresh)} tensors started fresh ({', '.join(self.fresh[:6])}" \
                    f"{', ...' if len(self.fresh) > 6 else ''})"
        return f"{text}; {self.note}" if self.note else text


@torch.no_grad()
def transfer_state(model: YOLO, source: dict[str, torch.Tensor], source_classes: int,
                   source_names: Sequence[str] | None, names: Sequence[str] | None, summary: Transfer) -> Transfer:
    """Copy a state dict of the same architecture with `source_classes` classes into `model` (in place).

    Every tensor whose shape fits is copied. A head's output conv (A * (5 + C) rows) keeps, for each anchor, the
    box (tx, ty, tw, th) and objectness rows; a class row comes from the source class of the same name
    (normalize_name; by position when either side's names are unknown and the counts agree), else keeps the
    model's own initialisation: the default conv init for the weights and the bias of a class probability of
    1/(C+1), as a model trained from scratch starts, so a new class starts undecided rather than as some old
    class. The model's anchors are the config's: the source's are not copied.
    """
    target = model.state_dict()
    heads = {name: m for name, m in model.named_modules() if isinstance(m, HeadOutput)}
    if names is not None and source_names is not None:
        old = {normalize_name(n): i for i, n in enumerate(source_names)}
        pairs = [(j, old[normalize_name(n)]) for j, n in enumerate(names) if normalize_name(n) in old]
    elif source_classes == model.num_classes:
        pairs = [(j, j) for j in range(source_classes)]
    else:
        pairs = []
    for key, value in target.items():
        module = key.rpartition(".")[0]
        if key == "anchors" or module in heads:
            continue
        if key in source and source[key].shape == value.shape:
            value.copy_(source[key])
            summary.loaded, summary.values = summary.loaded + 1, summary.values + value.numel()
        else:
            summary.fresh.append(key)
    for name, head in heads.items():
        a, c = head.num_anchors, head.num_classes
        for kind in ("weight", "bias"):
            src = source[f"{name}.{kind}"]
            if src.shape[0] % (5 + source_classes) or src.shape[0] // (5 + source_classes) != a:
                raise ValueError(f"{name}: the source has {src.shape[0] // (5 + source_classes)} anchors per head "
                                 f"({src.shape[0]} rows for {source_classes} classes), this model {a}")
            src = src.view(a, 5 + source_classes, *src.shape[1:])
            dst = getattr(head, kind).view(a, 5 + c, *src.shape[2:])
            dst[:, :5] = src[:, :5]
            for j, i in pairs:
                dst[:, 5 + j] = src[:, 5 + i]
            summary.values += a * (5 + len(pairs)) * src[0, 0].numel()
    summary.heads, summary.anchors = len(heads), next(iter(heads.values())).num_anchors
    label = list(names) if names is not None else [str(j) for j in range(model.num_classes)]
    old_label = list(source_names) if source_names is not None else [str(i) for i in range(source_classes)]
    summary.from_old = {label[j]: old_label[i] for j, i in pairs}
    summary.fresh_classes = [label[j] for j in sorted(set(range(model.num_classes)) - {j for j, _ in pairs})]
    return summary


def start_from(model: YOLO, path: str | Path, names: Sequence[str] | None,
               darknet_names: Sequence[str] | None = None) -> Transfer:
    """Start `model` from a weights file (in place): a Darknet .weights file (a full COCO-trained model: classes
    `darknet_names`, or this model's own class count; or a backbone prefix such as darknet53.conv.74) or a .pt
    checkpoint of the same architecture and encoder with any number of classes (its EMA weights when it has them;
    its class names when it knows them). `names` are this model's classes, matched by name (transfer_state).
    A different architecture or encoder, or another number of anchors per head, is an error naming both."""
    path = Path(path)
    if path.suffix != ".pt":
        return _start_from_darknet(model, path, names, darknet_names)
    state = load_checkpoint(path)
    source, source_cfg = model_from_checkpoint(state, path)  # its own model: its weights checked against it
    arch, encoder = model.arch, model.encoder_name
    if (source_cfg.arch, source_cfg.encoder) != (arch, encoder):
        raise CheckpointError(f"{path} holds a {source_cfg.arch}/{source_cfg.encoder} model, but this config builds "
                              f"{arch}/{encoder}: --weights must be of the same architecture and encoder")
    source_names = state.get("class_names")
    summary = Transfer(f"{path} ({arch}/{encoder}, {source.num_classes} classes"
                       f"{'' if source_names else ', class names not stored'})")
    return transfer_state(model, source.state_dict(), source.num_classes, source_names, names, summary)


def darknet_part_sizes(arch: str, num_classes: int) -> dict[str, int]:
    """The float32 values a Darknet .weights file of `arch` holds: {"full <arch> (<n> classes)": count, its backbone
    prefix's name: count}."""
    with torch.device("meta"):  # sizes only: no memory, no init
        model = build_model(arch, "darknet53", max(num_classes, 1))
    layers = model.darknet_layers()
    parts = {f"full {arch} ({num_classes} classes)": len(layers), **model.darknet_prefixes}
    return {name: sum(t.numel() for layer in layers[:count] for t in conv_layer_tensors(layer))
            for name, count in parts.items()}


def darknet_file_kind(path: Path, num_classes: int) -> str | None:
    """Which Darknet model (or backbone prefix) with `num_classes` classes a .weights file's size fits, if any."""
    floats = (path.stat().st_size - 16) // 4
    for arch in ENCODERS:
        for name, size in darknet_part_sizes(arch, num_classes).items():
            if floats - size in (0, 1):  # header of 16 or 20 bytes
                return name
    return None


def fits_nothing(path: Path, error: DarknetSizeError, arch: str, class_counts: dict[int, str]) -> str:
    """The one message for a Darknet file that fits nothing start_from tried: its size, then each candidate with
    the float32 weights it holds (`arch` with each of `class_counts` {count: whose} and its backbone prefix; the
    other architectures with the first count), then the likely cause."""
    groups, sizes = [], []
    for name in [arch, *(a for a in ENCODERS if a != arch)]:
        counts = class_counts if name == arch else dict(list(class_counts.items())[:1])
        parts = {count: darknet_part_sizes(name, count) for count in counts}  # {full name: n, prefix name: n}
        items = [(f"with {whose} {count} classes", next(iter(parts[count].values())))
                 for count, whose in counts.items()]
        prefix, prefix_size = list(parts[next(iter(counts))].items())[1]  # the same whatever the class count
        items.append((f"its backbone {prefix}", prefix_size))
        groups.append(f"{name} " + ", ".join(f"{what} {n:,}" for what, n in items))
        sizes += [n for _, n in items]
    listing = groups[0] + "".join(f"; another architecture: {group}" for group in groups[1:])
    variant = f" ({error.values - 1:,} after the 20-byte header some PyTorch ports write)" if error.five_int32 else ""
    text = (f"{path}: its {error.values:,} float32 weights{variant} fit no Darknet file this config can start from. "
            f"Tried, with the float32 weights each holds: {listing}.")
    if error.values < min(sizes):
        return f"{text} The file is smaller than all of them: truncated (an interrupted download or copy?)"
    return f"{text} Is it the file of another model (model.arch, model.num_classes), or damaged?"


def _start_from_darknet(model: YOLO, path: Path, names: Sequence[str] | None,
                        darknet_names: Sequence[str] | None) -> Transfer:
    """start_from for a Darknet file: the full model with darknet_names' classes, else what fits `model` itself.

    Only a size that fits no part is tried again with the other class count; errors of the file itself (its header,
    a partial float) are raised at once. A file that fits nothing is reported once, naming every candidate
    (`fits_nothing`): one message per attempt read as two near-identical sentences (issue 21).
    """
    class_counts = {model.num_classes: "this config's"}
    if darknet_names is not None and len(darknet_names) != model.num_classes:
        class_counts = {len(darknet_names): "COCO's", **class_counts}
        source = build_model(model.arch, model.encoder_name, len(darknet_names),
                             model.anchors.tolist())
        try:
            if source.load_darknet_weights(path) == "full model":
                summary = Transfer(f"{path} (Darknet {model.arch}, {len(darknet_names)} classes)")
                return transfer_state(model, source.state_dict(), len(darknet_names), darknet_names, names, summary)
        except DarknetSizeError:
            pass  # the model's own class count is tried next; the message names both
    try:
        part = model.load_darknet_weights(path)
    except DarknetSizeError as e:
        coco_classes = len(darknet_names) if darknet_names is not None else model.num_classes
        if fits := darknet_file_kind(path, coco_classes):
            raise ValueError(f"{path} is Darknet's {fits}, but this config builds {model.arch}/"
                             f"{model.encoder_name} with {model.num_classes} classes: use weights of the same "
                             "architecture (model.arch / model.encoder)") from e
        raise ValueError(fits_nothing(path, e, model.arch, class_counts)) from e
    summary = Transfer(f"{path} (Darknet {part})")
    layers = model.darknet_layers()[:model.darknet_prefixes.get(part, len(model.darknet_layers()))]
    summary.loaded = sum(len(list(layer.parameters())) + len(list(layer.buffers())) for layer in layers)
    summary.values = sum(t.numel() for layer in layers for t in [*layer.parameters(), *layer.buffers()])
    summary.note = "" if part == "full model" else f"every layer after its {len(layers)} convs started fresh"
    return summary


def cut_prefix(full: Path, out: Path, arch: str, num_classes: int = 80) -> str:
    """Write the named backbone prefix of `full` (a full `arch` .weights file) to `out`; returns the prefix's name."""
    model = build_model(arch, "darknet53", num_classes)
    part = model.load_darknet_weights(full)
    if part != "full model":
        raise ValueError(f"{full} holds only the {part}, not a full {arch} model to cut a prefix from")
    (name, count), = model.darknet_prefixes.items()
    save_darknet_weights(model.darknet_layers()[:count], out, model.darknet_header)
    return name
