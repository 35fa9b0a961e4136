"""Audio files → codes in the builder: a tiny random HiggsAudioV2TokenizerModel (transformers) encodes generated
audio; the shard's codes equal the codec's own `encode` on the same audio."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
import torchaudio
from transformers import HiggsAudioV2TokenizerModel

from helpers import CODEC_RATE, TINY_MODEL, build, save_tiny_codec
from higgs_ds.data.shards import Manifest, decode_sample, read_shard


@pytest.fixture(scope="module")
def codec_dir(tmp_path_factory) -> Path:
    directory = save_tiny_codec(tmp_path_factory.mktemp("codec"))
    config = HiggsAudioV2TokenizerModel.from_pretrained(directory).config
    assert config.num_quantizers == 8 and config.frame_rate == 25
    return directory


def test_the_tiny_codec_decodes_n_frames_to_n_hops(codec_dir):
    """Its decoder upsamples by the encoder's hop (960 samples, 25 frames/s): N frames decode to N × 960 samples."""
    codec = HiggsAudioV2TokenizerModel.from_pretrained(codec_dir).eval()
    assert codec.config.hop_length == 960
    for frames in (1, 50):
        codes = torch.randint(0, 1024, (1, 8, frames), generator=torch.Generator().manual_seed(frames))
        with torch.inference_mode():
            audio = codec.decode(codes, return_dict=True).audio_values
        assert audio.shape == (1, 1, frames * 960), (frames, audio.shape)


def tone(seconds: float, rate: int, channels: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    wave = 0.4 * np.sin(2 * np.pi * (180 + 40 * seed) * t) + 0.05 * rng.standard_normal(len(t))
    return np.stack([wave * (1 + 0.2 * c) for c in range(channels)], axis=1).astype(np.float32)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("audio")
    soundfile.write(root / "reply.wav", tone(0.6, CODEC_RATE, 1, 1), CODEC_RATE, subtype="FLOAT")
    soundfile.write(root / "question.flac", tone(0.5, 16000, 2, 2), 16000)  # stereo, 16 kHz: downmix + resample
    np.save(root / "ref.npy", np.random.default_rng(3).integers(0, 1024, (8, 6)).astype(np.int16))
    samples = [
        {"id": "tts", "messages": [{"role": "user", "content": "Say hello."},
                                   {"role": "assistant", "content": {"type": "audio", "audio_url": "reply.wav"}}]},
        {"id": "asr", "messages": [{"role": "user", "content": [
            {"type": "text", "text": "Transcribe."}, {"type": "audio", "audio_url": str(root / "question.flac")}]},
            {"role": "assistant", "content": "hello"}]},
        {"id": "clone", "messages": [{"role": "assistant", "content": {"type": "audio", "audio_url": "ref.npy"}},
                                     {"role": "assistant", "content": {"type": "audio", "audio_url": "reply.wav"}}]},
    ]
    (root / "data.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples))
    (root / "config.json").write_text(json.dumps(TINY_MODEL))
    return root / "data.jsonl"


def shard_codes(out: Path, tokens) -> dict[str, list[np.ndarray]]:
    manifest = Manifest.load(out / "train")
    return {s.key: s.audio_codes for shard in manifest.shards
            for s in (decode_sample(raw, tokens, manifest.audio) for raw in read_shard(out / "train" / shard.name))}


def test_builder_codes_equal_the_codecs_encode(corpus, codec_dir, tmp_path, tokens):
    assert build(corpus, tmp_path / "out", "--codec", str(codec_dir)) == 0
    got = shard_codes(tmp_path / "out", tokens)

    codec = HiggsAudioV2TokenizerModel.from_pretrained(codec_dir).eval()
    reply = torch.from_numpy(soundfile.read(corpus.parent / "reply.wav", dtype="float32")[0])[None, None]
    stereo, rate = soundfile.read(corpus.parent / "question.flac", dtype="float32")
    question = torchaudio.functional.resample(torch.from_numpy(stereo.mean(axis=1))[None, None], rate, CODEC_RATE)
    with torch.inference_mode():
        expected_reply = codec.encode(reply, return_dict=False)[0].numpy()
        expected_question = codec.encode(question, return_dict=False)[0].numpy()

    assert expected_reply.shape == (8, 15) and expected_question.shape == (8, 13)  # 25 frames/s
    assert len(np.unique(expected_reply)) > 8, "random codebooks should give varied codes"
    np.testing.assert_array_equal(got["tts"][0], expected_reply)
    np.testing.assert_array_equal(got["asr"][0], expected_question)
    np.testing.assert_array_equal(got["clone"][0], np.load(corpus.parent / "ref.npy"))
    np.testing.assert_array_equal(got["clone"][1], expected_reply)


def test_codes_do_not_depend_on_worker_count(corpus, codec_dir, tmp_path):
    for workers in ("1", "2"):
        assert build(corpus, tmp_path / workers, "--codec", str(codec_dir), "--workers", workers) == 0
    one, two = (sorted((tmp_path / w / "train").iterdir()) for w in ("1", "2"))
    assert [p.name for p in one] == [p.name for p in two]
    assert all(a.read_bytes() == b.read_bytes() for a, b in zip(one, two))


def test_audio_problems_name_the_sample(corpus, codec_dir, tmp_path, capsys):
    assert build(corpus, tmp_path / "no_codec") == 1  # the first bad sample met, in shuffled order
    assert re.search(r"line [13] \(sample '(tts|clone)'\): audio\[[01]\]\.audio_url='reply\.wav': an audio file, but "
                     r"no --codec", capsys.readouterr().err)
    (corpus.parent / "broken.wav").write_bytes(b"RIFF not really a wav")
    broken = corpus.parent / "broken.jsonl"
    broken.write_text(corpus.read_text().replace('"reply.wav"', '"broken.wav"', 1))
    assert build(broken, tmp_path / "broken", "--codec", str(codec_dir), "--on-error", "skip") == 0
    errors = [json.loads(line) for line in (tmp_path / "broken" / "errors.jsonl").read_text().splitlines()]
    assert [e["line"] for e in errors] == [1]
    assert "line 1 (sample 'tts'): audio[0].audio_url='broken.wav': cannot read/encode audio" in errors[0]["error"]
    four = corpus.parent / "four.json"
    four.write_text(json.dumps(TINY_MODEL | {"audio_num_codebooks": 4}))
    with pytest.raises(SystemExit, match="produces 8 codebooks of 1024 codes; the model expects 4 of 1024"):
        build(corpus, tmp_path / "four", "--codec", str(codec_dir), "--model-config", str(four))
