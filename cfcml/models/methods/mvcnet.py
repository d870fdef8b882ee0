"""MVCNet (PE-MVCNet's cross-modal attention fusion, CMAF) on the shared encoders.

Original: Z. Guo, Z. Wang, R. Ge, J. Yu, F. Qin, Y. Tian, Y. Peng, Y. Li, C. Wang, "PE-MVCNet:
Multi-view and Cross-modal Fusion Network for Pulmonary Embolism Prediction", IEEE ISBI 2024
(arXiv:2402.17187); code `LeavingStarW/PE-MVCNET` (`models/ours.py`, the 2024 width-128
version). Mechanism (CMAF): image stream i = ReLU(W_i1 img), table stream t = ReLU(W_t1 tab);
per stream q/k/v = ReLU(Linear); V = MHA(q_t, k_i, v_i) + i (the table reads the image),
T = MHA(q_i, k_t, v_t) + t (the image reads the table); V' = W_i2 V, T' = W_t2 T;
classifier Linear(2h -> h) -> ReLU -> Linear(h -> out). 4 heads, attention dropout 0.2.

Adaptation (docs/baselines.md §6.3) and every departure:
- Several images: fused first by channel concatenation (the CFCML paper's footnote 2): the
  image token sequences (equal stage-4 grids) are concatenated along features, [N, m d].
- Decision, `method_args.mvcnet.inputs`: "tokens" (default) attends, per sample, over the
  stage-4 tokens (N image tokens, t attribute tokens); the attention outputs are mean-pooled
  over the query tokens so they fit the pooled residuals. "vector" runs the same layers on
  the pooled vectors (one token per stream), which matches the paper's zero GFLOPs increase,
  but attention over one key is a fixed linear map. In the original, i and t are [B, h]
  vectors that nn.MultiheadAttention reads as one unbatched sequence of length B — attention
  across the samples of a batch, so predictions depend on the batch; neither mode reproduces
  that.
- Table stream: the attribute tokens of the shared sentence embedding instead of the EMR MLP.
- Dropout(model.dropout) before the last classifier layer (the shared protocol's 0.5); CE for
  K classes instead of BCE. The original's image-only MMMNet branch is replaced by the shared
  encoders; its SGD schedule by the shared protocol. Heads: model.heads (4, as the original).
Outputs: features = the f_j; fused = [V'; T']. Per-sample loss only: exact under DDP.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from ..registry import register_method
from ..shape import CohortShape
from .base import FusionMethod, pooled

if TYPE_CHECKING:  # a method reads the Config it is given; only the engine and above import the config module
    from ...config import Config


@dataclass
class MvcnetArgs:
    inputs: str = "tokens"  # tokens (attention over tokens) | vector (one pooled vector per stream)
    hidden: int = 128  # CMAF width (PE-MVCNet 2024)
    attn_dropout: float = 0.2


def _check(cfg, selected: bool) -> list[str]:
    a, m = cfg.method_args.mvcnet, cfg.model
    if selected and a.hidden % m.heads:
        return [f"method_args.mvcnet.hidden ({a.hidden}) must be divisible by model.heads ({m.heads})"]
    return []


def _relu_linear(dim_in: int, dim_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(dim_in, dim_out), nn.ReLU())


@register_method(
    "mvcnet",
    display="MVCNet",
    args=MvcnetArgs,
    search_space="mvcnet.yaml",
    choices={"inputs": {"tokens", "vector"}},
    check=_check,
)
class MVCNet(FusionMethod):
    def __init__(self, cfg: Config, shape: CohortShape, num_tabular_features: int | None = None):
        super().__init__(cfg, shape, num_tabular_features)
        a = cfg.method_args.mvcnet
        h, d = a.hidden, self.dim
        self.vector_mode = a.inputs == "vector"
        self.image_in, self.table_in = _relu_linear(self.num_images * d, h), _relu_linear(d, h)
        self.q_image, self.k_image, self.v_image = (_relu_linear(h, h) for _ in range(3))
        self.q_table, self.k_table, self.v_table = (_relu_linear(h, h) for _ in range(3))
        self.table_reads_image = nn.MultiheadAttention(h, cfg.model.heads, dropout=a.attn_dropout, batch_first=True)
        self.image_reads_table = nn.MultiheadAttention(h, cfg.model.heads, dropout=a.attn_dropout, batch_first=True)
        self.image_out, self.table_out = nn.Linear(h, h), nn.Linear(h, h)
        self.classifier = nn.Sequential(
            nn.Linear(2 * h, h), nn.ReLU(), nn.Dropout(cfg.model.dropout), nn.Linear(h, self.num_classes)
        )

    def forward(self, images: list[torch.Tensor], tabular: torch.Tensor) -> dict:
        tokens = self.encode(images, tabular)
        f = pooled(tokens)
        image, table = torch.cat(tokens[:-1], dim=-1), tokens[-1]  # [B, N, m d], [B, t, d]
        if self.vector_mode:
            image, table = image.mean(dim=1, keepdim=True), table.mean(dim=1, keepdim=True)
        i, t = self.image_in(image), self.table_in(table)
        v = self.table_reads_image(self.q_table(t), self.k_image(i), self.v_image(i), need_weights=False)[0]
        v = v.mean(dim=1) + i.mean(dim=1)
        u = self.image_reads_table(self.q_image(i), self.k_table(t), self.v_table(t), need_weights=False)[0]
        u = u.mean(dim=1) + t.mean(dim=1)
        fused = torch.cat([self.image_out(v), self.table_out(u)], dim=1)
        return {"logits": self.classifier(fused), "features": f, "fused": fused}

    def loss_terms(self, out: dict, labels: torch.Tensor, *, epoch: int) -> dict:
        ce = F.cross_entropy(out["logits"].float(), labels)
        return {"loss": ce, "ce": ce}
