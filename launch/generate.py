"""Generate the assistant turn of each prompt with a training run, a checkpoint or an export: codes, WAVs, text.

    python launch/generate.py OUT_DIR_OR_TAG_OR_EXPORT --prompts prompts.jsonl --out DIR [--codec CODEC_DIR]
"""
import sys

from higgs_ds.generate.cli import main

if __name__ == "__main__":
    sys.exit(main())
