"""A training checkpoint → consolidated safetensors in the transformers layout and/or the boson layout, each with
its config.json and the run's tokenizer files (a LoRA run: adapters merged into the pretrained weights, or
the adapter alone in PEFT's format), loadable by `HiggsAudioV2ForConditionalGeneration.from_pretrained`
(port) and upstream boson-multimodal / `higgs_ds.model.load_model` (both).

DeepSpeed's zero_to_fp32 in lazy mode memory-maps the fp32 partitions; each output shard is gathered only while it
is written (higgs_ds.model.save_checkpoint), so the export never holds the whole model."""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from ..model import read_model_config, save_checkpoint
from ..model.checkpoint import expected_shapes
from . import checkpointing
from .config import LoraSection
from .lora import ADAPTER, alpha_of, merged_state, save_peft_adapter

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "chat_template.jinja")


def export(checkpoint: Path, out: Path, layouts: list[str], max_shard_bytes: int = 5 * 2**30) -> list[Path]:
    from transformers import AutoTokenizer

    run = checkpointing.run_config(checkpoint)
    tokenizer_dir = Path(run["model"]["tokenizer"])
    model_config = read_model_config(run["model"]["pretrained"] or run["model"]["config"],
                                     AutoTokenizer.from_pretrained(str(tokenizer_dir)))
    state = checkpointing.consolidated_state(checkpoint)
    lora = LoraSection(**run["lora"]) if run.get("lora", {}).get("rank") else None
    if lora is not None:  # the checkpoint holds the adapters and the parameters trained in full only
        expected = expected_shapes(model_config)
        trained = {k: v for k, v in state.items() if ADAPTER in k or k in expected}
        merged = merged_state(run["model"]["pretrained"], trained, alpha_of(lora) / lora.rank)
    elif "peft" in layouts:
        raise ValueError(f"{checkpoint}: --layout peft exports LoRA adapters, and this run trained without LoRA "
                         "(lora.rank=0)")
    written = []
    for layout in layouts:
        target = out / layout if len(layouts) > 1 else out
        if target.exists() and any(target.iterdir()):
            raise SystemExit(f"{target}: exists and is not empty")
        if layout == "peft":
            save_peft_adapter(trained, target, lora, base_model=run["model"]["pretrained"])
        else:
            save_checkpoint(merged if lora is not None else state, model_config, target, layout=layout,
                            max_shard_bytes=max_shard_bytes)
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
    parser.add_argument("--layout", choices=("port", "boson", "both", "peft", "all"), default="both",
                        help="port = transformers' HiggsAudioV2ForConditionalGeneration; boson = upstream's (a LoRA "
                             "run's adapters merged into full weights); peft = a LoRA run's adapter alone in PEFT's "
                             "format, for PeftModel.from_pretrained on the port; all = port, boson and peft")
    parser.add_argument("--max-shard-bytes", type=int, default=5 * 2**30)
    args = parser.parse_args(argv)
    layouts = {"both": ["port", "boson"], "all": ["port", "boson", "peft"]}.get(args.layout, [args.layout])
    try:
        for path in export(checkpointing.resolve(args.checkpoint), args.out, layouts, args.max_shard_bytes):
            print(f"wrote {path}")
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
