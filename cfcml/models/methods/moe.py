"""Sparsely-gated mixture of experts with noisy top-k gating (Shazeer et al., ICLR 2017), as
GLoMo uses it for its local representations.

Gating: clean logits u W_g, plus (training, noisy) N(0, 1) * (softplus(u W_n) + 0.01); the
top-k logits are softmaxed, the others get weight 0; W_g and W_n start at zero. The experts
run densely (3 small MLPs) and are weighted by the gates, which equals sparse dispatch.
Load balance = CV^2(sum_b gates) + CV^2(load); load is the smooth estimate of how often each
expert lands in the top k under re-sampled noise (training, noisy, k < E), else the count of
non-zero gates. The balance loss is a batch statistic, so the module returns the per-sample
gates and load and `load_balance_loss` turns (possibly all-gathered) rows into the loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

NOISE_EPS = 1e-2


def cv_squared(x: torch.Tensor) -> torch.Tensor:
    """Squared coefficient of variation of a 1-D tensor (0 for a single element)."""
    if x.numel() < 2:
        return x.new_zeros(())
    return x.var() / (x.mean() ** 2 + 1e-10)


def load_balance_loss(gates: torch.Tensor, load: torch.Tensor) -> torch.Tensor:
    """gates, load [B, E] (per-sample rows) -> CV^2(sum gates) + CV^2(sum load)."""
    return cv_squared(gates.sum(0)) + cv_squared(load.sum(0))


class NoisyTopKMoE(nn.Module):
    """u [B, D_in] -> {"out" [B, D_out], "gates" [B, E], "load" [B, E]}.

    combine "sum": y = sum_e g_e E_e(u) (the MoE formula of the GLoMo paper);
    "logsumexp": y = log sum_e g_e exp(E_e(u)) (the GLoMo code's combine, inherited from an
    implementation written for log-probabilities).
    """

    def __init__(
        self, dim_in: int, hidden: int, dim_out: int, experts: int, k: int, noisy: bool = True, combine: str = "sum"
    ):
        super().__init__()
        self.experts = nn.ModuleList(
            nn.Sequential(nn.Linear(dim_in, hidden), nn.ReLU(), nn.Linear(hidden, dim_out)) for _ in range(experts)
        )
        self.w_gate = nn.Parameter(torch.zeros(dim_in, experts))
        self.w_noise = nn.Parameter(torch.zeros(dim_in, experts))
        self.k, self.noisy, self.combine = k, noisy, combine

    def _gates(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        clean = u @ self.w_gate
        noisy_run = self.noisy and self.training
        if noisy_run:
            std = F.softplus(u @ self.w_noise) + NOISE_EPS
            logits = clean + torch.randn_like(clean) * std
        else:
            logits = clean
        num_experts = logits.shape[1]
        top_values, top_index = logits.topk(min(self.k + 1, num_experts), dim=1)
        gates = torch.zeros_like(logits).scatter(1, top_index[:, : self.k], top_values[:, : self.k].softmax(dim=1))
        if noisy_run and self.k < num_experts:
            normal = torch.distributions.Normal(0.0, 1.0)
            threshold_in = top_values[:, self.k : self.k + 1]  # an expert in the top k must beat the (k+1)-th
            threshold_out = top_values[:, self.k - 1 : self.k]  # one outside must beat the k-th
            is_in = logits > threshold_in
            load = torch.where(
                is_in, normal.cdf((clean - threshold_in) / std), normal.cdf((clean - threshold_out) / std)
            )
        else:
            load = (gates > 0).to(gates.dtype)
        return gates, load

    def forward(self, u: torch.Tensor) -> dict:
        gates, load = self._gates(u)
        outs = torch.stack([e(u) for e in self.experts], dim=1)  # [B, E, D_out]
        if self.combine == "sum":
            y = (gates.unsqueeze(-1) * outs).sum(dim=1)
        else:
            used = gates > 0
            log_g = torch.where(used, gates, torch.ones_like(gates)).log().masked_fill(~used, float("-inf"))
            y = torch.logsumexp(outs + log_g.unsqueeze(-1), dim=1)
        return {"out": y, "gates": gates, "load": load}
