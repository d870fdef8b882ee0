"""The comparison methods in the engine and around it: training runs, checkpoints, `cfcml
summary`, `cfcml cv --methods` and its table, and the per-method search spaces."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from cfcml.config import ConfigError, build_config
from cfcml.datasets import write_synthetic
from cfcml.datasets.spec import load_spec
from cfcml.engine import compare
from cfcml.engine.run import train_one
from cfcml.models.cfcml import build_model
from cfcml.models.methods import METHODS
from cfcml.models.summary import example_inputs, summarize
from cfcml.platform.search_space import load_search_space

SPACES = Path(__file__).resolve().parents[2] / "search_spaces"
TINY = [
    "data.image_size=[32,32]",
    "train.epochs=1",
    "train.deterministic=true",
    "train.select_min_epoch=0",
    "train.select_window=1",
]


@pytest.fixture(scope="module")
def derm_cohort(tmp_path_factory):
    return write_synthetic("derm7pt", tmp_path_factory.mktemp("derm") / "release_v0", 60, seed=2)


def _train(method, cohort, tmp_path, cache):
    cfg = build_config("derm7pt-smoke", TINY + [f"data.cache_dir={cache}", f"model.method={method}"])
    return cfg, train_one(cfg, cohort, tmp_path / method, seed=0, progress=False)


@pytest.mark.parametrize("method", ["etmc", "glomo"])
def test_a_method_trains_logs_its_terms_and_reloads_from_its_checkpoint(method, derm_cohort, tmp_path):
    _, result = _train(method, derm_cohort, tmp_path, tmp_path / "cache")
    assert result["finished"] and 0 <= result["test"]["auc"] <= 1
    terms = {"etmc": {"train_views", "train_pseudo", "train_combined"}, "glomo": {"train_ce", "train_load_balance"}}[
        method
    ]
    assert terms <= set(result["history"][0])
    # what `register`/`predict` do: rebuild from the saved config, load the weights, softmax the logits
    state = torch.load(tmp_path / method / "best.pt", weights_only=True)
    from cfcml.config import config_from_dict

    saved = config_from_dict(state["config"])
    assert saved.model.method == method
    model = build_model(saved, load_spec("derm7pt").shape()).eval()
    model.load_state_dict(state["model"])  # strict: the rebuilt method has exactly the saved parameters
    preds = np.load(tmp_path / method / "predictions.npz")
    assert preds["test_probs"].shape[1] == 2 and np.allclose(preds["test_probs"].sum(1), 1, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("method", [m for m in METHODS if m not in ("etmc", "glomo")])
def test_every_method_trains_in_the_engine(method, derm_cohort, tmp_path):
    _, result = _train(method, derm_cohort, tmp_path, tmp_path / "cache")
    assert result["finished"] and np.isfinite(result["history"][0]["train_loss"])


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models are bound by per-op overhead: one thread is as fast as two, and far faster
    when other processes share the cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --------------------------------------------------------------------------- summary


@pytest.mark.parametrize("method", METHODS)
def test_summary_reports_each_method(method):
    cfg = build_config("derm7pt-smoke", [f"model.method={method}"])
    s = summarize(cfg)  # the cohort and its paper numbers from cfg.dataset
    assert s["method"] == method and s["gflops"] > 0
    assert s["trainable_params"] == sum(p.numel() for p in build_model(cfg, load_spec("derm7pt").shape()).parameters())
    assert (
        s["paper_convention_params"] - s["trainable_params"] == 128 * 1000 + 1000
    )  # micro Swin's head (we keep its norm)
    assert (
        s["paper"]["params_m"]
        == {
            "cfcml": 30.63,
            "etmc": 28.69,
            "ccml": 28.58,
            "dmd": 184.49,
            "mvcnet": 28.89,
            "glomo": 30.67,
            "mrim": 26.60,
            "mrim_plus": 30.63,
        }[method]
    )
    if method in ("cfcml", "mrim_plus"):
        assert [st["stage"] for st in s["stages"]] == [1, 2, 3, 4]
    else:  # stage 4 only; vector methods read the pooled vector
        (st,) = s["stages"]
        assert st["stage"] == 4 and st["tokens_in"] == 4
        assert st["tokens_out"] == (4 if method in ("dmd", "mvcnet", "glomo") else 1)


def test_summary_counts_attention_so_dmd_token_mode_costs_more_than_pooled():
    flops = {}
    for inputs in ("tokens", "pooled"):
        cfg = build_config("derm7pt-smoke", ["model.method=dmd", f"method_args.dmd.inputs={inputs}"])
        flops[inputs] = summarize(cfg, load_spec("derm7pt").shape())["gflops"]
    assert flops["tokens"] > flops["pooled"]


# --------------------------------------------------------------------------- comparison table


def _summary(values: dict[str, list[float]], names=("fold1", "fold2", "fold3")) -> dict:
    from cfcml.engine.summary import summarize_runs

    runs = [{"name": n, "metrics": {k: v[i] for k, v in values.items()}} for i, n in enumerate(names)]
    return summarize_runs(runs)


def test_parse_methods_puts_cfcml_last_and_refuses_unknown_names():
    assert compare.parse_methods("etmc, ccml") == ["etmc", "ccml", "cfcml"]
    assert compare.parse_methods("cfcml,dmd,dmd") == ["dmd", "cfcml"]
    assert compare.parse_methods("all") == [m for m in METHODS if m != "cfcml"] + ["cfcml"]
    with pytest.raises(ConfigError, match="lstm"):
        compare.parse_methods("etmc,lstm")


def test_comparison_table_stars_significant_methods_and_explains_the_floor():
    names = tuple(f"seed{i}" for i in range(6))
    ref = {"auc": [0.90, 0.915, 0.93, 0.945, 0.96, 0.975], "acc": [0.8] * 6}  # distinct differences: exact test
    worse = {"auc": [0.80, 0.82, 0.81, 0.83, 0.85, 0.84], "acc": [0.81, 0.79, 0.8, 0.82, 0.78, 0.8]}
    c = compare.compare_summaries({"etmc": _summary(worse, names), "cfcml": _summary(ref, names)}, load_spec("derm7pt"))
    assert c["min_attainable_p"] == pytest.approx(2 / 64)
    assert c["methods"]["etmc"]["wilcoxon_p"]["auc"] == pytest.approx(2 / 64)  # all six differences one way
    assert c["methods"]["etmc"]["significant"]["auc"] and not c["methods"]["etmc"]["significant"]["acc"]
    md = compare.comparison_markdown(c, "t")
    rows = [line for line in md.splitlines() if line.startswith("| ")]
    assert rows[0].startswith("| Method | SEN | SPE | ACC") and rows[-1].startswith("| CFCML | ")
    assert "82.50 ± 1.87* (p=0.031)" in rows[1]  # AUC of ETMC, starred
    # three folds: the exact test cannot reach 0.05, and the footnote says so
    c3 = compare.compare_summaries(
        {"dmd": _summary({"auc": [0.1, 0.2, 0.3]}), "cfcml": _summary({"auc": [0.5, 0.65, 0.85]})}, load_spec("men")
    )
    assert c3["methods"]["dmd"]["wilcoxon_p"]["auc"] == pytest.approx(0.25)
    assert "cannot go below p = 0.250, so no difference can be significant" in compare.comparison_markdown(c3, "t")


def test_run_comparison_runs_each_method_into_its_folder(tmp_path, monkeypatch):
    calls = []

    def fake_protocol(cfg, data_root, out_dir, jobs=None, report=None, progress=False):
        calls.append((cfg.model.method, cfg.train.epochs, Path(out_dir)))
        return _summary(
            {
                "auc": {"cfcml": [0.9, 0.93, 0.97], "mvcnet": [0.8, 0.82, 0.79], "mrim": [0.7, 0.6, 0.8]}[
                    cfg.model.method
                ]
            }
        )

    monkeypatch.setattr(compare, "run_protocol", fake_protocol)
    c = compare.run_comparison(
        "men-smoke",
        ["train.lr=1e-3", "train.select_min_epoch=0", "train.select_window=1"],
        ["mvcnet", "mrim", "cfcml"],
        tmp_path / "data",
        tmp_path / "out",
        epochs=2,
    )
    assert [(m, e, d.name) for m, e, d in calls] == [
        ("mvcnet", 2, "mvcnet"),
        ("mrim", 2, "mrim"),
        ("cfcml", 2, "cfcml"),
    ]
    saved = json.loads((tmp_path / "out" / "comparison.json").read_text())
    assert list(saved["methods"]) == ["mvcnet", "mrim", "cfcml"] and saved["reference"] == "cfcml"
    assert saved["methods"]["mvcnet"]["wilcoxon_p"]["auc"] == pytest.approx(0.25)
    assert (tmp_path / "out" / "comparison.md").read_text() == c["markdown"]


def test_cv_methods_cli_refuses_compare_and_bad_method_names(tmp_path, capsys):
    from cfcml.cli import main

    assert (
        main(["cv", "--preset", "men-smoke", "--data", str(tmp_path), "--methods", "etmc", "--compare", str(tmp_path)])
        == 2
    )
    assert "exclude each other" in capsys.readouterr().err
    assert main(["cv", "--preset", "men-smoke", "--data", str(tmp_path), "--methods", "etmc,foo"]) == 2
    assert "foo" in capsys.readouterr().err


# --------------------------------------------------------------------------- search spaces


@pytest.mark.parametrize("method", [m for m in METHODS if m != "cfcml"])
def test_each_method_has_a_search_space_around_its_defaults(method):
    path = SPACES / f"{method}.yaml"
    section = "mrim" if method == "mrim_plus" else method
    for preset in ("men", "derm7pt", "men-smoke", "derm7pt-smoke"):
        cfg = build_config(preset, [f"model.method={method}"])
        space = load_search_space(path, cfg)  # keys exist, the defaults are the first trial and lie inside
        assert any(p.name.startswith(f"method_args.{section}.") for p in space.params)
        # the corners of the space build (no foreign method_args, no invalid combination)
        for pick in (0, -1):
            point = {
                p.name: (p.choices[pick] if p.type == "categorical" else p.cast([p.low, p.high][pick]))
                for p in space.params
            }
            build_config(preset, [f"{k}={json.dumps(v)}" for k, v in point.items()] + [f"model.method={method}"])


def test_example_inputs_drive_every_method_on_a_volume_cohort_with_more_series():
    from cfcml.models.shape import CohortShape

    shape = CohortShape(num_classes=4, num_images=5, num_attributes=2, image_kind="volume")
    for method in METHODS:
        cfg = build_config(
            "men-smoke", ["model.image_channels=2", "data.image_size=[4,16,16]", f"model.method={method}"]
        )
        out = build_model(cfg, shape).eval()(**example_inputs(cfg, shape, batch=2))
        assert out["logits"].shape == (2, 4) and len(out["features"]) == 6


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_every_method_packages_and_predicts_on_a_schema_described_cohort(method, tmp_path):
    """What registration ships, per method, on the glioma schema (4 series, 2 classes): the
    package from a trained run loads in `PackagedModel` and scores patients, also one with a
    series and an attribute missing."""
    from cfcml.datasets.reader import load_cohort
    from cfcml.platform.pyfunc import PackagedModel, build_package, cohort_frame

    schema = Path(__file__).resolve().parents[2] / "examples" / "glioma-demo.yaml"
    data = write_synthetic(load_spec(schema), tmp_path / "glioma", 48, seed=1)
    cfg = build_config(
        "men-smoke",
        [
            "data.image_size=[4,16,16]",
            "model.image_channels=2",
            "train.batch_size=6",
            "train.epochs=1",
            f"dataset={schema}",
            f"model.method={method}",
            "train.select_min_epoch=0",
            "train.select_window=1",
            f"data.cache_dir={tmp_path / 'cache'}",
        ],
    )
    result = train_one(cfg, data, tmp_path / "run", fold=1, progress=False)
    assert result["finished"]
    cohort = load_cohort(load_spec(schema), data)
    package = build_package(cfg, [{"name": "fold1", "weights": tmp_path / "run" / "best.pt"}], cohort, tmp_path / "pkg")
    model = PackagedModel(package, device="cpu")
    frame = cohort_frame(cohort).head(3)
    frame.loc[0, ["FLAIR", "kps"]] = ""
    out = model.predict_frame(frame)
    assert (out["status"] == "ok").all() and out.loc[0, "inputs_missing"] == "FLAIR,kps"
    probs = out[["prob_LGG", "prob_HGG"]].to_numpy()
    assert np.allclose(probs.sum(1), 1, atol=1e-5) and set(out["pred"]) <= {"LGG", "HGG"}
