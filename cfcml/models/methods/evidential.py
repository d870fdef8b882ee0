"""Subjective-logic / Dirichlet tools shared by ETMC and CCML (pure functions of tensors).

An opinion over K classes is a Dirichlet alpha = evidence + 1 [B, K], strength S = sum alpha,
belief b = evidence / S, uncertainty u = K / S (sum b + u = 1). Everything runs in float32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def annealing(epoch: int, annealing_epochs: int) -> float:
    """The KL weight min(1, epoch / T) of the evidential losses (epoch 0-based)."""
    return min(1.0, epoch / annealing_epochs)


def dirichlet_log_mean(alpha: torch.Tensor) -> torch.Tensor:
    """[B, K] -> log(alpha / S): as `logits`, softmax gives back the Dirichlet mean alpha / S."""
    return alpha.log() - alpha.sum(-1, keepdim=True).log()


def expected_ce(alpha: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[B, K], [B] -> [B]: the expected cross-entropy under Dir(alpha), psi(S) - psi(alpha_y)
    (the "digamma" loss of ETMC and CCML's ACE)."""
    s = alpha.sum(-1)
    return torch.digamma(s) - torch.digamma(alpha.gather(1, labels[:, None]).squeeze(1))


def kl_to_uniform(alpha: torch.Tensor) -> torch.Tensor:
    """[B, K] -> [B]: KL( Dir(alpha) || Dir(1, ..., 1) )."""
    k = alpha.shape[-1]
    s = alpha.sum(-1)
    log_norm = torch.lgamma(s) - torch.lgamma(alpha).sum(-1) - torch.lgamma(alpha.new_tensor(float(k)))
    return log_norm + ((alpha - 1) * (torch.digamma(alpha) - torch.digamma(s)[:, None])).sum(-1)


def misleading_kl(alpha: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[B, K], [B] -> [B]: KL of the opinion with the target evidence removed,
    alpha~ = y + (1 - y) * alpha, to the uniform Dirichlet (penalises evidence for wrong classes)."""
    y = F.one_hot(labels, alpha.shape[-1]).to(alpha.dtype)
    return kl_to_uniform(y + (1 - y) * alpha)


def ds_combine(alpha1: torch.Tensor, alpha2: torch.Tensor, min_agreement: float = 1e-6) -> torch.Tensor:
    """ETMC's reduced Dempster-Shafer rule for two opinions [B, K] -> the combined alpha [B, K].

    Conflict C = sum_{i != j} b1_i b2_j; b = (b1 * b2 + b1 * u2 + b2 * u1) / (1 - C);
    u = u1 * u2 / (1 - C); back to a Dirichlet: S = K / u, alpha = b * S + 1.
    1 - C is clamped at `min_agreement` (strongly conflicting opinions would divide by ~0).
    """
    k = alpha1.shape[-1]
    s1, s2 = alpha1.sum(-1, keepdim=True), alpha2.sum(-1, keepdim=True)
    b1, b2 = (alpha1 - 1) / s1, (alpha2 - 1) / s2
    u1, u2 = k / s1, k / s2
    conflict = b1.sum(-1, keepdim=True) * b2.sum(-1, keepdim=True) - (b1 * b2).sum(-1, keepdim=True)
    agreement = (1 - conflict).clamp_min(min_agreement)
    b = (b1 * b2 + b1 * u2 + b2 * u1) / agreement
    u = u1 * u2 / agreement
    return b * (k / u) + 1


def ccml_decouple(evidences: list[torch.Tensor], sharpen: float, eps: float = 1e-8) -> dict[str, torch.Tensor]:
    """CCML's dynamic evidence decoupling of V view evidences [B, K] (Liu et al., MM 2024).

    consistent e_c = element-wise min over views; residuals r_v = e_v - e_c; complementary
    e_d = mean_v r_v. The consistent belief b_c = e_c / S_c (S_c = sum(e_c + 1)) is sharpened,
    b^ = b_c^beta * sum(b_c) / sum(b_c^beta), and rescaled by the number of views:
    e^_c = V * S_c * b^. Fused evidence e_a = e^_c + e_d.
    -> {"consistent": e^_c, "complementary": e_d, "fused": e_a}, evidence (alpha - 1) each.
    `eps` guards the denominators (the original uses nan_to_num instead).
    """
    stacked = torch.stack(evidences)  # [V, B, K]
    e_c = stacked.min(0).values
    e_d = (stacked - e_c).mean(0)
    s_c = (e_c + 1).sum(-1, keepdim=True)
    b_c = e_c / s_c
    b_pow = b_c.pow(sharpen)  # sharpen >= 1 (config-checked): finite gradient at b = 0
    b_hat = b_pow * b_c.sum(-1, keepdim=True) / (b_pow.sum(-1, keepdim=True) + eps)
    e_hat = len(evidences) * s_c * b_hat
    return {"consistent": e_hat, "complementary": e_d, "fused": e_hat + e_d}
