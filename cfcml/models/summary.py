"""`cfcml summary`: parameter counts, forward GFLOPs per sample and the per-stage token shapes."""

from __future__ import annotations

import math

import torch
from torch.utils.flop_counter import FlopCounterMode

from ..config import Config
from .cfcml import build_model, count_params, stage_grids
from .pretrained import without_pretrained_weights
from .shape import CohortShape


def frozen_text_params(cfg: Config) -> int:
    """Parameters of the frozen text tower, counted on the meta device (nothing allocated)."""
    if not cfg.model.use_tabular or cfg.model.tabular_embedding != "clip":
        return 0
    import open_clip
    from open_clip.model import _build_text_tower

    mc = open_clip.get_model_config("ViT-B-32")
    with torch.device("meta"):
        tower = _build_text_tower(mc["embed_dim"], mc["text_cfg"])
    return sum(p.numel() for p in tower.parameters())


def example_inputs(cfg: Config, shape: CohortShape, batch: int = 1, num_tabular_features: int = 16) -> dict:
    images = [torch.randn(batch, shape.in_channels, *cfg.data.image_size) for _ in range(shape.num_images)]
    if cfg.model.tabular_embedding == "clip":
        tabular = torch.randn(batch, shape.num_attributes, 512)
    else:
        tabular = torch.randn(batch, num_tabular_features)
    return {"images": images if cfg.model.use_images else None, "tabular": tabular if cfg.model.use_tabular else None}


def summarize(cfg: Config, shape: CohortShape | None = None, paper: dict | None = None) -> dict:
    """Counts, FLOPs and token shapes of the model `cfg` builds for its cohort (`shape`,
    default: the cohort `cfg.dataset` names; `paper`: that schema's reference numbers)."""
    if shape is None:
        from ..config import cohort_spec

        spec = cohort_spec(cfg)
        shape, paper = spec.shape(), spec.paper
    # Random weights: a summary counts and times the model, it trains nothing (no refusal, no download).
    model = build_model(without_pretrained_weights(cfg), shape, num_tabular_features=16).eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(**example_inputs(cfg, shape))
    stages = []
    if cfg.model.use_images:
        grids = stage_grids(cfg.model.image_encoder, cfg.data.image_size)
        for s, (c, grid) in enumerate(zip(model.encoders[0].stage_channels, grids), start=1):
            stages.append({
                "stage": s,
                "feature_map": [c, *grid],
                "tokens_in": math.prod(grid),
                "tokens_out": cfg.model.n_image_tokens,
                "token_dim": cfg.model.dim,
                "used": (s - 1) in model.stages,
            })  # fmt: skip
    return {
        "preset": cfg.name,
        "trainable_params": count_params(model),
        "frozen_params": frozen_text_params(cfg),
        "gflops": counter.get_total_flops() / 1e9,  # torch's count: a multiply-add is 2 FLOPs
        "gmacs": counter.get_total_flops() / 2e9,
        "stages": stages,
        "paper": {k: paper[k] for k in ("params_m", "gflops") if k in paper} if paper else None,
    }


def format_summary(s: dict) -> str:
    lines = [
        f"preset            {s['preset']}",
        f"trainable params  {s['trainable_params'] / 1e6:.2f} M",
        f"frozen params     {s['frozen_params'] / 1e6:.2f} M (text encoder, never in checkpoints)",
        f"forward GFLOPs    {s['gflops']:.2f} per sample ({s['gmacs']:.2f} G multiply-adds; conv/matmul/attention only)",
    ]
    if s.get("paper"):
        lines.append(f"paper             {s['paper']['params_m']} M, {s['paper']['gflops']} GFLOPs")
    for st in s["stages"]:
        used = "" if st["used"] else "  (unused: SG-CIE)"
        lines.append(f"stage {st['stage']}  map {st['feature_map']} -> {st['tokens_in']} tokens -> {st['tokens_out']} x {st['token_dim']}{used}")
    return "\n".join(lines)
