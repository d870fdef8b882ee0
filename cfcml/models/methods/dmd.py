"""DMD on the shared encoders.

Original: Y. Li, Y. Wang, Z. Cui, "Decoupled Multimodal Distilling for Emotion Recognition",
CVPR 2023 (arXiv:2303.13802); code `mdswyz/DMD` (MIT). Mechanism: each modality's sequence is
decoupled into a private part s_m = E^s_m(x_m) and a common part c_m = E^c(x_m) (one shared
encoder), with reconstruction x^_m = D_m([s_m; c_m]), a cycle term on E^s_m(x^_m), an
orthogonality penalty between s_m and c_m and a margin loss aligning the common parts by
class. Homogeneous branch (common space): a residual head per modality on the flattened c_m,
MulT self-attention per modality, and a head on their concatenation. Heterogeneous branch
(private space): MulT cross-modal transformers into every target modality, a memory
transformer, a head per modality. A graph-distillation unit per space learns per-sample edge
weights between the modalities' logits (L1 distillation from detached teachers, an edge-prior
regulariser; the hetero unit also pushes private representations apart). Fusion: sigmoid
gates on the pooled hetero features and the common concatenation -> residual MLP -> output.
Loss (code): task losses on the output, the M homo, the M hetero and the common heads
+ 0.05 (homo logit + reg) + 0.05 (hetero logit + repr + reg)
+ 0.1 (cycle + recon + 0.1 (margin + orthogonality)).

Adaptation (docs/baselines.md §5.3) and every departure:
- Inputs: the shared encoders' stage-4 token sequences X_m [N_m, d] (MEN 128 tokens per
  series, 6 attribute tokens; Derm7pt 49 per photo, 5), d = model.dim, model.heads heads.
  Decision, `method_args.dmd.inputs`: "tokens" (default) keeps DMD's mechanism — the
  cross-modal transformers attend over tokens, which degenerate to fixed linear maps on
  length-1 sequences — at ~9 GFLOPs extra per MEN sample; "pooled" runs every layer on the
  pooled f_j (N_m = 1), which matches the paper's small GFLOPs increment (+0.23 G) and is the
  hedge against the large flattened layers over-fitting. Neither reproduces the paper's
  171.66 / 184.49 M (docs/baselines.md §5.3: no faithful generalisation does).
- The input Conv1d projection is the identity (widths are already d, as in the original when
  they match); E^s, E^c and D are the original's bias-free 1x1 convolutions, written as Linear
  layers over tokens (same parameters).
- M modalities instead of three: M(M-1) cross-modal transformers, memory width (M-1) d,
  M(M-1) graph edges, softmax over all edges with scale 1/8.
- Uniform graph-distillation priors 1/(M(M-1)): the original's "language teaches audio and
  vision" priors have no analogue here.
- Task losses: L1 regression -> CE on all 2M + 2 heads (summed); distillation stays L1 on the
  K-dim logits. Margin mu = 0.15 for every different-class pair (the original's label
  distance is meaningless for nominal classes).
- "Last time step" -> mean over tokens (the last raster token is a corner voxel). No causal
  mask. Sinusoidal positions kept over raster order.
- Orthogonality: max(0, cos(s, c)) per token along the feature axis, averaged (the original's
  CosineEmbeddingLoss on (L, B, d) tensors takes the cosine along the batch axis, a quirk).
- Hetero representation term: max(0, cos(student, detached teacher)) weighted per sample by
  its edge weight + prior (the original multiplies the batch-mean cosine by the mean weight).
- The original also builds `proj_cosine_*` (Linear(N_m d -> d) on the private part) but no
  loss uses it: not built here (it would get no gradient; 6.4 M of the recipe's MEN count).
- Dropouts: attention 0.3, embedding 0.2, output 0.5, relu/residual 0 (MOSI config). The
  original's text dropout on BERT features, gradient accumulation, value clipping and
  optimiser are not carried (shared protocol).
Outputs: features = the f_j; fused = the input of the final output layer.
DDP: the margin loss (triplets over the batch) and the edge-prior regularisers (batch means of
the edge weights) use the all-gathered global batch; every other term is per sample.
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
from .mult import MulTEncoder

if TYPE_CHECKING:  # a method reads the Config it is given; only the engine and above import the config module
    from ...config import Config


@dataclass
class DmdArgs:
    inputs: str = "tokens"  # tokens (stage-4 token sequences) | pooled (one vector per modality)
    layers: int = 4  # MulT encoder depth (nlevels)
    attn_dropout: float = 0.3
    embed_dropout: float = 0.2
    output_dropout: float = 0.5
    margin: float = 0.15  # hinge margin between different-class common features
    gd_reg: float = 10.0  # graph-distillation edge-prior regulariser
    repr_weight: float = 10.0  # weight of the hetero representation term inside the GD loss
    w_gd: float = 0.05  # weight of each graph-distillation loss
    w_decouple: float = 0.1  # weight of reconstruction + cycle (+ 0.1 x (margin + orthogonality))


def _check(cfg, selected: bool) -> list[str]:
    m, problems = cfg.model, []
    if cfg.method_args.dmd.layers < 1:
        problems.append("method_args.dmd.layers must be at least 1")
    if selected and m.dim % m.heads:
        problems.append(f"model.dim ({m.dim}) must be divisible by model.heads ({m.heads}) for dmd's attention")
    return problems


class ResidualHead(nn.Module):
    """x [B, D] -> (logits [B, K], repr [B, H], residual [B, D]): r = W1 x,
    h = W2 dropout(relu(r)) + x, logits = W3 h (DMD's projection heads)."""

    def __init__(self, dim: int, hidden: int, num_classes: int, dropout: float):
        super().__init__()
        self.proj1, self.proj2, self.out = nn.Linear(dim, hidden), nn.Linear(hidden, dim), nn.Linear(dim, num_classes)
        self.dropout = dropout

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        r = F.relu(self.proj1(x))  # the original's in-place ReLU makes this the representation it distils
        h = self.proj2(F.dropout(r, self.dropout, self.training)) + x
        return self.out(h), r, h


class GraphDistillation(nn.Module):
    """DMD's graph-distillation unit over M modalities (edges j <- i for every i != j).

    Node embeddings z_m = [W_logit logit_m; W_repr repr_m]; edge score W_edge [z_j; z_i];
    per-sample softmax over all M(M-1) edges of temperature * score.
    """

    def __init__(self, num_modalities: int, num_classes: int, repr_dim: int, size: int, temperature: float = 1 / 8):
        super().__init__()
        self.w_logit, self.w_repr = nn.Linear(num_classes, size), nn.Linear(repr_dim, size)
        self.w_edge = nn.Linear(4 * size, 1)
        self.pairs = [
            (j, i) for j in range(num_modalities) for i in range(num_modalities) if i != j
        ]  # (student, teacher)
        self.temperature = temperature
        self.register_buffer("prior", torch.full((len(self.pairs),), 1.0 / len(self.pairs)), persistent=False)

    def edges(self, logits: list[torch.Tensor], reprs: list[torch.Tensor]) -> torch.Tensor:
        """M x [B, K], M x [B, R] -> edge weights [B, E]."""
        z = [torch.cat([self.w_logit(lg), self.w_repr(r)], dim=1) for lg, r in zip(logits, reprs)]
        scores = torch.cat([self.w_edge(torch.cat([z[j], z[i]], dim=1)) for j, i in self.pairs], dim=1)
        return (scores * self.temperature).softmax(dim=1)

    def logit_loss(self, logits: list[torch.Tensor], edges: torch.Tensor) -> torch.Tensor:
        """sum over edges of mean_b (w + prior) * |logit_j - sg(logit_i)|_1."""
        return sum(
            ((edges[:, e] + self.prior[e]) * (logits[j] - logits[i].detach()).abs().sum(1)).mean()
            for e, (j, i) in enumerate(self.pairs)
        )

    def repr_push_loss(self, reprs: list[torch.Tensor], edges: torch.Tensor) -> torch.Tensor:
        """sum over edges of mean_b (w + prior) * max(0, cos(repr_j, sg(repr_i)))."""
        return sum(
            (
                (edges[:, e] + self.prior[e]) * F.cosine_similarity(reprs[j], reprs[i].detach(), dim=1).clamp_min(0)
            ).mean()
            for e, (j, i) in enumerate(self.pairs)
        )

    def prior_reg(self, edges_global: torch.Tensor) -> torch.Tensor:
        """sum over edges of (batch-mean weight - prior)^2 (a batch statistic)."""
        return (edges_global.mean(0) - self.prior).pow(2).sum()


def margin_loss(feats: torch.Tensor, ids: torch.Tensor, margin: float, chunk: int = 64) -> torch.Tensor:
    """DMD's hinge on common features [n, d] with labels [n]: for each anchor with both a
    positive p (same label, not itself) and a negative q, the mean over (p, q) of
    max(0, margin - cos(a, p) + cos(a, q)); averaged over such anchors (0 when none).
    Anchors go in chunks so memory stays chunk x n x n."""
    z = F.normalize(feats.float(), dim=1, eps=1e-8)
    cos = z @ z.T
    same = ids[:, None] == ids[None, :]
    pos = same & ~torch.eye(len(ids), dtype=torch.bool, device=ids.device)
    neg = ~same
    per_anchor, counts = [], []
    for rows in torch.arange(len(ids), device=ids.device).split(chunk):
        hinge = (margin - cos[rows, :, None] + cos[rows, None, :]).clamp_min(0)  # [a, p, q]
        pair = pos[rows, :, None] & neg[rows, None, :]
        count = pair.sum((1, 2))
        per_anchor.append((hinge * pair).sum((1, 2)) / count.clamp_min(1))
        counts.append(count)
    per_anchor, valid = torch.cat(per_anchor), torch.cat(counts) > 0
    return (per_anchor * valid).sum() / valid.sum().clamp_min(1)


@register_method(
    "dmd", display="DMD", args=DmdArgs, search_space="dmd.yaml", choices={"inputs": {"tokens", "pooled"}}, check=_check
)
class DMD(FusionMethod):
    def __init__(self, cfg: Config, shape: CohortShape, num_tabular_features: int | None = None):
        super().__init__(cfg, shape, num_tabular_features)
        a, d, k, mods = cfg.method_args.dmd, self.dim, self.num_classes, self.num_modalities
        self.args = a
        self.lengths = self.num_tokens if a.inputs == "tokens" else [1] * mods
        heads, drop = cfg.model.heads, a.output_dropout

        def mult(width: int) -> MulTEncoder:
            return MulTEncoder(width, heads, a.layers, a.attn_dropout, a.embed_dropout)

        # decoupling
        self.private = nn.ModuleList(nn.Linear(d, d, bias=False) for _ in range(mods))
        self.common = nn.Linear(d, d, bias=False)
        self.decoders = nn.ModuleList(nn.Linear(2 * d, d, bias=False) for _ in range(mods))
        self.align = nn.ModuleList(nn.Linear(n * d, d) for n in self.lengths)
        # homogeneous branch (common space)
        self.homo_heads = nn.ModuleList(ResidualHead(n * d, d, k, drop) for n in self.lengths)
        self.self_attention = nn.ModuleList(mult(d) for _ in range(mods))
        self.common_head = ResidualHead(mods * d, mods * d, k, drop)
        # heterogeneous branch (private space): cross[j][i'] brings the i-th other modality into j
        self.cross = nn.ModuleList(nn.ModuleList(mult(d) for _ in range(mods - 1)) for _ in range(mods))
        self.memory = nn.ModuleList(mult((mods - 1) * d) for _ in range(mods))
        self.hetero_heads = nn.ModuleList(ResidualHead((mods - 1) * d, (mods - 1) * d, k, drop) for _ in range(mods))
        # graph distillation, fusion
        self.gd_homo = GraphDistillation(mods, k, d, 64)
        self.gd_hetero = GraphDistillation(mods, k, (mods - 1) * d, 32)
        self.hetero_gates = nn.ModuleList(nn.Linear((mods - 1) * d, (mods - 1) * d) for _ in range(mods))
        self.common_gate = nn.Linear(mods * d, mods * d)
        width = mods * (mods - 1) * d + mods * d
        self.final = ResidualHead(width, width, k, drop)

    def forward(self, images: list[torch.Tensor], tabular: torch.Tensor) -> dict:
        tokens = self.encode(images, tabular)
        f = pooled(tokens)
        x = tokens if self.args.inputs == "tokens" else [v[:, None] for v in f]  # M x [B, L_m, d]
        s = [enc(xm) for enc, xm in zip(self.private, x)]
        c = [self.common(xm) for xm in x]
        recon = [dec(torch.cat([sm, cm], dim=-1)) for dec, sm, cm in zip(self.decoders, s, c)]
        s_cycle = [enc(r) for enc, r in zip(self.private, recon)]
        common_sim = [al(cm.flatten(1)) for al, cm in zip(self.align, c)]

        homo = [head(cm.flatten(1)) for head, cm in zip(self.homo_heads, c)]
        c_fusion = torch.cat([att(cm).mean(dim=1) for att, cm in zip(self.self_attention, c)], dim=1)
        logits_common = self.common_head(c_fusion)[0]

        hetero_feats = []
        for j in range(self.num_modalities):
            others = [i for i in range(self.num_modalities) if i != j]
            h = torch.cat([enc(s[j], s[i]) for enc, i in zip(self.cross[j], others)], dim=-1)
            hetero_feats.append(self.memory[j](h).mean(dim=1))
        hetero = [head(h) for head, h in zip(self.hetero_heads, hetero_feats)]

        gated = [torch.sigmoid(g(h)) for g, h in zip(self.hetero_gates, hetero_feats)] + [
            torch.sigmoid(self.common_gate(c_fusion))
        ]
        logits, _, fused = self.final(torch.cat(gated, dim=1))
        return {
            "logits": logits,
            "features": f,
            "fused": fused,
            "inputs": x,
            "private": s,
            "common": c,
            "recon": recon,
            "private_cycle": s_cycle,
            "common_sim": common_sim,
            "homo_logits": [h[0] for h in homo],
            "homo_reprs": [h[1] for h in homo],
            "common_logits": logits_common,
            "hetero_logits": [h[0] for h in hetero],
            "hetero_reprs": [h[2] for h in hetero],
        }

    def loss_terms(self, out: dict, labels: torch.Tensor, *, epoch: int) -> dict:
        a = self.args
        heads = [out["logits"], out["common_logits"], *out["homo_logits"], *out["hetero_logits"]]
        task = sum(F.cross_entropy(lg.float(), labels) for lg in heads)
        recon = sum(F.mse_loss(r.float(), xm.float()) for r, xm in zip(out["recon"], out["inputs"]))
        cycle = sum(F.mse_loss(sc.float(), sm.float()) for sc, sm in zip(out["private_cycle"], out["private"]))
        ortho = sum(
            F.cosine_similarity(sm.float(), cm.float(), dim=-1).clamp_min(0).mean()
            for sm, cm in zip(out["private"], out["common"])
        )
        homo_logits = [lg.float() for lg in out["homo_logits"]]
        hetero_logits = [lg.float() for lg in out["hetero_logits"]]
        edges_homo = self.gd_homo.edges(homo_logits, out["homo_reprs"]).float()
        edges_hetero = self.gd_hetero.edges(hetero_logits, out["hetero_reprs"]).float()

        # batch-level terms on the global batch
        common_sim = torch.stack(out["common_sim"], dim=1)  # [B, M, d]
        all_labels, all_sim, all_homo, all_hetero = global_batch(labels, common_sim, edges_homo, edges_hetero)
        margin = margin_loss(all_sim.flatten(0, 1), all_labels.repeat_interleave(self.num_modalities), a.margin)
        reg_homo = a.gd_reg * self.gd_homo.prior_reg(all_homo)
        reg_hetero = a.gd_reg * self.gd_hetero.prior_reg(all_hetero)

        gd_homo = self.gd_homo.logit_loss(homo_logits, edges_homo) + reg_homo
        gd_hetero = (
            self.gd_hetero.logit_loss(hetero_logits, edges_hetero)
            + reg_hetero
            + a.repr_weight * self.gd_hetero.repr_push_loss([r.float() for r in out["hetero_reprs"]], edges_hetero)
        )
        decouple = cycle + recon + 0.1 * (margin + ortho)
        total = task + a.w_gd * (gd_homo + gd_hetero) + a.w_decouple * decouple
        return {
            "loss": total,
            "task": task,
            "gd_homo": gd_homo,
            "gd_hetero": gd_hetero,
            "recon": recon,
            "cycle": cycle,
            "margin": margin,
            "ortho": ortho,
        }
