"""higgs-ds: training stack for Higgs Audio v2 (shards → stream → collate → model+loss → engine → hooks)."""
import os as _os
import sys as _sys

# DeepSpeed compiles its CPU communication op on first use into TORCH_EXTENSIONS_DIR (default ~/.cache/
# torch_extensions, shared by every venv: two checkouts would rebuild it alternately, 20-90 s per launch). Inside a
# venv the build is the venv's own; setup.sh builds it once.
if _sys.prefix != _sys.base_prefix:
    _os.environ.setdefault("TORCH_EXTENSIONS_DIR", _os.path.join(_sys.prefix, "torch_extensions"))
