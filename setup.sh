#!/usr/bin/env bash
# Creates .venv with everything higgs-ds needs (torch 2.13.0 pinned; see requirements.txt) and installs the project
# into it (editable). Idempotent, from any folder. After a complete setup it writes .venv/.higgs-ds-setup, a hash of
# requirements.txt, pyproject.toml and this script; when that matches and the venv imports this checkout's higgs_ds
# with torch and deepspeed, it only says so. An interrupted setup leaves no stamp, so the next run repairs it.
set -euo pipefail
if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then
    echo "usage: ./setup.sh   create, update or repair .venv (torch 2.13.0, requirements.txt, the project editable);"
    echo "       quick when nothing changed since the last complete setup (stamp: .venv/.higgs-ds-setup)"
    exit 0
fi
cd "$(dirname "$(readlink -f "$0")")"
STAMP=.venv/.higgs-ds-setup
WANTED="$(cat requirements.txt pyproject.toml setup.sh | sha256sum | cut -d' ' -f1)"
# -I: neither the current folder nor PYTHONPATH may stand in for the venv's own install of this checkout.
CHECK='import os, sys, higgs_ds, torch, deepspeed
sys.exit(not os.path.realpath(higgs_ds.__file__).startswith(os.path.realpath(sys.argv[1]) + os.sep))'
if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$WANTED" ]] && .venv/bin/python -I -c "$CHECK" "$PWD" >/dev/null 2>&1
then
    echo "setup.sh: environment up to date ($PWD/.venv)"
    exit 0
fi
rm -f "$STAMP"
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
# DeepSpeed compiles its CPU communication op on first use. `import higgs_ds` points TORCH_EXTENSIONS_DIR into this
# venv (the default ~/.cache/torch_extensions is shared by every venv: two checkouts would rebuild it in turn at
# every launch); build it here once, so that no launch waits for the compiler.
echo "setup.sh: building DeepSpeed's CPU communication op into .venv/torch_extensions (once, up to 2 minutes)"
.venv/bin/python -c 'import higgs_ds, deepspeed
from deepspeed.accelerator import get_accelerator
builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
if builder is not None and deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
    builder.load(verbose=False)' >/dev/null
if ! problem="$(.venv/bin/python -I -c "$CHECK" "$PWD" 2>&1)"; then  # what the quick path checks must hold now
    echo "$problem" >&2
    echo "setup.sh: .venv does not import this checkout's higgs_ds with torch and deepspeed" >&2
    exit 1
fi
echo "$WANTED" > "$STAMP"
echo "setup.sh: .venv ready ($PWD/.venv)"
