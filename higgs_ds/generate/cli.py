"""`launch/generate.py`: a model (a training run, a checkpoint or an export) continues each prompt of a JSONL file.

Everything is checked first (SOURCE, --codec, every prompt line: one `error:` line, exit 2, nothing written); the
outputs are written to a staging folder moved into place at the end (as the shard builder does), so --out holds a
complete result or nothing:
  OUT/codes/<id>.npy    the audio codes, de-delayed, int16 [K, T] (as the shard builder stores codes)
  OUT/wav/<id>.wav      with --codec: the codes decoded, 32-bit float WAV at the codec's sample rate
  OUT/results.jsonl     one line per prompt, in the prompts' order: id, text (the turn's text stream, special
                        tokens kept), frames, stop (eos | max_frames | max_text_tokens), stream_ids (stream bos/eos
                        ids among the codes: clipped for the codec), seconds (its wall time),
                        codes and wav (paths relative to OUT; wav null without --codec or audio)"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
from tqdm import tqdm

from data_tools.build.staging import Staging, output_dir
from data_tools.cli import UsageError

from ..vocabulary import first_line
from .codec import CodecDecoder
from .decode import STOPS, SamplingConfig, generate
from .prompt_file import read_prompts
from .source import load_source


def parser() -> argparse.ArgumentParser:
    from ..cli import HelpFormatter

    defaults = SamplingConfig()
    p = argparse.ArgumentParser(prog="launch/generate.py", formatter_class=HelpFormatter, description=(
        "Generate the assistant turn of each prompt (ChatML messages, as in a training sample) with a training "
        "run, a checkpoint or an export: audio codes, WAVs with --codec, and the text."))
    p.add_argument("source", type=Path, help="a training run's out_dir (its newest complete checkpoint), a checkpoint "
                                             "tag directory, or an export (launch/export.py; its --layout both "
                                             "folder: the port layout)")
    p.add_argument("--prompts", type=Path, required=True,
                   help='JSONL, one prompt per line: {"id": a file name, "messages": [...], "force_audio": true}')
    p.add_argument("--out", type=Path, required=True,
                   help="output directory (must not exist or be empty; written only when every prompt is done)")
    p.add_argument("--codec", help="HiggsAudioV2TokenizerModel directory: write WAVs (and encode audio files the "
                                   "prompts name)")
    p.add_argument("--batch-size", type=int, default=8, help="prompts decoded together")
    p.add_argument("--max-frames", type=int, default=defaults.max_frames,
                   help="audio frames per turn (25 a second; the delay pattern's K + 1 columns not counted)")
    p.add_argument("--max-text-tokens", type=int, default=defaults.max_text_tokens, help="text tokens per turn")
    p.add_argument("--sample", action="store_true", help="sample instead of the greedy choice (the most likely token)")
    p.add_argument("--temperature", type=float, default=defaults.temperature, help="with --sample")
    p.add_argument("--top-k", type=int, default=defaults.top_k, help="with --sample; 0: off")
    p.add_argument("--top-p", type=float, default=defaults.top_p, help="with --sample")
    p.add_argument("--seed", type=int, default=defaults.seed,
                   help="with --sample; each prompt draws from its own generator (this seed and its id)")
    p.add_argument("--no-cache", action="store_true", help="recompute every step without the KV cache (slow)")
    return p


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    if not args.sample and (args.temperature, args.top_k, args.top_p, args.seed) != (1.0, 0, 1.0, 0):
        p.error("--temperature, --top-k, --top-p and --seed apply with --sample only")
    try:
        sampling = SamplingConfig(do_sample=args.sample, temperature=args.temperature, top_k=args.top_k,
                                  top_p=args.top_p, seed=args.seed, max_frames=args.max_frames,
                                  max_text_tokens=args.max_text_tokens)
        if args.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
        out = output_dir(args.out)
        loaded = load_source(args.source)
        codec = CodecDecoder(args.codec, loaded.vocabulary.model_config.audio) if args.codec else None
        prompts = read_prompts(args.prompts, loaded.vocabulary, args.codec)
    except (ValueError, OSError, UsageError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{len(prompts)} prompts, {loaded.description}", file=sys.stderr)
    start = time.perf_counter()
    try:
        with tqdm(total=len(prompts), desc="generating", unit="prompt", file=sys.stderr) as bar:
            generations = generate(loaded.model, prompts, loaded.vocabulary.tokens, sampling,
                                   batch_size=args.batch_size, use_cache=not args.no_cache,
                                   progress=lambda _: bar.update())
        staging = Staging(out)
        with staging as directory:
            write(directory, generations, loaded.vocabulary.tokenizer, codec,
                  loaded.vocabulary.model_config.audio.codes_per_codebook)
            staging.commit()
    except KeyboardInterrupt:
        print(f"interrupted: nothing written to {args.out}", file=sys.stderr)
        return 130
    except UsageError as exc:  # --out could not be created or put in place
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except (OSError, ValueError) as exc:  # a full disk; codes the codec cannot take
        print(f"error: {first_line(exc)} (nothing written to {args.out})", file=sys.stderr)
        return 1
    stops = Counter(g.stop for g in generations)
    print(f"done: {len(generations)} prompts in {time.perf_counter() - start:.1f} s, "
          f"{sum(g.frames for g in generations)} audio frames; stop: "
          f"{', '.join(f'{s} {stops[s]}' for s in STOPS)}; wrote {args.out}")
    return 0


def write(directory: Path, generations: list, tokenizer, codec, codes_per_codebook: int) -> None:
    """codes/, wav/ (with a codec) and results.jsonl into `directory`. A codebook free after the delay ramp may
    pick a stream bos/eos id (an untrained model does): kept in codes/, counted in results.jsonl (`stream_ids`),
    and clipped to the last code for the codec, as upstream's serve engine does."""
    (directory / "codes").mkdir()
    if codec is not None:
        (directory / "wav").mkdir()
    rows = []
    for g in tqdm(generations, desc="writing", unit="prompt", file=sys.stderr, disable=codec is None):
        codes = f"codes/{g.id}.npy"
        np.save(directory / codes, g.codes.astype(np.int16))  # ids < 1026 (codes, or a stray stream id)
        wav = f"wav/{g.id}.wav" if codec is not None and g.frames else None
        if wav is not None:
            codec.write_wav(directory / wav, g.codes.clip(0, codes_per_codebook - 1))
        rows.append({"id": g.id, "text": tokenizer.decode(g.text_ids, skip_special_tokens=False),
                     "frames": g.frames, "stop": g.stop, "stream_ids": int((g.codes >= codes_per_codebook).sum()),
                     "seconds": round(g.seconds, 3), "codes": codes, "wav": wav})
    (directory / "results.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
