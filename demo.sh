#!/usr/bin/env bash
# The demo: generated data with a known loss floor, a 2-rank CPU DeepSpeed run, evaluation, export (--help says more).
# Works from any folder; sets up .venv on first use (HIGGS_DS_VENV=DIR runs another venv's Python instead).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="${HIGGS_DS_VENV:-$ROOT/.venv}"
[ -x "$VENV/bin/python" ] || [ -n "${HIGGS_DS_VENV:-}" ] || "$ROOT/setup.sh"
exec env PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" "$VENV/bin/python" "$ROOT/examples/demo/demo.py" "$@"
