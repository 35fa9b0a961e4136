"""Upstream side of benchmarks/bench_data.py: times boson-multimodal's collator (+ its model-side expansion).

Run in the reference venv only (bench_data.py launches it):
    .venv-ref/bin/python reference/bench_upstream_collator.py --set DIR --batch-size 16 --repeats 3
DIR holds samples.jsonl ({"key", "sample"} per line) and the codes/*.npy its audio items point to (the layout of
reference/make_data_goldens.py). Prints one JSON line: samples/s of the collator alone, of collator + expansion, and
of upstream's whole per-sample path (prepare_chatml_sample + loading the codes, as its dataset's __getitem__ does
in the data loader, + collator + expansion).
"""
from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--set", type=Path, required=True, help="sample set folder: samples.jsonl and codes/")
    parser.add_argument("--tokenizer", type=Path, default=ROOT / "tests/assets/tiny_tokenizer")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds; the best one counts")
    return parser.parse_args(argv)


if __name__ == "__main__":
    parse_args()  # --help answers here, without the reference venv's packages

# Imported after the argument check on purpose: these need the reference venv.
import numpy as np
import torch
from boson_multimodal.data_collator.higgs_audio_collator import HiggsAudioSampleCollator
from boson_multimodal.dataset.chatml_dataset import ChatMLDatasetSample, prepare_chatml_sample
from boson_multimodal.model.higgs_audio.utils import merge_input_ids_with_audio_features
from make_data_goldens import dataset_sample  # same folder
from transformers import AutoTokenizer


def load(set_dir: Path, tokenizer) -> list[ChatMLDatasetSample]:
    samples = []
    for line in (set_dir / "samples.jsonl").read_text().splitlines():
        tokens, labels, audio, _ = prepare_chatml_sample(copy.deepcopy(json.loads(line)["sample"]), tokenizer)
        codes = [np.load(set_dir / a.audio_url, allow_pickle=False) for a in audio]
        samples.append(dataset_sample(tokens, labels, codes))
    return samples


def main() -> None:
    args = parse_args()
    torch.set_num_threads(1)
    tokenizer = AutoTokenizer.from_pretrained(str(args.tokenizer))
    ids = tokenizer.convert_tokens_to_ids
    t0 = time.perf_counter()
    samples = load(args.set, tokenizer)
    load_seconds = time.perf_counter() - t0  # upstream's dataset does this per sample, in the data loader
    collator = HiggsAudioSampleCollator(
        whisper_processor=None, audio_in_token_id=ids("<|AUDIO|>"), audio_out_token_id=ids("<|AUDIO_OUT|>"),
        pad_token_id=ids("<|end_of_text|>"), audio_stream_bos_id=1024, audio_stream_eos_id=1025, round_to=1,
        encode_whisper_embed=False, return_audio_in_tokens=True, audio_num_codebooks=8, use_delay_pattern=True)
    batches = [samples[i:i + args.batch_size] for i in range(0, len(samples), args.batch_size)]
    best = {"collate": float("inf"), "collate_expand": float("inf")}
    for _ in range(args.repeats):
        fresh = [copy.deepcopy(b) for b in batches]  # upstream writes into label tensors: copies, outside the clock
        t0 = time.perf_counter()
        outs = [collator(b) for b in fresh]
        t1 = time.perf_counter()
        for out in outs:  # the expansion upstream does in the model's forward (our collator does it)
            merge_input_ids_with_audio_features(
                None, None, torch.zeros(out.audio_in_ids.shape[1], 1), out.audio_in_ids_start,
                torch.zeros(out.audio_out_ids.shape[1], 1), out.audio_out_ids_start, ids("<|AUDIO|>"),
                ids("<|AUDIO_OUT|>"), torch.zeros(*out.input_ids.shape, 1), out.input_ids, out.attention_mask,
                out.label_ids, pad_token_id=ids("<|end_of_text|>"), round_to=1, left_padding=False)
        t2 = time.perf_counter()
        best["collate"] = min(best["collate"], t1 - t0)
        best["collate_expand"] = min(best["collate_expand"], t2 - t0)
    best["tokenize_load_collate_expand"] = load_seconds + best["collate_expand"]
    print(json.dumps({"samples": len(samples), **{f"{k}_samples_per_s": len(samples) / v for k, v in best.items()}}))


if __name__ == "__main__":
    main()
