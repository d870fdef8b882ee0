"""train.modality_dropout: masks at the stated rate with never an empty sample, the registered
model's removal convention (zeros / "unknown" sentence / zero MLP columns), determinism, and
nothing of it at evaluation."""

import pytest
import torch

from cfcml.config import ConfigError, build_config
from cfcml.datasets.spec import load_spec
from cfcml.engine.modality_dropout import MISSING_WORD, ModalityDropout, build_modality_dropout, feature_columns


@pytest.mark.parametrize("p,m,t", [(0.3, 3, 6), (0.9, 1, 1), (0.5, 2, 0)])
def test_masks_have_the_stated_rate_and_never_empty_a_sample(p, m, t):
    drop = ModalityDropout(p, m, t)
    keep_img, keep_att = drop.masks(40_000, drop.generator(0))
    assert keep_img.shape == (40_000, m) and keep_att.shape == (40_000, t)
    keep = torch.cat([keep_img, keep_att], dim=1)
    assert keep.any(dim=1).all()
    n = m + t
    expected = p - p**n / n  # removal rate once the all-removed rows keep one input
    removed = 1 - keep.float().mean(dim=0)
    assert torch.allclose(removed, torch.full((n,), expected), atol=0.012), (removed, expected)


def test_same_seed_same_masks_other_seed_other_masks():
    drop = ModalityDropout(0.4, 3, 6)
    a = drop.masks(64, drop.generator(7))
    b = drop.masks(64, drop.generator(7))
    c = drop.masks(64, drop.generator(8))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], c[0])
    # the masks do not repeat the global stream of the same seed (augmentation, dropout)
    torch.manual_seed(7)
    assert not torch.equal(torch.rand(64, 9) >= 0.4, torch.cat(drop.masks(64, drop.generator(7)), dim=1))


def test_removal_convention_sentences_and_images():
    g = torch.Generator().manual_seed(0)
    images = [torch.randn(32, 1, 2, 4, 4, generator=g) + 3 for _ in range(3)]
    tabular = torch.randn(32, 6, 8, generator=g)
    unknown = torch.randn(6, 8, generator=g)
    before = [x.clone() for x in images], tabular.clone()
    drop = ModalityDropout(0.5, 3, 6, unknown=unknown)
    out = drop({"images": images, "tabular": tabular}, drop.generator(1))
    keep_img, keep_att = drop.masks(32, drop.generator(1))
    for j in range(3):
        assert torch.equal(out["images"][j][~keep_img[:, j]], torch.zeros_like(images[j][~keep_img[:, j]]))
        assert torch.equal(out["images"][j][keep_img[:, j]], images[j][keep_img[:, j]])
    for b in range(32):
        for a in range(6):
            assert torch.equal(out["tabular"][b, a], tabular[b, a] if keep_att[b, a] else unknown[a])
    assert all(torch.equal(x, y) for x, y in zip(images, before[0])) and torch.equal(tabular, before[1])  # not in place


def test_removal_convention_mlp_columns():
    spec = load_spec("men")  # location (3 words), sex (2), 4 numerics
    columns = feature_columns(spec)
    assert columns == [0, 0, 0, 1, 1, 2, 3, 4, 5]
    features = torch.randn(16, len(columns)) + 5
    drop = ModalityDropout(0.5, 0, 6, columns=torch.tensor(columns))
    out = drop({"images": [torch.ones(16, 1, 2, 2, 2)], "tabular": features}, drop.generator(3))
    _, keep_att = drop.masks(16, drop.generator(3))
    expected = features * keep_att[:, columns].float()
    assert torch.equal(out["tabular"], expected)
    assert torch.equal(out["images"][0], torch.ones(16, 1, 2, 2, 2))  # num_images 0: images untouched


def test_build_from_config(tmp_path):
    assert build_modality_dropout(build_config("men-smoke"), load_spec("men")) is None  # default 0: off
    cfg = build_config(
        "men-smoke", ["train.modality_dropout=0.25", "model.tabular_embedding=mlp", "model.use_images=false"]
    )
    drop = build_modality_dropout(cfg, load_spec("men"))
    assert (drop.p, drop.num_images, drop.num_attributes, drop.unknown) == (0.25, 0, 6, None)
    assert drop.columns.tolist() == feature_columns(load_spec("men"))
    for bad in ("1.0", "-0.1", "true"):
        with pytest.raises(ConfigError, match="train.modality_dropout"):
            build_config("men-smoke", [f"train.modality_dropout={bad}"])


def test_missing_word_is_the_registered_models():
    from cfcml.platform.pyfunc import MISSING_WORD as shipped

    assert shipped == MISSING_WORD == "unknown"


@pytest.mark.slow
def test_training_with_modality_dropout_is_deterministic_and_eval_is_untouched(tmp_path, monkeypatch):
    """Two runs of one seed with p = 0.5 train identically (sentence route: the "unknown"
    sentences come from the cache); the dropout is called in every training step and never
    while validating or testing."""
    from cfcml.datasets import write_synthetic
    from cfcml.engine.run import TrainingRun

    data = write_synthetic("men", tmp_path / "men", 45, 0)
    cfg = build_config(
        "men-smoke",
        [
            "data.image_size=[4,16,16]",
            "data.aug_prob=0.0",
            "train.epochs=1",
            "train.select_min_epoch=0",
            "train.select_window=1",
            f"data.cache_dir={tmp_path / 'cache'}",
            "train.device=cpu",
            "train.modality_dropout=0.5",
        ],
    )
    histories, drop_call = [], ModalityDropout.__call__
    for name in ("a", "b"):
        run = TrainingRun(cfg, data, tmp_path / name, fold=1, progress=False)
        calls = []

        def counting(self, inputs, rng, calls=calls):
            calls.append(inputs["images"][0].shape[0])
            return drop_call(self, inputs, rng)

        monkeypatch.setattr(ModalityDropout, "__call__", counting)
        assert run.modality_dropout.unknown.shape == (6, 512)
        run.train_epoch()
        steps = len(calls)
        assert steps == len(run.train_loader) and steps > 0
        run.finish()
        assert len(calls) == steps  # validation and test never went through it
        histories.append(run.history[0]["train_loss"])
    assert histories[0] == histories[1]
