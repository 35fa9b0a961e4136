"""demo.sh's program (examples/demo/demo.py) with its training launched through the tests' fault entry point,
tests/launch_with_faults.py (the faults: HIGGS_DS_FAULTS); evaluation and export run as in the demo.

    python tests/demo_with_faults.py [demo.sh arguments]"""
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples" / "demo"))

import demo  # noqa: E402

if __name__ == "__main__":
    demo.TRAIN = ROOT / "tests" / "launch_with_faults.py"
    sys.exit(demo.main())
