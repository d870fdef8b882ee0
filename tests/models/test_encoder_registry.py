"""The image-encoder and tabular-embedding registries (`cfcml.models.encoders`): every entry
reads a known kind and builds what its strides promise, every preset names registered entries,
unknown names are refused naming the key, and a newly registered entry is used by the config,
the model and the engine with no other edit."""

from __future__ import annotations

from itertools import pairwise

import pytest
import torch
from torch import nn

from cfcml.config import ConfigError, build_config, choices, preset_names
from cfcml.datasets.image_kinds import KINDS, PHOTO, VOLUME
from cfcml.datasets.spec import load_spec
from cfcml.datasets.tabular import num_features
from cfcml.engine.run_model import run_architecture
from cfcml.models import encoders
from cfcml.models.cfcml import stage_grids
from cfcml.models.encoders import (
    IMAGE_ENCODERS,
    TABULAR_EMBEDDINGS,
    ImageEncoder,
    TabularEmbedding,
    image_encoder,
    register_image_encoder,
    register_tabular_embedding,
    tabular_embedding,
)
from cfcml.models.summary import example_inputs, summarize

SMOKE = {"volume": "men-smoke", "photo": "derm7pt-smoke"}  # a preset of each image kind to build encoders with
TINY = {"volume": [8, 20, 20], "photo": [64, 64]}  # odd volume sides: the grids round up


@pytest.fixture
def scratch_registry(monkeypatch):
    """Registrations made in the test are dropped afterwards (the built-ins stay)."""
    monkeypatch.setattr(encoders, "IMAGE_ENCODERS", dict(encoders.IMAGE_ENCODERS))
    monkeypatch.setattr(encoders, "TABULAR_EMBEDDINGS", dict(encoders.TABULAR_EMBEDDINGS))


def test_every_encoder_reads_a_known_kind_and_every_preset_names_registered_entries():
    assert set(IMAGE_ENCODERS) >= {"nnmamba3d", "swin_t"} and set(TABULAR_EMBEDDINGS) >= {"clip", "mlp"}
    assert all(KINDS[e.kind.name] is e.kind for e in IMAGE_ENCODERS.values())
    assert {e.kind.name for e in IMAGE_ENCODERS.values()} == set(KINDS)  # every kind has an encoder
    assert choices()["model.image_encoder"] == set(IMAGE_ENCODERS)
    assert choices()["model.tabular_embedding"] == set(TABULAR_EMBEDDINGS)
    for preset in preset_names():
        cfg = build_config(preset)
        assert image_encoder(cfg) is IMAGE_ENCODERS[cfg.model.image_encoder], preset
        assert tabular_embedding(cfg) is TABULAR_EMBEDDINGS[cfg.model.tabular_embedding], preset
        assert image_encoder(cfg).kind is load_spec(cfg.dataset).kind, preset


def test_what_each_builtin_entry_says():
    assert (image_encoder("nnmamba3d").kind, image_encoder("swin_t").kind) == (VOLUME, PHOTO)
    assert not image_encoder("nnmamba3d").pretrained_backbone and image_encoder("swin_t").pretrained_backbone
    assert tabular_embedding("clip").uses_text_tower and not tabular_embedding("clip").reads_features
    assert tabular_embedding("mlp").reads_features and not tabular_embedding("mlp").uses_text_tower
    cfg = build_config("derm7pt")
    assert image_encoder("swin_t").head_params(cfg) == 768 * 1000 + 1000  # Swin-T's ImageNet head
    assert image_encoder("nnmamba3d").head_params(build_config("men")) == 0


def test_an_unknown_name_is_refused_naming_the_key_and_the_known_names():
    with pytest.raises(ConfigError) as e:
        image_encoder("vit3d")
    assert str(e.value) == "model.image_encoder: unknown value 'vit3d'; known: nnmamba3d, swin_t"
    cfg = build_config("men-smoke")
    cfg.model.tabular_embedding = "bag_of_words"  # set after validation: the lookup is the last line of defence
    with pytest.raises(ConfigError) as e:
        tabular_embedding(cfg)
    assert str(e.value) == "model.tabular_embedding: unknown value 'bag_of_words'; known: clip, mlp"
    with pytest.raises(ConfigError) as e:
        build_config("men-smoke", ["model.image_encoder=vit3d"])
    assert str(e.value) == "model.image_encoder: 'vit3d' is not one of ['nnmamba3d', 'swin_t']"
    with pytest.raises(ValueError, match="already registered"):
        register_image_encoder(IMAGE_ENCODERS["swin_t"])


@pytest.mark.parametrize("name", sorted(IMAGE_ENCODERS))
def test_each_encoder_builds_the_stage_maps_its_strides_promise(name):
    entry = image_encoder(name)
    size = TINY[entry.kind.name]
    cfg = build_config(SMOKE[entry.kind.name], [f"model.image_encoder={name}", f"data.image_size={size}"])
    torch.manual_seed(0)
    module = entry.build(cfg).eval()
    with torch.no_grad():
        maps = module(torch.randn(2, entry.kind.channels, *size))
    assert len(maps) == len(module.stage_channels) == 4
    assert [tuple(m.shape) for m in maps] == [(2, c, *g) for c, g in zip(module.stage_channels, entry.grids(size))]
    assert stage_grids(name, size) == entry.grids(size)  # the old public helper reads the registry


@pytest.mark.parametrize("name", sorted(TABULAR_EMBEDDINGS))
def test_each_tabular_embedding_maps_its_example_input_to_attribute_tokens(name):
    entry = tabular_embedding(name)
    module = entry.build(16, 5, 32)
    x = entry.example(3, 5, 16)
    assert tuple(x.shape) == ((3, 5, 512) if entry.uses_text_tower else (3, 16))
    assert tuple(module(x).shape) == (3, 5, 32)


def test_the_mlp_embedding_needs_the_feature_count():
    with pytest.raises(ValueError, match="model.tabular_embedding=mlp needs the number of encoded tabular features"):
        tabular_embedding("mlp").build(None, 5, 32)


class _TinyEncoder3D(nn.Module):
    """Four stride-2 convolutions: stage maps at strides 2, 4, 8, 16."""

    def __init__(self, in_channels: int = 1):
        super().__init__()
        self.stage_channels = (3, 5, 6, 7)
        widths = (in_channels, *self.stage_channels)
        self.stages = nn.ModuleList(nn.Conv3d(a, b, 3, stride=2, padding=1) for a, b in pairwise(widths))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        maps = []
        for stage in self.stages:
            x = torch.relu(stage(x))
            maps.append(x)
        return maps


class _MeanFeatureEmbedding(nn.Module):
    """Encoded attribute features [B, F] -> t copies of one projected token [B, t, dim]."""

    def __init__(self, num_features: int, num_attributes: int, dim: int):
        super().__init__()
        self.num_attributes = num_attributes
        self.proj = nn.Linear(num_features, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).unsqueeze(1).expand(-1, self.num_attributes, -1)


def _register_fakes(kind=VOLUME) -> None:
    register_image_encoder(ImageEncoder("tiny3d", kind, (2, 4, 8, 16), lambda cfg: _TinyEncoder3D(VOLUME.channels)))
    register_tabular_embedding(
        TabularEmbedding("mean_features", False, _MeanFeatureEmbedding, lambda batch, t, f: torch.randn(batch, f))
    )


@pytest.mark.parametrize("method", ["cfcml", "etmc"])
def test_a_registered_encoder_and_embedding_are_used_with_no_other_edit(scratch_registry, method):
    _register_fakes()
    sets = ["model.image_encoder=tiny3d", "model.tabular_embedding=mean_features", f"model.method={method}"]
    cfg = build_config("men-smoke", sets)  # the config accepts the new names
    spec = load_spec(cfg.dataset)
    model = run_architecture(cfg, spec)  # the engine's path: the embedding reads features, so F is counted
    assert all(isinstance(e, _TinyEncoder3D) for e in model.encoders)
    assert isinstance(model.tabular_embed, _MeanFeatureEmbedding)
    assert model.tabular_embed.proj.in_features == num_features(spec)
    assert model.backbone_parameters() == []  # not a pretrained backbone: trained at the base LR
    out = model(**example_inputs(cfg, spec.shape(), batch=2, num_tabular_features=num_features(spec)))
    assert out["logits"].shape == (2, spec.num_classes)
    stages = summarize(cfg, spec.shape())["stages"]  # `cfcml summary` reads the fake's strides and channels
    grids = image_encoder("tiny3d").grids(cfg.data.image_size)
    assert [s["feature_map"] for s in stages] == [[c, *g] for c, g in zip((3, 5, 6, 7), grids)][-len(stages) :]


def test_a_registered_encoder_of_another_kind_is_refused_for_the_cohort(scratch_registry):
    _register_fakes(kind=PHOTO)
    with pytest.raises(ConfigError, match=r"model.image_encoder: the preset men-smoke's encoder tiny3d reads photos"):
        build_config("men-smoke", ["model.image_encoder=tiny3d"])
