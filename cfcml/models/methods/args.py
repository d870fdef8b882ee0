"""Hyper-parameters of the comparison methods: the config's `method_args` section.

One dataclass per method, with the original method's defaults (BASELINES.md cites where each
comes from). Pure dataclasses, no torch: `cfcml.config` imports this module. MRIM and MRIM+
share `method_args.mrim` (the same losses on different features); CFCML's own weights stay in
the `loss` section.
"""

from __future__ import annotations

from dataclasses import dataclass, field

METHODS = ("cfcml", "etmc", "ccml", "dmd", "mvcnet", "glomo", "mrim", "mrim_plus")
# model.method -> the method_args section it reads (None: none)
ARGS_SECTION = {
    "cfcml": None,
    "etmc": "etmc",
    "ccml": "ccml",
    "dmd": "dmd",
    "mvcnet": "mvcnet",
    "glomo": "glomo",
    "mrim": "mrim",
    "mrim_plus": "mrim",
}
# Methods built on CFCML's MG-CIE model (everything else sits on the shared stage-4 encoders).
ON_CFCML = ("cfcml", "mrim_plus")


@dataclass
class EtmcArgs:
    annealing_epochs: int = 10  # KL weight min(1, epoch / T); ETMC's --annealing_epoch
    hidden: list[int] = field(default_factory=lambda: [128, 16])  # evidence-head widths; [] = one Linear (the original)


@dataclass
class CcmlArgs:
    annealing_epochs: int = 50  # KL weight min(1, epoch / T); CCML's main.py
    sharpen: float = 1.25  # beta: power that sharpens the consistent belief
    gamma: float = 1.0  # weight of the complementary opinion's ACE
    delta: float = 1.0  # weight of the consistent opinion's KL
    hidden: list[int] = field(default_factory=lambda: [64])  # evidence-head widths; [] = one Linear (the original)


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


@dataclass
class MvcnetArgs:
    inputs: str = "tokens"  # tokens (attention over tokens) | vector (one pooled vector per stream)
    hidden: int = 128  # CMAF width (PE-MVCNet 2024)
    attn_dropout: float = 0.2


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


@dataclass
class MrimArgs:  # a reconstruction: no MRIM paper text or code was found (docs/baselines.md §8)
    tau: float = 0.07
    lambda_s2s: float = 0.06  # sample-to-sample weight (start: CFCML's MEN alpha)
    lambda_s2p: float = 0.04  # sample-to-proxy weight (start: CFCML's MEN beta)


@dataclass
class MethodArgs:
    etmc: EtmcArgs = field(default_factory=EtmcArgs)
    ccml: CcmlArgs = field(default_factory=CcmlArgs)
    dmd: DmdArgs = field(default_factory=DmdArgs)
    mvcnet: MvcnetArgs = field(default_factory=MvcnetArgs)
    glomo: GlomoArgs = field(default_factory=GlomoArgs)
    mrim: MrimArgs = field(default_factory=MrimArgs)


CHOICES = {
    "model.method": set(METHODS),
    "method_args.dmd.inputs": {"tokens", "pooled"},
    "method_args.mvcnet.inputs": {"tokens", "vector"},
    "method_args.glomo.combine": {"sum", "logsumexp"},
}


def foreign_method_args(values: dict) -> tuple[str, list[str]]:
    """(the selected method, the `method_args` sections a preset/override dict sets for another
    method): those would be silently ignored, so the config refuses them."""
    model, given = values.get("model"), values.get("method_args")
    method = model.get("method", "cfcml") if isinstance(model, dict) else "cfcml"
    wanted = ARGS_SECTION.get(method)
    if not isinstance(given, dict):
        return method, []  # the config's type check reports it
    return method, sorted(f"method_args.{s}" for s in given if s != wanted)


def method_config_problems(cfg) -> list[str]:
    """Settings a method cannot run with (checked once, when the config is built)."""
    m, a = cfg.model, cfg.method_args
    problems = []
    if m.method not in ON_CFCML and not (m.use_images and m.use_tabular):
        problems.append(
            f"model.method={m.method} fuses images and the table: it needs model.use_images and model.use_tabular"
        )
    if any(w < 1 for w in a.etmc.hidden + a.ccml.hidden):
        problems.append("method_args.{etmc,ccml}.hidden: widths must be positive")
    if a.ccml.sharpen < 1:
        problems.append("method_args.ccml.sharpen must be at least 1 (a power that sharpens the consistent belief)")
    if a.etmc.annealing_epochs < 1 or a.ccml.annealing_epochs < 1:
        problems.append("method_args.{etmc,ccml}.annealing_epochs must be at least 1")
    if a.dmd.layers < 1 or a.glomo.fusion_layers < 1:
        problems.append("method_args.dmd.layers and method_args.glomo.fusion_layers must be at least 1")
    if m.method in ("dmd", "glomo") and m.dim % m.heads:
        problems.append(f"model.dim ({m.dim}) must be divisible by model.heads ({m.heads}) for {m.method}'s attention")
    if m.method == "mvcnet" and a.mvcnet.hidden % m.heads:
        problems.append(f"method_args.mvcnet.hidden ({a.mvcnet.hidden}) must be divisible by model.heads ({m.heads})")
    if not 1 <= a.glomo.top_k <= a.glomo.experts or a.glomo.segments < 1:
        problems.append("method_args.glomo: need 1 <= top_k <= experts and segments >= 1")
    if a.mrim.tau <= 0:
        problems.append("method_args.mrim.tau must be positive")
    return problems
