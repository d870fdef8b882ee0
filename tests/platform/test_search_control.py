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


def test_budget_reserves_each_trial_up_to_its_next_milestone():
    """3 folds per trial, a rung at epoch 2, 4 epochs max, 24 epochs in all: a trial's epochs up
    to its next milestone are reserved when it starts or passes one; it is stopped only there."""
    b = EpochBudget(total=24, runs_per_trial=3, milestones=[4, 2])
    assert b.milestones == [2, 4] and b.max_epochs == 4
    b.on_start("a")
    b.on_start("b")
    assert b.reserved() == 12 and b.can_start()  # 0 + 12 + 6 <= 24
    assert b.on_report("a", 1)  # inside its reserved segment
    assert b.used == 3 and b.reserved() == 9
    assert b.on_report("a", 2)  # rung: 6 reported + a's next 2 epochs + b's 2 = 18 <= 24
    assert b.can_start()  # 18 + 6 <= 24
    b.on_start("c")
    assert b.on_report("b", 1)
    assert b.on_report("b", 2) is False  # 12 reported + a 6 + b 6 + c 6 = 30 > 24: b stops at its rung
    assert b.stopped == {"b"}
    b.on_complete("b")
    assert b.on_report("a", 3) and b.on_report("a", 4)  # a ends by itself at max_epochs
    assert b.used == 18 and b.reserved() == 6  # c's first segment
    assert not b.can_start()
    assert b.on_report("c", 1)
    assert b.on_report("c", 2) is False  # 24 reported + c's next 6 > 24
    assert b.used == 24 == b.total
    assert b.describe() == {
        "budget_epochs": 24,
        "epochs_used": 24,
        "trials_started": 3,
        "trials_stopped_by_budget": 2,
        "budget_exhausted": False,
    }


def test_budget_refuses_a_total_below_one_trials_first_rung():
    with pytest.raises(ValueError):
        EpochBudget(total=5, runs_per_trial=3, milestones=[2, 5])
    with pytest.raises(ValueError):
        EpochBudget(total=50, runs_per_trial=3, milestones=[])


@pytest.mark.parametrize("seed", range(20))
def test_budget_is_never_overrun_by_a_simulated_asynchronous_study(seed):
    """Random epoch durations, 3 concurrent trials, random ASHA stops at the rungs: the epochs
    trained (a stopped trial trains nothing past its rung: its workers wait for the decision)
    never exceed the total, and little of it is left unused."""
    rng = random.Random(seed)
    runs, milestones, total, concurrent = 3, [2, 6, 18, 20], 210, 3
    budget = EpochBudget(total=total, runs_per_trial=runs, milestones=milestones)
    stopper = BudgetStopper(budget)
    clock, live, trained, started, finished = 0.0, {}, 0, 0, False  # live: trial -> (epoch end time, epochs done)
    while live or not finished:
        while not finished and len(live) < concurrent:  # the searcher's view
            if not budget.can_start():
                finished = not budget.running
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
        asha_stop = done in milestones[:-1] and rng.random() < 0.6
        if stopper(tid, result) or asha_stop or done >= milestones[-1]:
            del live[tid]
            budget.on_complete(tid)
        else:
            live[tid] = (clock + rng.uniform(0.5, 2.0), done)
        assert trained <= total
    assert trained == budget.used <= total
    assert total - trained <= 12 * runs  # at most one longest segment left over
    assert started > 5


def test_stopper_marks_the_result_it_stops():
    b = EpochBudget(total=3, runs_per_trial=3, milestones=[1, 5])
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
    return PrunedAwareOptunaSearch(
        space=space,
        metric="cv_val_auc",
        mode="max",
        max_epochs=max_epochs,
        budget=budget,
        sampler=optuna.samplers.TPESampler(seed=0),
    )


def test_searcher_tells_optuna_pruned_for_early_stopped_trials_and_complete_otherwise():
    s = _searcher()
    assert isinstance(s.suggest("t1"), dict) and isinstance(s.suggest("t2"), dict)
    s.on_trial_result("t1", {"cv_val_auc": 0.6, "epoch": 1, "training_iteration": 1})
    s.on_trial_complete("t1", {"cv_val_auc": 0.7, "epoch": 2, "training_iteration": 2})  # ASHA cut it at epoch 2
    for e in range(1, 5):
        s.on_trial_result("t2", {"cv_val_auc": 0.5 + e / 10, "epoch": e, "training_iteration": e})
    s.on_trial_complete("t2", {"cv_val_auc": 0.9, "epoch": 4, "training_iteration": 4})
    assert isinstance(s.suggest("t3"), dict)
    for e in range(1, 4):  # Tune withholds the final result (ASHA's STOP at max_t) from the searcher
        s.on_trial_result("t3", {"cv_val_auc": 0.6, "epoch": e, "training_iteration": e})
    s.on_trial_complete("t3", {"cv_val_auc": 0.65, "epoch": 4, "training_iteration": 4})
    trials = s._ot_study.get_trials()
    assert [t.state for t in trials] == [TrialState.PRUNED, TrialState.COMPLETE, TrialState.COMPLETE]
    assert trials[0].value == 0.7 and trials[0].last_step == 2  # the value at the epoch it reached
    assert trials[1].value == 0.9 and trials[1].last_step == 4
    assert trials[2].value == 0.65 and trials[2].last_step == 4  # its curve ends where it did
    s.on_trial_complete("t1", {"cv_val_auc": 0.7, "epoch": 2})  # a second completion changes nothing
    assert s._ot_study.get_trials()[0].state == TrialState.PRUNED


def test_searcher_failed_trial_is_fail():
    s = _searcher()
    s.suggest("t1")
    s.on_trial_complete("t1", None, error=True)
    assert s._ot_study.get_trials()[0].state == TrialState.FAIL


def test_searcher_waits_then_finishes_when_the_budget_has_no_room():
    from ray.tune.search import Searcher

    budget = EpochBudget(total=6, runs_per_trial=3, milestones=[1, 4])
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
    budget = EpochBudget(total=30, runs_per_trial=3, milestones=[2, 4])
    s = _searcher(budget)
    s.suggest("t1")
    budget.on_report("t1", 2)
    s.save(str(tmp_path / "searcher.pkl"))
    fresh_budget = EpochBudget(total=30, runs_per_trial=3, milestones=[2, 4])  # as unpickled from tuner.pkl
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
    dists = {
        "model.n_image_tokens": optuna.distributions.IntDistribution(4, 16, step=4),
        "loss.alpha": optuna.distributions.FloatDistribution(0.01, 0.24, log=True),
    }
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
    from cfcml.platform.study import views as study_views

    url = f"sqlite:///{tmp_path / 'o.db'}"
    study = _study(n_complete=5, n_pruned=3)
    optuna.copy_study(from_study_name=study.study_name, from_storage=study._storage, to_storage=url, to_study_name="s")
    client = _Client()
    budget = EpochBudget(total=200, runs_per_trial=3, milestones=[2, 6])
    out = study_views.log_study_views(client, "run", "s", url, runs_per_trial=3, budget=budget)
    assert out["trial_states"] == {"complete": 5, "pruned": 3, "failed": 0}
    assert out["epochs_spent"] == (5 * 6 + 3 * 2) * 3  # every fold of every trial, pruned ones included
    assert set(out["importances"]) == {"model.n_image_tokens", "loss.alpha"}
    assert (
        out["importances"]["model.n_image_tokens"] > out["importances"]["loss.alpha"]
    )  # the value depends on n_i only
    assert set(client.figures) == {
        "plots/optuna_history.png",
        "plots/optuna_intermediate_values.png",
        "plots/optuna_parallel_coordinate.png",
        "plots/optuna_param_importances.png",
    }
    assert client.metrics["trials_pruned"] == 3 and client.metrics["epochs_spent"] == 108
    assert client.metrics["budget_epochs"] == 200 and "importance.loss.alpha" in client.metrics
    assert json.loads(client.texts["optuna_param_importances.json"])["importances"]
    assert sorted(client.artifacts[0]["state"]) == ["COMPLETE"] * 5 + ["PRUNED"] * 3


def test_views_with_few_complete_trials_fall_back_to_pruned_values_and_say_so(tmp_path):
    from cfcml.platform.study import views as study_views

    url = f"sqlite:///{tmp_path / 'o.db'}"
    study = _study(n_complete=2, n_pruned=2)
    optuna.copy_study(from_study_name=study.study_name, from_storage=study._storage, to_storage=url, to_study_name="s")
    client = _Client()
    out = study_views.log_study_views(client, "run", "s", url, runs_per_trial=1)
    assert set(out["importances"]) == {"model.n_image_tokens", "loss.alpha"}
    assert "4 trials, 2 of them pruned" in out["importances_note"] and "indicative" in out["importances_note"]
    assert "indicative" in client.figures["plots/optuna_param_importances.png"]
    assert "2 of them pruned" in json.loads(client.texts["optuna_param_importances.json"])["note"]


def test_views_with_one_trial_say_why_there_are_no_importances(tmp_path):
    from cfcml.platform.study import views as study_views

    url = f"sqlite:///{tmp_path / 'o.db'}"
    study = _study(n_complete=1, n_pruned=0)
    optuna.copy_study(from_study_name=study.study_name, from_storage=study._storage, to_storage=url, to_study_name="s")
    client = _Client()
    out = study_views.log_study_views(client, "run", "s", url, runs_per_trial=1)
    assert out["importances"] == {} and "at least 2 trials" in out["importances_note"]
    assert "plots/optuna_param_importances.png" not in client.figures
    assert {"plots/optuna_history.png", "plots/optuna_parallel_coordinate.png"} <= set(client.figures)


def test_views_never_raise(tmp_path):
    from cfcml.platform.study import views as study_views

    assert study_views.log_study_views(_Client(), "run", "missing", f"sqlite:///{tmp_path / 'none.db'}", 1) == {}


# ----------------------------------------------------------------------------- rung decisions reach the workers


def test_rung_sync_asha_posts_its_decision_at_every_rung(monkeypatch):
    from types import SimpleNamespace

    from cfcml.platform import search_control
    from cfcml.platform.search_control import RungSyncASHA, await_decision

    posted = []
    monkeypatch.setattr(
        search_control, "post_decision", lambda board, tid, epoch, d: posted.append((board, tid, epoch, d))
    )
    asha = RungSyncASHA(
        time_attr="epoch",
        metric="cv_val_auc",
        mode="max",
        max_t=4,
        grace_period=1,
        reduction_factor=2,
        board="b",
        decision_epochs=[1, 2],
    )
    good, bad = SimpleNamespace(trial_id="good"), SimpleNamespace(trial_id="bad")
    for t in (good, bad):
        asha.on_trial_add(None, t)
    assert asha.on_trial_result(None, good, {"epoch": 1, "cv_val_auc": 0.8}) == "CONTINUE"
    assert asha.on_trial_result(None, bad, {"epoch": 1, "cv_val_auc": 0.5}) == "STOP"  # below the rung's median
    assert asha.on_trial_result(None, good, {"epoch": 2, "cv_val_auc": 0.85}) == "CONTINUE"
    assert (
        asha.on_trial_result(None, good, {"epoch": 3, "cv_val_auc": 0.86}) == "CONTINUE"
    )  # not a rung: nothing posted
    assert posted == [("b", "good", 1, "CONTINUE"), ("b", "bad", 1, "STOP"), ("b", "good", 2, "CONTINUE")]
    assert await_decision(None, "good", 1) is None  # no board (e.g. a Train run outside a study): train on


def test_budget_stopper_posts_stop(monkeypatch):
    from cfcml.platform import search_control

    posted = []
    monkeypatch.setattr(
        search_control, "post_decision", lambda board, tid, epoch, d: posted.append((board, tid, epoch, d))
    )
    b = EpochBudget(total=6, runs_per_trial=3, milestones=[1, 3])
    stopper = BudgetStopper(b, board="b")
    b.on_start("a")
    assert stopper("a", {"epoch": 1}) is True  # 3 reported + 6 more reserved > 6
    assert posted == [("b", "a", 1, "STOP")]
