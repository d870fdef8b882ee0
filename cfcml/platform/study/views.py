"""The views users expect from an Optuna study, logged to the study's MLflow parent run.

Read from the study's Optuna storage once the search is over (so they show exactly what TPE
saw, pruned trials included):

- ``plots/optuna_history.png``: every trial's objective by trial number — complete trials as
  dots, pruned (ASHA- or budget-stopped) trials as crosses labelled with the epoch they reached
  — and the best complete value so far;
- ``plots/optuna_intermediate_values.png``: each trial's objective per epoch (the ASHA rungs
  are where the pruned curves end);
- ``plots/optuna_parallel_coordinate.png``: one line per trial across the searched parameters
  (log-scaled axes where the space is log), coloured by the objective, pruned trials dashed grey;
- ``plots/optuna_param_importances.png`` + ``optuna_param_importances.json``: fANOVA importances
  (``optuna.importance``, seeded) over the COMPLETE trials; with fewer than
  :data:`MIN_TRIALS_FOR_IMPORTANCE` of them, over every trial with a value (pruned ones at their
  last value, flagged as indicative in the title and the JSON's note); with fewer than 2 such
  trials, or no spread in the values, only the note, saying why;
- ``optuna_trials.csv``: Optuna's trial table (state, value, parameters, duration);
- metrics ``trials_complete``/``trials_pruned``/``trials_failed``, ``epochs_spent`` (every run
  of every trial) and, under a budget, ``budget_epochs``; ``importance.<param>`` per parameter.

Plain matplotlib (Agg); no plotly/kaleido. Any failure here is logged and skipped: views must
never fail a finished search.
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

MIN_TRIALS_FOR_IMPORTANCE = 3  # fANOVA on fewer complete trials says nothing
SHORT = {
    "model.n_image_tokens": "n_i",
    "model.n_tabular_tokens": "n_t",
    "loss.alpha": "α",
    "loss.beta": "β",
    "loss.gamma": "γ",
    "train.lr": "lr",
    "loss.tau": "τ",
}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def short(name: str) -> str:
    return SHORT.get(name, name.rsplit(".", 1)[-1])


def closed_trials(study) -> dict[str, list]:
    """{"COMPLETE": [...], "PRUNED": [...], "FAIL": [...]} of an Optuna study's frozen trials."""
    from optuna.trial import TrialState

    out = {"COMPLETE": [], "PRUNED": [], "FAIL": []}
    for t in study.get_trials(deepcopy=False):
        if t.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL):
            out[t.state.name].append(t)
    return out


def epochs_of(trial) -> int:
    """Epochs a trial trained: its last reported step (one step per lockstep epoch)."""
    return max(trial.intermediate_values) if trial.intermediate_values else 0


def param_importances(study, min_trials: int = MIN_TRIALS_FOR_IMPORTANCE) -> tuple[dict[str, float] | None, str]:
    """(importances, note): fANOVA (seeded) over the COMPLETE trials; with fewer than
    `min_trials` of them (a short study, e.g. `make run`), over every trial with a value, pruned
    ones at the value they were stopped with (the note says so: indicative only); (None, why)
    when even that is too little."""
    import optuna

    def usable(trials):
        return [t for t in trials if t.value is not None and not math.isnan(t.value)]

    trials = closed_trials(study)
    complete, pruned = usable(trials["COMPLETE"]), usable(trials["PRUNED"])
    evaluator = optuna.importance.FanovaImportanceEvaluator(seed=0)
    if len(complete) >= min_trials and len({t.value for t in complete}) > 1:
        importances = optuna.importance.get_param_importances(study, evaluator=evaluator)
        note = f"fANOVA over {len(complete)} complete trials"
    else:
        pool = complete + pruned
        if len(pool) < 2 or len({t.value for t in pool}) < 2:
            return None, (
                f"{len(complete)} complete and {len(pruned)} pruned trial(s) with a value: importances need "
                "at least 2 trials with different values"
            )
        proxy = optuna.create_study(direction=study.direction)  # pruned trials enter at their last value
        for t in pool:
            proxy.add_trial(optuna.trial.create_trial(params=t.params, distributions=t.distributions, value=t.value))
        importances = optuna.importance.get_param_importances(proxy, evaluator=evaluator)
        note = (
            f"fANOVA over {len(pool)} trials, {len(pruned)} of them pruned (at their value when stopped): "
            f"indicative only, fewer than {min_trials} complete"
        )
    return {k: float(v) for k, v in importances.items()}, note


def history_figure(study, direction: str = "maximize"):
    plt = _plt()
    trials = closed_trials(study)
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    done = sorted(trials["COMPLETE"], key=lambda t: t.number)
    if done:
        ax.scatter([t.number for t in done], [t.value for t in done], c="tab:blue", s=28, label="complete", zorder=3)
        best, line = None, []
        for t in done:
            if best is None or (t.value > best if direction == "maximize" else t.value < best):
                best = t.value
            line.append((t.number, best))
        ax.step(*zip(*line), where="post", c="tab:red", lw=1.5, label="best complete so far")
    pruned = [t for t in trials["PRUNED"] if t.value is not None]
    if pruned:
        ax.scatter(
            [t.number for t in pruned],
            [t.value for t in pruned],
            marker="x",
            c="tab:gray",
            s=30,
            label="pruned (epoch reached)",
            zorder=3,
        )
        for t in pruned:
            ax.annotate(
                str(epochs_of(t)),
                (t.number, t.value),
                textcoords="offset points",
                xytext=(3, 3),
                fontsize=6,
                color="tab:gray",
            )
    ax.set_xlabel("trial number")
    ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True))  # trials, not fractions of one
    ax.set_ylabel("objective")
    ax.set_title("optimisation history", fontsize=10)
    ax.grid(alpha=0.3)
    if done or pruned:
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def intermediate_figure(study):
    plt = _plt()
    trials = closed_trials(study)
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for state, style in (("COMPLETE", {"lw": 1.4, "alpha": 0.9}), ("PRUNED", {"lw": 1.0, "ls": "--", "c": "tab:gray"})):
        for t in trials[state]:
            if t.intermediate_values:
                xs, ys = zip(*sorted(t.intermediate_values.items()))
                ax.plot(xs, ys, marker="o", ms=2, **style)
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True))
    ax.set_ylabel("objective")
    ax.set_title("objective per epoch (solid: complete, dashed: pruned)", fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def _axis_position(value, dist) -> float:
    """`value` in [0, 1] along a distribution's axis (log-scaled for log distributions)."""
    import optuna.distributions as d

    if isinstance(dist, d.CategoricalDistribution):
        return dist.choices.index(value) / max(len(dist.choices) - 1, 1)
    low, high = float(dist.low), float(dist.high)
    if getattr(dist, "log", False):
        low, high, value = math.log(low), math.log(high), math.log(value)
    return 0.5 if high == low else (float(value) - low) / (high - low)


def parallel_coordinate_figure(study):
    plt = _plt()
    import matplotlib
    from matplotlib import cm, colors

    trials = closed_trials(study)
    shown = [t for t in trials["COMPLETE"] + trials["PRUNED"] if t.value is not None]
    names = sorted({k for t in shown for k in t.distributions})
    fig, ax = plt.subplots(figsize=(7.2, 4.2))
    if not shown or not names:
        ax.text(0.5, 0.5, "no trial to show", ha="center", va="center")
        return fig
    values = [t.value for t in trials["COMPLETE"]] or [t.value for t in shown]
    norm = colors.Normalize(min(values), max(values) if max(values) > min(values) else min(values) + 1e-9)
    cmap = matplotlib.colormaps["viridis"]
    xs = list(range(len(names) + 1))
    for t in sorted(shown, key=lambda t: (t.state.name == "COMPLETE", t.value)):  # best complete drawn last
        ys = [_axis_position(t.params[n], t.distributions[n]) if n in t.params else math.nan for n in names]
        ys.append(norm(t.value) if t.state.name == "COMPLETE" else min(max(norm(t.value), 0.0), 1.0))
        if t.state.name == "COMPLETE":
            ax.plot(xs, ys, c=cmap(norm(t.value)), lw=1.6, alpha=0.9)
        else:
            ax.plot(xs, ys, c="tab:gray", lw=0.9, ls="--", alpha=0.6)
    dists = {n: next(t.distributions[n] for t in shown if n in t.distributions) for n in names}
    labels = []
    for n in names:
        dist = dists[n]
        if hasattr(dist, "low"):
            labels.append(
                f"{short(n)}\n[{dist.low:g}, {dist.high:g}]" + (" log" if getattr(dist, "log", False) else "")
            )
        else:
            labels.append(short(n))
    labels.append(f"objective\n[{norm.vmin:.3f}, {norm.vmax:.3f}]")
    ax.set_xticks(xs, labels, fontsize=7)
    ax.set_yticks([0, 0.5, 1], ["low", "", "high"], fontsize=7)
    for x in xs:
        ax.axvline(x, c="black", lw=0.6)
    fig.colorbar(cm.ScalarMappable(norm=norm, cmap=cmap), ax=ax, label="objective (complete trials)")
    ax.set_title("parallel coordinates (dashed grey: pruned)", fontsize=10)
    fig.tight_layout()
    return fig


def importance_figure(importances: dict[str, float], note: str):
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.6, 0.5 + 0.45 * max(len(importances), 1)))
    items = sorted(importances.items(), key=lambda kv: kv[1])
    ax.barh([short(k) for k, _ in items], [v for _, v in items], color="tab:blue")
    for i, (_, v) in enumerate(items):
        ax.text(v, i, f" {v:.2f}", va="center", fontsize=7)
    ax.set_xlabel("importance (fANOVA, sums to 1)")
    ax.set_title(f"parameter importances — {note}", fontsize=9)
    ax.set_xlim(0, max([v for _, v in items] + [0.01]) * 1.2)
    fig.tight_layout()
    return fig


def study_counts(study, runs_per_trial: int) -> dict:
    trials = closed_trials(study)
    epochs = sum(epochs_of(t) for ts in trials.values() for t in ts) * runs_per_trial
    return {
        "trials_complete": len(trials["COMPLETE"]),
        "trials_pruned": len(trials["PRUNED"]),
        "trials_failed": len(trials["FAIL"]),
        "epochs_spent": epochs,
    }


def log_study_views(client, run_id: str, study_name: str, storage_url: str, runs_per_trial: int, budget=None) -> dict:
    """Log the views above to `run_id`; -> {"trial_states", "epochs_spent", "importances", ...}
    for the study summary (empty on failure: logged as a warning)."""
    try:
        import optuna
        from mlflow.entities import Metric

        study = optuna.load_study(study_name=study_name, storage=storage_url)
        direction = study.direction.name.lower()
        counts = study_counts(study, runs_per_trial)
        summary = {
            "trial_states": {k.removeprefix("trials_"): v for k, v in counts.items() if k.startswith("trials_")},
            "epochs_spent": counts["epochs_spent"],
        }
        metrics = dict(counts)
        if budget is not None:
            summary["budget"] = budget.describe()
            metrics["budget_epochs"] = budget.total
        importances, note = param_importances(study)
        summary["importances"] = importances or {}
        summary["importances_note"] = note
        if importances:
            metrics |= {f"importance.{k}": v for k, v in importances.items()}
        plt = _plt()
        figures = {
            "plots/optuna_history.png": history_figure(study, direction),
            "plots/optuna_intermediate_values.png": intermediate_figure(study),
            "plots/optuna_parallel_coordinate.png": parallel_coordinate_figure(study),
        }
        if importances:
            figures["plots/optuna_param_importances.png"] = importance_figure(importances, note)
        for path, fig in figures.items():
            try:
                client.log_figure(run_id, fig, path)
            finally:
                plt.close(fig)
        client.log_text(
            run_id,
            json.dumps({"importances": importances, "note": note}, indent=2) + "\n",
            "optuna_param_importances.json",
        )
        with tempfile.TemporaryDirectory() as tmp:
            frame = study.trials_dataframe()
            frame.to_csv(Path(tmp) / "optuna_trials.csv", index=False)
            client.log_artifact(run_id, str(Path(tmp) / "optuna_trials.csv"))
        import time

        now = int(time.time() * 1000)
        client.log_batch(run_id, metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()])
        return summary
    except Exception as e:  # noqa: BLE001 - views must never fail a finished search
        from ..redact import redact

        log.warning("could not log the Optuna views of study %s: %s", study_name, redact(str(e)))
        return {}
