"""Export a training checkpoint to consolidated safetensors in the transformers and/or boson layout.

    python launch/export.py OUT_DIR_OR_TAG --out EXPORT_DIR [--layout both|port|boson]
"""
import sys

from higgs_ds.train.export import main

if __name__ == "__main__":
    sys.exit(main())
