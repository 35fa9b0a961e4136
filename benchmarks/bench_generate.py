"""Generation throughput: higgs_ds.generate (batched, KV cache) against transformers'
HiggsAudioV2ForConditionalGeneration.generate, same random weights, same prompts, greedy, N audio frames per prompt.

    .venv/bin/python benchmarks/bench_generate.py [--frames 200 --prompts 8 --hidden 768 --layers 8 --repeats 2]
        [--port-one-at-a-time] [--skip-no-cache]

Model: the release's proportions at a quarter of its width (hidden 768 = 6 heads x head dim 128, 2 KV heads: the
release's 3:1 grouping; intermediate 2048 = hidden x 8/3; DualFFN in every layer) with the real heads (text 128256,
audio 8 x 1026) and --layers decoder layers (the release: hidden 3072, 24 / 8 heads, 28 layers). fp32, SDPA. While
decoding audio the port computes only the audio head, and so do we (the text head runs on text rows only; a prompt
ending in `<|audio_out_bos|>` has none), so the 128256-wide head costs neither side anything per frame.

Both models get the stream-eos rows of the audio head zeroed (logit 0 against random logits over 1024 codes: never
the argmax), so no prompt ends early: ours writes --frames de-delayed frames (max_frames), i.e. --frames + K delayed
columns (the all-bos column and the K - 1 ramp columns are not frames), and the port is asked for the same columns
(max_new_tokens = --frames + K). Every comparison asserts the two sides' columns equal before printing a ratio.

Prompts: TTS-like ChatML through `build_prompt` (the tiny test tokenizer's ids, in a 128256 vocabulary): even ones
clone a voice (user text, assistant audio of 60-150 random frames, user text), odd ones are text only; all end with
`<|audio_out_bos|>`. Each measurement is --repeats wall-clock runs after one warm-up (median, then every run):
  1. 1 prompt: ours vs the port's generate.
  2. --prompts prompts, both batched: ours with batch_size=--prompts; the port left-padded with attention_mask and
     the reference frames right-padded with audio_input_ids_mask (it gives the same codes). With
     --port-one-at-a-time, also the port one prompt at a time.
  For 1 and 2, both sides also run with 1 frame (prefill + the first K + 1 columns) to split off the cost of one
  further column, which is what the decode loop controls.
  3. our KV cache vs our no-cache loop (use_cache=False: every step recomputes the whole sequence), 1 prompt: the
     voice-clone prompt of 1. and the shortest (text-only) one, as the ratio grows with the sequence; the no-cache
     loop runs once (the longest part of the run).
  4. KV-cache bytes per position, computed (2 x layers x KV heads x head dim x dtype bytes) at the release's widths
     and at this model's, the latter checked against a DynamicCache the port fills.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from transformers import AutoTokenizer, DynamicCache, HiggsAudioV2Config, HiggsAudioV2ForConditionalGeneration

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this tree's higgs_ds first
from higgs_ds.data.tokens import SpecialTokens  # noqa: E402
from higgs_ds.generate import SamplingConfig, build_prompt, generate  # noqa: E402
from higgs_ds.model import HiggsAudioForTraining  # noqa: E402
from higgs_ds.vocabulary import Vocabulary  # noqa: E402

TOKENIZER = ROOT / "tests/assets/tiny_tokenizer"
RELEASE = dict(layers=28, kv_heads=8, head_dim=128, dtype_bytes=2)  # bf16
WORDS = ("the quick brown fox jumps over the lazy dog hello world this is a calm voice please read the text aloud "
         "generate audio following instruction speak transcribe clip").split()


def bench_config(hidden: int, layers: int, tokenizer) -> HiggsAudioV2Config:
    """The release's proportions at `hidden` (a multiple of 384: head dim 128, 3 query heads per KV head)."""
    if hidden % 384:
        raise SystemExit(f"--hidden must be a multiple of 384 (head dim 128, 3:1 grouping), got {hidden}")
    tokens = SpecialTokens.from_tokenizer(tokenizer)
    return HiggsAudioV2Config(
        vocab_size=128256, hidden_size=hidden, intermediate_size=hidden * 8 // 3, num_hidden_layers=layers,
        num_attention_heads=hidden // 128, num_key_value_heads=hidden // 384, head_dim=128,
        pad_token_id=tokens.pad, bos_token_id=tokens.begin_of_text, eos_token_id=tokens.eot,
        num_codebooks=8, codebook_size=1026, audio_token_id=tokens.audio_out, audio_bos_token_id=tokens.audio_out_bos,
        audio_delay_token_id=tokenizer.convert_tokens_to_ids("<|audio_delay|>"), audio_stream_bos_id=1024,
        audio_stream_eos_id=1025)


def build_models(config: HiggsAudioV2Config):
    torch.manual_seed(0)
    ours = HiggsAudioForTraining(config, attn_implementation="sdpa").eval()
    with torch.no_grad():  # no stream-eos: both write exactly --frames columns
        heads = ours.audio_lm_head.weight.view(config.num_codebooks, config.codebook_size, -1)
        heads[:, config.audio_stream_eos_id] = 0
    port = HiggsAudioV2ForConditionalGeneration(config, use_text_head=True).eval()
    port.config._attn_implementation = "sdpa"
    port.load_state_dict(ours.state_dict())
    return ours, port


def words(generator: np.random.Generator, low: int, high: int) -> str:
    return " ".join(generator.choice(WORDS, int(generator.integers(low, high)))).capitalize() + "."


def make_prompts(count: int, vocabulary: Vocabulary, seed: int = 0):
    """Even prompts clone a voice from a reference clip; odd ones are text only. Lengths vary."""
    g = np.random.default_rng(seed)
    clips = {}

    def load_codes(ref):
        return clips[ref.item["audio_url"]]

    prompts = []
    for i in range(count):
        messages = [{"role": "system", "content": "Generate audio following instruction."}]
        if i % 2 == 0:
            url = f"ref{i}.npy"
            clips[url] = g.integers(0, 1024, (8, int(g.integers(60, 151))))
            messages += [{"role": "user", "content": words(g, 8, 20)},
                         {"role": "assistant", "content": {"type": "audio", "audio_url": url}}]
        messages.append({"role": "user", "content": words(g, 10, 30)})
        prompts.append(build_prompt({"messages": messages}, vocabulary, load_codes, f"p{i}"))
    return prompts


# ------------------------------------------------------------------------------------------------------ the port

def port_feed(prompts, config: HiggsAudioV2Config) -> dict:
    """Prompts → the port's generate inputs: ids left-padded (attention_mask), audio frames right-padded
    [B, frames, K] with audio_input_ids_mask. Audio positions hold the port's audio_token_id."""
    width = max(len(p) for p in prompts)
    frames = max(p.audio_codes.shape[1] for p in prompts)
    ids = torch.full((len(prompts), width), config.pad_token_id, dtype=torch.long)
    attention = torch.zeros(len(prompts), width, dtype=torch.long)
    codes = torch.zeros(len(prompts), frames, config.num_codebooks, dtype=torch.long)
    codes_mask = torch.zeros(len(prompts), frames, dtype=torch.bool)
    for b, p in enumerate(prompts):
        row = p.input_ids.clone()
        row[p.audio_mask] = config.audio_token_id
        ids[b, width - len(p):] = row
        attention[b, width - len(p):] = 1
        n = p.audio_codes.shape[1]
        codes[b, :n] = p.audio_codes.T
        codes_mask[b, :n] = True
    feed = dict(input_ids=ids, attention_mask=attention)
    if frames:
        feed.update(audio_input_ids=codes, audio_input_ids_mask=codes_mask)
    return feed


def port_generate(port, prompts, config, frames: int, batched: bool) -> list[torch.Tensor]:
    """The port's new columns per prompt, as [K, columns] (our segments' layout). `frames` de-delayed frames take
    K more delayed columns (the all-bos column and the ramp), which the port's max_new_tokens counts."""
    columns = frames + config.num_codebooks
    groups = [prompts] if batched else [[p] for p in prompts]
    out = []
    for group in groups:
        sequences = port.generate(**port_feed(group, config), do_sample=False, max_new_tokens=columns)
        out += [s[-columns:].T for s in sequences]
    return out


def ours_generate(model, prompts, tokens, frames: int, batch_size: int, use_cache: bool = True):
    results = generate(model, prompts, tokens, SamplingConfig(max_frames=frames), batch_size=batch_size,
                       use_cache=use_cache)
    assert all(r.stop == "max_frames" and len(r.segments) == 1 and r.frames == frames for r in results), \
        [(r.stop, r.frames) for r in results]
    return [r.segments[0] for r in results]


# ------------------------------------------------------------------------------------------------------ timing

def timed(run, repeats: int) -> tuple[list[float], list[torch.Tensor]]:
    """Seconds of each of `repeats` runs (after the caller's warm-up) and the last run's outputs."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = run()
        times.append(time.perf_counter() - start)
    return times, out


def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(x.shape == y.shape and torch.equal(x, y) for x, y in zip(a, b))


def agreement(a: list[torch.Tensor], b: list[torch.Tensor]) -> str:
    return ", ".join(f"{float((x == y).float().mean()):.3f}" if x.shape == y.shape else f"shape {tuple(y.shape)}"
                     for x, y in zip(a, b))


def fmt(times: list[float], frames: int) -> str:
    med = statistics.median(times)
    return f"{med:7.2f} s ({', '.join(f'{t:.2f}' for t in times)})  {frames / med:7.1f} frames/s"


def cache_bytes(layers: int, kv_heads: int, head_dim: int, dtype_bytes: int) -> int:
    """KV-cache bytes per cached position (one frame or one text token): keys and values of every layer."""
    return 2 * layers * kv_heads * head_dim * dtype_bytes


def compare(label: str, prompts, n: int, ours_run, port_run, repeats: int, port_label: str) -> float:
    """Ours vs the port on `prompts` (outputs asserted equal), plus both with 1 frame (the prefill and the first K
    columns) to split off the per-column cost. Returns the speed-up ours / port."""
    median = statistics.median
    total = n * len(prompts)
    print(f"\n{label}", flush=True)
    ours_t, ours_out = timed(lambda: ours_run(n), repeats)
    print(f"  ours                      {fmt(ours_t, total)}", flush=True)
    port_t, port_out = timed(lambda: port_run(n), repeats)
    assert same(ours_out, port_out), f"{label}: frames differ (share of codes equal per prompt: " \
                                     f"{agreement(ours_out, port_out)})"
    print(f"  port {port_label:21s}{fmt(port_t, total)}  [outputs equal]")
    speedup = median(port_t) / median(ours_t)
    print(f"  speed-up ours / port: {speedup:.2f}x", flush=True)
    ours_1, _ = timed(lambda: ours_run(1), repeats)
    port_1, _ = timed(lambda: port_run(1), repeats)
    ours_col = (median(ours_t) - median(ours_1)) / (n - 1)
    port_col = (median(port_t) - median(port_1)) / (n - 1)
    print(f"  prefill + first frame (K + 1 columns): ours {median(ours_1):.2f} s, port {median(port_1):.2f} s; each "
          f"further column: ours {ours_col * 1000:.1f} ms, port {port_col * 1000:.1f} ms (port / ours "
          f"{port_col / ours_col:.2f}x)", flush=True)
    return speedup


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=200, help="audio frames per prompt (max_frames; > 1)")
    parser.add_argument("--prompts", type=int, default=8, help="prompts of the batched comparison")
    parser.add_argument("--hidden", type=int, default=768, help="a multiple of 384 (the release: 3072)")
    parser.add_argument("--layers", type=int, default=8, help="decoder layers (the release: 28)")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per measurement (median printed)")
    parser.add_argument("--port-one-at-a-time", action="store_true",
                        help="also time the port on the --prompts prompts one at a time (~--prompts x slower)")
    parser.add_argument("--skip-no-cache", action="store_true", help="skip our no-cache loop (the longest part)")
    args = parser.parse_args()
    if args.frames < 2:
        parser.error("--frames must be > 1")

    tokenizer = AutoTokenizer.from_pretrained(str(TOKENIZER))
    config = bench_config(args.hidden, args.layers, tokenizer)
    ours, port = build_models(config)
    vocabulary = Vocabulary(tokenizer, ours.model_config, SpecialTokens.from_tokenizer(tokenizer))
    tokens = vocabulary.tokens
    prompts = make_prompts(args.prompts, vocabulary)
    one = prompts[:1]
    n, k = args.frames, config.num_codebooks

    print(f"machine: {platform.processor() or platform.machine()}, CPU only, {torch.get_num_threads()} torch threads, "
          f"torch {torch.__version__}")
    print(f"model: hidden {config.hidden_size}, {config.num_hidden_layers} layers, {config.num_attention_heads} "
          f"heads / {config.num_key_value_heads} KV heads x {config.head_dim}, intermediate "
          f"{config.intermediate_size}, text vocab {config.vocab_size}, audio {k} x {config.codebook_size}, fp32, "
          f"SDPA; {sum(p.numel() for p in ours.parameters()) / 1e6:.1f} M parameters")
    print(f"prompts: lengths {[len(p) for p in prompts]} positions, reference frames "
          f"{[p.audio_codes.shape[1] for p in prompts]}; {n} frames each (+ {k} delay columns), greedy, stream-eos "
          f"rows zeroed; {args.repeats} timed runs each (median, then each run)")

    # warm-up (allocator, SDPA kernels, generate's first-call setup)
    ours_generate(ours, one, tokens, 2, 1)
    port_generate(port, one, config, 2, batched=True)

    # 1. one prompt
    compare(f"1 prompt ({len(one[0])} positions), {n} frames:", one, n,
            lambda f: ours_generate(ours, one, tokens, f, 1),
            lambda f: port_generate(port, one, config, f, batched=True), args.repeats, "generate")

    # 2. --prompts prompts, both batched
    compare(f"{len(prompts)} prompts x {n} frames, both batched (ours batch_size={len(prompts)}; the port left-padded "
            f"with attention_mask):", prompts, n,
            lambda f: ours_generate(ours, prompts, tokens, f, len(prompts)),
            lambda f: port_generate(port, prompts, config, f, batched=True), args.repeats, "batched")
    if args.port_one_at_a_time:
        ours_t, ours_out = timed(lambda: ours_generate(ours, prompts, tokens, n, len(prompts)), args.repeats)
        port_t, port_out = timed(lambda: port_generate(port, prompts, config, n, batched=False), args.repeats)
        assert same(ours_out, port_out), "the port one prompt at a time: frames differ"
        print(f"  ours batched (again)      {fmt(ours_t, n * len(prompts))}")
        print(f"  port one at a time        {fmt(port_t, n * len(prompts))}  [outputs equal]")
        print(f"  speed-up ours batched / port one at a time: "
              f"{statistics.median(port_t) / statistics.median(ours_t):.2f}x", flush=True)

    # 3. our KV cache vs our no-cache loop: the no-cache step's cost grows with the sequence, so the ratio depends on
    #    the prompt: the voice-clone prompt of 1. and the shortest (text-only) prompt. The no-cache loop runs once.
    if not args.skip_no_cache:
        for label, prompt in (("voice clone", one[0]), ("shortest, text only", min(prompts, key=len))):
            print(f"\nKV cache vs our no-cache loop (use_cache=False), 1 prompt ({label}, {len(prompt)} positions), "
                  f"{n} frames:", flush=True)
            cached, cached_out = timed(lambda: ours_generate(ours, [prompt], tokens, n, 1), args.repeats)
            print(f"  ours, KV cache            {fmt(cached, n)}", flush=True)
            nocache, nocache_out = timed(lambda: ours_generate(ours, [prompt], tokens, n, 1, use_cache=False), 1)
            assert same(nocache_out, cached_out), "no-cache frames differ from cached"
            print(f"  ours, no cache            {fmt(nocache, n)}  [outputs equal]")
            print(f"  speed-up cache / no cache: {statistics.median(nocache) / statistics.median(cached):.2f}x",
                  flush=True)

    # 4. KV-cache bytes
    release = cache_bytes(**RELEASE)
    bench = cache_bytes(config.num_hidden_layers, config.num_key_value_heads, config.head_dim, 4)
    with torch.no_grad():  # the port's DynamicCache after a 10-position forward holds 10 positions
        cache = port(input_ids=torch.full((1, 10), config.pad_token_id), cache=DynamicCache(config=config),
                     use_cache=True).cache
    held = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values)) // 10
    assert held == bench, (held, bench)
    mib, columns = 2 ** 20, n + k
    print(f"\nKV cache per position (frame column or text token) = 2 x layers x KV heads x head dim x dtype bytes:")
    batch = len(prompts)
    print(f"  release (28 layers, 8 KV heads, head dim 128, bf16): {release} B = {release // 1024} KiB; x {n} frames "
          f"= {release * n / mib:.1f} MiB per prompt ({release * columns / mib:.1f} MiB with the {k} delay columns); "
          f"x batch {batch} = {release * n * batch / mib:.1f} MiB ({release * columns * batch / mib:.1f} MiB); the "
          f"prompt's positions come on top")
    print(f"  this model ({config.num_hidden_layers} layers, {config.num_key_value_heads} KV heads, fp32): {bench} B "
          f"per position, as a port DynamicCache holds ({held} B)")


if __name__ == "__main__":
    main()
