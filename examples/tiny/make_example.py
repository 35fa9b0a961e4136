"""Writes the tiny example data set next to this file (or into the folder given as the first argument):

    samples.jsonl   24 upstream ChatML samples: TTS, voice cloning (a reference clip before start_index),
                    multi-turn chat ending in audio, audio-in (ASR-style user audio), text-only chat
    codes/*.npy     the pre-computed audio codes every audio_url points to: int16 [8, T], codes 0..1023
    tokenizer/      a copy of tests/assets/tiny_tokenizer (byte-level BPE with the Higgs special tokens)
    config.json     a tiny boson-layout model config: 8 codebooks of 1024 codes with the delay pattern (the
                    release's audio settings), a 2-layer backbone, token ids matching the tokenizer

Run once and commit the output (`tests/test_readme.py` checks that rerunning it reproduces the files). The codes are
arithmetic patterns, not random draws, so the output never depends on a library's random generator.

    .venv/bin/python examples/tiny/make_example.py
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
TOKENIZER_SOURCE = HERE.parents[1] / "tests" / "assets" / "tiny_tokenizer"
NUM_CODEBOOKS, CODES = 8, 1024
SYSTEM_TTS = "Generate audio following instruction."
SYSTEM_CLONE = "Generate audio following instruction. Speak in the voice of the reference clip."

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello world, this is a tiny example.",
    "Please read the text aloud.",
    "Speak in a calm voice.",
    "Rain is expected later this evening.",
    "Numbers like 42 and 7 are read out in full.",
]


def codes(index: int, frames: int) -> np.ndarray:
    """A deterministic [8, frames] pattern of codes in 0..1023 (distinct per clip and codebook)."""
    k = np.arange(NUM_CODEBOOKS, dtype=np.int64)[:, None]
    t = np.arange(frames, dtype=np.int64)[None, :]
    return ((index * 131 + k * 97 + t * t * 7 + t * (k + 3) * 13) % CODES).astype(np.int16)


def samples(clip) -> list[dict]:
    """The 24 samples; `clip(name, frames)` writes a codes file and returns its audio_url."""
    out = []
    for i, text in enumerate(SENTENCES, start=1):  # TTS: the assistant's audio is learnt
        out.append({"id": f"tts-{i:02d}", "messages": [
            {"role": "system", "content": SYSTEM_TTS},
            {"role": "user", "content": text},
            {"role": "assistant", "content": {"type": "audio", "audio_url": clip(f"tts-{i:02d}", 12 + 3 * i)}}]})
    for i in range(1, 6):  # voice cloning: the reference clip (turn 2) comes before start_index, so is not learnt
        out.append({"id": f"clone-{i:02d}", "start_index": 3, "speaker": f"speaker-{i % 2 + 1}", "messages": [
            {"role": "system", "content": SYSTEM_CLONE},
            {"role": "user", "content": SENTENCES[i - 1]},
            {"role": "assistant", "content": {"type": "audio", "audio_url": clip(f"clone-{i:02d}-ref", 10 + i)}},
            {"role": "user", "content": SENTENCES[i]},
            {"role": "assistant", "content": {"type": "audio", "audio_url": clip(f"clone-{i:02d}", 14 + 2 * i)}}]})
    for i in range(1, 5):  # multi-turn: text turns, then a text answer followed by its audio (<|eom_id|> between)
        out.append({"id": f"chat-audio-{i:02d}", "misc": {"speaker": "speaker-1"}, "messages": [
            {"role": "system", "content": "You are a helpful voice assistant."},
            {"role": "user", "content": f"Can you count to {i + 2}?"},
            {"role": "assistant", "content": "Sure."},
            {"role": "user", "content": "Say it out loud, please."},
            {"role": "assistant", "content": " ".join(str(n) for n in range(1, i + 3))},
            {"role": "assistant", "content": {"type": "audio", "audio_url": clip(f"chat-audio-{i:02d}", 9 + 4 * i)}}]})
    for i in range(1, 6):  # audio in: the user's clip is context (never learnt), the transcript is learnt
        out.append({"id": f"asr-{i:02d}", "messages": [
            {"role": "user", "content": [
                {"type": "text", "text": "Transcribe this clip."},
                {"type": "audio", "audio_url": clip(f"asr-{i:02d}", 16 + 5 * i)}]},
            {"role": "assistant", "content": SENTENCES[i]}]})
    for i in range(1, 5):  # text only
        out.append({"id": f"text-{i:02d}", "messages": [
            {"role": "user", "content": f"What is {i} plus {i}?"},
            {"role": "assistant", "content": f"{i} plus {i} is {2 * i}."},
            {"role": "user", "content": "Thanks!"},
            {"role": "assistant", "content": "You are welcome."}]})
    return out


def model_config(tokenizer_dir: Path) -> dict:
    """Boson layout (what upstream's checkpoints hold); token ids are those of the tokenizer."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    ids = tokenizer.convert_tokens_to_ids
    return {
        "architectures": ["HiggsAudioModel"], "model_type": "higgs_audio",
        "audio_num_codebooks": NUM_CODEBOOKS, "audio_codebook_size": CODES, "use_delay_pattern": True,
        "audio_stream_bos_id": CODES, "audio_stream_eos_id": CODES + 1,
        "audio_adapter_type": "dual_ffn_fast_forward", "audio_dual_ffn_layers": [0, 1],
        "skip_audio_tower": True, "encode_whisper_embed": False, "encode_audio_in_tokens": True,
        "audio_in_token_idx": ids("<|AUDIO|>"), "audio_out_token_idx": ids("<|AUDIO_OUT|>"),
        "audio_out_bos_token_id": ids("<|audio_out_bos|>"), "audio_eos_token_id": ids("<|audio_eos|>"),
        "pad_token_id": ids("<|end_of_text|>"),
        "text_config": {
            "model_type": "llama", "vocab_size": -(-len(tokenizer) // 16) * 16, "hidden_size": 32,
            "intermediate_size": 80, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "head_dim": 8, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
            "bos_token_id": ids("<|begin_of_text|>"), "eos_token_id": ids("<|eot_id|>")},
    }


def prompts() -> list[dict]:
    """Generation prompts (launch/generate.py): the conversation up to the assistant turn to generate. TTS, voice
    cloning (the reference clip of clone-01 in an earlier assistant turn), and a turn that may start with text."""
    system = {"role": "system", "content": "Generate audio following instruction."}
    return [
        {"id": "tts", "messages": [system, {"role": "user", "content": "The quick brown fox jumps over the lazy dog."}]},
        {"id": "clone", "messages": [
            {"role": "system", "content": "Generate audio following instruction. Speak in the voice of the reference clip."},
            {"role": "user", "content": "The quick brown fox jumps over the lazy dog."},
            {"role": "assistant", "content": {"type": "audio", "audio_url": "codes/clone-01-ref.npy"}},
            {"role": "user", "content": "Please read the text aloud."}]},
        {"id": "chat", "force_audio": False, "messages": [{"role": "user", "content": "Say hello, then read it."}]},
    ]


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(out / "codes", ignore_errors=True)
    (out / "codes").mkdir()
    clips: list[str] = []

    def clip(name: str, frames: int) -> str:
        np.save(out / "codes" / f"{name}.npy", codes(len(clips), frames), allow_pickle=False)
        clips.append(name)
        return f"codes/{name}.npy"

    lines = [json.dumps(sample) for sample in samples(clip)]
    (out / "samples.jsonl").write_text("".join(line + "\n" for line in lines))
    (out / "prompts.jsonl").write_text("".join(json.dumps(prompt) + "\n" for prompt in prompts()))
    if out.resolve() / "tokenizer" != TOKENIZER_SOURCE:
        shutil.rmtree(out / "tokenizer", ignore_errors=True)
        shutil.copytree(TOKENIZER_SOURCE, out / "tokenizer")
    (out / "config.json").write_text(json.dumps(model_config(out / "tokenizer"), indent=2) + "\n")
    print(f"{out}: {len(lines)} samples, {len(clips)} code files")


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Write the tiny example data set (24 ChatML samples, their codes, "
                                     "3 generation prompts, a tiny tokenizer and model config) into a folder.")
    parser.add_argument("out", nargs="?", type=Path, default=HERE, help="output folder (default: next to this file)")
    main(parser.parse_args().out)
