#!/usr/bin/env bash
# The upstream reference (boson-multimodal 0.1.1 pins transformers<4.47): a separate venv, never the project's.
# Used only to regenerate goldens (reference/make_*_goldens.py) and by benchmarks/bench_data.py.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv-ref
.venv-ref/bin/pip install -q torch==2.13.0 transformers==4.46.3 "huggingface-hub<1.0" "tokenizers<0.21" \
    pandas dacite loguru pydantic librosa einops
.venv-ref/bin/pip install -q --no-deps boson-multimodal==0.1.1
