"""GLoMo on the shared encoders.

Original: Y. Zhuang, Y. Zhang, Z. Hu, X. Zhang, J. Deng, F. Ren, "GLoMo: Global-Local Modal
Fusion for Multimodal Sentiment Analysis", ACM MM 2024, doi:10.1145/3664647.3681527; code
`YetZzzzzz/GLoMo` (MIT). Mechanism: per modality a global vector g_m and local segment
features (Conv1d k3 over the sequence, adaptive max-pool to G segments, flattened) mixed by a
noisy top-k mixture of experts into l_m; a 2-layer post-LN transformer (FFN 2048, dropout 0.1)
over [g_1, l_1, ..., g_M, l_M]; global attention weights a = softmax(d^-1/2 MLP([h_g])) and
local weights b likewise; f_cross = Linear([sum a h_g; sum b h_l]); f_mod = sum_m a_m
Linear([h_gm; h_lm]) (the global weights guide the modality-level fusion); output
Linear([f_cross; f_mod]). Loss: task loss + sum_m MoE load-balance losses (coefficient 0.01).
Defaults: G = 3, 3 experts, top-2.

Adaptation (docs/baselines.md §7.3) and every departure:
- g_m = the pooled stage-4 vector f_m of the shared encoders; GLoMo's modality-specific
  transformer encoders (and BERT for text) are dropped — our encoders are already global
  extractors, and the paper's parameter count (12.85 M on MEN) leaves no room for them.
- Local features from the modality's stage-4 tokens (128 / 49 image tokens, 6 / 5 attribute
  tokens): Conv1d(d -> d, k3, no bias) along the tokens -> adaptive max-pool to G.
- Decision, `method_args.glomo.combine`: "sum" (default) is the standard MoE combine that
  the paper writes; "logsumexp" is the code's log sum g exp(E) combine.
- d = model.dim, model.heads heads (the original uses 16 heads at d 48-256). CE for K classes
  instead of L1 regression; the shared protocol replaces AdamW and its schedule.
Outputs: features = the f_j; fused = [f_cross; f_mod] (2d).
DDP: the load-balance loss (a batch statistic) uses the all-gathered gates and loads.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from ..registry import register_method
from ..shape import CohortShape
from .base import FusionMethod, global_batch, pooled
from .moe import NoisyTopKMoE, load_balance_loss

if TYPE_CHECKING:  # a method reads the Config it is given; only the engine and above import the config module
    from ...config import Config


@dataclass
class GlomoArgs:
    segments: int = 3  # local segments per modality (gran)
    experts: int = 3
    top_k: int = 2
    moe_loss_coef: float = 0.01  # load-balance loss coefficient
    noisy_gating: bool = True
    combine: str = "sum"  # sum (the paper's MoE formula) | logsumexp (the code's log sum g exp(E))
    fusion_layers: int = 2
    ffn_dim: int = 2048  # nn.TransformerEncoderLayer's default, as in the code
    dropout: float = 0.1  # fusion transformer
    attention_dropout: float = 0.3  # the global/local attention MLPs


def _check(cfg, selected: bool) -> list[str]:
    a, m, problems = cfg.method_args.glomo, cfg.model, []
    if a.fusion_layers < 1:
        problems.append("method_args.glomo.fusion_layers must be at least 1")
    if selected and m.dim % m.heads:
        problems.append(f"model.dim ({m.dim}) must be divisible by model.heads ({m.heads}) for glomo's attention")
    if not 1 <= a.top_k <= a.experts or a.segments < 1:
        problems.append("method_args.glomo: need 1 <= top_k <= experts and segments >= 1")
    return problems


class ModalityAttention(nn.Module):
    """M vectors [B, M, d] -> softmax weights [B, M]: MLP(M d -> d -> M) scaled by d^-1/2."""

    def __init__(self, num_modalities: int, dim: int, dropout: float):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(num_modalities * dim, dim), nn.Dropout(dropout), nn.ReLU(), nn.Linear(dim, num_modalities)
        )
        self.scale = dim**-0.5

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return (self.mlp(h.flatten(1)) * self.scale).softmax(dim=1)


@register_method(
    "glomo",
    display="GLoMo",
    args=GlomoArgs,
    search_space="glomo.yaml",
    choices={"combine": {"sum", "logsumexp"}},
    check=_check,
)
class GLoMo(FusionMethod):
    def __init__(self, cfg: Config, shape: CohortShape, num_tabular_features: int | None = None):
        super().__init__(cfg, shape, num_tabular_features)
        a, d, mods = cfg.method_args.glomo, self.dim, self.num_modalities
        self.moe_loss_coef = a.moe_loss_coef
        self.local_conv = nn.ModuleList(nn.Conv1d(d, d, kernel_size=3, padding=1, bias=False) for _ in range(mods))
        self.segments = nn.AdaptiveMaxPool1d(a.segments)
        self.moe = nn.ModuleList(
            NoisyTopKMoE(
                dim_in=a.segments * d,
                hidden=d,
                dim_out=d,
                experts=a.experts,
                k=a.top_k,
                noisy=a.noisy_gating,
                combine=a.combine,
            )
            for _ in range(mods)
        )
        layer = nn.TransformerEncoderLayer(d, cfg.model.heads, a.ffn_dim, a.dropout, batch_first=True)
        self.fusion = nn.TransformerEncoder(layer, a.fusion_layers, enable_nested_tensor=False)
        self.global_attention = ModalityAttention(mods, d, a.attention_dropout)
        self.local_attention = ModalityAttention(mods, d, a.attention_dropout)
        self.cross = nn.Linear(2 * d, d)
        self.modality = nn.ModuleList(nn.Linear(2 * d, d) for _ in range(mods))
        self.classifier = nn.Linear(2 * d, self.num_classes)

    def forward(self, images: list[torch.Tensor], tabular: torch.Tensor) -> dict:
        tokens = self.encode(images, tabular)
        f = pooled(tokens)
        moe = [
            mix(self.segments(conv(x.transpose(1, 2))).flatten(1))
            for conv, mix, x in zip(self.local_conv, self.moe, tokens)
        ]
        seq = torch.stack([v for g, m in zip(f, moe) for v in (g, m["out"])], dim=1)  # [B, 2M, d]: g_1, l_1, g_2, ...
        h = self.fusion(seq)
        h_global, h_local = h[:, 0::2], h[:, 1::2]  # [B, M, d] each
        a, b = self.global_attention(h_global), self.local_attention(h_local)
        f_cross = self.cross(torch.cat([(a[..., None] * h_global).sum(1), (b[..., None] * h_local).sum(1)], dim=1))
        per_modality = torch.stack(
            [lin(torch.cat([h_global[:, m], h_local[:, m]], dim=1)) for m, lin in enumerate(self.modality)], dim=1
        )
        f_mod = (a[..., None] * per_modality).sum(1)
        fused = torch.cat([f_cross, f_mod], dim=1)
        return {
            "logits": self.classifier(fused),
            "features": f,
            "fused": fused,
            "gates": [m["gates"] for m in moe],
            "load": [m["load"] for m in moe],
        }

    def loss_terms(self, out: dict, labels: torch.Tensor, *, epoch: int) -> dict:
        ce = F.cross_entropy(out["logits"].float(), labels)
        _, gates, load = global_batch(labels, torch.stack(out["gates"], 1).float(), torch.stack(out["load"], 1).float())
        balance = sum(load_balance_loss(gates[:, m], load[:, m]) for m in range(gates.shape[1]))
        return {"loss": ce + self.moe_loss_coef * balance, "ce": ce, "load_balance": balance}
