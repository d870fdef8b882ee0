"""Token mapping (Eq. 1): a stage map's N spatial tokens -> a predefined number of tokens."""

from __future__ import annotations

import torch
from torch import nn


def flatten_tokens(feature_map: torch.Tensor) -> torch.Tensor:
    """[B, C, *spatial] -> [B, N, C] with N = prod(spatial)."""
    return feature_map.flatten(2).transpose(1, 2)


class Conv1dTokenMap(nn.Module):
    """[B, N, C_in] -> [B, n, C_out]: a Conv1d whose input channels are the N tokens (kernel 3,
    sliding along the feature axis), then Linear(C_in -> C_out) unless C_in == C_out."""

    def __init__(self, num_tokens_in: int, num_tokens_out: int, dim_in: int, dim_out: int):
        super().__init__()
        self.conv = nn.Conv1d(num_tokens_in, num_tokens_out, kernel_size=3, padding=1)
        self.proj = nn.Identity() if dim_in == dim_out else nn.Linear(dim_in, dim_out)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.proj(self.conv(tokens))


class PerceiverTokenMap(nn.Module):
    """The Fig. 10 alternative: n learned latents cross-attend to the N input tokens
    (one Perceiver block: cross-attention + MLP, both residual, pre-norm)."""

    def __init__(self, num_tokens_in: int, num_tokens_out: int, dim_in: int, dim_out: int, heads: int = 4):
        super().__init__()
        self.inp = nn.Identity() if dim_in == dim_out else nn.Linear(dim_in, dim_out)
        self.latents = nn.Parameter(torch.randn(num_tokens_out, dim_out) * 0.02)
        self.norm_q, self.norm_kv, self.norm_mlp = nn.LayerNorm(dim_out), nn.LayerNorm(dim_out), nn.LayerNorm(dim_out)
        self.attn = nn.MultiheadAttention(dim_out, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(dim_out, 2 * dim_out), nn.GELU(), nn.Linear(2 * dim_out, dim_out))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        kv = self.norm_kv(self.inp(tokens))
        q = self.latents.unsqueeze(0).expand(tokens.shape[0], -1, -1)
        x = q + self.attn(self.norm_q(q), kv, kv, need_weights=False)[0]
        return x + self.mlp(self.norm_mlp(x))


def make_token_map(
    kind: str, num_tokens_in: int, num_tokens_out: int, dim_in: int, dim_out: int, heads: int = 4
) -> nn.Module:
    if kind == "conv1d":
        return Conv1dTokenMap(num_tokens_in, num_tokens_out, dim_in, dim_out)
    if kind == "perceiver":
        return PerceiverTokenMap(num_tokens_in, num_tokens_out, dim_in, dim_out, heads)
    raise ValueError(f"unknown token mapping {kind!r} (conv1d | perceiver)")
