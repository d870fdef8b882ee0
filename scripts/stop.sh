#!/usr/bin/env bash
# `make stop`: stop what `make run` started (Ray head, MLflow server), by recorded process id.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
export CFCML_PYTHON="${CFCML_PYTHON:-$ROOT/.venv/bin/python}"
export CFCML_STATE_DIR="${CFCML_STATE_DIR:-$ROOT/.cfcml-state}"
if [[ ! -x "$CFCML_PYTHON" ]]; then
  echo "make stop: $CFCML_PYTHON not found; nothing started by make run can be running" >&2
  exit 0
fi
rc=0
bash cluster/stop_local.sh || rc=1
bash mlflow/stop.sh || rc=1
exit $rc
