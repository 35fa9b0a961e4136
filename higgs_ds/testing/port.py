"""The same batch for transformers' `HiggsAudioV2ForConditionalGeneration`, to compare against the port (parity tests,
benchmarks' baselines).

The port marks every audio frame (audio-in and audio-out) with its audio placeholder id in `input_ids` and takes the
frames' codes (delay pattern, stream bos/eos included) in `audio_input_ids` [B, frames, K]; its own loss shifts.
Checked in tests/test_model_parity.py (docs/design.md §2).
"""
from __future__ import annotations

import torch
from transformers import HiggsAudioV2Config

from ..data.batch import IGNORE, Batch


def port_inputs(batch: Batch, config: HiggsAudioV2Config) -> dict[str, torch.Tensor]:
    """The same batch for transformers' HiggsAudioV2ForConditionalGeneration: every audio frame (in and out) is an
    audio placeholder in input_ids, its codes go in audio_input_ids [B, frames, K] (docs/design.md §2)."""
    rows, length = batch.input_ids.shape
    k_count = config.num_codebooks
    is_audio = batch.audio_in_mask | batch.audio_out_mask
    codes = torch.zeros(rows * length, k_count, dtype=torch.long)
    labels = torch.full((rows * length, k_count), IGNORE, dtype=torch.long)
    codes[batch.audio_in_mask.flatten()] = batch.audio_in_ids.T
    codes[batch.audio_out_mask.flatten()] = batch.audio_out_ids.T
    labels[batch.audio_out_mask.flatten()] = batch.audio_out_labels.T
    frames = int(is_audio.sum(1).max())
    audio_input_ids = torch.zeros(rows, frames, k_count, dtype=torch.long)
    audio_labels = torch.full((rows, frames, k_count), IGNORE, dtype=torch.long)
    audio_mask = torch.zeros(rows, frames, dtype=torch.bool)
    for row in range(rows):
        flat = row * length + is_audio[row].nonzero().squeeze(1)
        audio_input_ids[row, :len(flat)], audio_labels[row, :len(flat)] = codes[flat], labels[flat]
        audio_mask[row, :len(flat)] = True
    return dict(input_ids=batch.input_ids.masked_fill(is_audio, config.audio_token_id),
                attention_mask=batch.attention_mask, position_ids=batch.position_ids, audio_input_ids=audio_input_ids,
                audio_input_ids_mask=audio_mask, labels=batch.label_ids, audio_labels=audio_labels)


def port_generate(port, prompt, max_frames: int, **sampling) -> torch.Tensor:
    """transformers' own `generate` on one generation prompt (higgs_ds.generate.Prompt): its new delayed frames
    [K, n] (the first all stream-bos). The port generates the audio stream only; a prompt without audio passes no
    audio arguments (the port's prepare_inputs_for_generation takes an empty audio_input_ids for a decode step)."""
    ids = prompt.input_ids.clone()
    ids[prompt.audio_mask] = port.config.audio_token_id
    frames = prompt.audio_codes.shape[1]
    audio = dict(audio_input_ids=prompt.audio_codes.T[None],
                 audio_input_ids_mask=torch.ones(1, frames, dtype=torch.bool)) if frames else {}
    with torch.no_grad():
        out = port.generate(input_ids=ids[None], max_new_tokens=max_frames, **audio, **sampling)
    return out[0, frames:].T
