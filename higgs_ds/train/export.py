"""A training checkpoint → consolidated safetensors in the transformers layout and/or the boson layout, each with
its config.json and the run's tokenizer files (a LoRA run: adapters merged into the pretrained weights, or
the adapter alone in PEFT's format), loadable by `HiggsAudioV2ForConditionalGeneration.from_pretrained`
(port) and upstream boson-multimodal / `higgs_ds.model.load_model` (both).

A model directory (config.json + safetensors of either layout, e.g. the boson release) is rewritten in the other
layout the same way, each tensor in its stored dtype: the port-layout base a PEFT adapter loads onto.

DeepSpeed's zero_to_fp32 in lazy mode memory-maps the fp32 partitions; each output shard is gathered only while it
is written (higgs_ds.model.save_checkpoint), so the export never holds the whole model."""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from ..model import read_model_config, save_checkpoint
from ..model.checkpoint import check_state_dict, expected_shapes, weight_files
from ..vocabulary import load_vocabulary
from . import checkpointing
from .config import RunConfig
from .lora import ADAPTER, Lazy, alpha_of, merged_state, save_peft_adapter

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "chat_template.jinja")


def export(checkpoint: Path, out: Path, layouts: list[str], max_shard_bytes: int = 5 * 2**30) -> list[Path]:
    run = RunConfig.from_saved(checkpointing.run_dir(checkpoint))
    m = run.model
    tokenizer_dir = Path(m.tokenizer)
    model_config = load_vocabulary(m.tokenizer, m.pretrained or m.config, "model.tokenizer",
                                   "model.pretrained" if m.pretrained else "model.config").model_config
    state, trained = checkpoint_weights(checkpoint, run, model_config)
    lora = run.lora if run.lora.rank else None
    if lora is None and "peft" in layouts:
        raise ValueError(f"{checkpoint}: --layout peft exports LoRA adapters, and this run trained without LoRA "
                         "(lora.rank=0)")

    def peft(target: Path) -> None:
        save_peft_adapter(trained, target, lora, base_model=peft_base(Path(m.pretrained), target, tokenizer_dir))

    return write(state, model_config, out, layouts, tokenizer_dir, max_shard_bytes, peft)


def checkpoint_weights(checkpoint: Path, run: RunConfig, model_config) -> tuple[dict, dict | None]:
    """A checkpoint's full port-layout weights, lazily gathered from the ZeRO shards, and a LoRA run's trained
    tensors (None for a full run): its checkpoint holds the adapters and the parameters trained in full only, so
    the weights are the adapters merged into model.pretrained."""
    state = checkpointing.consolidated_state(checkpoint)
    if not run.lora.rank:
        return state, None
    expected = expected_shapes(model_config)
    trained = {k: v for k, v in state.items() if ADAPTER in k or k in expected}
    return merged_state(run.model.pretrained, trained, alpha_of(run.lora) / run.lora.rank), trained


def peft_base(pretrained: Path, adapter_dir: Path, tokenizer_dir: Path) -> str:
    """The base an adapter names (base_model_name_or_path): transformers loads only the port layout, so a
    port-layout `model.pretrained` is named as it is, and a boson-layout one (the release) is converted into
    ADAPTER/base first (in its stored dtype, with the tokenizer) and that is named. Absolute paths: PEFT reads
    them from any folder."""
    if read_model_config(pretrained).layout == "port":
        return str(pretrained.resolve())
    base = adapter_dir / "base"
    convert(pretrained, base, ["port"], tokenizer_dir)
    print(f"wrote {base} (the adapter's base: model.pretrained {pretrained} converted to the port layout)")
    return str(base.resolve())


def convert(model_dir: Path, out: Path, layouts: list[str], tokenizer_dir: Path,
            max_shard_bytes: int = 5 * 2**30) -> list[Path]:
    """A model directory of either layout rewritten in `layouts`, tensor by tensor, each in its stored dtype."""
    from .weights import read_tensor, weight_plan

    if "peft" in layouts:
        raise ValueError(f"{model_dir}: a model directory has no LoRA adapter to export (--layout peft)")
    if not any((tokenizer_dir / name).exists() for name in TOKENIZER_FILES[:2]):
        raise ValueError(f"{tokenizer_dir}: no tokenizer here (tokenizer.json / tokenizer_config.json); the token ids "
                         "of the config come from it: pass --tokenizer DIR")
    model_config = load_vocabulary(tokenizer_dir, model_dir, "--tokenizer", "MODEL_DIR").model_config
    plan = weight_plan(model_dir)
    if not_float := [name for name, planned in plan.items() if planned.dtype is None]:
        raise ValueError(f"{model_dir}: {not_float[:3]} are not stored as floating-point weights")
    state = {name: Lazy(lambda sources=sources: read_tensor(sources), shape, dtype)
             for name, (sources, shape, dtype) in plan.items()}
    check_state_dict(state, expected_shapes(model_config), str(model_dir))
    return write(state, model_config, out, layouts, tokenizer_dir, max_shard_bytes)


def write(state: dict, model_config, out: Path, layouts: list[str], tokenizer_dir: Path, max_shard_bytes: int,
          peft=None) -> list[Path]:
    """Each layout into its own folder (the folder itself for one layout), with the tokenizer files."""
    written = []
    for layout in layouts:
        target = out / layout if len(layouts) > 1 else out
        if target.exists() and any(target.iterdir()):
            raise ValueError(f"--out {target}: exists and is not empty")
        if layout == "peft":
            peft(target)
        else:
            save_checkpoint(state, model_config, target, layout=layout, max_shard_bytes=max_shard_bytes)
        for name in TOKENIZER_FILES:
            if (tokenizer_dir / name).exists():
                shutil.copy2(tokenizer_dir / name, target / name)
        written.append(target)
    return written


def is_model_dir(path: Path) -> bool:
    """config.json and weights, and no training checkpoint: a pretrained or exported model."""
    if any((path / name).exists() for name in (checkpointing.COMPLETE, "checkpoints")):
        return False
    if not (path / "config.json").is_file():
        return False
    try:
        return bool(weight_files(path))
    except (OSError, ValueError):
        return False


def parser() -> argparse.ArgumentParser:
    from ..cli import HelpFormatter

    parser = argparse.ArgumentParser(prog="launch/export.py", formatter_class=HelpFormatter, description=(
        "Export a higgs-ds training checkpoint to consolidated safetensors (transformers and/or boson layout, or a "
        "LoRA run's PEFT adapter); or rewrite a model directory (e.g. the boson release) in the other layout."))
    parser.add_argument("checkpoint", type=Path, help="checkpoint tag directory, a run's out_dir, or a model "
                                                      "directory (config.json + safetensors) to convert")
    parser.add_argument("--out", type=Path, required=True,
                        help="output directory (with several layouts: one subfolder per layout)")
    parser.add_argument("--layout", choices=("port", "boson", "both", "peft", "all"), default="both",
                        help="port = transformers' HiggsAudioV2ForConditionalGeneration; boson = upstream's (a LoRA "
                             "run's adapters merged into full weights); peft = a LoRA run's adapter alone in PEFT's "
                             "format, for PeftModel.from_pretrained on the port (its base_model_name_or_path: "
                             "model.pretrained, or a boson-layout one converted to PEFT_DIR/base); all = port, boson "
                             "and peft")
    parser.add_argument("--tokenizer", type=Path, help="converting a model directory: its tokenizer (default: the "
                                                       "tokenizer files in that directory)")
    parser.add_argument("--max-shard-bytes", type=int, default=5 * 2**30, help="largest safetensors file written")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    layouts = {"both": ["port", "boson"], "all": ["port", "boson", "peft"]}.get(args.layout, [args.layout])
    try:
        if is_model_dir(args.checkpoint):
            written = convert(args.checkpoint, args.out, layouts, args.tokenizer or args.checkpoint,
                              args.max_shard_bytes)
        else:
            written = export(checkpointing.resolve(args.checkpoint), args.out, layouts, args.max_shard_bytes)
    except (ValueError, OSError) as exc:  # RunConfigError and VocabularyError are ValueErrors
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for path in written:
        print(f"wrote {path}")
    return 0
