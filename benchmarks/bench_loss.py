"""Text + audio loss heads, forward + backward: fused (chunked / Liger) vs materialized logits.

Workload (defaults, the real sizes): 8192 rows of hidden 3072; 1/4 of them are learnable text rows that reach the
128256-way text head, 3/4 are audio-out rows that reach the 8 × 1026-way audio head (in the model only learnable rows
reach each head). All targets are learnable. The objective is text_sum + Σ_k w_k·audio_sum_k with w_k = 1, as in the
model, whose codebooks have equal token counts; --per-codebook-weights uses distinct w_k, which makes the chunked
audio head recompute grad_hidden in backward.

Each variant runs in a fresh subprocess. Memory ("extra") is the peak during one forward+backward above the state
after setup: weights, hidden states, and each weight's .grad, preallocated as in a DeepSpeed engine so that neither
variant is charged for creating them; "+.grad" adds those buffers back. Note that autograd still produces a
weight-sized gradient tensor per head and adds it into .grad: both variants pay for it inside "extra".
CPU: peak RSS (/proc VmHWM, reset before the measured step); CUDA: torch.cuda.max_memory_allocated.
Time: wall and process CPU seconds (all threads) of the step; on a CPU shared with other jobs, CPU seconds compare
better. The summary keeps each variant's best over --repeats.

    python benchmarks/bench_loss.py                      # CPU, fp32
    python benchmarks/bench_loss.py --device cuda        # bf16; adds the Liger variant when liger_kernel imports
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

from higgs_ds.model.heads import DEFAULT_CHUNK_TOKENS, LinearCrossEntropyHead, resolve_impl

MIB = 1 << 20


def cpu_rss(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024


def memory_now(device: torch.device) -> int:
    return torch.cuda.memory_allocated() if device.type == "cuda" else cpu_rss("VmRSS")


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS


def peak(device: torch.device) -> int:
    return torch.cuda.max_memory_allocated() if device.type == "cuda" else cpu_rss("VmHWM")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def make_workload(args, impl: str, device: torch.device, dtype: torch.dtype):
    gen = torch.Generator(device).manual_seed(0)
    tokens = args.tokens
    text_rows = int(tokens * args.text_fraction)
    text = LinearCrossEntropyHead(args.hidden, args.text_vocab, chunk_tokens=args.chunk_tokens, impl=impl)
    audio = LinearCrossEntropyHead(
        args.hidden, args.codebook_vocab, args.codebooks, chunk_tokens=args.chunk_tokens, impl=impl
    )
    text, audio = text.to(device, dtype), audio.to(device, dtype)
    for head in (text, audio):
        with torch.no_grad():
            head.weight.normal_(0, 0.02, generator=gen)
    hidden = torch.randn(tokens, args.hidden, generator=gen, device=device, dtype=dtype).requires_grad_()
    text_targets = torch.randint(0, args.text_vocab, (text_rows,), generator=gen, device=device)
    audio_targets = torch.randint(0, args.codebook_vocab, (tokens - text_rows, args.codebooks), generator=gen,
                                  device=device)
    codebook_weights = torch.ones(args.codebooks, device=device)
    if args.per_codebook_weights:
        codebook_weights = torch.linspace(0.5, 1.5, args.codebooks, device=device)
    return text, audio, hidden, text_targets, audio_targets, codebook_weights


def step(text, audio, hidden, text_targets, audio_targets, codebook_weights) -> None:
    text_rows = text_targets.shape[0]
    text_loss = text(hidden[:text_rows], text_targets)
    audio_loss = audio(hidden[text_rows:], audio_targets)
    (text_loss.loss_sum.sum() + (audio_loss.loss_sum * codebook_weights).sum()).backward()


def worker(args) -> dict:
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    workload = make_workload(args, args.worker, device, dtype)
    text, audio, hidden, text_targets, audio_targets, codebook_weights = workload
    # Warm-up on a few rows of each head: library init and kernel selection stay out of the measurement.
    step(text, audio, hidden[:64], text_targets[:16], audio_targets[:48], codebook_weights)
    hidden.grad = text.weight.grad = audio.weight.grad = None
    sync(device)
    before_grads = memory_now(device)
    for param in (text.weight, audio.weight):
        param.grad = torch.zeros_like(param)
    grad_bytes = memory_now(device) - before_grads
    baseline = memory_now(device)
    reset_peak(device)
    start, start_cpu = time.perf_counter(), time.process_time()
    step(*workload)
    sync(device)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - start_cpu
    extra = peak(device) - baseline
    return dict(variant=args.worker, runs=resolve_impl(args.worker, device), seconds=seconds, cpu_seconds=cpu_seconds,
                extra_mib=extra / MIB, with_grads_mib=(extra + grad_bytes) / MIB, grad_mib=grad_bytes / MIB)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default=None, help="float32 (CPU default) or bfloat16 (CUDA default)")
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--hidden", type=int, default=3072)
    parser.add_argument("--text-vocab", type=int, default=128256)
    parser.add_argument("--codebooks", type=int, default=8)
    parser.add_argument("--codebook-vocab", type=int, default=1026)
    parser.add_argument("--text-fraction", type=float, default=0.25)
    parser.add_argument("--per-codebook-weights", action="store_true", help="distinct w_k (see above)")
    parser.add_argument("--chunk-tokens", type=int, default=DEFAULT_CHUNK_TOKENS, help="rows per chunk")
    parser.add_argument("--repeats", type=int, default=1, help="alternating rounds of all variants")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    if args.worker:
        print(json.dumps(worker(args)))
        return

    variants = ["materialized", "chunked"]
    if args.device == "cuda" and resolve_impl("liger", torch.device("cuda")) == "liger":
        variants.append("liger")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}, dtype {args.dtype}, "
          f"{args.tokens} rows ({args.text_fraction:g} text) × hidden {args.hidden}, text vocab {args.text_vocab}, "
          f"audio {args.codebooks}×{args.codebook_vocab}, chunk {args.chunk_tokens} rows, "
          f"{'distinct' if args.per_codebook_weights else 'equal'} codebook weights")
    results: dict[str, list[dict]] = {v: [] for v in variants}
    for _ in range(args.repeats):
        for variant in variants:
            out = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--worker", variant],
                                 check=True, capture_output=True, text=True).stdout
            results[variant].append(json.loads(out.strip().splitlines()[-1]))
            print("  " + json.dumps(results[variant][-1]), flush=True)

    def best(variant, key):
        return min(r[key] for r in results[variant])

    columns = [("time s", "seconds", ".2f"), ("cpu s", "cpu_seconds", ".2f"), ("extra MiB", "extra_mib", ".0f"),
               ("+.grad MiB", "with_grads_mib", ".0f")]
    print(f"{'variant':14} {'runs':13}" + "".join(f" {title:>11}" for title, _, _ in columns))
    for v in variants:
        print(f"{v:14} {results[v][0]['runs']:13}" + "".join(f" {best(v, key):11{fmt}}" for _, key, fmt in columns))
    for v in variants[1:]:
        print(f"{v} / materialized: " + ", ".join(
            f"{title.split()[0]} {best(v, key) / best('materialized', key):.3f}×" for title, key, _ in columns))

if __name__ == "__main__":
    main()
