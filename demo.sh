#!/usr/bin/env bash
# The demo: generated data with a known loss floor, a 2-rank CPU DeepSpeed run, evaluation, export (--help says more).
# Works from any folder. Runs ./setup.sh first every time (quick when .venv is up to date; it repairs an interrupted
# setup), except for --help with a venv in place; HIGGS_DS_VENV=DIR runs another venv's Python instead, no setup.
set -euo pipefail
ROOT="$(cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")" && pwd)"
VENV="${HIGGS_DS_VENV:-$ROOT/.venv}"
if [[ -z "${HIGGS_DS_VENV:-}" ]] && ! [[ ( "${1:-}" == "-h" || "${1:-}" == "--help" ) && -x "$VENV/bin/python" ]]; then
    "$ROOT/setup.sh"
fi
exec env PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" "$VENV/bin/python" "$ROOT/examples/demo/demo.py" "$@"
