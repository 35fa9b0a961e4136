"""The per-modality loss breakdown of a training checkpoint on a split, in one process: total, text, audio and each
codebook (means over the split's learnable tokens, the objective's own reduction), with the token counts."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from ..data.collator import Collator
from ..data.shards import check_fingerprint, data_fingerprint
from ..data.stream import ShardLoader
from ..data.tokens import SpecialTokens
from ..model import HiggsAudioForTraining, LossConfig, read_model_config
from ..model.checkpoint import check_state_dict
from ..model.losses import means_of_sums
from . import checkpointing
from .config import run_lora
from .lora import apply_lora
from .weights import load_pretrained


def evaluate(checkpoint: Path, split: str, max_tokens: int | None = None) -> dict[str, float]:
    from transformers import AutoTokenizer

    run = checkpointing.run_config(checkpoint)
    m, d = run["model"], run["data"]
    tokenizer = AutoTokenizer.from_pretrained(m["tokenizer"])
    model_config = read_model_config(m["pretrained"] or m["config"], tokenizer)
    tokens = SpecialTokens.from_tokenizer(tokenizer, model_config.pad_token_id)
    model = HiggsAudioForTraining(model_config, LossConfig(m["text_weight"], m["audio_weight"], m["audio_reduction"]),
                                  attn_implementation=m["attn_implementation"], head_impl=m["head_impl"])
    lora = run_lora(run)
    if lora is not None:  # the checkpoint holds the adapters and the extras; the base is the pretrained checkpoint
        load_pretrained(model, m["pretrained"], model_config)
        apply_lora(model, lora)
    params = dict(model.named_parameters())
    state = checkpointing.consolidated_state(checkpoint)  # a LoRA run's: what it trained, and nothing else
    check_state_dict(state, {n: tuple(p.shape) for n, p in params.items() if lora is None or p.requires_grad},
                     str(checkpoint))
    with torch.no_grad():
        for name, tensor in state.items():
            params[name].copy_(tensor.contiguous())  # one tensor gathered at a time
    model.eval()
    collator = Collator(tokens, model_config.audio, layout=d["layout"], round_to=d["round_to"],
                        pack_length=d["pack_length"])
    loader = ShardLoader(split, collator, rank=0, world_size=1, max_tokens=max_tokens or d["max_tokens"],
                         batch_size=None if (max_tokens or d["max_tokens"]) else d["batch_size"], shuffle=False,
                         num_epochs=1)
    check_fingerprint(loader.manifest, data_fingerprint(tokenizer, tokens, model_config.audio))
    k = model_config.audio.num_codebooks
    sums = torch.zeros(2 + 2 * k, dtype=torch.float64)
    with torch.no_grad():
        for batch in loader:
            sums += model(**batch.model_inputs()).sums()
    result = means_of_sums(sums, k, model.loss_config)
    result.update({"tokens/text_learnable": int(sums[1]), "tokens/audio_learnable": int(sums[2 + k:].sum()),
                   **{key: value for key, value in loader.stats().items() if key.endswith("samples")}})
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="launch/evaluate.py", description="Print the per-modality loss breakdown "
                                     "(total, text, audio, each codebook) of a higgs-ds checkpoint on a split.")
    parser.add_argument("checkpoint", type=Path, help="checkpoint tag directory, or a run's out_dir")
    parser.add_argument("--split", required=True, help="split directory or URL (data_tools.build_shards OUT/val)")
    parser.add_argument("--max-tokens", type=int, help="batch budget (default: the run's data.max_tokens)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = parser.parse_args(argv)
    try:
        result = evaluate(checkpointing.resolve(args.checkpoint), args.split, args.max_tokens)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        for name, value in result.items():
            print(f"{name:28s} {value:.4f}" if isinstance(value, float) else f"{name:28s} {value}")
    return 0
