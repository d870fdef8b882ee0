"""The study's epoch budget, pruned-trial bookkeeping, TPE options and Optuna views — pure
logic on fixed inputs (no services, no training)."""

from __future__ import annotations

import json
import random

import optuna
import pytest
from optuna.trial import TrialState

from cfcml.platform.search_control import (
    STOPPED_BY_KEY,
    BudgetStopper,
    EpochBudget,
    PrunedAwareOptunaSearch,
    asha_rungs,
    trial_outcome,
)

optuna.logging.set_verbosity(optuna.logging.WARNING)


# ----------------------------------------------------------------------------- the budget


def test_budget_reserves_in_flight_epochs_and_stops_at_the_cap():
    """3 folds per trial, 2 epochs max, 15 epochs in all: each running trial holds one epoch in
    flight; a trial goes on (or a new one starts) only while reported + in flight fits."""
    b = EpochBudget(total=15, runs_per_trial=3, max_epochs=2)
    b.on_start("a")
    b.on_start("b")
    assert b.in_flight() == 6
    assert b.on_report("a", 1)  # 3 reported + 6 in flight <= 15
    assert b.can_start()  # 3 + 6 + 3 <= 15
    b.on_start("c")
    assert b.on_report("b", 1)  # 6 + 9 = 15: exactly fits
    assert b.on_report("a", 2)  # a reached max_epochs: it ends by itself, nothing more in flight
    assert b.used == 9 and b.in_flight() == 6  # b and c
    assert not b.can_start()  # 9 + 6 + 3 > 15
    assert b.on_report("c", 1) is False  # 12 + 6 > 15: c stops
    assert b.stopped == {"c"}
    b.on_complete("c")
    assert b.on_report("b", 2)
    assert b.used == 15 and b.describe()["epochs_used"] == 15 and b.describe()["trials_started"] == 3


def test_min_trial_epochs_keeps_a_trial_from_starting_below_the_first_rung():
    b = EpochBudget(total=12, runs_per_trial=3, max_epochs=4, min_trial_epochs=2)
    b.on_start("a")
    b.on_report("a", 1)
    b.on_report("a", 2)  # 6 reported, 3 in flight
    assert not b.can_start()  # 9 + 2 x 3 > 12
    b.on_complete("a")
    assert b.can_start()  # 6 + 6 <= 12


def test_budget_refuses_a_total_below_one_epoch():
    with pytest.raises(ValueError):
        EpochBudget(total=2, runs_per_trial=3, max_epochs=5)


@pytest.mark.parametrize("seed", range(20))
def test_budget_is_never_overrun_by_a_simulated_asynchronous_study(seed):
    """Random epoch durations, 3 concurrent trials, random ASHA-like stops: the epochs actually
    trained (every epoch a trial started is finished before it is stopped) never exceed the
    total, and every trial that stops early is either ASHA's or the budget's."""
    rng = random.Random(seed)
    runs, max_epochs, total, concurrent = 3, 6, 90, 3
    budget = EpochBudget(total=total, runs_per_trial=runs, max_epochs=max_epochs, min_trial_epochs=1)
    stopper = BudgetStopper(budget)
    clock, live, trained, started, finished = 0.0, {}, 0, 0, False  # live: trial -> (epoch end time, epochs done)
    while live or not finished:
        while not finished and len(live) < concurrent:  # the searcher's view
            if not budget.can_start():
                if not budget.running:
                    finished = True
                break
            tid = f"t{started}"
            started += 1
            budget.on_start(tid)
            live[tid] = (clock + rng.uniform(0.5, 2.0), 0)
        if not live:
            break
        tid = min(live, key=lambda t: live[t][0])  # the next epoch to finish
        clock, done = live[tid][0], live[tid][1] + 1
        trained += runs
        result = {"epoch": done, "cv_val_auc": rng.random()}
        stop = stopper(tid, result) or (done < max_epochs and rng.random() < 0.3)  # budget, then "ASHA"
        if stop or done >= max_epochs:
            del live[tid]
            budget.on_complete(tid)
        else:
            live[tid] = (clock + rng.uniform(0.5, 2.0), done)
        assert trained <= total
    assert trained == budget.used <= total
    assert total - trained < (concurrent + 1) * runs  # little is left unused
    assert budget.exhausted is False  # only the searcher sets it


def test_stopper_marks_the_result_it_stops():
    b = EpochBudget(total=3, runs_per_trial=3, max_epochs=5)
    stopper = BudgetStopper(b)
    b.on_start("a")
    result = {"epoch": 1}
    assert stopper("a", result) is True
    assert result[STOPPED_BY_KEY] == "budget"
    assert stopper("b", {"no_epoch": 1}) is False
    assert stopper.stop_all() is False


# ----------------------------------------------------------------------------- ASHA rungs and trial outcome


@pytest.mark.parametrize("grace,rf,max_t", [(1, 2, 2), (1, 2, 20), (2, 3, 20), (10, 3, 50), (1, 4, 50), (3, 2, 3)])
def test_asha_rungs_match_rays_bracket(grace, rf, max_t):
    from ray.tune.schedulers.async_hyperband import _Bracket

    milestones = sorted(m for m, _ in _Bracket(grace, max_t, rf, s=0)._rungs)
    assert asha_rungs(grace, rf, max_t) == milestones


def test_trial_outcome_tags():
    rungs = [2, 6, 18]
    tags, metrics = trial_outcome("FINISHED", {"epoch": 20}, 20, rungs)
    assert tags["cfcml.trial_state"] == "COMPLETE" and "cfcml.stopped_by" not in tags
    assert metrics == {"epochs_trained": 20.0} and tags["cfcml.asha_rung"] == "18"
    tags, _ = trial_outcome("FINISHED", {"epoch": 6}, 20, rungs)
    assert tags["cfcml.trial_state"] == "PRUNED" and tags["cfcml.stopped_by"] == "ASHA"
    assert tags["cfcml.asha_rung"] == "6" and tags["cfcml.stopped_at_epoch"] == "6"
    tags, _ = trial_outcome("FINISHED", {"epoch": 3, STOPPED_BY_KEY: "budget"}, 20, rungs)
    assert tags["cfcml.stopped_by"] == "budget" and tags["cfcml.asha_rung"] == "2"
    tags, metrics = trial_outcome("FAILED", {}, 20, rungs)
    assert tags["cfcml.trial_state"] == "FAIL" and metrics["epochs_trained"] == 0.0 and tags["cfcml.asha_rung"] == "0"


# ----------------------------------------------------------------------------- the searcher


def _searcher(budget=None, max_epochs=4):
    space = {"x": optuna.distributions.FloatDistribution(0.0, 1.0)}
    return PrunedAwareOptunaSearch(space=space, metric="cv_val_auc", mode="max", max_epochs=max_epochs, budget=budget,
                                   sampler=optuna.samplers.TPESampler(seed=0))  # fmt: skip


def test_searcher_tells_optuna_pruned_for_early_stopped_trials_and_complete_otherwise():
    s = _searcher()
    assert isinstance(s.suggest("t1"), dict) and isinstance(s.suggest("t2"), dict)
    s.on_trial_result("t1", {"cv_val_auc": 0.6, "epoch": 1, "training_iteration": 1})
    s.on_trial_complete("t1", {"cv_val_auc": 0.7, "epoch": 2, "training_iteration": 2})  # ASHA cut it at epoch 2
    for e in range(1, 5):
        s.on_trial_result("t2", {"cv_val_auc": 0.5 + e / 10, "epoch": e, "training_iteration": e})
    s.on_trial_complete("t2", {"cv_val_auc": 0.9, "epoch": 4, "training_iteration": 4})
    trials = s._ot_study.get_trials()
    assert [t.state for t in trials] == [TrialState.PRUNED, TrialState.COMPLETE]
    assert trials[0].value == 0.7 and trials[0].last_step == 2  # the value at the epoch it reached
    assert trials[1].value == 0.9
    s.on_trial_complete("t1", {"cv_val_auc": 0.7, "epoch": 2})  # a second completion changes nothing
    assert s._ot_study.get_trials()[0].state == TrialState.PRUNED


def test_searcher_failed_trial_is_fail():
    s = _searcher()
    s.suggest("t1")
    s.on_trial_complete("t1", None, error=True)
    assert s._ot_study.get_trials()[0].state == TrialState.FAIL


def test_searcher_waits_then_finishes_when_the_budget_has_no_room():
    from ray.tune.search import Searcher

    budget = EpochBudget(total=6, runs_per_trial=3, max_epochs=4)
    s = _searcher(budget)
    assert isinstance(s.suggest("t1"), dict) and isinstance(s.suggest("t2"), dict)
    assert s.suggest("t3") is None  # both in flight: ask again later
    assert not budget.exhausted
    budget.on_report("t1", 1)
    s.on_trial_complete("t1", {"cv_val_auc": 0.5, "epoch": 1})
    budget.on_report("t2", 1)
    s.on_trial_complete("t2", {"cv_val_auc": 0.6, "epoch": 1})
    assert s.suggest("t3") == Searcher.FINISHED and budget.exhausted
    assert s.suggest("t4") == Searcher.FINISHED
    assert budget.describe()["trials_started"] == 2


def test_searcher_restore_keeps_the_stoppers_budget_object(tmp_path):
    budget = EpochBudget(total=30, runs_per_trial=3, max_epochs=4)
    s = _searcher(budget)
    s.suggest("t1")
    budget.on_report("t1", 2)
    s.save(str(tmp_path / "searcher.pkl"))
    fresh_budget = EpochBudget(total=30, runs_per_trial=3, max_epochs=4)  # as unpickled from tuner.pkl
    stopper = BudgetStopper(fresh_budget)
    restored = _searcher(fresh_budget)
    restored.restore(str(tmp_path / "searcher.pkl"))
    assert restored.budget is stopper.budget and stopper.budget.used == 6 and "t1" in stopper.budget.running


# ----------------------------------------------------------------------------- search space: TPE options


def test_space_sampler_options(tmp_path):
    from cfcml.config import build_config
    from cfcml.platform.search_space import SearchSpaceError, load_search_space

    base = "params:\n  loss.alpha: {type: float, low: 0.01, high: 0.24, log: true}\n"
    path = tmp_path / "s.yaml"
    path.write_text(base + "sampler: {n_startup_trials: 4, multivariate: true}\n")
    space = load_search_space(path, build_config("men-smoke"))
    assert space.sampler == {"n_startup_trials": 4, "multivariate": True}
    optuna.samplers.TPESampler(seed=0, **space.sampler)  # the study passes them on as they are
    path.write_text(base)
    assert load_search_space(path).sampler == {}
    path.write_text(base + "sampler: {seed: 3}\n")  # the seed is the study's --seed
    with pytest.raises(SearchSpaceError, match="sampler"):
        load_search_space(path)


# ----------------------------------------------------------------------------- Optuna views


def _study(n_complete: int, n_pruned: int):
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=0))
    dists = {"model.n_image_tokens": optuna.distributions.IntDistribution(4, 16, step=4),
             "loss.alpha": optuna.distributions.FloatDistribution(0.01, 0.24, log=True)}  # fmt: skip
    for i in range(n_complete + n_pruned):
        t = study.ask(dists)
        last = 2 if i >= n_complete else 6
        for step in range(1, last + 1):
            t.report(0.5 + 0.01 * step + 0.1 * t.params["loss.alpha"], step)
        if i >= n_complete:
            study.tell(t, state=TrialState.PRUNED)
        else:
            study.tell(t, 0.6 + t.params["model.n_image_tokens"] / 100)
    return study


class _Client:
    """Records what the views log (an MlflowClient stand-in)."""

    def __init__(self):
        self.figures, self.texts, self.artifacts, self.metrics = {}, {}, [], {}

    def log_figure(self, run_id, fig, path):
        self.figures[path] = fig.axes[0].get_title()

    def log_text(self, run_id, text, path):
        self.texts[path] = text

    def log_artifact(self, run_id, local):
        import pandas as pd

        self.artifacts.append(pd.read_csv(local))

    def log_batch(self, run_id, metrics=()):
        self.metrics |= {m.key: m.value for m in metrics}


def test_views_count_states_epochs_and_importances(tmp_path):
    from cfcml.platform import study_views

    url = f"sqlite:///{tmp_path / 'o.db'}"
    study = _study(n_complete=5, n_pruned=3)
    optuna.copy_study(from_study_name=study.study_name, from_storage=study._storage, to_storage=url, to_study_name="s")
    client = _Client()
    budget = EpochBudget(total=200, runs_per_trial=3, max_epochs=6)
    out = study_views.log_study_views(client, "run", "s", url, runs_per_trial=3, budget=budget)
    assert out["trial_states"] == {"complete": 5, "pruned": 3, "failed": 0}
    assert out["epochs_spent"] == (5 * 6 + 3 * 2) * 3  # every fold of every trial, pruned ones included
    assert set(out["importances"]) == {"model.n_image_tokens", "loss.alpha"}
    assert out["importances"]["model.n_image_tokens"] > out["importances"]["loss.alpha"]  # the value depends on n_i only
    assert set(client.figures) == {"plots/optuna_history.png", "plots/optuna_intermediate_values.png",
                                   "plots/optuna_parallel_coordinate.png", "plots/optuna_param_importances.png"}
    assert client.metrics["trials_pruned"] == 3 and client.metrics["epochs_spent"] == 108
    assert client.metrics["budget_epochs"] == 200 and "importance.loss.alpha" in client.metrics
    assert json.loads(client.texts["optuna_param_importances.json"])["importances"]
    assert sorted(client.artifacts[0]["state"]) == ["COMPLETE"] * 5 + ["PRUNED"] * 3


def test_views_without_enough_complete_trials_say_why(tmp_path):
    from cfcml.platform import study_views

    url = f"sqlite:///{tmp_path / 'o.db'}"
    study = _study(n_complete=2, n_pruned=2)
    optuna.copy_study(from_study_name=study.study_name, from_storage=study._storage, to_storage=url, to_study_name="s")
    client = _Client()
    out = study_views.log_study_views(client, "run", "s", url, runs_per_trial=1)
    assert out["importances"] == {} and "2 complete trial(s)" in out["importances_note"]
    assert "plots/optuna_param_importances.png" not in client.figures
    assert "plots/optuna_history.png" in client.figures
    assert "2 complete" in json.loads(client.texts["optuna_param_importances.json"])["note"]


def test_views_never_raise(tmp_path):
    from cfcml.platform import study_views

    assert study_views.log_study_views(_Client(), "run", "missing", f"sqlite:///{tmp_path / 'none.db'}", 1) == {}
