#!/usr/bin/env bash
# The test suite on a fresh machine: sets up .venv if needed (./setup.sh, idempotent), then runs every test.
# Works from any folder; extra arguments go to pytest (e.g. ./test.sh -m "not slow", ./test.sh -k lora).
set -euo pipefail
cd "$(dirname "$(readlink -f "$0")")"
if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then
    echo "usage: ./test.sh [pytest arguments]   set up .venv if needed, then run the tests (what .ci/run does)"
    exit 0
fi
./setup.sh
exec .venv/bin/python -m pytest -q tests "$@"
