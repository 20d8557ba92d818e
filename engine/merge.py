"""The end of a fine-tuning run: the weights between the start and the trained model that score best.

WiSE-FT (Wortsman et al., "Robust fine-tuning of zero-shot models", CVPR 2022): averaging the weights of a
pre-trained model and its fine-tuned copy, (1 - alpha) * start + alpha * trained, keeps what the start knew while
adding what the data taught; one alpha chosen on held-out data is often better than both ends. Fine-tuning from
COCO weights on a few hundred images of objects COCO already knows moves the weights away from what 118k images
taught (issue 21): the search below includes alpha = 0, so a run never ends below its start on the validation set,
and alpha = 1 (the trained weights) wins where the data teaches something new. A mix ranks by AP + AP50, first among
those at or above the start in AP, AP50 and eval.metric (mix_rank): on a set the start already does well, AP50 is
near its ceiling (0.95) and moves by noise while AP shows whether the boxes got better, so neither alone decides.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch
from torch import nn

from engine.evaluate import EvalResult
from engine.state import Trainer
from utils.checkpoint import load_checkpoint, save_checkpoint
from utils.config_load import config_to_dict
from utils.logger import log

R = TypeVar("R")  # a score that orders: a number, or mix_rank's tuple
ALPHAS = (0.5, 0.25, 0.75)  # tried in this order after the two ends: a halving search with two evaluations


def interpolate(start: dict[str, torch.Tensor], end: dict[str, torch.Tensor], alpha: float
                ) -> dict[str, torch.Tensor]:
    """(1 - alpha) * start + alpha * end for every floating tensor (BatchNorm statistics too); the rest from end."""
    if start.keys() != end.keys():
        raise ValueError(f"the start and the trained weights differ in keys: {sorted(start.keys() ^ end.keys())[:5]}")
    return {k: torch.lerp(start[k].to(v.dtype), v, alpha) if v.is_floating_point() else v for k, v in end.items()}


def mix_rank(stats: dict[str, float], start: dict[str, float], metric: str) -> tuple[bool, float]:
    """How a mix's scores rank (larger is better): (at or above the start in AP, AP50 and `metric`, AP + AP50)."""
    keeps = all(stats[k] >= start[k] for k in {"AP", "AP50", metric})
    return keeps, stats["AP"] + stats["AP50"]


def best_mix(score: Callable[[float], R], start_score: R, end_score: R) -> tuple[float, dict[float, R]]:
    """The alpha in [0, 1] whose weights score best; score(alpha) evaluates one mix (any ordered score: a number,
    mix_rank's tuple). Returns (alpha, every score). Two evaluations: alpha 0.5, then 0.25 or 0.75 on the side of the
    better end (ties go to the trained end)."""
    scores = {0.0: start_score, 1.0: end_score}
    scores[0.5] = score(0.5)
    side = 0.25 if start_score > end_score else 0.75
    scores[side] = score(side)
    best = max(sorted(scores, reverse=True), key=lambda a: scores[a])  # ties: the larger alpha (more training kept)
    return best, scores


def keep_start(trainer: Trainer, model: nn.Module, start_file: Path, trained: EvalResult,
               evaluate_now: Callable[[], EvalResult], metric: str, record: Callable[[EvalResult], bool]) -> None:
    """train.keep_start: put into the trained model (and its EMA) the mix of start and trained weights that scores
    best (models/merge.py; alpha 0 is the start, 1 the trained weights), evaluating two mixes; the chosen one is
    recorded as the run's last evaluation (best.pt too, if it is the best)."""
    start = load_checkpoint(start_file)
    ends = {id(m): {k: v.clone() for k, v in m.state_dict().items()} for m in {trainer.eval_model, model}}
    results = {1.0: trained}

    def score(alpha: float) -> tuple[bool, float]:
        trainer.eval_model.load_state_dict(interpolate(start["model"], ends[id(trainer.eval_model)], alpha))
        results[alpha] = evaluate_now()
        log.info("keep_start: %.2f x start + %.2f x trained weights | %s", 1 - alpha, alpha,
                 scores(results[alpha].stats))
        return mix_rank(results[alpha].stats, start["stats"], metric)

    def scores(stats: dict[str, float]) -> str:
        return " ".join(f"{k} {stats[k]:.4f}" for k in dict.fromkeys(("AP", "AP50", metric)))

    alpha, ranks = best_mix(score, mix_rank(start["stats"], start["stats"], metric),
                            mix_rank(trained.stats, start["stats"], metric))
    for m in {trainer.eval_model, model}:
        m.load_state_dict(interpolate(start["model"], ends[id(m)], alpha))
    everything = {0.0: start["stats"], **{a: r.stats for a, r in results.items()}}
    log.info("keep_start: last.pt holds %.2f x start + %.2f x trained weights, the best AP + AP50 not below the start"
             " (%s)", 1 - alpha, alpha, "; ".join(f"{a:.2f}: {scores(everything[a])}" for a in sorted(ranks)))
    if alpha < 1.0:  # the last evaluation in the log, evals.jsonl and the pictures is last.pt's (the start's again)
        record(results.get(alpha) or evaluate_now())


def save_start(trainer: Trainer, evaluation: EvalResult, path: Path) -> None:
    """The start of a train.keep_start run, as a checkpoint validation.py reads: its weights (the EMA's, equal to the
    model's at step 0), config, class names and step-0 scores."""
    save_checkpoint({"model": trainer.eval_model.state_dict(), "config": config_to_dict(trainer.cfg),
                     "class_names": trainer.class_names, "stats": evaluation.stats}, path)
