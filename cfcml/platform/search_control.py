"""How long a study's trials run, and what Optuna is told about the ones that stop early.

- :class:`EpochBudget`: a hard cap on the epochs a study trains, counted as every fold (or
  seed) of every trial — stopped trials included. A trial reports once per lockstep epoch of
  its ``runs_per_trial`` runs, so one report costs ``runs_per_trial`` epochs.
- :class:`BudgetStopper` (a ``ray.tune.Stopper``) stops a trial at a milestone when its next
  segment could overrun the budget; the searcher below stops proposing trials when none fits.
- :class:`RungSyncASHA` + the decision board (:func:`open_board`, :func:`await_decision`):
  Tune's decisions reach a trial's Ray Train workers only as a kill, seconds after the report,
  while the workers train on — measured here, a stopped 3-epoch smoke trial trained all 3. The
  scheduler and the budget post every rung decision to a small Ray actor, and the workers wait
  for it after reporting a rung epoch (a second or two, a few times per trial).
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

import dataclasses
import logging
import math
import time
import warnings
from dataclasses import dataclass, field

import ray
from optuna.trial import TrialState
from ray.tune import Stopper
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search import Searcher
from ray.tune.search.optuna import OptunaSearch

from ..config import first_candidate_epoch

log = logging.getLogger(__name__)

STOPPED_BY_KEY = "cfcml_stopped_by"  # written into the stopping result, read by the MLflow callback
TIME_ATTR = "epoch"  # epochs completed, reported by cfcml.platform.train_loop


@dataclass
class EpochBudget:
    """Epoch accounting for one study. ``total``: epochs summed over every run of every trial;
    ``runs_per_trial``: folds / seeds a trial trains in lockstep (one report = that many epochs);
    ``milestones``: the epochs at which a trial may be stopped — ASHA's rungs and ``max_epochs``.

    A trial's epochs up to its next milestone are *reserved* when it starts or passes a
    milestone; it goes on past a milestone (and a new trial starts) only if the epochs reported
    plus everything reserved stay within the total. So the budget is never overrun, and like
    ASHA it stops trials at rungs only — where the Train workers wait for the decision
    (:func:`await_decision`), so a stopped trial trains no epoch after its stop."""

    total: int
    runs_per_trial: int
    milestones: list[int]  # sorted; the last one is max_epochs
    reached: dict[str, int] = field(default_factory=dict)  # trial id -> epochs reported
    running: set[str] = field(default_factory=set)  # started (or pending) and not yet complete
    stopped: set[str] = field(default_factory=set)  # trials this budget stopped
    started: int = 0
    exhausted: bool = False  # no further trial fitted: the searcher said FINISHED

    def __post_init__(self):
        self.milestones = sorted({int(m) for m in self.milestones})
        if not self.milestones or self.milestones[0] < 1:
            raise ValueError(f"milestones must be positive epochs, got {self.milestones}")
        if self.total < self.milestones[0] * self.runs_per_trial:
            raise ValueError(
                f"an epoch budget of {self.total} cannot pay for one trial's first {self.milestones[0]} "
                f"epoch(s) of {self.runs_per_trial} runs"
            )

    @property
    def max_epochs(self) -> int:
        return self.milestones[-1]

    @property
    def used(self) -> int:
        """Epochs reported so far (every run of every trial)."""
        return sum(self.reached.values()) * self.runs_per_trial

    def next_milestone(self, epochs: int) -> int:
        return next((m for m in self.milestones if m > epochs), self.max_epochs)

    def reserved(self) -> int:
        """Epochs running trials will train before their next milestone (every run)."""
        return sum(
            max(self.next_milestone(self.reached.get(t, 0)) - self.reached.get(t, 0), 0) for t in self.running
        ) * (self.runs_per_trial)

    def can_start(self) -> bool:
        """Whether one more trial fits: its epochs up to the first milestone on top of what is
        reported and reserved."""
        return self.used + self.reserved() + self.milestones[0] * self.runs_per_trial <= self.total

    def on_start(self, trial_id: str) -> None:
        if trial_id not in self.running:
            self.running.add(trial_id)
            self.started += 1

    def on_report(self, trial_id: str, epochs: int) -> bool:
        """Record that `trial_id` has completed `epochs`; -> whether it may train on."""
        before = self.reached.get(trial_id, 0)
        self.reached[trial_id] = now = max(int(epochs), before)
        self.running.add(trial_id)  # a restored trial reports before any suggest in this driver
        if now >= self.max_epochs or now < self.next_milestone(before):
            return True  # done by itself, or still inside the segment reserved for it
        if self.used + self.reserved() <= self.total:  # reserved() now holds its next segment
            return True
        self.stopped.add(trial_id)
        return False

    def on_complete(self, trial_id: str) -> None:
        self.running.discard(trial_id)

    def describe(self) -> dict:
        return {
            "budget_epochs": self.total,
            "epochs_used": self.used,
            "trials_started": self.started,
            "trials_stopped_by_budget": len(self.stopped),
            "budget_exhausted": self.exhausted,
        }


# ----------------------------------------------------------------------------- decisions reach the workers


BOARD_NAMESPACE = "cfcml"
_boards: dict = {}


def board_name(study: str) -> str:
    return f"cfcml-decisions-{study}"


def open_board(name: str):
    """The study's decision board (a tiny Ray actor, created once per driver): the scheduler and
    the budget post what they decided at a rung, Train workers wait for it (:func:`await_decision`).
    Without it a stopped trial's workers train on until Tune's kill arrives — seconds, i.e. one
    or two more epochs on a small model, at every stop."""

    @ray.remote(num_cpus=0, max_restarts=0)
    class DecisionBoard:
        def __init__(self):
            self.decisions = {}

        def post(self, trial_id: str, epoch: int, decision: str) -> None:
            self.decisions[(trial_id, int(epoch))] = decision

        def get(self, trial_id: str, epoch: int):
            return self.decisions.get((trial_id, int(epoch)))

    handle = DecisionBoard.options(name=name, namespace=BOARD_NAMESPACE, get_if_exists=True).remote()
    _boards[name] = handle
    return handle


def post_decision(name: str | None, trial_id: str, epoch: int, decision: str) -> None:
    """Driver side: tell the workers of `trial_id` what was decided at `epoch` (fire and forget)."""
    if not name:
        return
    try:
        handle = _boards.get(name) or ray.get_actor(name, namespace=BOARD_NAMESPACE)
        _boards[name] = handle
        handle.post.remote(trial_id, int(epoch), decision)
    except Exception as e:  # noqa: BLE001 - the workers fall back to waiting out their timeout
        log.warning("could not post the decision for trial %s at epoch %s: %s", trial_id, epoch, e)


def await_decision(
    name: str | None, trial_id: str, epoch: int, timeout: float = 300.0, poll: float = 0.2
) -> str | None:
    """Worker side, after reporting a rung epoch: the decision (``"STOP"``/``"CONTINUE"``/...),
    or None when there is no board or it said nothing within `timeout` seconds (then train on)."""
    if not name:
        return None
    try:
        board = ray.get_actor(name, namespace=BOARD_NAMESPACE)
    except ValueError:
        return None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            decision = ray.get(board.get.remote(trial_id, int(epoch)), timeout=30)
        except Exception as e:  # noqa: BLE001 - a lost board must not kill training
            log.warning("decision board unreachable (%s): training on", e)
            return None
        if decision is not None:
            return decision
        time.sleep(poll)
    log.warning("no decision for trial %s at epoch %s within %.0f s: training on", trial_id, epoch, timeout)
    return None


class BudgetStopper(Stopper):
    """Stops a trial at a milestone when its next segment could overrun the study's epoch budget."""

    def __init__(self, budget: EpochBudget, board: str | None = None):
        self.budget, self.board = budget, board

    def __call__(self, trial_id: str, result: dict) -> bool:
        if TIME_ATTR not in result:
            return False
        if self.budget.on_report(trial_id, int(result[TIME_ATTR])):
            return False
        result[STOPPED_BY_KEY] = "budget"  # the same dict becomes the trial's last result
        post_decision(self.board, trial_id, int(result[TIME_ATTR]), "STOP")
        log.info(
            "epoch budget: stopping trial %s at epoch %s (%s)", trial_id, result[TIME_ATTR], self.budget.describe()
        )
        return True

    def stop_all(self) -> bool:
        return False  # running trials stop at their next milestone instead


class RungSyncASHA(ASHAScheduler):
    """ASHA that posts its decision at every rung (below max_t) to the decision board, where the
    trial's Train workers wait for it: a stopped trial trains no epoch past its rung."""

    def __init__(self, *args, board: str | None = None, decision_epochs=(), **kwargs):
        super().__init__(*args, **kwargs)
        self.board, self.decision_epochs = board, {int(e) for e in decision_epochs}

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        value = result.get(self._metric)
        if isinstance(value, float) and math.isnan(value):  # no finite validation metric: ranks last
            result = {**result, self._metric: -math.inf * self._metric_op}
        decision = super().on_trial_result(tune_controller, trial, result)
        epoch = result.get(TIME_ATTR)
        if epoch is not None and int(epoch) in self.decision_epochs:
            post_decision(self.board, trial.trial_id, int(epoch), decision)
        return decision


class PrunedAwareOptunaSearch(OptunaSearch):
    """``OptunaSearch`` that records trials stopped before ``max_epochs`` as PRUNED and stops
    proposing trials once the epoch budget (if any) has no room for another one."""

    def __init__(self, *args, max_epochs: int, budget: EpochBudget | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.max_epochs = int(max_epochs)
        self.budget = budget

    def suggest(self, trial_id: str):
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

    def on_trial_result(self, trial_id: str, result: dict):
        value = result.get(self.metric) if isinstance(self.metric, str) else None
        if isinstance(value, float) and math.isnan(value):
            return  # no candidate epoch yet (see cfcml.platform.train_loop.cv_metrics): nothing to report
        super().on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False):
        if self.budget is not None:
            self.budget.on_complete(trial_id)
        value = (result or {}).get(self.metric) if isinstance(self.metric, str) else None
        epochs = (result or {}).get(TIME_ATTR)
        known = trial_id in self._ot_trials and trial_id not in self._completed_trials
        if known and not error and value is not None and epochs is not None:
            # Tune withholds the result it stops a trial on (ASHA also stops at max_t) from the
            # searcher: report it, so the trial's curve (and its epoch count) ends where it did
            with warnings.catch_warnings():  # the epoch may already be reported
                warnings.simplefilter("ignore")
                if not (isinstance(value, float) and math.isnan(value)):
                    self._ot_trials[trial_id].report(float(value), int(epochs))
        pruned = not error and value is not None and epochs is not None and int(epochs) < self.max_epochs
        if not pruned or not known:
            return super().on_trial_complete(trial_id, result=result, error=error)
        trial = self._ot_trials[trial_id]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
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


def latest_first_candidate(train, params) -> int:
    """The latest first candidate epoch (0-based) any trial can have: the config's, with the
    searched selection/warm-up keys at the top of their ranges."""
    keys = ("warmup_epochs", "select_window", "select_min_epoch")
    highs = {
        p.name.split(".", 1)[1]: p.high if p.type != "categorical" else max(p.choices)
        for p in params
        if p.name in {f"train.{k}" for k in keys}
    }
    return first_candidate_epoch(dataclasses.replace(train, **{k: int(v) for k, v in highs.items()}))


def check_first_rung(grace_period: int, first_candidate: int, source: str) -> None:
    """Refuse ASHA rungs before the first candidate epoch: there a trial has no selected epoch
    and reports no objective, so the rung would rank nothing. `first_candidate` is 0-based."""
    if int(grace_period) < first_candidate + 1:
        raise ValueError(
            f"{source}: asha.grace_period = {grace_period} falls before the first epoch that can be selected "
            f"(epoch {first_candidate + 1}: train.select_window and the LR warm-up / train.select_min_epoch); "
            f"set asha.grace_period >= {first_candidate + 1}"
        )
