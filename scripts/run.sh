#!/usr/bin/env bash
# `make run`: the whole platform on one machine, offline, in a few minutes.
#
#   1. starts the MLflow tracking server (SQLite + local artifacts) and a local Ray head,
#   2. writes a synthetic MEN cohort,
#   3. submits jobs/tune_men.py with `ray job submit`: a smoke search (Ray Tune + Optuna TPE +
#      ASHA, each trial a Ray Train run over the 3 folds), tracked in MLflow,
#   4. ends with the best model registered as cfcml-men@challenger, and prints where to look.
#
# Everything it starts is recorded in $CFCML_STATE_DIR (default .cfcml-state/) and stopped by
# process id with `make stop` (`cfcml dev stop`). Knobs (environment): CFCML_RUN_TRIALS (3), CFCML_RUN_EPOCHS (15),
# CFCML_RUN_PATIENTS (300: with fewer the tiny model learns too little to show), CFCML_RUN_STUDY (men-smoke-<time>), CFCML_MLFLOW_PORT (5000),
# CFCML_RAY_DASHBOARD_PORT (8265), CFCML_RAY_NUM_CPUS (nproc).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
BIN="$ROOT/.venv/bin"
export CFCML_PYTHON="${CFCML_PYTHON:-$BIN/python}"
export CFCML_STATE_DIR="${CFCML_STATE_DIR:-$ROOT/.cfcml-state}"
STATE="$CFCML_STATE_DIR"
export RAY_USAGE_STATS_ENABLED=0 MLFLOW_DISABLE_TELEMETRY=true HF_HUB_OFFLINE=1
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"  # no busy-waiting threads when trials share the cores
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-token}"
TRIALS="${CFCML_RUN_TRIALS:-3}"
EPOCHS="${CFCML_RUN_EPOCHS:-15}"
PATIENTS="${CFCML_RUN_PATIENTS:-300}"
STUDY="${CFCML_RUN_STUDY:-men-smoke-$(date +%Y%m%d-%H%M%S)}"
mkdir -p "$STATE"

step() { printf '\n==> %s\n' "$*"; }

step "cfcml dev start: MLflow tracking server, then a local Ray head"
CFCML_RAY_NUM_CPUS="${CFCML_RAY_NUM_CPUS:-$(nproc)}" "$BIN/cfcml" dev start
# shellcheck disable=SC1091
source "$STATE/mlflow.env"
# shellcheck disable=SC1091
source "$STATE/ray.env"

DATA="$STATE/data/men-synth-$PATIENTS"
if [[ ! -f "$DATA/clinical.csv" ]]; then
  step "synthetic MEN cohort ($PATIENTS patients) -> $DATA"
  "$BIN/cfcml" synth men --out "$DATA" --patients "$PATIENTS"
fi

COMMIT="$(git rev-parse HEAD 2>/dev/null || echo unknown)"
SUMMARY="$STATE/studies/$STUDY.json"
step "ray job submit: jobs/tune_men.py (study $STUDY: $TRIALS trials x $EPOCHS epochs x 3 folds)"
RUNTIME_ENV=$(printf '{"env_vars": {"MLFLOW_DISABLE_TELEMETRY": "true", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "OMP_WAIT_POLICY": "PASSIVE", "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "600"}, "excludes": [".venv", ".git", ".cfcml-state", ".cfcml-cache", "runs", "mlruns", "*.pt"]}')
"$BIN/ray" job submit --address "$RAY_API_SERVER_ADDRESS" --working-dir . \
  --submission-id "$STUDY" --runtime-env-json "$RUNTIME_ENV" -- \
  python jobs/tune_men.py --preset men-smoke --data "$DATA" --name "$STUDY" \
    --num-samples "$TRIALS" --epochs "$EPOCHS" --storage "$STATE/ray_results" \
    --tracking-uri "$MLFLOW_TRACKING_URI" --git-commit "$COMMIT" \
    --set "data.cache_dir=$STATE/cache" --json-out "$SUMMARY"

STATUS="$("$BIN/ray" job status --address "$RAY_API_SERVER_ADDRESS" "$STUDY" 2>/dev/null | tail -n 1 || true)"
if [[ ! -f "$SUMMARY" ]]; then
  echo "the job did not finish ($STATUS); logs: $BIN/ray job logs --address $RAY_API_SERVER_ADDRESS $STUDY" >&2
  exit 1
fi

"$BIN/python" - "$SUMMARY" "$MLFLOW_TRACKING_URI" "$RAY_API_SERVER_ADDRESS" <<'PY'
import json, sys
s, ui, ray_ui = json.load(open(sys.argv[1])), sys.argv[2], sys.argv[3]
exp = f"{ui}/#/experiments/{s['experiment_id']}"
ml = "?workflowType=machine_learning"  # MLflow 3.17's UI opens in its GenAI view unless told otherwise
print(f"""
================================================================================
Done: study {s['study']} ({s['trials']} trials), best trial {s['best_trial_id']}
  cv_val_auc (mean over folds, validation) {s['best_cv_val_auc']:.4f}
  params {s['best_params']}
Registered: {s.get('model_uri', '(not registered)')}  (version {s.get('model_version', '-')})

MLflow UI: {ui}
  - experiment:   {exp}{ml}
  - parent run:   {exp}/runs/{s['parent_run_id']}{ml}   (the cohort as its dataset, search_curves.png,
                  best-trial test table best_trial/test_summary.md, confusion/ROC plots,
                  optuna_study.txt, the clinical report report/report.html + model_card.md)
  - child runs:   one per trial, named from its parameters: per-fold curves fold1/val_auc ...,
                  plots/validation_auc.png, config.yaml, system metrics
  - models:       {ui}/#/models/{s.get('model_name', 'cfcml-men')}{ml}  (alias @challenger; the model card is
                  the version's description)
Ray dashboard: {ray_ui}
Optuna study:  {s['optuna_storage']}

Next:
  .venv/bin/cfcml promote --model {s.get('model_name', 'cfcml-men')} --alias challenger --tracking-uri {ui}
  .venv/bin/cfcml predict --model models:/{s.get('model_name', 'cfcml-men')}@champion --data <cohort> --out preds.csv --tracking-uri {ui}
  make stop
{s.get('test_markdown', '')}
================================================================================""")
PY
