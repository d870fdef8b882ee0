#!/usr/bin/env bash
# Stop the local Ray head started by cluster/start_local.sh: SIGTERM to the recorded
# `ray start --block` process, then its process group, then SIGKILL; also ends job drivers
# of this cluster (found by the marker in their environment). Never touches other Ray
# clusters.   cluster/stop_local.sh [--state-dir DIR]
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${CFCML_PYTHON:-$ROOT/.venv/bin/python}"
STATE="${CFCML_STATE_DIR:-$ROOT/.cfcml-state}"

while [[ $# -gt 0 ]]; do
  case "$1" in
    --state-dir) STATE="$2"; shift 2 ;;
    -h|--help) sed -n '2,5p' "${BASH_SOURCE[0]}"; exit 0 ;;
    *) echo "cluster/stop_local.sh: unknown argument: $1" >&2; exit 2 ;;
  esac
done

exec "$PY" -m cfcml.platform.services --state-dir "$STATE" stop ray
