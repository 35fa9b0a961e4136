"""Per-modality loss breakdown of a training checkpoint on a split (one process).

    python launch/evaluate.py OUT_DIR_OR_TAG --split SPLIT_DIR_OR_URL [--json]
"""
import sys

from higgs_ds.train.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
