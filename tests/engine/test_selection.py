"""Epoch selection: an epoch is a candidate only with a full window and after the LR warm-up;
`train.patience` stops a run; a search space may not put ASHA's first rung before a candidate."""

import math

import numpy as np
import pytest

from cfcml.config import ConfigError, TrainConfig, build_config, first_candidate_epoch, parse_overrides
from cfcml.engine.selection import patience_exhausted, select_epoch, selection_score
from cfcml.platform.search_control import check_first_rung, latest_first_candidate
from cfcml.platform.search_space import Param


def _history(curve):
    return [{"val_auc": v} for v in curve]


def test_the_issue_curve_selects_a_trained_epoch():
    curve = [0.9, 0.5, 0.55, 0.6, 0.7, 0.75, 0.8, 0.8]
    first = first_candidate_epoch(TrainConfig(select_window=5, warmup_epochs=2))
    assert first == 4
    assert select_epoch(_history(curve), "auc", 5, first) >= 4
    # the old rule (partly filled windows competing) picked epoch 0, still in the warm-up
    assert select_epoch(_history(curve), "auc", 1, 0) == 0


def test_random_curves_never_select_a_non_candidate():
    rng = np.random.default_rng(0)
    for _ in range(2000):
        n = int(rng.integers(1, 30))
        window, warmup = int(rng.integers(1, 8)), int(rng.integers(0, 8))
        min_epoch = int(rng.choice([-1, 0, int(rng.integers(0, 10))]))
        curve = rng.uniform(0.3, 1.0, n)
        curve[rng.random(n) < 0.1] = math.nan
        first = first_candidate_epoch(
            TrainConfig(select_window=window, warmup_epochs=warmup, select_min_epoch=min_epoch)
        )
        picked = select_epoch(_history(curve), "auc", window, first)
        if picked is None:
            assert n <= first or all(
                math.isnan(selection_score(_history(curve[: e + 1]), "auc", window, first)) for e in range(n)
            )
        else:
            assert picked >= first >= window - 1 and picked >= (warmup if min_epoch < 0 else min_epoch)
    history = [{"val_loss": v} for v in (0.1, 2.0, 1.0, 0.9, 0.8)]
    assert select_epoch(history, "loss", 2, first_candidate_epoch(TrainConfig(select_window=2, warmup_epochs=1))) == 4


def test_select_min_epoch_defaults_to_the_warm_up_and_zero_is_allowed():
    assert first_candidate_epoch(TrainConfig(warmup_epochs=5)) == 5
    assert first_candidate_epoch(TrainConfig(warmup_epochs=5, select_min_epoch=0)) == 0
    assert first_candidate_epoch(TrainConfig(warmup_epochs=0, select_window=3)) == 2


def test_patience_counts_candidate_epochs_without_improvement():
    assert not patience_exhausted(best_epoch=4, epochs_done=6, first_candidate=4, patience=0)  # off
    assert not patience_exhausted(best_epoch=4, epochs_done=6, first_candidate=4, patience=2)
    assert patience_exhausted(best_epoch=4, epochs_done=7, first_candidate=4, patience=2)
    assert not patience_exhausted(best_epoch=None, epochs_done=4, first_candidate=4, patience=1)  # none yet
    assert patience_exhausted(best_epoch=None, epochs_done=6, first_candidate=4, patience=2)  # all NaN


def test_config_refuses_a_run_that_ends_before_its_first_candidate():
    with pytest.raises(ConfigError, match=r"train.select_min_epoch: no epoch can be selected.*epoch 4"):
        build_config("men-smoke", ["train.epochs=3"])
    assert build_config("men-smoke", ["train.epochs=1", "train.select_window=1", "train.select_min_epoch=0"])
    with pytest.raises(ConfigError, match="train.patience"):
        build_config("men-smoke", ["train.patience=-1"])


def test_yaml_tags_in_overrides_are_refused_naming_the_key():
    with pytest.raises(ConfigError, match=r"^train.lr: .*not a plain YAML value"):
        parse_overrides(["train.lr=!!python/object/apply:os.system ['touch /tmp/cfcml-pwned']"])


def test_cli_exits_2_on_a_yaml_tag(capsys):
    from cfcml import cli

    code = cli.main(["summary", "--preset", "men-smoke", "--set", "train.lr=!!python/object/apply:os.system ['true']"])
    assert code == 2 and "train.lr" in capsys.readouterr().err


def test_asha_first_rung_must_not_precede_the_first_candidate():
    check_first_rung(5, 4, "search space")
    with pytest.raises(ValueError, match=r"asha.grace_period = 2 .*set asha.grace_period >= 5"):
        check_first_rung(2, 4, "search space")
    searched = [Param("train.select_window", "int", low=1, high=7, step=1)]
    assert latest_first_candidate(TrainConfig(select_window=5, warmup_epochs=2), searched) == 6
    assert latest_first_candidate(TrainConfig(select_window=5, warmup_epochs=2), []) == 4
