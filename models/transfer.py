"""A model from a weights file: a training checkpoint (.pt) or a Darknet .weights file."""
from __future__ import annotations

import dataclasses
from pathlib import Path

from models import YOLO, build_model
from utils.checkpoint import CheckpointError, checkpoint_weights, load_checkpoint
from utils.config import Config, ConfigError, config_from_dict


def load_model(path: str | Path, cfg: Config) -> tuple[YOLO, Config]:
    """A model from a training checkpoint (.pt: its own model config, EMA weights when present) or a Darknet
    .weights file (built from cfg.model); returns it with the config whose `model` section describes it."""
    path = Path(path)
    if path.suffix != ".pt":
        model = build_model(cfg.model.arch, cfg.model.encoder, cfg.model.num_classes, cfg.model.anchors)
        part = model.load_darknet_weights(path)
        if part != "full model":
            raise CheckpointError(f"{path} holds only the {part} backbone; evaluation needs a full model")
        return model, cfg
    state = load_checkpoint(path)
    try:
        model_cfg = config_from_dict(state["config"], str(path)).model
    except ConfigError as e:
        raise CheckpointError(f"{path}: its stored config is invalid: {e}") from e
    model = build_model(model_cfg.arch, model_cfg.encoder, model_cfg.num_classes, model_cfg.anchors)
    weights = checkpoint_weights(state)
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        raise CheckpointError(f"{path}: weights do not fit the {model_cfg.arch}/{model_cfg.encoder} model its config "
                              f"describes: {e}") from e
    return model, dataclasses.replace(cfg, model=model_cfg)


def load_start_weights(model: YOLO, path: Path) -> str:
    """--weights: a checkpoint's (EMA) weights or a Darknet file (full model or backbone) into `model`; returns
    what loaded."""
    if path.suffix != ".pt":
        return f"Darknet {model.load_darknet_weights(path)}"
    state = load_checkpoint(path)
    try:
        model.load_state_dict(checkpoint_weights(state))
    except RuntimeError as e:
        raise CheckpointError(f"{path}: its weights do not fit the model of this config: {e}") from e
    return "checkpoint weights"
