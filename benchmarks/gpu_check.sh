#!/usr/bin/env bash
# One-shot GPU check (see benchmarks/gpu_check.py): one line per check, PASS|FAIL|SKIP name: detail;
# exit 1 on any FAIL. Works from a repository checkout without installing cfcml and without a
# network: nothing is installed or downloaded. Expected 3-6 minutes on one H100; stopped after 9.
#
#   benchmarks/gpu_check.sh [--device cuda:0] [--budget-s 90]        (PYTHON=... to pick the interpreter)
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
if [[ -n "${PYTHON:-}" ]]; then
  py=$PYTHON
elif [[ -x .venv/bin/python ]]; then
  py=.venv/bin/python
else
  py=$(command -v python3 || command -v python)
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the checkout's cfcml, installed or not
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 MLFLOW_DISABLE_TELEMETRY=true RAY_USAGE_STATS_ENABLED=0
export PIP_NO_INDEX=1  # should anything try to install, it fails at once instead of waiting for a network
if command -v timeout >/dev/null; then
  exec timeout --kill-after=10 "${GPU_CHECK_TIMEOUT_S:-540}" "$py" benchmarks/gpu_check.py "$@"
fi
exec "$py" benchmarks/gpu_check.py "$@"
