"""CFCML's training objective (SPEC §3): CE + alpha*L_sam + beta*L_up + gamma*L_cp.

Every model carries its own objective as `model.loss_terms(out, labels, *, epoch)`; CFCML's
(and the ablations', `loss.ccrm=false`) is this one. Comparison methods keep theirs in their
modules (`cfcml.models.methods`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from .ccrm import ccrm_losses_distributed

if TYPE_CHECKING:  # the loss section is given; only the engine and above import the config module
    from ..config import LossConfig


def cfcml_objective(model_out: dict, labels: torch.Tensor, loss: LossConfig, num_classes: int) -> dict:
    """-> {"loss", "ce", and with CCRM on "sam", "up", "cp"}. Under DDP, CCRM runs on the
    all-gathered global batch and the terms are added unscaled (DDP's gradient averaging then
    gives exactly the single-process gradient; see ccrm_losses_distributed)."""
    ce = F.cross_entropy(model_out["logits"].float(), labels)
    parts = {"ce": ce}
    total = ce
    if loss.ccrm:
        c = ccrm_losses_distributed(model_out["features"], labels, num_classes, loss.tau)
        total = total + loss.alpha * c["sam"] + loss.beta * c["up"] + loss.gamma * c["cp"]
        parts.update(c)
    parts["loss"] = total
    return parts
