"""Upstream (boson-multimodal 0.1.1) goldens for the data path: ChatML tokens, collator, expanded sequence.

Run in the reference venv (transformers 4.46 + boson-multimodal, never the project's):
    .venv-ref/bin/python reference/make_data_goldens.py \
        [--samples tests/goldens/data/samples.jsonl] [--out tests/goldens/data/goldens.npz] \
        [--tokenizer tests/assets/tiny_tokenizer]

A sample set is a folder holding
    samples.jsonl   one JSON object per line: {"key": "<unique, no dots>", "sample": <upstream ChatML sample>}
    codes/*.npy     int16 [8, T] audio codes in 0..1023, one file per audio item; an audio item's "audio_url" is
                    the file's path relative to the folder (e.g. "codes/clip.npy"). A missing file is generated
                    here with T = round(25 * item["duration"]) frames, seeded by its file name.
Every sample must be valid for upstream (it returns None otherwise, and this script stops).

For each sample this runs upstream `prepare_chatml_sample` (tokens, labels, audio order, speaker), builds a
`ChatMLDatasetSample`, collates it with `HiggsAudioSampleCollator` (no whisper, round_to=1, right padding) and
expands it with the model's `merge_input_ids_with_audio_features` (dummy 1-dim embeddings), as a batch of one,
with and without the delay pattern; then the same for multi-sample batches (consecutive samples in groups of
2, 3, 5, ... and one batch of all). Every call gets fresh deep copies: upstream writes into the label tensors.

Writes `--out` (npz, arrays named "<case>/<field>" and "chatml/<key>/<field>") and `--out` with suffix .json:
the cases (sample keys, delay flag), per-sample audio urls and speaker, and the samples/tokenizer paths relative
to the json's folder, so tests/test_data_parity.py can replay everything (HIGGS_DS_DATA_GOLDENS=<npz> for a
held-out set).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=Path, default=ROOT / "tests/goldens/data/samples.jsonl",
                        help="samples.jsonl of a sample set (its folder holds codes/)")
    parser.add_argument("--out", type=Path, default=ROOT / "tests/goldens/data/goldens.npz",
                        help="the goldens' .npz (the .json index is written beside it)")
    parser.add_argument("--tokenizer", type=Path, default=ROOT / "tests/assets/tiny_tokenizer")
    return parser.parse_args(argv)


if __name__ == "__main__":
    parse_args()  # --help answers here, without the reference venv's packages

# Imported after the argument check on purpose: these need the reference venv.
import numpy as np
import torch
from boson_multimodal.data_collator.higgs_audio_collator import HiggsAudioSampleCollator
from boson_multimodal.dataset.chatml_dataset import ChatMLDatasetSample, prepare_chatml_sample
from boson_multimodal.model.higgs_audio.utils import merge_input_ids_with_audio_features
from transformers import AutoTokenizer

NUM_CODEBOOKS, CODEBOOK_SIZE, FRAMES_PER_SECOND = 8, 1024, 25
BATCH_SIZES = (2, 3, 5)


def audio_items(sample: dict) -> list[tuple[str, float | None]]:
    """(audio_url, duration) of every audio item in order of appearance (as dacite parses: audio_url => audio)."""
    urls = []
    for message in sample["messages"]:
        content = message["content"]
        for item in content if isinstance(content, list) else [content]:
            if isinstance(item, dict) and (item.get("type") == "audio" or "audio_url" in item):
                urls.append((item["audio_url"], item.get("duration")))
    return urls


def ensure_codes(folder: Path, url: str, duration: float | None) -> np.ndarray:
    path = folder / url
    if not path.exists():
        if duration is None:
            raise SystemExit(f"{path} is missing and its audio item has no duration to generate it from")
        frames = max(1, round(FRAMES_PER_SECOND * duration))
        rng = np.random.default_rng(zlib.crc32(path.name.encode()))
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, rng.integers(0, CODEBOOK_SIZE, size=(NUM_CODEBOOKS, frames), dtype=np.int16))
    return np.load(path, allow_pickle=False)


def dataset_sample(tokens: list[int], labels: list[int], codes: list[np.ndarray]) -> ChatMLDatasetSample:
    lengths = [c.shape[1] for c in codes]
    return ChatMLDatasetSample(
        input_ids=torch.tensor(tokens, dtype=torch.long),
        label_ids=torch.tensor(labels, dtype=torch.long),
        audio_ids_concat=torch.from_numpy(np.concatenate(codes, axis=1)).long() if codes
        else torch.zeros((NUM_CODEBOOKS, 0), dtype=torch.long),
        audio_ids_start=torch.tensor(np.cumsum([0] + lengths[:-1]) if codes else [], dtype=torch.long),
        audio_waveforms_concat=torch.zeros(0),
        audio_waveforms_start=torch.zeros(0, dtype=torch.long),
        audio_sample_rate=torch.zeros(0),
        audio_speaker_indices=torch.zeros(0, dtype=torch.long),
    )


def upstream_batch(samples: list[ChatMLDatasetSample], ids: dict[str, int], use_delay_pattern: bool) -> dict:
    collator = HiggsAudioSampleCollator(
        whisper_processor=None, encode_whisper_embed=False, use_delay_pattern=use_delay_pattern, round_to=1,
        return_audio_in_tokens=True, audio_num_codebooks=NUM_CODEBOOKS, audio_in_token_id=ids["audio_in"],
        audio_out_token_id=ids["audio_out"], pad_token_id=ids["pad"], audio_stream_bos_id=CODEBOOK_SIZE,
        audio_stream_eos_id=CODEBOOK_SIZE + 1)
    batch = collator(copy.deepcopy(samples))

    def dummy(n: int) -> torch.Tensor:  # the merge only needs embeddings with the right row count
        return torch.zeros((n, 1))

    _, attention_mask, labels, position_ids, input_ids, audio_in_mask, _, audio_out_mask = \
        merge_input_ids_with_audio_features(
            None, None, dummy(batch.audio_in_ids.shape[1]), batch.audio_in_ids_start,
            dummy(batch.audio_out_ids.shape[1]), batch.audio_out_ids_start, ids["audio_in"], ids["audio_out"],
            torch.zeros((*batch.input_ids.shape, 1)), batch.input_ids, batch.attention_mask, batch.label_ids,
            pad_token_id=ids["pad"], round_to=1, left_padding=False)

    def codes_2d(x: torch.Tensor) -> np.ndarray:  # upstream returns [0, 0] for "no audio"; our contract is [K, 0]
        return x.numpy().reshape(NUM_CODEBOOKS, -1)

    return {
        "input_ids": input_ids.numpy(), "attention_mask": attention_mask.bool().numpy(),
        "position_ids": position_ids.numpy(), "label_ids": labels.numpy(),
        "audio_in_mask": audio_in_mask.numpy(), "audio_out_mask": audio_out_mask.numpy(),
        "audio_in_ids": codes_2d(batch.audio_in_ids), "audio_out_ids": codes_2d(batch.audio_out_ids),
        "audio_out_labels": codes_2d(batch.label_audio_ids),
    }


def main() -> None:
    args = parse_args()

    tokenizer = AutoTokenizer.from_pretrained(str(args.tokenizer))
    ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in
           (("audio_in", "<|AUDIO|>"), ("audio_out", "<|AUDIO_OUT|>"), ("pad", "<|end_of_text|>"))}
    rows = [json.loads(line) for line in args.samples.read_text().splitlines() if line.strip()]
    keys = [row["key"] for row in rows]
    assert len(set(keys)) == len(keys) and not any("." in k or "/" in k for k in keys), "keys: unique, no . or /"

    arrays, chatml, prepared = {}, {}, {}
    for row in rows:
        key = row["key"]
        tokens, labels, audio, speaker = prepare_chatml_sample(copy.deepcopy(row["sample"]), tokenizer)
        if tokens is None:
            raise SystemExit(f"upstream rejected sample {key!r}")
        urls = audio_items(row["sample"])
        assert [a.audio_url for a in audio] == [u for u, _ in urls], key
        codes = [ensure_codes(args.samples.parent, url, duration) for url, duration in urls]
        arrays[f"chatml/{key}/input_ids"] = np.array(tokens, dtype=np.int64)
        arrays[f"chatml/{key}/label_ids"] = np.array(labels, dtype=np.int64)
        chatml[key] = {"audio_urls": [u for u, _ in urls], "speaker": speaker}
        prepared[key] = dataset_sample(tokens, labels, codes)

    groups = [[k] for k in keys]
    start, n = 0, 0
    while start < len(keys):
        size = BATCH_SIZES[n % len(BATCH_SIZES)]
        groups.append(keys[start:start + size])
        start, n = start + size, n + 1
    groups.append(keys)
    cases = []
    for use_delay_pattern in (True, False):
        for group in groups:
            name = f"{'delay' if use_delay_pattern else 'nodelay'}/{len(cases)}"
            result = upstream_batch([prepared[k] for k in group], ids, use_delay_pattern)
            arrays.update({f"{name}/{field}": value for field, value in result.items()})
            cases.append({"name": name, "keys": group, "use_delay_pattern": use_delay_pattern})

    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.out, **arrays)
    def rel(path: Path) -> str:
        return os.path.relpath(path.resolve(), args.out.parent.resolve())

    index = {"upstream": "boson-multimodal 0.1.1 prepare_chatml_sample + HiggsAudioSampleCollator + "
                         "merge_input_ids_with_audio_features(round_to=1, left_padding=False)",
             "samples": rel(args.samples), "tokenizer": rel(args.tokenizer), "num_codebooks": NUM_CODEBOOKS,
             "chatml": chatml, "cases": cases}
    args.out.with_suffix(".json").write_text(json.dumps(index, indent=1, ensure_ascii=False) + "\n")
    print(f"{len(rows)} samples, {len(cases)} cases -> {args.out} ({args.out.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
