"""`cfcml summary`: parameter counts, forward GFLOPs per sample and the per-stage token shapes,
for CFCML or any comparison method (`model.method`)."""

from __future__ import annotations

import contextlib
import math
from typing import TYPE_CHECKING

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from ..datasets.spec import load_spec
from .cfcml import count_params
from .encoders import image_encoder, tabular_embedding, uses_text_tower
from .methods import build_method
from .pretrained import without_pretrained_weights
from .registry import method_entry
from .shape import CohortShape

if TYPE_CHECKING:  # models read the Config they are given; only the engine and above import the config module
    from ..config import Config


def _count_sdpa(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


@contextlib.contextmanager
def _countable_attention():
    """Attention the FLOP counter sees: no fused MHA/transformer fast path (it hides the
    projections from the counter) while counting."""
    enabled = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(enabled)


# torch counts fused attention on CUDA but not its CPU kernel: count it like the others.
_CPU_SDPA = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _count_sdpa}


def swin_head_params(cfg: Config) -> int:
    """The head the paper counts and our features-only encoder lacks: Swin-T's ImageNet head, which
    the paper's Derm7pt counts include (docs/baselines.md §1.3; the final norm, which the paper
    also counts, we keep): 0.77 M. 0 for encoders without one (`ImageEncoder.head_params`)."""
    return image_encoder(cfg).head_params(cfg) if cfg.model.use_images else 0


def frozen_text_params(cfg: Config) -> int:
    """Parameters of the frozen text tower, counted on the meta device (nothing allocated)."""
    if not uses_text_tower(cfg):
        return 0
    import open_clip  # open_clip takes seconds to import: only when the text tower is counted
    from open_clip.model import _build_text_tower

    mc = open_clip.get_model_config("ViT-B-32")
    with torch.device("meta"):
        tower = _build_text_tower(mc["embed_dim"], mc["text_cfg"])
    return sum(p.numel() for p in tower.parameters())


def example_inputs(cfg: Config, shape: CohortShape, batch: int = 1, num_tabular_features: int = 16) -> dict:
    images = [torch.randn(batch, shape.in_channels, *cfg.data.image_size) for _ in range(shape.num_images)]
    tabular = tabular_embedding(cfg).example(batch, shape.num_attributes, num_tabular_features)
    return {"images": images if cfg.model.use_images else None, "tabular": tabular if cfg.model.use_tabular else None}


def _image_tokens_out(cfg: Config, grid_tokens: int) -> int:
    """Tokens per image a method's head reads from a stage map (1: it reads the pooled vector)."""
    method = cfg.model.method
    if method_entry(method).on_cfcml:
        return cfg.model.n_image_tokens
    if method == "glomo" or (method == "dmd" and cfg.method_args.dmd.inputs == "tokens"):
        return grid_tokens
    if method == "mvcnet" and cfg.method_args.mvcnet.inputs == "tokens":
        return grid_tokens
    return 1


def summarize(cfg: Config, shape: CohortShape | None = None, paper: dict | None = None) -> dict:
    """Counts, FLOPs and token shapes of the model `cfg` builds for its cohort (`shape`,
    default: the cohort `cfg.dataset` names; `paper`: that schema's reference numbers, whose
    `methods` block holds the paper's Table 2/3 complexity of each comparison method)."""
    if shape is None:
        spec = load_spec(cfg.dataset)  # the config was validated against it: it loads
        shape, paper = spec.shape(), spec.paper
    # Random weights: a summary counts and times the model, it trains nothing (no refusal, no download).
    model = build_method(without_pretrained_weights(cfg), shape, num_tabular_features=16).eval()
    with torch.no_grad(), _countable_attention(), FlopCounterMode(display=False, custom_mapping=_CPU_SDPA) as counter:
        model(**example_inputs(cfg, shape))
    stages = []
    if cfg.model.use_images:
        grids = image_encoder(cfg).grids(cfg.data.image_size)
        for s, (c, grid) in enumerate(zip(model.encoders[0].stage_channels, grids), start=1):
            if not method_entry(cfg.model.method).on_cfcml and s != 4:
                continue  # comparison methods read stage 4 only
            stages.append(
                {
                    "stage": s,
                    "feature_map": [c, *grid],
                    "tokens_in": math.prod(grid),
                    "tokens_out": _image_tokens_out(cfg, math.prod(grid)),
                    "token_dim": cfg.model.dim,
                    "used": (s - 1) in model.stages,
                }
            )
    reference = (paper or {}).get("methods", {}).get(cfg.model.method) if cfg.model.method != "cfcml" else paper
    params = count_params(model)
    return {
        "preset": cfg.name,
        "method": cfg.model.method,
        "trainable_params": params,
        "frozen_params": frozen_text_params(cfg),
        "gflops": counter.get_total_flops() / 1e9,  # torch's count: a multiply-add is 2 FLOPs
        "gmacs": counter.get_total_flops() / 2e9,
        "stages": stages,
        "paper": {k: reference[k] for k in ("params_m", "gflops") if k in reference} or None if reference else None,
        # the paper's convention: + Swin-T's unused ImageNet head and final norm (Derm7pt)
        "paper_convention_params": params + swin_head_params(cfg),
    }


def format_summary(s: dict) -> str:
    lines = [
        f"preset            {s['preset']}",
        f"method            {s.get('method', 'cfcml')}",
        f"trainable params  {s['trainable_params'] / 1e6:.2f} M",
        f"frozen params     {s['frozen_params'] / 1e6:.2f} M (text encoder, never in checkpoints)",
        f"forward GFLOPs    {s['gflops']:.2f} per sample ({s['gmacs']:.2f} G multiply-adds; conv/matmul/attention only)",
    ]
    extra = s.get("paper_convention_params", s["trainable_params"]) - s["trainable_params"]
    if extra:
        lines.append(
            f"paper convention  {s['paper_convention_params'] / 1e6:.2f} M (+ Swin's ImageNet head and final norm, "
            f"{extra / 1e6:.2f} M, which the paper counts and our features-only Swin lacks)"
        )
    if s.get("paper"):
        lines.append(f"paper             {s['paper']['params_m']} M, {s['paper']['gflops']} GFLOPs")
    for st in s["stages"]:
        used = "" if st["used"] else "  (unused: SG-CIE)"
        out = (
            "pooled to 1"
            if st["tokens_out"] == 1 and st["tokens_in"] > 1
            else f"{st['tokens_out']} x {st['token_dim']}"
        )
        lines.append(f"stage {st['stage']}  map {st['feature_map']} -> {st['tokens_in']} tokens -> {out}{used}")
    return "\n".join(lines)
