"""MRIM and MRIM+ — a RECONSTRUCTION: no MRIM paper text or code was found.

"Modality-Relevant Interactive Mining", Yan et al., 2024, as the CFCML paper describes it
(§1-2; title and venue unknown, docs/baselines.md §8): it learns single-modality and hybrid-modality
class proxies and mines sample-to-sample and sample-to-proxy relations with contrastive
learning that uses only samples as anchors; it was designed for two image modalities. The
paper's parameter counts leave MRIM no fusion module of its own (MEN: base + the CFCML
classifier + 1,920 proxy parameters = 10.39 M exactly), so this is a loss-only method.

Reconstruction (docs/baselines.md §8.3):
- MRIM: the pooled stage-4 vectors f_j of the shared encoders -> the CFCML classifier on
  [f_1; ...; f_M]. MRIM+ (§9): CFCML's model (MG-CIE features F_j, same classifier) with the
  CCRM losses replaced by the MRIM losses — a direct CCRM-vs-MRIM ablation on the same features.
- Learned proxies, unit-norm Gaussian at init, trained at the head's LR: single-modality
  P in R^{K x M x d} (one per class and modality, the table included), hybrid H in R^{K x d}.
- s(a, b) = exp(cos(a, b) / tau), tau = 0.07; per anchor -log(sum_P s / (sum_P s + sum_N s)),
  by log-sum-exp. Sample anchors only:
  * sample-to-sample: anchor f_j^i; positives every other feature (any modality) of a sample of
    the same class; negatives every feature of samples of other classes; mean over anchors.
  * sample-to-proxy: anchor f_j^i; positives {P_j^y, H^y}; negatives {P_j^l, H^l : l != y};
    mean over anchors.
- Loss = CE + lambda_s2s * L_s2s + lambda_s2p * L_s2p. Unknown in the original; defaults are
  CFCML's MEN alpha / beta (0.06 / 0.04) as the dossier suggests — tune them
  (search_spaces/mrim.yaml) with the same budget as the other methods.
Outputs: features = the f_j (MRIM) or F_j (MRIM+); fused = the classifier input.
DDP: both terms use the all-gathered global batch (features with gradient), like CCRM.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from ..cfcml import CFCML
from ..registry import register_method
from ..shape import CohortShape
from .base import FusionMethod, global_batch, mlp_head, pooled

if TYPE_CHECKING:  # a method reads the Config it is given; only the engine and above import the config module
    from ...config import Config


@dataclass
class MrimArgs:  # a reconstruction: no MRIM paper text or code was found (docs/baselines.md §8)
    tau: float = 0.07
    lambda_s2s: float = 0.06  # sample-to-sample weight (start: CFCML's MEN alpha)
    lambda_s2p: float = 0.04  # sample-to-proxy weight (start: CFCML's MEN beta)


def _check(cfg, selected: bool) -> list[str]:
    return ["method_args.mrim.tau must be positive"] if cfg.method_args.mrim.tau <= 0 else []


class MrimProxies(nn.Module):
    """single [K, M, d] (class x modality) and hybrid [K, d] proxies, unit-norm at init."""

    def __init__(self, num_classes: int, num_modalities: int, dim: int):
        super().__init__()
        self.single = nn.Parameter(F.normalize(torch.randn(num_classes, num_modalities, dim), dim=-1))
        self.hybrid = nn.Parameter(F.normalize(torch.randn(num_classes, dim), dim=-1))


def _contrastive(logits: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
    """Per-anchor softplus(LSE(neg) - LSE(pos)) = -log(sum_P e / (sum_P e + sum_N e)) from
    logits [..., n] and boolean masks; exactly 0 (with a zero, finite gradient) for an anchor
    without positives or without negatives."""
    has_pos, has_neg = pos.any(-1, keepdim=True), neg.any(-1, keepdim=True)
    # rows without a positive (negative) keep all their logits so the LSE and its backward stay finite
    lse_pos = logits.masked_fill(~(pos | ~has_pos), float("-inf")).logsumexp(-1)
    lse_neg = logits.masked_fill(~(neg | ~has_neg), float("-inf")).logsumexp(-1)
    term = F.softplus(lse_neg - lse_pos)
    valid = (has_pos & has_neg).squeeze(-1)
    return torch.where(valid, term, torch.zeros_like(term))


def mrim_losses(
    features: list[torch.Tensor], labels: torch.Tensor, proxies: MrimProxies, tau: float
) -> dict[str, torch.Tensor]:
    """M features [B, d] (tabular last), labels [B] -> {"s2s", "s2p"} (float32 scalars)."""
    with torch.autocast(labels.device.type, enabled=False):
        z = F.normalize(torch.stack([f.float() for f in features]), dim=-1)  # [M, B, d]
        num_mod, batch = z.shape[:2]
        flat, ids = z.flatten(0, 1), labels.repeat(num_mod)  # anchor index = j * B + i
        same = ids[:, None] == ids[None, :]
        not_self = ~torch.eye(len(ids), dtype=torch.bool, device=ids.device)
        s2s = _contrastive(flat @ flat.T / tau, same & not_self, ~same).mean()

        single = F.normalize(proxies.single.float(), dim=-1)  # [K, M, d]
        hybrid = F.normalize(proxies.hybrid.float(), dim=-1)  # [K, d]
        to_single = torch.einsum("mbd,kmd->mbk", z, single)
        to_hybrid = torch.einsum("mbd,kd->mbk", z, hybrid)
        logits = torch.cat([to_single, to_hybrid], dim=-1) / tau  # [M, B, 2K]
        target = F.one_hot(labels, single.shape[0]).bool().repeat(1, 2)  # [B, 2K]
        target = target.expand(num_mod, batch, -1)
        s2p = _contrastive(logits, target, ~target).mean()
    return {"s2s": s2s, "s2p": s2p}


def _mrim_objective(out: dict, labels: torch.Tensor, proxies: MrimProxies, args) -> dict:
    ce = F.cross_entropy(out["logits"].float(), labels)
    all_labels, stacked = global_batch(labels, torch.stack(out["features"], 1))
    terms = mrim_losses(list(stacked.unbind(1)), all_labels, proxies, args.tau)
    total = ce + args.lambda_s2s * terms["s2s"] + args.lambda_s2p * terms["s2p"]
    return {"loss": total, "ce": ce, **terms}


@register_method("mrim", display="MRIM", args=MrimArgs, search_space="mrim.yaml", check=_check)
class MRIM(FusionMethod):
    def __init__(self, cfg: Config, shape: CohortShape, num_tabular_features: int | None = None):
        super().__init__(cfg, shape, num_tabular_features)
        self.args = cfg.method_args.mrim
        self.classifier = mlp_head(self.num_modalities * self.dim, (128, 16), self.num_classes, cfg.model.dropout)
        self.proxies = MrimProxies(self.num_classes, self.num_modalities, self.dim)

    def forward(self, images: list[torch.Tensor], tabular: torch.Tensor) -> dict:
        f = pooled(self.encode(images, tabular))
        fused = torch.cat(f, dim=1)
        return {"logits": self.classifier(fused), "features": f, "fused": fused}

    def loss_terms(self, out: dict, labels: torch.Tensor, *, epoch: int) -> dict:
        return _mrim_objective(out, labels, self.proxies, self.args)


@register_method(
    "mrim_plus",
    display="MRIM+",
    args=MrimArgs,
    section="mrim",
    search_space="mrim_plus.yaml",
    on_cfcml=True,
    check=_check,
)
class MRIMPlus(CFCML):
    """CFCML's model (MG-CIE) with the MRIM objective instead of CE + CCRM."""

    def __init__(self, cfg: Config, shape: CohortShape, num_tabular_features: int | None = None):
        super().__init__(cfg, shape, num_tabular_features)
        self.args = cfg.method_args.mrim
        num_modalities = self.num_images + int(self.use_tabular)
        self.proxies = MrimProxies(shape.num_classes, num_modalities, cfg.model.dim)

    def loss_terms(self, out: dict, labels: torch.Tensor, *, epoch: int) -> dict:
        return _mrim_objective(out, labels, self.proxies, self.args)
