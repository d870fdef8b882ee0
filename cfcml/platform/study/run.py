"""`run_study(spec)`: prepare (config, cohort, storage, Ray) -> search (Tune + Optuna + ASHA in
the study's MLflow parent run) -> finalise (test, report and register the best trial)."""

from __future__ import annotations

from .finalise import Finaliser
from .parent import connect, parent_run
from .prepare import check_tracking_server, prepare, start_ray
from .search import search
from .spec import StudySpec
from .views import log_study_views


def run_study(spec: StudySpec) -> dict:
    """Run (or resume) a study end to end; returns a summary (best trial, test table, model)."""
    check_tracking_server(spec)  # before Ray or Optuna start anything
    plan = start_ray(prepare(spec))
    with parent_run(plan, connect(plan)) as tracking:
        results, budget = search(plan, tracking)
        views = log_study_views(  # importances, history, ...
            tracking.client, tracking.parent_id, plan.name, plan.optuna_url, len(plan.runs), budget
        )
        return views | Finaliser(plan, tracking).finalise(results)
