"""How long a study's trials run, and what Optuna is told about the ones that stop early.

- :class:`EpochBudget`: a hard cap on the epochs a study trains, counted as every fold (or
  seed) of every trial — stopped trials included. A trial reports once per lockstep epoch of
  its ``runs_per_trial`` runs, so one report costs ``runs_per_trial`` epochs. The budget is
  never overrun: each running trial may have one epoch in flight, so a trial continues (and a
  new one starts) only when the epochs reported plus those in flight stay within the total.
- :class:`BudgetStopper` (a ``ray.tune.Stopper``) stops a trial at a report when continuing
  could overrun the budget; the searcher below stops proposing trials when none fits.
- :class:`PrunedAwareOptunaSearch`: Ray's ``OptunaSearch`` tells Optuna COMPLETE for every
  trial Tune stopped, with the value it had when ASHA cut it, so TPE takes a 2-epoch value for
  a finished one. This subclass tells Optuna the truth: a trial that ended before ``max_epochs``
  without an error is PRUNED at the epoch it reached (TPE ranks pruned trials below complete
  ones, and Optuna's importances use complete trials only). It also applies the budget.
- :func:`asha_rungs` / :func:`trial_outcome`: what a finished trial's MLflow run is tagged
  with (state, epochs trained, the ASHA rung it reached, who stopped it).

Everything here lives in the Tune driver; the budget's counters are saved with the searcher's
state, so a resumed study keeps counting where it stopped.
"""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

STOPPED_BY_KEY = "cfcml_stopped_by"  # written into the stopping result, read by the MLflow callback
TIME_ATTR = "epoch"  # epochs completed, reported by cfcml.platform.train_loop


@dataclass
class EpochBudget:
    """Epoch accounting for one study. ``total``: epochs summed over every run of every trial;
    ``runs_per_trial``: folds / seeds a trial trains in lockstep (one report = that many epochs)."""

    total: int
    runs_per_trial: int
    max_epochs: int  # a trial that reached it ends by itself: nothing more in flight
    min_trial_epochs: int = 1  # a new trial starts only if this many of its epochs fit (ASHA's grace period)
    reached: dict[str, int] = field(default_factory=dict)  # trial id -> epochs reported
    running: set[str] = field(default_factory=set)  # started (or pending) and not yet complete
    stopped: set[str] = field(default_factory=set)  # trials this budget stopped
    started: int = 0
    exhausted: bool = False  # no further trial fitted: the searcher said FINISHED

    def __post_init__(self):
        if self.total < self.runs_per_trial:
            raise ValueError(f"an epoch budget of {self.total} cannot pay for one epoch of {self.runs_per_trial} runs")

    @property
    def used(self) -> int:
        """Epochs reported so far (every run of every trial)."""
        return sum(self.reached.values()) * self.runs_per_trial

    def in_flight(self) -> int:
        """Epochs that running trials may be training right now (at most one each)."""
        live = [t for t in self.running if self.reached.get(t, 0) < self.max_epochs]
        return len(live) * self.runs_per_trial

    def can_start(self) -> bool:
        """Whether one more trial fits: its first `min_trial_epochs` epochs on top of what is
        reported and in flight (a trial cut before the first rung would teach nothing)."""
        return self.used + self.in_flight() + self.min_trial_epochs * self.runs_per_trial <= self.total

    def on_start(self, trial_id: str) -> None:
        if trial_id not in self.running:
            self.running.add(trial_id)
            self.started += 1

    def on_report(self, trial_id: str, epochs: int) -> bool:
        """Record that `trial_id` has completed `epochs`; -> whether it may train another one."""
        self.reached[trial_id] = max(int(epochs), self.reached.get(trial_id, 0))
        self.running.add(trial_id)  # a restored trial reports before any suggest in this driver
        if self.reached[trial_id] >= self.max_epochs:
            return True  # it ends by itself
        if self.used + self.in_flight() <= self.total:  # its next epoch is counted in flight
            return True
        self.stopped.add(trial_id)
        return False

    def on_complete(self, trial_id: str) -> None:
        self.running.discard(trial_id)

    def describe(self) -> dict:
        return {"budget_epochs": self.total, "epochs_used": self.used, "trials_started": self.started,
                "trials_stopped_by_budget": len(self.stopped), "budget_exhausted": self.exhausted}  # fmt: skip


def _stopper_base():
    from ray.tune import Stopper

    return Stopper


class BudgetStopper(_stopper_base()):
    """Stops a trial at a report when its next epoch could overrun the study's epoch budget."""

    def __init__(self, budget: EpochBudget):
        self.budget = budget

    def __call__(self, trial_id: str, result: dict) -> bool:
        if TIME_ATTR not in result:
            return False
        if self.budget.on_report(trial_id, int(result[TIME_ATTR])):
            return False
        result[STOPPED_BY_KEY] = "budget"  # the same dict becomes the trial's last result
        log.info("epoch budget: stopping trial %s at epoch %s (%s)", trial_id, result[TIME_ATTR], self.budget.describe())
        return True

    def stop_all(self) -> bool:
        return False  # running trials finish their epoch and stop at their next report instead


def _optuna_search_base():
    from ray.tune.search.optuna import OptunaSearch

    return OptunaSearch


class PrunedAwareOptunaSearch(_optuna_search_base()):
    """``OptunaSearch`` that records trials stopped before ``max_epochs`` as PRUNED and stops
    proposing trials once the epoch budget (if any) has no room for another one."""

    def __init__(self, *args, max_epochs: int, budget: EpochBudget | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.max_epochs = int(max_epochs)
        self.budget = budget

    def suggest(self, trial_id: str):
        from ray.tune.search import Searcher

        if self.budget is not None and trial_id not in self._ot_trials:
            if self.budget.exhausted:
                return Searcher.FINISHED
            if not self.budget.can_start():
                if self.budget.running:
                    return None  # ask again when a running trial ends: its reservation frees room
                log.info("epoch budget: no room for another trial (%s)", self.budget.describe())
                self.budget.exhausted = True
                return Searcher.FINISHED
        suggestion = super().suggest(trial_id)
        if self.budget is not None and isinstance(suggestion, dict):
            self.budget.on_start(trial_id)
        return suggestion

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False):
        if self.budget is not None:
            self.budget.on_complete(trial_id)
        value = (result or {}).get(self.metric) if isinstance(self.metric, str) else None
        epochs = (result or {}).get(TIME_ATTR)
        pruned = not error and value is not None and epochs is not None and int(epochs) < self.max_epochs
        if not pruned or trial_id in self._completed_trials or trial_id not in self._ot_trials:
            return super().on_trial_complete(trial_id, result=result, error=error)
        from optuna.trial import TrialState

        trial = self._ot_trials[trial_id]
        with warnings.catch_warnings():  # the stopping epoch may already be reported
            warnings.simplefilter("ignore")
            if not (isinstance(value, float) and math.isnan(value)):
                trial.report(float(value), int(epochs))
            try:
                self._ot_study.tell(trial, state=TrialState.PRUNED)
            except Exception as e:  # noqa: BLE001 - as OptunaSearch: bookkeeping must not stop the study
                log.warning("could not record trial %s as pruned in Optuna: %s", trial_id, e)
        self._completed_trials.add(trial_id)

    def restore(self, checkpoint_path: str):
        """Keep the budget object the stopper holds: copy the saved counters into it."""
        live = self.budget
        super().restore(checkpoint_path)
        saved = self.budget
        if live is not None and saved is not None and saved is not live:
            live.__dict__.update(saved.__dict__)
            self.budget = live


# ----------------------------------------------------------------------------- trial outcome


def asha_rungs(grace_period: int, reduction_factor: float, max_t: int) -> list[int]:
    """The epochs at which Ray's ASHA (one bracket) compares trials: grace x rf^k below max_t.

    Same count as ``ray.tune.schedulers.async_hyperband._Bracket``:
    int(log(max_t / grace) / log(rf) + 1) rungs."""
    if grace_period < 1 or reduction_factor < 2 or max_t < 1:
        raise ValueError("grace_period >= 1, reduction_factor >= 2 and max_t >= 1 expected")
    count = int(math.log(max_t / grace_period) / math.log(reduction_factor) + 1) if max_t >= grace_period else 1
    return sorted({int(grace_period * reduction_factor**k) for k in range(max(count, 1))})


def trial_outcome(status: str, last_result: dict, max_epochs: int, rungs: list[int]) -> tuple[dict, dict]:
    """(tags, metrics) for a trial's MLflow run when Tune is done with it.

    `status`: ``FINISHED`` (Tune completed or stopped it) or ``FAILED``. A trial that finished
    before `max_epochs` was stopped early — by ASHA, or by the epoch budget when the stopping
    result says so — and is PRUNED, as in Optuna."""
    epochs = int(last_result.get(TIME_ATTR, 0) or 0)
    reached = [r for r in rungs if r <= epochs]
    metrics = {"epochs_trained": float(epochs)}
    tags = {"cfcml.epochs_trained": str(epochs), "cfcml.asha_rung": str(reached[-1]) if reached else "0"}
    if status == "FAILED":
        tags["cfcml.trial_state"] = "FAIL"
    elif epochs < max_epochs:
        tags["cfcml.trial_state"] = "PRUNED"
        tags["cfcml.stopped_by"] = "budget" if last_result.get(STOPPED_BY_KEY) == "budget" else "ASHA"
        tags["cfcml.stopped_at_epoch"] = str(epochs)
    else:
        tags["cfcml.trial_state"] = "COMPLETE"
    return tags, metrics
