"""CFCML and the paper's comparison methods, all on the same encoders (issue 16).

`model.method` picks one; `build_method` builds it. Every method has the interface described
in `base.py` (forward -> {"logits", "features", "fused", ...}, `loss_terms(out, labels, *,
epoch)`, `backbone_parameters()`) and registers itself where it is defined
(`cfcml.models.registry.register_method`). Importing this package registers every built-in
method: the paper's in the paper's order (the order of `cv --methods all` and of the tables),
then any further module of this package, so a new method is one new module (+ its YAML).
"""

from __future__ import annotations

import importlib
import pkgutil

from ..registry import method_class, method_entry, method_names

# isort: off
# Registration order is the paper's order: CFCML first, then the comparison methods.
from .. import cfcml  # noqa: F401
from . import etmc, ccml, dmd, mvcnet, glomo, mrim  # noqa: F401
# isort: on

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")  # any other method module registers itself

METHODS = method_names()  # the built-in methods (the registry is the live list: method_names())


def build_method(cfg, shape, num_tabular_features: int | None = None):
    """The model of `cfg.model.method` for a cohort of `shape` (a CohortShape)."""
    return method_class(cfg.model.method)(cfg, shape, num_tabular_features)


__all__ = ["METHODS", "build_method", "method_class", "method_entry", "method_names"]
