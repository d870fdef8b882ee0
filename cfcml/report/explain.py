"""Choices around Grad-CAM that need no model: which test cases to explain, which stage to use."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def select_cases(labels, probs, n_correct: int = 2, n_wrong: int = 2, pred=None) -> list[int]:
    """Row indices of the cases to explain: the most confident correct predictions, then the
    most confident wrong ones (the errors a reader most needs to see), ties by row order.

    labels [N] int, probs [N, K], pred [N] the hard labels (None: argmax) -> up to n_correct +
    n_wrong indices; confidence is the probability of the predicted class.
    """
    labels = np.asarray(labels).reshape(-1)
    probs = np.asarray(probs, dtype=np.float64)
    pred = probs.argmax(axis=1) if pred is None else np.asarray(pred).reshape(-1).astype(np.int64)
    conf = probs[np.arange(len(pred)), pred]
    order = np.lexsort((np.arange(len(conf)), -conf))  # confidence descending, then row
    correct = [int(i) for i in order if pred[i] == labels[i]][:n_correct]
    wrong = [int(i) for i in order if pred[i] != labels[i]][:n_wrong]
    return correct + wrong


def cam_stage(grids: Sequence[Sequence[int]], min_side: int = 2) -> int:
    """The deepest stage (0-based, for `grad_cam(..., output_index=)`) whose feature grid has at
    least `min_side` cells along every axis: deep enough to be class-specific, fine enough to
    show a place. grids: per stage (H, W) or (D, H, W), e.g.
    `cfcml.models.cfcml.stage_grids(encoder, image_size)`. Falls back to stage 0."""
    ok = [s for s, g in enumerate(grids) if min(g) >= min_side]
    return ok[-1] if ok else 0
