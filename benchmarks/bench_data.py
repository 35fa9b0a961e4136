"""Data-path throughput: shards → collated batches (ours) vs upstream boson-multimodal's collator, same samples.

    .venv/bin/python benchmarks/bench_data.py [--samples 512] [--batch-size 16] [--repeats 3]

Builds a TTS-like sample set (system + user text, 2–20 s assistant audio, a third with a 3–8 s reference clip
in the user turn) in a temporary folder, shards it with data_tools.build_shards, then measures in one run:
  ours/stream   ShardLoader: tar read + decode + batching + collate (padded, expanded), one process
  ours/collate  our Collator alone on the decoded samples (in memory, like upstream)
  upstream      HiggsAudioSampleCollator alone, and + merge_input_ids_with_audio_features (the expansion upstream
                does in the model), in the reference venv (.venv-ref; reference/setup_ref_venv.sh) as a subprocess
and the padding efficiency (real tokens / batch positions) of token-budget batches, pad-to-longest vs packed
rows. One thread each. Without the reference venv the upstream rows are skipped (with a note).

Epoch planning at scale (synthetic TTS-like lengths, no shards written): for 1M samples in 1000 shards over 64
rank×worker slots and 10M samples in 10000 shards over 2048 slots, in both layouts, the time one rank takes to
plan its own 2 slots (what training does, the batch count agreed by an all-reduce), the time to plan every slot
in one process (what a single process without a collective does, and what gives the exact dropped share), and
the share of samples dropped in a non-final epoch (the final epoch drops none). `--planning-only` runs just this.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from transformers import AutoTokenizer

ROOT = Path(__file__).resolve().parents[1]
from higgs_ds.data.collator import Collator
from higgs_ds.data.plan import Budget, ShardLengths, plan_epoch
from higgs_ds.data.stream import ShardLoader
from higgs_ds.data.tokens import SpecialTokens
from higgs_ds.model_config import read_model_config

TOKENIZER = ROOT / "tests/assets/tiny_tokenizer"
WORDS = "the quick brown fox jumps over a lazy dog while we read this text aloud in a calm voice".split()


def make_set(folder: Path, n: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    (folder / "codes").mkdir(parents=True)
    rows = []
    for i in range(n):
        def clip(name: str, seconds: float) -> dict:
            np.save(folder / f"codes/{name}.npy", rng.integers(0, 1024, (8, round(25 * seconds)), dtype=np.int16))
            return {"type": "audio", "audio_url": f"codes/{name}.npy"}
        user = [{"type": "text", "text": " ".join(rng.choice(WORDS, rng.integers(8, 40)))}]
        if i % 3 == 0:
            user.insert(0, clip(f"ref{i}", rng.uniform(3, 8)))
        rows.append({"key": f"s{i}", "sample": {"messages": [
            {"role": "system", "content": "Generate audio following instruction."},
            {"role": "user", "content": user},
            {"role": "assistant", "content": clip(f"out{i}", rng.uniform(2, 20))}]}})
    (folder / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "train.jsonl").write_text("".join(json.dumps({"id": r["key"], **r["sample"]}) + "\n" for r in rows))


def best_of(repeats: int, fn) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--pack-length", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ref-python", type=Path, default=ROOT / ".venv-ref/bin/python")
    parser.add_argument("--planning-only", action="store_true", help="only the epoch-planning measurements")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if not args.planning_only:
        throughput(args)
    planning(args.seed)


def planning(seed: int) -> None:
    rng = np.random.default_rng(seed)
    for samples, shards, slots in ((1_000_000, 1000, 64), (10_000_000, 10_000, 2048)):
        # TTS-like: 20-80 text tokens, 2-20 s of audio-out at 25 frames/s (+ bos, eos, 7 delay frames).
        lengths = (rng.integers(20, 81, samples) + np.round(25 * rng.uniform(2, 20, samples)) + 9).astype(np.int32)
        per_shard = np.array_split(lengths, shards)
        for layout in ("padded", "packed"):
            budget = Budget(max_tokens=16384, layout=layout, pack_length=4096 if layout == "packed" else None)
            t0 = time.perf_counter()
            plan_epoch(ShardLengths.from_arrays(per_shard), 1, seed, slots, budget, slots=[slots // 2, slots // 2 + 1],
                       agree_min=lambda value: value)
            one_rank = time.perf_counter() - t0
            t0 = time.perf_counter()
            whole = plan_epoch(ShardLengths.from_arrays(per_shard), 1, seed, slots, budget)
            every_slot = time.perf_counter() - t0
            print(f"planning {samples:>10,d} samples / {shards:>5d} shards / {slots:>4d} slots {layout:6s}: one rank "
                  f"(2 slots) {one_rank:6.2f} s, every slot in one process {every_slot:6.2f} s, "
                  f"{whole.batches_per_slot} batches per slot, dropped {whole.total('dropped') / samples:.2%}")


def throughput(args) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "set"
        make_set(folder, args.samples, args.seed)
        config = {"audio_num_codebooks": 8, "audio_codebook_size": 1024, "use_delay_pattern": True,
                  "skip_audio_tower": True, "audio_adapter_type": "dual_ffn_fast_forward",
                  "audio_dual_ffn_layers": [0], "text_config": {"vocab_size": 416, "hidden_size": 32,
                  "intermediate_size": 80, "num_hidden_layers": 1, "num_attention_heads": 4}}
        (folder / "config.json").write_text(json.dumps(config))
        subprocess.run([sys.executable, "-m", "data_tools.build_shards", str(folder / "train.jsonl"),
                        "--tokenizer", str(TOKENIZER), "--model-config", str(folder / "config.json"),
                        "--out", str(folder / "shards"), "--shard-samples", "64"],
                       check=True, cwd=ROOT, capture_output=True)

        tokens = SpecialTokens.from_tokenizer(AutoTokenizer.from_pretrained(str(TOKENIZER)))
        audio = read_model_config(config).audio
        padded = Collator(tokens, audio)
        stream = ShardLoader(folder / "shards/train", padded, batch_size=args.batch_size, shuffle=False,
                             rank=0, world_size=1)
        delivered = []
        t_stream = best_of(args.repeats, lambda: delivered.append(sum(len(b.sample_keys) for b in stream)))
        n_stream = delivered[-1]

        samples = _decoded_samples(stream)
        batches = [samples[i:i + args.batch_size] for i in range(0, len(samples), args.batch_size)]
        t_collate = best_of(args.repeats, lambda: [padded(b) for b in batches])

        upstream = None
        if args.ref_python.exists():
            upstream = json.loads(subprocess.run(
                [str(args.ref_python), str(ROOT / "reference/bench_upstream_collator.py"), "--set", str(folder),
                 "--batch-size", str(args.batch_size), "--repeats", str(args.repeats)],
                check=True, cwd=ROOT, capture_output=True, text=True).stdout.strip().splitlines()[-1])

        # Padding efficiency of the training default, token-budget batches from the stream, in both layouts.
        packed = Collator(tokens, audio, layout="packed", pack_length=args.pack_length)
        efficiency = {}
        for name, collator in (("pad-to-longest", padded), (f"packed rows of {args.pack_length}", packed)):
            budgeted = ShardLoader(folder / "shards/train", collator, max_tokens=4 * args.pack_length, seed=0,
                                   rank=0, world_size=1)
            real = total = 0
            for b in budgeted:
                real, total = real + b.num_tokens, total + b.attention_mask.numel()
            efficiency[name] = real / total

    ours = {"shard→batch (read+decode+collate+expand)": n_stream / t_stream,
            "collate+expand (in memory)": len(samples) / t_collate}
    print(f"samples: {args.samples} (stream delivered {n_stream}), batch size {args.batch_size}, "
          f"best of {args.repeats}, 1 thread, no DataLoader workers")
    for name, value in ours.items():
        print(f"ours     {name:45s} {value:9.0f} samples/s")
    if upstream is None:
        print(f"upstream rows skipped: no reference venv at {args.ref_python} (reference/setup_ref_venv.sh builds it)")
    else:
        compare(ours, upstream)
    print(f"padding efficiency (real tokens / positions, token-budget batches of {4 * args.pack_length}): "
          + ", ".join(f"{name} {value:.3f}" for name, value in efficiency.items()))


def compare(ours: dict, upstream: dict) -> None:
    theirs = {"collate (in memory, no expansion)": upstream["collate_samples_per_s"],
              "collate+expand (in memory)": upstream["collate_expand_samples_per_s"],
              "tokenize+load codes+collate+expand": upstream["tokenize_load_collate_expand_samples_per_s"]}
    for name, value in theirs.items():
        print(f"upstream {name:45s} {value:9.0f} samples/s")
    for mine, base in (("shard→batch (read+decode+collate+expand)", "tokenize+load codes+collate+expand"),
                       ("shard→batch (read+decode+collate+expand)", "collate+expand (in memory)"),
                       ("shard→batch (read+decode+collate+expand)", "collate (in memory, no expansion)"),
                       ("collate+expand (in memory)", "collate+expand (in memory)")):
        print(f"ratio    ours {mine} / upstream {base}: {ours[mine] / theirs[base]:.2f}x")


def _decoded_samples(stream: ShardLoader) -> list:
    """The samples the stream delivered, decoded once (read straight from the shards, outside the clock)."""
    from higgs_ds.data.shards import decode_sample, read_shard

    return [decode_sample(raw, stream.collator.tokens, stream.collator.audio, stream.manifest.vocab_size)
            for shard in stream.manifest.shards for raw in read_shard(stream.manifest.shard_path(shard))]


if __name__ == "__main__":
    main()
