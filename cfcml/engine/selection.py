"""Which epoch a run keeps: the windowed validation score, the first candidate epoch, patience.

An epoch is a candidate once its window of `train.select_window` validation values is full and
`train.select_min_epoch` has passed (`cfcml.config.first_candidate_epoch`); before that its
score is NaN, so a partly filled window never competes with full ones. The same rule serves
`cfcml train`/`cv`, a study's objective and the comparison methods.
"""

from __future__ import annotations

import math

from .metrics import higher_is_better


def better(metric: str, new: float, old: float | None) -> bool:
    """Is `new` a better score of `metric` than `old` (None or NaN: anything finite is)?"""
    if old is None or (isinstance(old, float) and math.isnan(old)):
        return not math.isnan(new)
    return new > old if higher_is_better(metric) else new < old


def selection_score(history: list[dict], metric: str, window: int, first_candidate: int = 0) -> float:
    """The validation score the last epoch of `history` is selected on: the mean of `metric` over
    the last `window` epochs (NaN epochs skipped), or NaN while that epoch is not a candidate —
    before `first_candidate` (a full window, the LR warm-up over; see `first_candidate_epoch`).
    A window > 1 keeps a one-epoch spike on a small validation set from picking the weights; the
    weights kept are still those of the epoch itself."""
    if len(history) - 1 < max(first_candidate, window - 1):
        return math.nan  # a partly filled window would compete with full ones
    values = [h[f"val_{metric}"] for h in history[-window:]]
    values = [v for v in values if not math.isnan(v)]
    return sum(values) / len(values) if values else math.nan


def select_epoch(history: list[dict], metric: str, window: int, first_candidate: int = 0) -> int | None:
    """The epoch a run with this validation history selects (None: no finite score yet); the
    same rule `TrainingRun` applies one epoch at a time."""
    best, value = None, None
    for epoch in range(len(history)):
        score = selection_score(history[: epoch + 1], metric, window, first_candidate)
        if better(metric, score, value):
            best, value = epoch, score
    return best


def patience_exhausted(best_epoch: int | None, epochs_done: int, first_candidate: int, patience: int) -> bool:
    """True when `patience` candidate epochs have passed without a better selection score."""
    if patience <= 0 or epochs_done <= first_candidate:
        return False
    since = first_candidate - 1 if best_epoch is None else best_epoch
    return epochs_done - 1 - since >= patience
