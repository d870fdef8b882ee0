"""The training objective of SPEC §3: CE + alpha*L_sam + beta*L_up + gamma*L_cp."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..config import Config
from ..models.ccrm import ccrm_losses_distributed


def compute_loss(model_out: dict, labels: torch.Tensor, cfg: Config, num_classes: int) -> dict:
    """-> {"loss", "ce", and with CCRM on "sam", "up", "cp"}. Under DDP, CCRM runs on the
    all-gathered global batch and the terms are added unscaled (DDP's gradient averaging then
    gives exactly the single-process gradient; see ccrm_losses_distributed)."""
    ce = F.cross_entropy(model_out["logits"].float(), labels)
    parts = {"ce": ce}
    total = ce
    if cfg.loss.ccrm:
        c = ccrm_losses_distributed(model_out["features"], labels, num_classes, cfg.loss.tau)
        total = total + cfg.loss.alpha * c["sam"] + cfg.loss.beta * c["up"] + cfg.loss.gamma * c["cp"]
        parts.update(c)
    parts["loss"] = total
    return parts
