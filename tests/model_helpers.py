"""Tiny configs and hand-built Batches for the model tests (the collator is tested on its own)."""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
from transformers import AutoTokenizer, HiggsAudioV2Config

from higgs_ds.data.batch import Batch
from higgs_ds.data.tokens import SpecialTokens

TOKENIZER = Path(__file__).parent / "assets" / "tiny_tokenizer"
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


@lru_cache(maxsize=1)
def tokenizer():
    return AutoTokenizer.from_pretrained(str(TOKENIZER))


def special_tokens() -> SpecialTokens:
    return SpecialTokens.from_tokenizer(tokenizer())


def tiny_config(num_codebooks: int = 4, codes: int = 32, hidden: int = 32, layers: int = 2,
                vocab: int = 416) -> HiggsAudioV2Config:
    """`codes` real codes per codebook; stream bos/eos come after them (the release: 1024 -> codebook_size 1026)."""
    tokens = special_tokens()
    return HiggsAudioV2Config(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden + 16, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, head_dim=hidden // 4, max_position_embeddings=131072,
        rope_parameters=dict(LLAMA3_ROPE), pad_token_id=tokens.pad, bos_token_id=tokens.begin_of_text,
        eos_token_id=tokens.eot, num_codebooks=num_codebooks, codebook_size=codes + 2,
        audio_token_id=tokens.audio_out, audio_bos_token_id=tokens.audio_out_bos,
        audio_delay_token_id=tokenizer().convert_tokens_to_ids("<|audio_delay|>"),
        audio_stream_bos_id=codes, audio_stream_eos_id=codes + 1)


@dataclass
class Piece:
    kind: str  # "text" | "audio_in" | "audio_out"
    values: torch.Tensor  # text ids [n] or codes [K, T]
    labelled: bool


def text(ids, labelled: bool = False) -> Piece:
    return Piece("text", torch.as_tensor(ids, dtype=torch.long), labelled)


def audio_in(codes: torch.Tensor) -> Piece:
    return Piece("audio_in", codes.long(), False)


def audio_out(codes: torch.Tensor, labelled: bool = True) -> Piece:
    return Piece("audio_out", codes.long(), labelled)


def delayed(codes: torch.Tensor, bos: int, eos: int, label: bool) -> torch.Tensor:
    """[bos|codes|eos] (labels: [-100|codes|eos]) with codebook k shifted right by k (docs/design.md §4)."""
    k_count, length = codes.shape
    first, last = (-100, eos) if label else (bos, eos)
    stream = torch.cat([torch.full((k_count, 1), first), codes, torch.full((k_count, 1), last)], dim=1)
    out = torch.full((k_count, length + 1 + k_count), -100 if label else eos, dtype=torch.long)
    for k in range(k_count):
        out[k, :k] = -100 if label else bos
        out[k, k:k + length + 2] = stream[k]
    return out


def make_batch(rows: list[list[list[Piece]]], config: HiggsAudioV2Config, pad_to: int | None = None) -> Batch:
    """rows[b] = the samples packed into row b; each sample a list of Pieces. Right-padded with segment 0."""
    tokens = special_tokens()
    bos, eos, k_count = config.audio_stream_bos_id, config.audio_stream_eos_id, config.num_codebooks
    per_row, audio = [], {"audio_in": ([], []), "audio_out": ([], [])}
    for row in rows:
        cols = {name: [] for name in ("input_ids", "position_ids", "segment_ids", "label_ids", "audio_in_mask",
                                      "audio_out_mask")}
        for segment, pieces in enumerate(row, start=1):
            start = len(cols["input_ids"])
            for piece in pieces:
                if piece.kind == "text":
                    n = len(piece.values)
                    cols["input_ids"] += piece.values.tolist()
                    cols["label_ids"] += piece.values.tolist() if piece.labelled else [-100] * n
                    flags = (False, False)
                else:
                    frames = delayed(piece.values, bos, eos, label=False)
                    labels = delayed(piece.values, bos, eos, label=True)
                    if not piece.labelled:
                        labels.fill_(-100)
                    audio[piece.kind][0].append(frames)
                    audio[piece.kind][1].append(labels)
                    n = frames.shape[1]
                    cols["input_ids"] += [tokens.audio_in if piece.kind == "audio_in" else tokens.audio_out] * n
                    cols["label_ids"] += [-100] * n
                    flags = (piece.kind == "audio_in", piece.kind == "audio_out")
                cols["audio_in_mask"] += [flags[0]] * n
                cols["audio_out_mask"] += [flags[1]] * n
            cols["segment_ids"] += [segment] * (len(cols["input_ids"]) - start)
            cols["position_ids"] += list(range(len(cols["input_ids"]) - start))
        per_row.append(cols)
    length = max(pad_to or 0, max(len(cols["input_ids"]) for cols in per_row))
    fill = {"input_ids": tokens.pad, "position_ids": 0, "segment_ids": 0, "label_ids": -100, "audio_in_mask": False,
            "audio_out_mask": False}
    tensors = {name: torch.tensor([cols[name] + [value] * (length - len(cols[name])) for cols in per_row])
               for name, value in fill.items()}

    def stack(parts):
        return torch.cat(parts, dim=1) if parts else torch.zeros(k_count, 0, dtype=torch.long)

    return Batch(input_ids=tensors["input_ids"], attention_mask=tensors["segment_ids"] > 0,
                 position_ids=tensors["position_ids"], segment_ids=tensors["segment_ids"].int(),
                 label_ids=tensors["label_ids"], audio_in_mask=tensors["audio_in_mask"],
                 audio_out_mask=tensors["audio_out_mask"], audio_in_ids=stack(audio["audio_in"][0]),
                 audio_out_ids=stack(audio["audio_out"][0]), audio_out_labels=stack(audio["audio_out"][1]))


def random_codes(generator: torch.Generator, config: HiggsAudioV2Config, frames: int) -> torch.Tensor:
    return torch.randint(0, config.audio_stream_bos_id, (config.num_codebooks, frames), generator=generator)


def random_text(generator: torch.Generator, n: int, high: int = 400) -> torch.Tensor:
    return torch.randint(0, high, (n,), generator=generator)


def tts_sample(generator: torch.Generator, config: HiggsAudioV2Config, prompt: int = 6, frames: int = 5,
               reference_frames: int = 0, answer_text: int = 2) -> list[Piece]:
    """System/user prompt (not learnable) [+ reference audio-in], learnable audio-out, a learnable text tail."""
    pieces = [text(random_text(generator, prompt))]
    if reference_frames:
        pieces += [audio_in(random_codes(generator, config, reference_frames)), text(random_text(generator, 2))]
    pieces += [audio_out(random_codes(generator, config, frames)), text(random_text(generator, answer_text), True)]
    return pieces


def randomize(model: torch.nn.Module, seed: int = 0) -> None:
    """Non-trivial weights everywhere: text and audio norms/MLPs must differ for routing bugs to show."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            param.copy_(1.0 + 0.3 * noise if name.endswith("norm.weight") else 0.15 * noise)


def mixed_packed_batch(config: HiggsAudioV2Config, seed: int, pad_to: int) -> Batch:
    """Two packed rows, two samples each: text, audio-in, audio-out (trained and not), right padding in both."""
    g = torch.Generator().manual_seed(seed)
    row0 = [tts_sample(g, config, reference_frames=3, frames=6),
            [text(random_text(g, 4), labelled=True), audio_out(random_codes(g, config, 3))]]
    row1 = [[audio_out(random_codes(g, config, 4), labelled=False), text(random_text(g, 5), labelled=True)],
            [text(random_text(g, 3)), audio_in(random_codes(g, config, 2)), text(random_text(g, 2), labelled=True)]]
    batch = make_batch([row0, row1], config, pad_to=pad_to)
    assert batch.audio_in_ids.shape[1] and batch.audio_out_ids.shape[1]
    assert (batch.segment_ids == 0).any(dim=1).all() and (batch.segment_ids == 2).any(dim=1).all()
    return batch
