#!/usr/bin/env bash
# The upstream reference (boson-multimodal 0.1.1 pins transformers<4.47): a separate venv, never the project's.
# Used only to regenerate goldens (reference/make_*_goldens.py), by reference/check_boson_export.py's upstream step
# and by benchmarks/bench_data.py. Works from any folder; rerunning it reuses the venv.
set -euo pipefail
if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then
    cat <<'USAGE'
usage: reference/setup_ref_venv.sh   create or update .venv-ref in the repository root: upstream boson-multimodal
       0.1.1 with torch 2.13.0 and transformers 4.46.3 (a multi-GB download), for the reference/ scripts and
       benchmarks/bench_data.py's upstream rows; never the project's .venv (./setup.sh builds that)
USAGE
    exit 0
fi
if [[ $# -gt 0 ]]; then
    echo "reference/setup_ref_venv.sh: takes no arguments (--help says what it does)" >&2
    exit 2
fi
cd "$(dirname "$(readlink -f "$0")")/.."
python3 -m venv .venv-ref
.venv-ref/bin/pip install -q torch==2.13.0 transformers==4.46.3 "huggingface-hub<1.0" "tokenizers<0.21" \
    pandas dacite loguru pydantic librosa einops
.venv-ref/bin/pip install -q --no-deps boson-multimodal==0.1.1
