"""The MulT transformer encoder (Tsai et al., ACL 2019) that DMD builds its attention from.

Pre-LN layers (multi-head attention, then a 4x ReLU feed-forward, both residual), inputs
scaled by sqrt(d) plus sinusoidal positions, embedding dropout, a final LayerNorm. With a
`source`, every layer is cross-modal: queries from x, keys and values from the source (normed
by the same LayerNorm, as in MulT). No causal mask: our tokens are spatial, not temporal.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def sinusoidal_positions(length: int, dim: int, device, dtype) -> torch.Tensor:
    """[length, dim]: fairseq's table for positions 1..length (sines, then cosines)."""
    half = dim // 2
    freq = torch.exp(torch.arange(half, device=device, dtype=torch.float32) * -(math.log(10000.0) / max(half - 1, 1)))
    angles = torch.arange(1, length + 1, device=device, dtype=torch.float32)[:, None] * freq[None]
    table = torch.cat([angles.sin(), angles.cos()], dim=1)
    if dim % 2:
        table = F.pad(table, (0, 1))
    return table.to(dtype)


class MulTLayer(nn.Module):
    """x [B, L, d] (, source [B, L_s, d]) -> [B, L, d]."""

    def __init__(self, dim: int, heads: int, attn_dropout: float, relu_dropout: float = 0.0, res_dropout: float = 0.0):
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, heads, dropout=attn_dropout, batch_first=True)
        self.norm_attn, self.norm_ffn = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.fc1, self.fc2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)
        self.relu_dropout, self.res_dropout = relu_dropout, res_dropout

    def forward(self, x: torch.Tensor, source: torch.Tensor | None = None) -> torch.Tensor:
        h = self.norm_attn(x)
        kv = h if source is None else self.norm_attn(source)
        h = self.attn(h, kv, kv, need_weights=False)[0]
        x = x + F.dropout(h, self.res_dropout, self.training)
        h = F.dropout(F.relu(self.fc1(self.norm_ffn(x))), self.relu_dropout, self.training)
        return x + F.dropout(self.fc2(h), self.res_dropout, self.training)


class MulTEncoder(nn.Module):
    """x [B, L, d] (, source [B, L_s, d]) -> [B, L, d]."""

    def __init__(self, dim: int, heads: int, layers: int, attn_dropout: float, embed_dropout: float):
        super().__init__()
        self.layers = nn.ModuleList(MulTLayer(dim, heads, attn_dropout) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.scale, self.embed_dropout = math.sqrt(dim), embed_dropout

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        x = self.scale * x + sinusoidal_positions(x.shape[1], x.shape[2], x.device, x.dtype)
        return F.dropout(x, self.embed_dropout, self.training)

    def forward(self, x: torch.Tensor, source: torch.Tensor | None = None) -> torch.Tensor:
        x = self._embed(x)
        source = self._embed(source) if source is not None else None
        for layer in self.layers:
            x = layer(x, source)
        return self.norm(x)
