"""Crossmodal information enhancement (Eqs. 2-4) and the multi-granularity fusion (Eq. 5)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class CIE(nn.Module):
    """One modality's query tokens attend to all other modalities' tokens.

    query [B, n, d], context [B, m, d] -> [B, 2n, d] = cat(query, attention output) along tokens.
    Multi-head cross-attention with q/k/v/out linears (bias), no norm, no residual.
    """

    def __init__(self, dim: int = 128, heads: int = 4):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.q, self.k, self.v, self.out = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, query: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        def split(x):  # [B, L, d] -> [B, heads, L, d/heads]
            return x.unflatten(-1, (self.heads, -1)).transpose(1, 2)

        attn = F.scaled_dot_product_attention(split(self.q(query)), split(self.k(context)), split(self.v(context)))
        attn = self.out(attn.transpose(1, 2).flatten(2))
        return torch.cat([query, attn], dim=1)


class GranularityCIE(nn.Module):
    """CIE for every modality at one granularity: modality j queries the others' tokens.

    With a single modality there is nothing to attend to and its tokens pass through.
    """

    def __init__(self, num_modalities: int, dim: int, heads: int):
        super().__init__()
        self.blocks = nn.ModuleList(CIE(dim, heads) for _ in range(num_modalities)) if num_modalities > 1 else None

    def forward(self, tokens: list[torch.Tensor]) -> list[torch.Tensor]:
        if self.blocks is None:
            return tokens
        out = []
        for j, block in enumerate(self.blocks):
            context = torch.cat(tokens[:j] + tokens[j + 1 :], dim=1)
            out.append(block(tokens[j], context))
        return out


class GranularityFusion(nn.Module):
    """Eq. 5 for one modality: cat over granularities [B, G*k*n, d] -> Conv1d(-> n) -> mean -> [B, d]."""

    def __init__(self, num_tokens_in: int, num_tokens_out: int):
        super().__init__()
        self.conv = nn.Conv1d(num_tokens_in, num_tokens_out, kernel_size=3, padding=1)

    def forward(self, per_granularity: list[torch.Tensor]) -> torch.Tensor:
        return self.conv(torch.cat(per_granularity, dim=1)).mean(dim=1)
