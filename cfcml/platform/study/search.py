"""The search: ASHA's rungs and the decision board, the trainable and its context, Optuna's
TPE searcher, the rung-synchronised ASHA scheduler, the epoch budget, the Tuner; and telling a
finished search from an interrupted one."""

from __future__ import annotations

import time
from dataclasses import dataclass

from ...datasets.spec import shipped
from ..tracking import end_running_children
from . import node_watch
from .callback import _study_callback_cls
from .context import TrialContext
from .parent import Tracking
from .prepare import StudyPlan
from .progress import study_progress_callback
from .spec import NodeLost, StudyError, StudyInterrupted
from .trial import _trial


@dataclass(frozen=True)
class Rungs:
    """ASHA's rungs in epochs and the board the Train workers read its decisions from."""

    grace: int
    epochs: list[int]  # ASHA's rungs (`search_control.asha_rungs`)
    max_epochs: int
    board: str

    @property
    def decisions(self) -> dict:
        """Where the Train workers wait for a decision: every rung before the last epoch."""
        return {"board": self.board, "epochs": [r for r in self.epochs if r < self.max_epochs]}


def plan_rungs(plan: StudyPlan) -> Rungs:
    from .. import search_control as sc  # imports Ray Tune

    cfg, space = plan.cfg, plan.space
    grace = min(int(space.asha["grace_period"]), cfg.train.epochs)
    try:
        sc.check_first_rung(grace, sc.latest_first_candidate(cfg.train, space.params), "search space")
    except ValueError as e:
        raise StudyError(str(e)) from None
    rungs = sc.asha_rungs(grace, float(space.asha["reduction_factor"]), cfg.train.epochs)
    board = sc.board_name(plan.name)  # rung decisions reach the Train workers through it (search_control)
    sc.open_board(board)
    return Rungs(grace=grace, epochs=rungs, board=board, max_epochs=cfg.train.epochs)


def trial_context(plan: StudyPlan, tracking: Tracking, rungs: Rungs) -> TrialContext:

    spec = plan.spec
    return TrialContext(
        preset=spec.preset,
        overrides=plan.overrides,
        epochs=plan.cfg.train.epochs,
        data=plan.data,
        runs=plan.runs,
        spec=shipped(plan.cohort_spec),
        study=plan.name,
        tracking_uri=tracking.tracking_uri,
        experiment_id=tracking.experiment_id,
        parent_run_id=tracking.parent_id,
        workers=spec.resources.workers_per_trial,
        cpus_per_worker=spec.resources.cpus_per_worker,
        gpus_per_worker=spec.resources.gpus_per_worker,
        max_failures=spec.resources.max_failures,
        train_storage=plan.train_storage,
        system_metrics=spec.tracking.system_metrics,
        system_metrics_interval=spec.tracking.system_metrics_interval,
        fault=spec.fault and {**spec.fault, "params": plan.first},  # the first trial (the preset's point)
        holdout=[c.case_id for c in plan.held] or None,
        decisions=rungs.decisions,
    )


def _new_tuner(plan: StudyPlan, tracking: Tracking, trainable, rungs: Rungs, budget):
    import optuna
    from ray import tune

    from .. import search_control as sc  # budget, pruned trials, rung decisions

    spec, space, epochs = plan.spec, plan.space, plan.cfg.train.epochs
    searcher = sc.PrunedAwareOptunaSearch(
        space=space.distributions(),
        metric=space.metric,
        mode=space.mode,
        points_to_evaluate=[plan.first],
        sampler=optuna.samplers.TPESampler(seed=spec.search.seed, **space.sampler),
        study_name=plan.name,
        storage=optuna.storages.RDBStorage(plan.optuna_url),
        max_epochs=epochs,
        budget=budget,
    )
    scheduler = sc.RungSyncASHA(
        time_attr="epoch",
        max_t=epochs,
        grace_period=rungs.grace,
        reduction_factor=float(space.asha["reduction_factor"]),
        board=rungs.board,
        decision_epochs=rungs.decisions["epochs"],
    )
    names = [r["name"] for r in plan.runs]
    callback = _study_callback_cls()(
        tracking.tracking_uri, tracking.experiment_id, tracking.parent_id, epochs, names, rungs.epochs
    )
    progress = study_progress_callback(spec.search.num_samples, epochs, space.metric, spec.quiet)
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            metric=space.metric,
            mode=space.mode,
            search_alg=searcher,
            scheduler=scheduler,
            num_samples=spec.search.num_samples,
            max_concurrent_trials=plan.concurrent,
        ),
        run_config=tune.RunConfig(
            name=plan.name,
            storage_path=plan.storage,
            callbacks=[c for c in (callback, progress, node_watch.node_watch_callback()) if c],
            verbose=1,
            stop=sc.BudgetStopper(budget, rungs.board) if budget else None,
        ),
    )


def make_tuner(plan: StudyPlan, tracking: Tracking):
    """(the Tuner, the epoch budget or None): a new study's, or the restored one's."""
    from ray import tune

    from .. import search_control as sc

    rungs = plan_rungs(plan)
    ctx = trial_context(plan, tracking, rungs).to_dict()
    # the trial driver only waits on its Train run: it takes no CPU (a token of memory, as Tune
    # refuses an empty request), so CPUs/GPUs go to Train workers and concurrency is set before.
    # It runs on the head node, and so does the Train controller it starts (Ray puts that on the
    # driver's node): a worker node that dies takes a trial's workers, never the trial
    head = {"node:__internal_head__": 0.001}
    trainable = tune.with_resources(tune.with_parameters(_trial, ctx=ctx), {"CPU": 0, "memory": 2**20, **head})
    if plan.restoring:  # a restored study restores its budget with the searcher
        tuner = tune.Tuner.restore(
            plan.study_path, trainable=trainable, resume_unfinished=True, resume_errored=False, restart_errored=False
        )
        return tuner, None
    budget = None
    if plan.spec.budget.budget_epochs:
        epochs = plan.cfg.train.epochs
        budget = sc.EpochBudget(plan.spec.budget.budget_epochs, len(plan.runs), [*rungs.epochs, epochs])
    return _new_tuner(plan, tracking, trainable, rungs, budget), budget


def trial_counts(name: str, optuna_url: str) -> tuple[int, int]:
    """(closed, open) trials of the Optuna study: closed = COMPLETE, PRUNED or FAIL; open =
    asked but never told (RUNNING/WAITING). After a SIGINT, Tune returns normally and marks its
    live trials TERMINATED in memory, so the Optuna study (told only when a trial really ends)
    is what tells a finished search from an interrupted one."""
    import optuna
    from optuna.trial import TrialState

    study = optuna.load_study(study_name=name, storage=optuna_url)
    closed = sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL) for t in study.trials)
    return closed, len(study.trials) - closed


def search(plan: StudyPlan, tracking: Tracking):
    """Run the search (in the open parent run): -> (Tune's results, the epoch budget or None);
    raises StudyInterrupted when trials were left unfinished."""
    import mlflow

    tuner, budget = make_tuner(plan, tracking)
    node_watch.arm(plan.spec.resources.node_loss_timeout)
    t0 = time.time()
    try:
        results = tuner.fit()
    finally:
        end_running_children(tracking.client, tracking.parent_id, "KILLED")
    mlflow.log_metric("search_seconds", time.time() - t0)
    finished, unfinished = trial_counts(plan.name, plan.optuna_url)
    # a budget ends the search before num_samples: then only trials left open mean an interrupt
    spec, name = plan.spec, plan.name
    ended_by_budget = bool(spec.budget.budget_epochs) and not unfinished and (budget is None or budget.exhausted)
    if unfinished or (finished < spec.search.num_samples and not ended_by_budget):
        mlflow.set_tag("cfcml.status", "interrupted")
        if reason := node_watch.stop_reason():
            mlflow.set_tag("cfcml.stop_reason", reason)
            raise NodeLost(
                f"study {name} stopped: {reason}; once the cluster has room again, "
                f"continue it with --resume (same --name {name} and --storage)"
            )
        raise StudyInterrupted(
            f"study {name} interrupted; continue it with --resume (same --name {name} and --storage)"
        )
    mlflow.set_tag("cfcml.status", "searched")
    return results, budget
