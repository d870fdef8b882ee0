#!/usr/bin/env bash
# Start a local Ray head in the background; returns once the dashboard answers.
#
#   cluster/start_local.sh [--port P] [--dashboard-port D] [--num-cpus N] [--num-gpus G]
#                          [--auth-mode token|disabled] [--node-ip-address IP]
#                          [--state-dir DIR] [--timeout S]
#
# Defaults: GCS port 6379, dashboard + Jobs API on http://127.0.0.1:8265, --num-cpus $(nproc),
# --temp-dir <state>/ray-tmp, usage stats off, RAY_AUTH_MODE=token with a per-checkout token
# in <state>/ray_auth_token (0600), --node-ip-address 127.0.0.1: a single-node cluster whose
# every port (GCS, raylet, agents, client server, dashboard) listens on loopback only.
# Another --node-ip-address lets worker nodes join (the dashboard stays on 127.0.0.1); it is
# refused with --auth-mode disabled (an open cluster runs anyone's code).
# The client settings go to <state>/ray.env:
#   source .cfcml-state/ray.env && ray job submit --runtime-env cluster/runtime_env.yaml -- python jobs/tune_men.py
# Environment (flags win): CFCML_STATE_DIR, CFCML_RAY_PORT, CFCML_RAY_DASHBOARD_PORT,
# CFCML_RAY_NUM_CPUS, CFCML_RAY_NUM_GPUS, RAY_AUTH_MODE (token|disabled; default token),
# CFCML_RAY_NODE_IP (default 127.0.0.1),
# CFCML_SERVICE_TIMEOUT (readiness wait, s; default 180), CFCML_PYTHON.
# Stop it with cluster/stop_local.sh (kills the recorded process group).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${CFCML_PYTHON:-$ROOT/.venv/bin/python}"
STATE="${CFCML_STATE_DIR:-$ROOT/.cfcml-state}"
PORT="${CFCML_RAY_PORT:-6379}"
DASHBOARD_PORT="${CFCML_RAY_DASHBOARD_PORT:-8265}"
NUM_CPUS="${CFCML_RAY_NUM_CPUS:-$(nproc)}"
NUM_GPUS="${CFCML_RAY_NUM_GPUS:-}"
AUTH_MODE="${RAY_AUTH_MODE:-token}"
NODE_IP="${CFCML_RAY_NODE_IP:-127.0.0.1}"
TIMEOUT="${CFCML_SERVICE_TIMEOUT:-180}"

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}"; }

while [[ $# -gt 0 ]]; do
  case "$1" in
    --port) PORT="$2"; shift 2 ;;
    --dashboard-port) DASHBOARD_PORT="$2"; shift 2 ;;
    --num-cpus) NUM_CPUS="$2"; shift 2 ;;
    --num-gpus) NUM_GPUS="$2"; shift 2 ;;
    --auth-mode) AUTH_MODE="$2"; shift 2 ;;
    --node-ip-address) NODE_IP="$2"; shift 2 ;;
    --state-dir) STATE="$2"; shift 2 ;;
    --timeout) TIMEOUT="$2"; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "cluster/start_local.sh: unknown argument: $1" >&2; usage >&2; exit 2 ;;
  esac
done

if ! "$PY" -c 'import cfcml.platform.services' 2>/dev/null; then
  echo "cluster/start_local.sh: $PY cannot import cfcml (run 'make setup' or set CFCML_PYTHON)" >&2
  exit 1
fi

export RAY_USAGE_STATS_ENABLED=0
args=(--port "$PORT" --dashboard-port "$DASHBOARD_PORT" --num-cpus "$NUM_CPUS"
      --auth-mode "$AUTH_MODE" --node-ip-address "$NODE_IP" --timeout "$TIMEOUT")
[[ -n "$NUM_GPUS" ]] && args+=(--num-gpus "$NUM_GPUS")
exec "$PY" -m cfcml.platform.services --state-dir "$STATE" start ray "${args[@]}"
