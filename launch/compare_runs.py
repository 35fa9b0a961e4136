"""Compare runs' loss curves from their TensorBoard event files.

    python launch/compare_runs.py RUN_A RUN_B [...] [--plots DIR] [--assert --rtol 1e-4] [--expected FILE]
"""
import sys

from higgs_ds.hooks.compare import main

if __name__ == "__main__":
    sys.exit(main())
