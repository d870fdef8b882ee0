#!/usr/bin/env bash
# `make stop`: stop what `make run` started (Ray head, MLflow server), by recorded process id:
# `cfcml dev stop` with the interpreter of $CFCML_PYTHON (default .venv/bin/python).
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
export CFCML_PYTHON="${CFCML_PYTHON:-$ROOT/.venv/bin/python}"
export CFCML_STATE_DIR="${CFCML_STATE_DIR:-$ROOT/.cfcml-state}"
if [[ ! -x "$CFCML_PYTHON" ]]; then
  echo "make stop: $CFCML_PYTHON not found; nothing started by make run can be running" >&2
  exit 0
fi
exec "$CFCML_PYTHON" -m cfcml.cli dev stop  # `cfcml dev stop`: the Ray head, then MLflow (and an S3 if started)
