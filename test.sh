#!/usr/bin/env bash
# The test suite on a fresh machine: runs ./setup.sh (builds or repairs .venv; quick when it is up to date), then
# every test. Works from any folder; extra arguments go to pytest (e.g. ./test.sh -m "not slow", ./test.sh -k lora).
set -euo pipefail
cd "$(dirname "$(readlink -f "$0")")"
if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then
    echo "usage: ./test.sh [pytest arguments]   run ./setup.sh (quick when .venv is up to date), then the tests (what"
    echo "       .ci/run does); about 12 minutes on 2 CPU cores; -m \"not slow\" skips the multi-process tests"
    exit 0
fi
./setup.sh
exec .venv/bin/python -m pytest -q tests "$@"
