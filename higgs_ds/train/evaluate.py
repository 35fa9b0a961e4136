"""The per-modality loss breakdown of a training checkpoint on a split, in one process: total, text, audio and each
codebook (means over the split's learnable tokens, the objective's own reduction), with the token counts."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from ..data.stream import ShardLoader
from ..model import HiggsAudioForTraining, LossConfig
from ..model.checkpoint import check_state_dict
from ..model.losses import LossSums
from ..vocabulary import Vocabulary, load_vocabulary
from . import checkpointing
from .config import RunConfig
from .export import checkpoint_weights
from .loaders import make_collator


def load_checkpoint(checkpoint: Path) -> tuple[HiggsAudioForTraining, Vocabulary, RunConfig]:
    """A training checkpoint tag as a plain fp32 model in eval mode (the export's weights: a LoRA run's adapters
    merged in, no PEFT layers), with its run's vocabulary and config. Evaluation and generation load it here."""
    run = RunConfig.from_saved(checkpointing.run_dir(checkpoint))
    m = run.model
    vocabulary = load_vocabulary(m.tokenizer, m.pretrained or m.config, "model.tokenizer",
                                 "model.pretrained" if m.pretrained else "model.config")
    model = HiggsAudioForTraining(vocabulary.model_config, LossConfig(m.text_weight, m.audio_weight,
                                                                      m.audio_reduction),
                                  attn_implementation=m.attn_implementation, head_impl=m.head_impl)
    params = dict(model.named_parameters())
    state, _ = checkpoint_weights(checkpoint, run, vocabulary.model_config)
    check_state_dict(state, {n: tuple(p.shape) for n, p in params.items()}, str(checkpoint))
    with torch.no_grad():
        for name, tensor in state.items():
            params[name].copy_(tensor.contiguous())  # one tensor gathered (or merged) at a time
    return model.eval(), vocabulary, run


def evaluate(checkpoint: Path, split: str, max_tokens: int | None = None) -> dict[str, float]:
    model, vocabulary, run = load_checkpoint(checkpoint)
    model_config, d = vocabulary.model_config, run.data
    budget = max_tokens or d.max_tokens
    loader = ShardLoader(split, make_collator(run, vocabulary.tokens, model_config.audio), rank=0, world_size=1,
                         max_tokens=budget, batch_size=None if budget else d.batch_size, shuffle=False, num_epochs=1,
                         fingerprint=vocabulary.fingerprint())
    sums = LossSums.zeros(model_config.audio.num_codebooks)
    with torch.no_grad():
        for batch in loader:
            sums = sums + model(**batch.model_inputs()).sums()
    result = sums.means(model.loss_config)
    result.update({"tokens/text_learnable": int(sums.text_count),
                   "tokens/audio_learnable": int(sums.audio_counts.sum()),
                   **{key: value for key, value in loader.stats().items() if key.endswith("samples")}})
    return result


def parser() -> argparse.ArgumentParser:
    from ..cli import HelpFormatter

    parser = argparse.ArgumentParser(prog="launch/evaluate.py", formatter_class=HelpFormatter, description=(
        "Print the per-modality loss breakdown (total, text, audio, each codebook) of a higgs-ds checkpoint on a "
        "split."))
    parser.add_argument("checkpoint", type=Path, help="checkpoint tag directory, or a run's out_dir")
    parser.add_argument("--split", required=True, help="split directory or URL (data_tools.build_shards OUT/val)")
    parser.add_argument("--max-tokens", type=int, help="batch budget (default: the run's data.max_tokens)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        result = evaluate(checkpointing.resolve(args.checkpoint), args.split, args.max_tokens)
    except (ValueError, OSError) as exc:  # RunConfigError, VocabularyError, a checkpoint or split that does not fit
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        for name, value in result.items():
            print(f"{name:28s} {value:.4f}" if isinstance(value, float) else f"{name:28s} {value}")
    return 0
