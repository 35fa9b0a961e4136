"""Export a training checkpoint to consolidated safetensors in the transformers and/or boson layout (a LoRA run:
merged, or its PEFT adapter), or rewrite a model directory (e.g. the boson release) in the other layout.

    python launch/export.py OUT_DIR_OR_TAG --out EXPORT_DIR [--layout both|port|boson|peft|all]
    python launch/export.py MODEL_DIR --out PORT_DIR --layout port [--tokenizer TOKENIZER_DIR]
"""
import sys

from higgs_ds.train.export import main

if __name__ == "__main__":
    sys.exit(main())
