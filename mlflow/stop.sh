#!/usr/bin/env bash
# Stop the MLflow server started by mlflow/start.sh: kills its recorded process group
# (SIGTERM, then SIGKILL) by process id.   mlflow/stop.sh [--state-dir DIR]
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${CFCML_PYTHON:-$ROOT/.venv/bin/python}"
STATE="${CFCML_STATE_DIR:-$ROOT/.cfcml-state}"

while [[ $# -gt 0 ]]; do
  case "$1" in
    --state-dir) STATE="$2"; shift 2 ;;
    -h|--help) sed -n '2,3p' "${BASH_SOURCE[0]}"; exit 0 ;;
    *) echo "mlflow/stop.sh: unknown argument: $1" >&2; exit 2 ;;
  esac
done

exec "$PY" -m cfcml.platform.services --state-dir "$STATE" stop mlflow
