#!/usr/bin/env bash
# Creates .venv with everything higgs-ds needs (CPU torch 2.13.0 pinned; see requirements.txt) and installs the
# project into it (editable). Idempotent: rerunning it reuses the venv.
set -euo pipefail
if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then
    echo "usage: ./setup.sh   create or update .venv (CPU torch 2.13.0, requirements.txt, the project editable)"
    exit 0
fi
cd "$(dirname "$(readlink -f "$0")")"
python3 -m venv .venv
.venv/bin/pip install -q -r requirements.txt
# The project itself, editable: `import higgs_ds` and the console commands (higgs-build-shards, higgs-shards) work
# from any folder. No build isolation: setuptools is already in the venv, nothing more to fetch.
.venv/bin/pip install -q --no-deps --no-build-isolation -e .
# transformers' Higgs codec (HiggsAudioV2TokenizerModel) imports torchaudio, and uses only its pure-torch
# resampler. No torchaudio release is built for torch 2.13 and the newest one's compiled ops fail to load beside it,
# so where `import torchaudio` fails we keep its Python package without those libraries (their ops stay
# unavailable and fail loudly if called). A machine with a matching torch/torchaudio pair keeps both intact.
if ! .venv/bin/python -c "import torchaudio" 2>/dev/null; then
    .venv/bin/pip install -q --no-deps torchaudio==2.11.0
    if ! .venv/bin/python -c "import torchaudio" 2>/dev/null; then
        rm -f .venv/lib/python3*/site-packages/torchaudio/lib/*.so
    fi
    .venv/bin/python -c "import torch, torchaudio.functional as F; F.resample(torch.zeros(1, 160), 16000, 24000)"
fi
