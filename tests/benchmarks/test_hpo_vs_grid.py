"""benchmarks/hpo_vs_grid.py: the grid, the budget accounting, selection and aggregation, on
fixed inputs (no training)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("hpo_vs_grid", ROOT / "benchmarks" / "hpo_vs_grid.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _grid(test_auc: float) -> dict:
    """The grid arm's result: 420 epochs, best validation AUC 0.84 at {"x": 9}."""
    return {
        "best_val_auc": 0.84,
        "test_auc": test_auc,
        "test_auc_std": 0.04,
        "epochs": 420,
        "seconds": 600.0,
        "config": {"x": 9},
        "configs": [],
        "curve": [(60, 0.8)],
    }


def test_the_paper_grid_scaled_is_seven_configurations(bench):
    grid = bench.scaled_grid()
    assert grid == {"nt": [2, 4, 6, 8], "ni": [4, 8, 12, 16], "ni_fixed": 8}
    assert bench.scaled_grid(1) == {"nt": [8, 16, 24, 32], "ni": [16, 32, 48, 64], "ni_fixed": 32}  # Fig. 6 itself
    one = bench.coordinate_step_one(grid)
    assert one == [(8, 2), (8, 4), (8, 6), (8, 8)]
    two = bench.coordinate_step_two(grid, best_nt=6)
    assert two == [(4, 6), (8, 6), (12, 6), (16, 6)]
    assert len(set(one) | set(two)) == 7  # (8, 6) is shared


def test_budget_is_half_the_grid_in_whole_lockstep_epochs(bench):
    assert bench.grid_budget(7, 3, 20) == 210  # 7 x 3 x 20 = 420 -> 210
    assert bench.grid_budget(7, 3, 3) == 30  # 63 / 2 = 31.5 -> 31 -> 30 (a trial epoch costs 3)
    assert bench.grid_budget(7, 3, 50, fraction=0.25) == 261
    assert bench.grid_budget(7, 3, 3) % 3 == 0


def test_study_epochs_count_every_fold_of_every_trial(bench):
    # a full trial (20), two stopped at ASHA's first rung (4), one stopped by the budget (1)
    assert bench.study_epochs([20, 4, 4, 1], folds=3) == 87
    assert bench.study_epochs([], folds=3) == 0


def test_selection_uses_validation_only_and_keeps_the_first_of_ties(bench):
    records = [
        {"name": "a", "val_auc": 0.80, "test_auc": 0.99},
        {"name": "b", "val_auc": 0.85, "test_auc": 0.70},
        {"name": "c", "val_auc": 0.85, "test_auc": 0.90},
    ]
    assert bench.select(records)["name"] == "b"  # test AUC never decides
    assert bench.select(records, "test_auc")["name"] == "a"
    with pytest.raises(ValueError):
        bench.select([])


def test_best_so_far_orders_by_time_and_accumulates_epochs(bench):
    points = [(3.0, 0.70, 3), (1.0, 0.60, 3), (2.0, 0.75, 3), (4.0, 0.72, 3)]  # (time, value, epochs)
    assert bench.best_so_far(points) == [(3, 0.60), (6, 0.75), (9, 0.75), (12, 0.75)]
    records = [{"val_auc": 0.7, "epochs": 60}, {"val_auc": 0.65, "epochs": 60}, {"val_auc": 0.8, "epochs": 60}]
    assert bench.grid_curve(records) == [(60, 0.7), (120, 0.7), (180, 0.8)]


def _seed(seed, val, test, epochs, config):
    return {
        "seed": seed,
        "best_val_auc": val,
        "test_auc": test,
        "test_auc_std": 0.05,
        "epochs": epochs,
        "seconds": 100.0 * (seed + 1),
        "config": config,
        "curve": [(epochs, val)],
        "parent_run_id": f"r{seed}",
    }


def test_aggregate_and_verdict(bench):
    seeds = [
        _seed(0, 0.80, 0.78, 201, {"x": 0}),
        _seed(1, 0.86, 0.74, 207, {"x": 1}),
        _seed(2, 0.82, 0.82, 198, {"x": 2}),
    ]
    hpo = bench.aggregate_seeds(seeds)
    assert hpo["test_auc"] == pytest.approx(0.78) and hpo["best_val_auc"] == pytest.approx(0.8266667)
    assert hpo["config"] == {"x": 1} and hpo["config_seed"] == 1  # shipped on validation, not test
    assert hpo["spread"]["test_auc"]["min"] == 0.74 and hpo["spread"]["test_auc"]["max"] == 0.82
    assert hpo["spread"]["test_auc"]["std"] == pytest.approx(0.04)
    assert hpo["epochs"] == pytest.approx(202)
    grid = _grid(test_auc=0.77)
    v = bench.verdict(grid, hpo, budget=210)
    assert v["seeds_at_least_grid_test_auc"] == 2 and v["every_seed_within_budget"]
    assert v["mean_test_auc_delta"] == pytest.approx(0.01) and v["epochs_ratio"] == pytest.approx(202 / 420)
    assert v["search_wins"]
    assert not bench.verdict(grid, hpo, budget=200)["search_wins"]  # one seed spent 207 > 200
    assert not bench.verdict(grid | {"test_auc": 0.79}, hpo, budget=210)["search_wins"]

    # the JSON contract and the table
    result = {"grid": grid, "hpo": hpo, "verdict": v, "settings": {"budget_epochs": 210}}
    for method in ("grid", "hpo"):
        assert {"best_val_auc", "test_auc", "epochs", "seconds", "config"} <= set(result[method])
    json.dumps(result)
    table = bench.markdown(result)
    assert table.count("| study (TPE + ASHA) |") == 3 and "| grid (paper's coordinate search) |" in table
    assert "78.00 ± 4.00 (74.00–82.00)" in table and "(2/3 seeds at least the grid's)" in table


def test_space_covers_the_grid_and_starts_at_the_preset(bench, tmp_path):
    from cfcml.config import build_config
    from cfcml.platform.search_space import load_search_space

    cfg = build_config("men-smoke")
    path = bench.write_space(
        tmp_path / "s.yaml",
        bench.scaled_grid(),
        {"grace_period": 4, "reduction_factor": 3},
        {"n_startup_trials": 4, "multivariate": True},
    )
    space = load_search_space(path, cfg)
    ni = next(p for p in space.params if p.name == "model.n_image_tokens")
    nt = next(p for p in space.params if p.name == "model.n_tabular_tokens")
    assert all(ni.contains(v) for v in (4, 8, 12, 16)) and not ni.contains(6)
    assert all(nt.contains(v) for v in (2, 4, 6, 8)) and not nt.contains(3)
    first = space.first_point(cfg)  # the grid's first configuration (n_i 8, n_t 4 at the preset's weights)
    assert (first["model.n_image_tokens"], first["model.n_tabular_tokens"]) == (8, 4)
    assert space.sampler == {"n_startup_trials": 4, "multivariate": True} and space.asha["grace_period"] == 4


def test_plot_draws_every_seed(bench, tmp_path):
    grid = {"curve": [(60, 0.7), (120, 0.75)]}
    hpo = {"seeds": [{"seed": 0, "curve": [(3, 0.5), (30, 0.8)]}, {"seed": 1, "curve": [(3, 0.6)]}]}
    fig = bench.plot({"grid": grid, "hpo": hpo, "settings": {"budget_epochs": 210}}, tmp_path / "p.png")
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert labels[0].startswith("grid") and "study, search seed 0" in labels and "study, search seed 1" in labels
    assert (tmp_path / "p.png").stat().st_size > 1000


def test_retrained_configurations_enter_the_verdict_and_the_table(bench, monkeypatch):
    seeds = [
        _seed(0, 0.80, 0.70, 201, {"x": 0}),
        _seed(1, 0.86, 0.74, 207, {"x": 9}),
        _seed(2, 0.82, 0.72, 198, {"x": 2}),
    ]
    grid = _grid(test_auc=0.85)
    result = {"grid": grid, "hpo": bench.aggregate_seeds(seeds), "settings": {"budget_epochs": 210}}
    trained = []

    def fake_retrain(data, overrides, epochs, work, config, retrain_seeds):  # what one configuration is worth
        trained.append(config["x"])
        values = {0: [0.80, 0.82], 9: [0.76, 0.78], 2: [0.78, 0.78]}[config["x"]]
        return {
            "seeds": retrain_seeds,
            "test_auc": values,
            **{f"test_auc_{k}": v for k, v in bench.spread(values).items() if k != "n"},
        }

    monkeypatch.setattr(bench, "retrain", fake_retrain)
    bench.add_retrained(result, None, [], 20, None, [1, 2])
    assert trained == [9, 0, 2]  # the grid's configuration, shared with study seed 1, is retrained once
    assert result["hpo"]["seeds"][1]["retrained"] is result["grid"]["retrained"]
    assert result["hpo"]["retrained_test_auc"] == pytest.approx((0.81 + 0.77 + 0.78) / 3)
    v = bench.verdict(grid, result["hpo"], budget=210)
    assert not v["search_wins"]  # on the selected runs the grid is ahead...
    assert v["search_wins_retrained"] and v["retrained_test_auc_delta"] == pytest.approx(
        (0.81 + 0.77 + 0.78) / 3 - 0.77
    )  # ...not retrained
    table = bench.markdown(result | {"verdict": v})
    assert "retrained (2 other training seeds)" in table and "| 77.00 ± 1.41 |" in table and "+1.67 points" in table
