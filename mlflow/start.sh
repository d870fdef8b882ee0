#!/usr/bin/env bash
# Start the MLflow tracking server in the background; returns once /health answers.
#
#   mlflow/start.sh [--host H] [--port P] [--backend-uri URI] [--artifacts-destination URI]
#                   [--allow-remote] [--allowed-hosts LIST] [--workers N] [--state-dir DIR]
#                   [--timeout S]
#
# Defaults: http://127.0.0.1:5000, SQLite <state>/mlflow.db, proxied artifacts in
# <state>/mlartifacts, state dir <repo>/.cfcml-state (pid, log, mlflow.env).
# A --host other than 127.0.0.1/localhost is refused unless --allow-remote is given, which
# turns on MLflow's basic-auth app (user admin, password generated into
# <state>/mlflow_admin_password, mode 0600; mlflow.env reads it from there).
# Environment (flags win): CFCML_STATE_DIR, CFCML_MLFLOW_HOST, CFCML_MLFLOW_PORT,
# MLFLOW_BACKEND_STORE_URI (or MLFLOW_BACKEND_URI; e.g. postgresql://user:pw@db:5432/mlflow,
# needs psycopg2) -- the backend URI reaches the server through its environment only, never
# a command line (visible in ps) or the log; prefer the variable to --backend-uri when it
# holds a password. MLFLOW_ARTIFACTS_DESTINATION (e.g. s3://bucket/mlflow; proxied, so only
# the server needs AWS credentials), MLFLOW_S3_ENDPOINT_URL / AWS_* (passed through to the
# server), MLFLOW_WORKERS, CFCML_SERVICE_TIMEOUT (readiness wait, s; default 180),
# CFCML_PYTHON (default <repo>/.venv/bin/python).
# Stop it with mlflow/stop.sh (kills the recorded process group).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${CFCML_PYTHON:-$ROOT/.venv/bin/python}"
STATE="${CFCML_STATE_DIR:-$ROOT/.cfcml-state}"
HOST="${CFCML_MLFLOW_HOST:-127.0.0.1}"
PORT="${CFCML_MLFLOW_PORT:-5000}"
BACKEND="${MLFLOW_BACKEND_STORE_URI:-${MLFLOW_BACKEND_URI:-}}"
ARTIFACTS="${MLFLOW_ARTIFACTS_DESTINATION:-}"
WORKERS="${MLFLOW_WORKERS:-1}"
TIMEOUT="${CFCML_SERVICE_TIMEOUT:-180}"
REMOTE=()

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}"; }

while [[ $# -gt 0 ]]; do
  case "$1" in
    --host) HOST="$2"; shift 2 ;;
    --port) PORT="$2"; shift 2 ;;
    --backend-uri) BACKEND="$2"; shift 2 ;;
    --artifacts-destination) ARTIFACTS="$2"; shift 2 ;;
    --allow-remote) REMOTE+=(--allow-remote); shift ;;
    --allowed-hosts) REMOTE+=(--allowed-hosts "$2"); shift 2 ;;
    --workers) WORKERS="$2"; shift 2 ;;
    --state-dir) STATE="$2"; shift 2 ;;
    --timeout) TIMEOUT="$2"; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "mlflow/start.sh: unknown argument: $1" >&2; usage >&2; exit 2 ;;
  esac
done

if ! "$PY" -c 'import cfcml.platform.services' 2>/dev/null; then
  echo "mlflow/start.sh: $PY cannot import cfcml (run 'make setup' or set CFCML_PYTHON)" >&2
  exit 1
fi

export MLFLOW_DISABLE_TELEMETRY=true
# URIs travel in the environment: the exec'd command line below shows no credential
unset MLFLOW_BACKEND_STORE_URI MLFLOW_ARTIFACTS_DESTINATION
[[ -n "$BACKEND" ]] && export MLFLOW_BACKEND_STORE_URI="$BACKEND"
[[ -n "$ARTIFACTS" ]] && export MLFLOW_ARTIFACTS_DESTINATION="$ARTIFACTS"
args=(--host "$HOST" --port "$PORT" --workers "$WORKERS" --timeout "$TIMEOUT" "${REMOTE[@]}")
exec "$PY" -m cfcml.platform.services --state-dir "$STATE" start mlflow "${args[@]}"
