"""The method registry: a method registers itself where it is defined, and the config, the
`cv --methods` parser and `build_method` see it with no other edit."""

from __future__ import annotations

import pickle
from dataclasses import dataclass

import pytest
import torch

from cfcml.config import ConfigError, build_config, config_from_dict
from cfcml.datasets.spec import load_spec
from cfcml.engine.compare import parse_methods
from cfcml.models import registry
from cfcml.models.methods import METHODS, build_method
from cfcml.models.methods.base import FusionMethod, mlp_head, pooled
from cfcml.models.registry import MethodRegistryError, register_method


@pytest.fixture
def scratch_registry(monkeypatch):
    """Registrations made in the test are dropped afterwards (the built-ins stay)."""
    monkeypatch.setattr(registry, "_METHODS", dict(registry._METHODS))


@dataclass
class ToyArgs:
    hidden: int = 8
    pool: str = "mean"


def _toy_check(cfg, selected: bool) -> list[str]:
    return ["method_args.toy.hidden must be at least 1"] if cfg.method_args.toy.hidden < 1 else []


def _register_toy():
    @register_method("toy", args=ToyArgs, choices={"pool": {"mean", "max"}}, check=_toy_check, display="Toy")
    class Toy(FusionMethod):
        def __init__(self, cfg, shape, num_tabular_features=None):
            super().__init__(cfg, shape, num_tabular_features)
            self.head = mlp_head(self.dim * self.num_modalities, [cfg.method_args.toy.hidden], self.num_classes, 0.0)

        def forward(self, images, tabular):
            features = pooled(self.encode(images, tabular))
            fused = torch.cat(features, dim=1)
            return {"logits": self.head(fused), "features": features, "fused": fused}

        def loss_terms(self, out, labels, *, epoch):
            ce = torch.nn.functional.cross_entropy(out["logits"], labels)
            return {"loss": ce, "ce": ce}

    return Toy


def test_builtin_methods_keep_their_names_order_and_sections():
    assert METHODS == ("cfcml", "etmc", "ccml", "dmd", "mvcnet", "glomo", "mrim", "mrim_plus")
    assert list(registry.args_sections()) == ["etmc", "ccml", "dmd", "mvcnet", "glomo", "mrim"]
    assert registry.method_entry("mrim_plus").section == "mrim"  # MRIM+ reads MRIM's section
    assert registry.method_entry("mrim_plus").on_cfcml and not registry.method_entry("mrim").on_cfcml
    assert registry.search_space_path("cfcml") is None  # CFCML tunes with its preset's space
    for name in METHODS[1:]:
        assert registry.search_space_path(name).is_file(), name
    assert registry.method_choices()["method_args.dmd.inputs"] == {"tokens", "pooled"}


def test_a_method_registered_in_one_place_is_configurable_and_buildable(scratch_registry):
    with pytest.raises(ConfigError, match="model.method: 'toy' is not one of"):
        build_config("derm7pt-smoke", ["model.method=toy"])
    toy_cls = _register_toy()

    cfg = build_config("derm7pt-smoke", ["model.method=toy", "method_args.toy.hidden=4"])
    assert cfg.method_args.toy == ToyArgs(hidden=4)
    assert cfg.method_args.etmc.hidden == [128, 16]  # the built-in sections are all still there
    assert config_from_dict(cfg.to_dict()) == cfg
    assert pickle.loads(pickle.dumps(cfg)) == cfg
    # its choices, its check and the foreign-section rule come from the registration
    with pytest.raises(ConfigError, match=r"method_args.toy.pool: 'median' is not one of \['max', 'mean'\]"):
        build_config("derm7pt-smoke", ["model.method=toy", "method_args.toy.pool=median"])
    with pytest.raises(ConfigError, match="method_args.toy.hidden must be at least 1"):
        build_config("derm7pt-smoke", ["model.method=toy", "method_args.toy.hidden=0"])
    with pytest.raises(ConfigError, match="method_args.toy set while model.method=etmc"):
        build_config("derm7pt-smoke", ["model.method=etmc", "method_args.toy.hidden=4"])
    with pytest.raises(ConfigError, match="model.method=toy fuses images and the table"):
        build_config("derm7pt-smoke", ["model.method=toy", "model.use_tabular=false"])
    assert "toy" in parse_methods("all") and parse_methods("toy") == ["toy", "cfcml"]

    torch.manual_seed(0)
    shape = load_spec(cfg.dataset).shape()
    model = build_method(cfg, shape)
    assert isinstance(model, toy_cls)
    images = [torch.randn(2, 3, *cfg.data.image_size) for _ in range(shape.num_images)]
    out = model(images, torch.randn(2, shape.num_attributes, 512))
    assert out["logits"].shape == (2, shape.num_classes)


def test_a_duplicate_name_or_an_inconsistent_registration_is_refused(scratch_registry):
    with pytest.raises(MethodRegistryError, match=r"model.method 'etmc' is already registered by .*ETMC"):
        register_method("etmc")(type("Other", (), {}))
    with pytest.raises(MethodRegistryError, match="method_args.mrim is already read as MrimArgs"):
        register_method("mrim_again", args=ToyArgs, section="mrim")(type("Other", (), {}))
    with pytest.raises(MethodRegistryError, match=r"choices name field\(s\) \['width'\]"):
        register_method("toy2", args=ToyArgs, choices={"width": {1}})(type("Other", (), {}))
    with pytest.raises(MethodRegistryError, match="search space 'nope.yaml' is not in"):
        register_method("toy3", search_space="nope.yaml")(type("Other", (), {}))
    assert registry.method_names() == METHODS  # nothing refused was registered
