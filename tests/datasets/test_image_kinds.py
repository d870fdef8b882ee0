"""Image kinds as objects (`cfcml.datasets.image_kinds`): what each kind implies, the schema
errors that name a kind, and that every layer's per-kind registry covers every kind (adding a
kind without its dataset, figure or request check would fail here, not in a user's run)."""

from __future__ import annotations

import copy

import pytest

from cfcml import config
from cfcml.config import ConfigError, build_config
from cfcml.datasets import reader, synthetic
from cfcml.datasets.image_kinds import IMAGE_KINDS, KINDS, PHOTO, VOLUME
from cfcml.datasets.shape import CohortShape
from cfcml.datasets.spec import SpecError, load_spec, spec_from_dict
from cfcml.engine.loaders import LOADERS
from cfcml.models.encoders import IMAGE_ENCODERS
from cfcml.platform import serve_request
from cfcml.platform.pyfunc import example_frame, input_columns
from cfcml.report import figures
from cfcml.report import synthetic as report_synthetic
from cfcml.report.inputs import EXPLANATION_KINDS


def test_builtin_cohorts_get_their_kind_object_and_model_shape():
    men, derm = load_spec("men"), load_spec("derm7pt")
    assert men.kind is VOLUME and derm.kind is PHOTO
    assert (men.image_kind, derm.image_kind) == ("volume", "photo")  # the name stays a string (schemas, tags)
    assert (men.shape().in_channels, men.shape().shared_encoder) == (1, False)
    assert (derm.shape().in_channels, derm.shape().shared_encoder) == (3, True)
    assert (men.kind.spatial_dims, derm.kind.spatial_dims) == (3, 2)


def test_every_layer_registers_every_kind():
    registries = {
        "datasets.reader": reader._IMAGE_CHECKS,
        "datasets.synthetic": synthetic._WRITERS,
        "config": config._IMAGE_SIZE_CHECKS,
        "engine.loaders": LOADERS,
        "report.figures": figures.EXPLANATION_PANELS,
        "report.synthetic": report_synthetic._PICTURES,
        "platform.serve_request formats": serve_request._FORMATS,
        "platform.serve_request checks": serve_request._IMAGE_CHECKS,
    }
    for where, table in registries.items():
        assert set(table) == set(IMAGE_KINDS), where
    assert set(EXPLANATION_KINDS) == set(IMAGE_KINDS)
    assert {e.kind.name for e in IMAGE_ENCODERS.values()} == set(IMAGE_KINDS)  # an image encoder for every kind
    assert all(name == kind.name for name, kind in KINDS.items())


def _raw(name: str) -> dict:
    return copy.deepcopy(load_spec(name).raw)


def test_an_unknown_kind_in_a_schema_names_the_key_and_the_known_kinds():
    raw = _raw("men")
    raw["images"]["kind"] = "slide"
    with pytest.raises(SpecError) as e:
        spec_from_dict(raw, "my.yaml")
    assert str(e.value) == "my.yaml: images.kind: 'slide' is not one of volume, photo"
    with pytest.raises(ValueError, match=r"image_kind must be one of \('volume', 'photo'\), got 'slide'"):
        CohortShape(2, 1, 1, "slide")


def test_a_mask_only_where_the_kind_has_one():
    raw = _raw("derm7pt")
    raw["images"]["mask"] = "masks/{id}.nii.gz"
    with pytest.raises(SpecError, match="images.mask: only volume cohorts have ROI masks"):
        spec_from_dict(raw, "skin.yaml")
    assert "mask" in input_columns(load_spec("men")) and "mask" not in input_columns(load_spec("derm7pt"))


@pytest.mark.parametrize(("name", "suffix"), [("men", ".nii.gz"), ("derm7pt", ".jpg")])
def test_the_input_example_uses_the_kinds_file_suffix(name, suffix):
    spec = load_spec(name)
    row = example_frame(spec).iloc[0]
    assert all(row[s] == f"/path/to/example-1/{s}{suffix}" for s in spec.series)


@pytest.mark.parametrize(
    ("preset", "size", "message"),
    [
        ("derm7pt-smoke", "[64,64,64]", "the derm7pt cohort holds photos, which need 2 sizes (H, W), got [64, 64, 64]"),
        ("men-smoke", "[8,16]", "the men cohort holds volumes, which need 3 sizes (D, H, W), got [8, 16]"),
        ("derm7pt-smoke", "[64,96]", "Swin needs square photos with a side divisible by 32, got [64, 96]"),
        ("men-smoke", "[1,16,16]", "volumes need at least 2 voxels per axis, got [1, 16, 16]"),
    ],
)
def test_image_size_is_checked_by_the_cohorts_kind(preset, size, message):
    with pytest.raises(ConfigError) as e:
        build_config(preset, [f"data.image_size={size}"])
    assert str(e.value) == f"data.image_size: {message}"


def test_inline_bytes_are_recognised_only_in_the_kinds_format():
    png, gz = b"\x89PNG\r\n\x1a\n" + b"0" * 8, b"\x1f\x8b" + b"0" * 8
    assert serve_request._FORMATS["photo"](png) == (".png", None)
    assert serve_request._FORMATS["volume"](gz) == (".nii.gz", None)
    assert serve_request._FORMATS["photo"](gz) == ("", "expected a PNG or JPEG photo")
    assert serve_request._FORMATS["volume"](png) == ("", "expected a NIfTI volume (.nii or .nii.gz bytes)")
