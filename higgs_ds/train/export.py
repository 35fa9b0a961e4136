"""A training checkpoint → consolidated safetensors in the transformers layout and/or the boson layout, each with
its config.json and the run's tokenizer files, loadable by `HiggsAudioV2ForConditionalGeneration.from_pretrained`
(port) and upstream boson-multimodal / `higgs_ds.model.load_model` (both).

DeepSpeed's zero_to_fp32 in lazy mode memory-maps the fp32 partitions; each output shard is gathered only while it
is written (higgs_ds.model.save_checkpoint), so the export never holds the whole model."""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from ..model import read_model_config, save_checkpoint
from . import checkpointing

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "chat_template.jinja")


def export(checkpoint: Path, out: Path, layouts: list[str], max_shard_bytes: int = 5 * 2**30) -> list[Path]:
    from transformers import AutoTokenizer

    run = checkpointing.run_config(checkpoint)
    tokenizer_dir = Path(run["model"]["tokenizer"])
    model_config = read_model_config(run["model"]["pretrained"] or run["model"]["config"],
                                     AutoTokenizer.from_pretrained(str(tokenizer_dir)))
    state = checkpointing.consolidated_state(checkpoint)
    written = []
    for layout in layouts:
        target = out / layout if len(layouts) > 1 else out
        if target.exists() and any(target.iterdir()):
            raise SystemExit(f"{target}: exists and is not empty")
        save_checkpoint(state, model_config, target, layout=layout, max_shard_bytes=max_shard_bytes)
        for name in TOKENIZER_FILES:
            if (tokenizer_dir / name).exists():
                shutil.copy2(tokenizer_dir / name, target / name)
        written.append(target)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="launch/export.py", description="Export a higgs-ds training checkpoint "
                                     "to consolidated safetensors (transformers and/or boson layout).")
    parser.add_argument("checkpoint", type=Path, help="checkpoint tag directory, or a run's out_dir")
    parser.add_argument("--out", type=Path, required=True, help="output directory (one subfolder per layout)")
    parser.add_argument("--layout", choices=("port", "boson", "both"), default="both",
                        help="port = transformers' HiggsAudioV2ForConditionalGeneration; boson = upstream's")
    parser.add_argument("--max-shard-bytes", type=int, default=5 * 2**30)
    args = parser.parse_args(argv)
    layouts = ["port", "boson"] if args.layout == "both" else [args.layout]
    try:
        for path in export(checkpointing.resolve(args.checkpoint), args.out, layouts, args.max_shard_bytes):
            print(f"wrote {path}")
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
