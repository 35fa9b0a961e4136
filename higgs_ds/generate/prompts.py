"""ChatML messages → a generation prompt: the training path's tokens and audio streams, then the assistant's header.

The messages are tokenized and their audio expanded exactly as training sees them (`sample_from_chatml` and the
Collator: stream bos/eos and the delay pattern around each clip), so a prompt is a training sample's prefix. Like
upstream's serve engine, the prompt ends with `<|start_header_id|>assistant<|end_header_id|>\\n\\n` and, when
`force_audio`, `<|audio_out_bos|>` (the model then speaks at once; otherwise it may write text first)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping

import numpy as np
import torch

from ..data.chatml import AudioRef, sample_from_chatml
from ..data.collator import Collator
from ..vocabulary import Vocabulary

ASSISTANT_HEADER = "<|start_header_id|>assistant<|end_header_id|>\n\n"


@dataclass
class Prompt:
    id: str
    input_ids: torch.Tensor  # long [L]: one position per text token and per audio frame (placeholder id there)
    audio_mask: torch.Tensor  # bool [L]: the audio-frame positions
    audio_codes: torch.Tensor  # long [K, n]: the codes at the n audio positions, in order (delayed, bos/eos included)

    def __len__(self) -> int:
        return self.input_ids.shape[0]


def build_prompt(sample: Mapping, vocabulary: Vocabulary, load_codes: Callable[[AudioRef], np.ndarray], key: str,
                 force_audio: bool = True) -> Prompt:
    """Raises SampleError (naming `key` and the field) for messages the training path would refuse."""
    tokenizer, tokens, audio = vocabulary.tokenizer, vocabulary.tokens, vocabulary.model_config.audio
    sample = sample_from_chatml(sample, tokenizer, tokens, audio, load_codes, key)
    batch = Collator(tokens, audio)([sample])
    audio_mask = (batch.audio_in_mask | batch.audio_out_mask)[0]
    codes = torch.empty(audio.num_codebooks, int(audio_mask.sum()), dtype=torch.long)
    codes[:, batch.audio_in_mask[0][audio_mask]] = batch.audio_in_ids
    codes[:, batch.audio_out_mask[0][audio_mask]] = batch.audio_out_ids
    header = tokenizer.encode(ASSISTANT_HEADER + ("<|audio_out_bos|>" if force_audio else ""),
                              add_special_tokens=False)
    return Prompt(id=str(key), input_ids=torch.cat([batch.input_ids[0], torch.tensor(header, dtype=torch.long)]),
                  audio_mask=torch.cat([audio_mask, torch.zeros(len(header), dtype=torch.bool)]), audio_codes=codes)
