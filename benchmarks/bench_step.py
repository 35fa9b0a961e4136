"""Forward+backward throughput: HiggsAudioForTraining (routed DualFFN, shifted losses on fused heads) against
transformers' HiggsAudioV2ForConditionalGeneration + its own loss, same weights, same TTS-like batch.

Small backbone (hidden 512, 4 layers) with the real head sizes (text 128256, audio 8 x 1026): the port computes
both heads at every position and materializes the logits; we run the text head only where a shifted text label
exists and the audio head only at labelled audio-out frames. The batch is one TTS sample per row (the port cannot
isolate packed samples): prompt, reference audio-in, audio-out, a few learnable text tokens.

    .venv/bin/python benchmarks/bench_step.py [--rows 1 --length 1024 --steps 3]
"""
from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
from transformers import HiggsAudioV2Config, HiggsAudioV2ForConditionalGeneration

from higgs_ds.data.batch import Batch
from higgs_ds.model import HiggsAudioForTraining
from higgs_ds.testing.host_syncs import DataDependentOps
from higgs_ds.testing.port import port_inputs  # the same port feed the parity tests check


def bench_config() -> HiggsAudioV2Config:
    """Special token ids: the port's defaults (the release's)."""
    return HiggsAudioV2Config(
        vocab_size=128256, hidden_size=512, intermediate_size=1376, num_hidden_layers=4, num_attention_heads=8,
        num_key_value_heads=2, head_dim=64, num_codebooks=8, codebook_size=1026)


def tts_batch(config: HiggsAudioV2Config, rows: int, length: int, generator: torch.Generator) -> Batch:
    """Per row: 60 prompt tokens, 25% reference audio-in, 16 text tokens, audio-out frames, 3 learnable tokens."""
    k, vocab = config.num_codebooks, config.codebook_size
    prompt, reference, middle, answer = 60, length // 4, 16, 3
    frames = length - prompt - reference - middle - answer
    kinds = torch.tensor([0] * prompt + [1] * reference + [0] * middle + [2] * frames + [0] * answer)
    kinds = kinds.expand(rows, length)
    # Text ids well below the special tokens. Audio frames hold a placeholder id (replaced by audio embeddings; we
    # route by mask, the port by this id).
    input_ids = torch.randint(0, 1000, (rows, length), generator=generator).masked_fill(kinds > 0,
                                                                                       config.audio_token_id)
    label_ids = torch.full((rows, length), -100)
    label_ids[:, -answer:] = input_ids[:, -answer:]
    audio_in_ids = torch.randint(0, vocab, (k, rows * reference), generator=generator)
    audio_out_ids = torch.randint(0, vocab, (k, rows * frames), generator=generator)
    audio_out_labels = audio_out_ids.clone()
    audio_out_labels[:, ::frames] = -100  # the all-bos first frame of each segment
    return Batch(input_ids=input_ids, attention_mask=torch.ones(rows, length, dtype=torch.bool),
                 position_ids=torch.arange(length).expand(rows, length), segment_ids=torch.ones(rows, length,
                                                                                                 dtype=torch.int32),
                 label_ids=label_ids, audio_in_mask=kinds == 1, audio_out_mask=kinds == 2, audio_in_ids=audio_in_ids,
                 audio_out_ids=audio_out_ids, audio_out_labels=audio_out_labels)


def time_steps(step, steps: int) -> tuple[float, float]:
    """Median seconds of forward+backward after one warm-up step; returns (median, loss)."""
    loss = step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        loss = step()
        times.append(time.perf_counter() - start)
    return statistics.median(times), loss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1)
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()

    torch.manual_seed(0)
    config = bench_config()
    ours = HiggsAudioForTraining(config, attn_implementation="sdpa")
    port = HiggsAudioV2ForConditionalGeneration(config, use_text_head=True)
    port.config._attn_implementation = "sdpa"
    port.load_state_dict(ours.state_dict())
    batch = tts_batch(config, args.rows, args.length, torch.Generator().manual_seed(0))
    theirs = port_inputs(batch, config)

    def our_step(index=batch.index):
        ours.zero_grad(set_to_none=True)
        loss = ours(**dict(batch.model_inputs(), index=index)).loss
        loss.backward()
        return loss.item()

    def unindexed_step():  # before the Batch carried its index: the model computed it, with host syncs
        return our_step(index=None)

    def data_dependent_ops(step) -> int:
        with DataDependentOps() as ops:
            step()
        return sum(ops.found.values()) - 1  # minus the step's own loss.item()

    def port_step():
        port.zero_grad(set_to_none=True)
        loss = port(**theirs).loss
        loss.backward()
        return loss.item()

    tokens = batch.num_tokens
    our_time, our_loss = time_steps(our_step, args.steps)
    unindexed_time, _ = time_steps(unindexed_step, args.steps)
    port_time, port_loss = time_steps(port_step, args.steps)
    learnable_text = int((batch.label_ids[:, 1:] != -100).sum())
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
          f"torch {torch.__version__}")
    print(f"batch: {args.rows} x {args.length} tokens, {int(batch.audio_out_mask.sum())} audio-out frames, "
          f"{int(batch.audio_in_mask.sum())} audio-in frames, {learnable_text} learnable text tokens")
    print(f"loss (same weights, same objective): ours {our_loss:.6f}  port {port_loss:.6f}")
    print(f"ours: {our_time * 1000:8.1f} ms/step  {tokens / our_time:9.1f} tokens/s  "
          f"{data_dependent_ops(our_step)} data-dependent ops per forward+backward (Batch carries its index)")
    print(f"ours, index computed in forward (before): {unindexed_time * 1000:8.1f} ms/step  "
          f"{data_dependent_ops(unindexed_step)} data-dependent ops; ratio before/after {unindexed_time / our_time:.2f}x")
    print(f"port: {port_time * 1000:8.1f} ms/step  {tokens / port_time:9.1f} tokens/s  "
          f"{data_dependent_ops(port_step)} data-dependent ops")
    print(f"speed-up: {port_time / our_time:.2f}x")


if __name__ == "__main__":
    main()
