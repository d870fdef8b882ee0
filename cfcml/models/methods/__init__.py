"""CFCML and the paper's comparison methods, all on the same encoders (issue 16).

`model.method` picks one; `build_method` builds it. Every method has the interface described
in `base.py` (forward -> {"logits", "features", "fused", ...}, `loss_terms(out, labels, *,
epoch)`, `backbone_parameters()`). Modules are imported on demand: `cfcml.config` imports
`args` from this package and must not pull in torch.
"""

from __future__ import annotations

import importlib

from .args import METHODS

# model.method -> (module, class)
_CLASSES = {
    "cfcml": ("cfcml.models.cfcml", "CFCML"),
    "etmc": ("cfcml.models.methods.etmc", "ETMC"),
    "ccml": ("cfcml.models.methods.ccml", "CCML"),
    "dmd": ("cfcml.models.methods.dmd", "DMD"),
    "mvcnet": ("cfcml.models.methods.mvcnet", "MVCNet"),
    "glomo": ("cfcml.models.methods.glomo", "GLoMo"),
    "mrim": ("cfcml.models.methods.mrim", "MRIM"),
    "mrim_plus": ("cfcml.models.methods.mrim", "MRIMPlus"),
}
assert set(_CLASSES) == set(METHODS)


def method_class(name: str) -> type:
    if name not in _CLASSES:
        raise ValueError(f"unknown model.method {name!r}; expected one of {', '.join(METHODS)}")
    module, cls = _CLASSES[name]
    return getattr(importlib.import_module(module), cls)


def build_method(cfg, shape, num_tabular_features: int | None = None):
    """The model of `cfg.model.method` for a cohort of `shape` (a CohortShape)."""
    return method_class(cfg.model.method)(cfg, shape, num_tabular_features)


__all__ = ["METHODS", "build_method", "method_class"]
