"""launch/generate.py and what it loads: SOURCE as a training run, a tag, a LoRA run (merged) or an export
(higgs_ds/generate/source.py); codes → WAV with the codec (codec.py); the prompts file and the command end to end
(prompt_file.py, cli.py); a bad input is one `error:` line, exit 2, and no --out. The runs are real one-rank
launches of the tiny model (2 steps each), their weights dumped by the tests' entry point for comparison."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
from safetensors.torch import load_file

from helpers import (CODEC_RATE, LORA, base_config, launch, lora_config, save_tiny_codec, tiny_tokenizer,
                     write_yaml)
from higgs_ds.data.tokens import AudioSettings
from higgs_ds.generate import SamplingConfig, build_prompt, generate
from higgs_ds.generate.cli import main
from higgs_ds.generate.codec import CodecDecoder
from higgs_ds.generate.prompt_file import read_prompts
from higgs_ds.generate.source import load_source
from higgs_ds.model.checkpoint import read_port_state_dict
from higgs_ds.train.export import main as export_main

HOP = 960


def one_rank_run(config: dict, out: Path) -> Path:
    """The run launched on one rank, its final parameters dumped to out/final.safetensors."""
    config["data"]["val"] = None
    path = write_yaml(out.parent / f"{out.name}.yaml", **config)
    code, output = launch(path, gpus=1, faults={"dump_weights": str(out / "final.safetensors")})
    assert code == 0, output[-3000:]
    return out


@pytest.fixture(scope="module")
def run(corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run")
    return one_rank_run(base_config(corpus, out, max_steps=2, grad_accum=1, save_every=1, tensorboard=False), out)


@pytest.fixture(scope="module")
def lora_run(corpus, pretrained, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("lora")
    return one_rank_run(lora_config(corpus, pretrained, out, max_steps=2, grad_accum=1, tensorboard=False), out)


@pytest.fixture(scope="module")
def export(run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("export") / "both"
    assert export_main([str(run), "--out", str(out), "--layout", "both"]) == 0
    return out


@pytest.fixture(scope="module")
def codec_dir(tmp_path_factory) -> Path:
    return save_tiny_codec(tmp_path_factory.mktemp("codec"))


def weights(model) -> dict[str, torch.Tensor]:
    return dict(model.named_parameters())


# ------------------------------------------------------------------------------------------------------- SOURCE


def test_a_run_loads_its_newest_checkpoint_and_a_tag_its_own(run):
    loaded = load_source(run)
    assert loaded.description == f"checkpoint step00000002 of run {run}"
    assert not loaded.model.training and loaded.vocabulary.tokens.audio_out == tiny_tokenizer().convert_tokens_to_ids(
        "<|AUDIO_OUT|>")
    final = load_file(str(run / "final.safetensors"))
    assert weights(loaded.model).keys() == final.keys()
    for name, value in weights(loaded.model).items():
        assert value.dtype == torch.float32 and torch.equal(value, final[name]), name

    tag = run / "checkpoints" / "step00000001"
    first = weights(load_source(tag).model)
    saved = get_fp32_state_dict_from_zero_checkpoint(str(tag.parent), tag=tag.name)
    assert all(torch.equal(first[name], saved[name]) for name in first)
    assert not all(torch.equal(first[name], final[name]) for name in first), "step 2 trained on"


def test_a_lora_run_loads_with_its_adapters_merged_into_a_plain_model(lora_run, pretrained):
    """The weights are W + (alpha / rank) · B A of the run's own trained adapters (and its extras trained in full),
    in a model without PEFT layers."""
    loaded = weights(load_source(lora_run).model)
    assert loaded.keys() == read_port_state_dict(pretrained).keys()
    final, scaling = load_file(str(lora_run / "final.safetensors")), LORA["alpha"] / LORA["rank"]
    merged = 0
    for name, value in loaded.items():
        module = name.removesuffix(".weight")
        if f"{module}.base_layer.weight" in final:
            a, b = final[f"{module}.lora_A.default.weight"], final[f"{module}.lora_B.default.weight"]
            torch.testing.assert_close(value, final[f"{module}.base_layer.weight"] + scaling * b @ a, rtol=0,
                                       atol=1e-6)
            assert not torch.equal(value, final[f"{module}.base_layer.weight"]), name
            merged += 1
        else:
            assert torch.equal(value, final[name]), name
    assert merged == 2 * 10, "every linear layer of both decoder layers"


def test_exports_of_either_layout_load_the_runs_weights(run, export):
    want = weights(load_source(run).model)
    for source, layout in ((export, "port"), (export / "port", "port"), (export / "boson", "boson")):
        loaded = load_source(source)
        assert loaded.description == f"export {source if source != export else export / 'port'} ({layout} layout)"
        got = weights(loaded.model)
        assert got.keys() == want.keys() and all(torch.equal(got[n], want[n]) for n in want), source


def test_a_source_that_cannot_be_loaded_is_one_line_naming_it(run, export, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    incomplete = copy / "checkpoints" / "step00000003"
    incomplete.mkdir()
    (copy / "checkpoints" / "step00000002" / "rank0.pt").write_bytes(b"truncated")
    no_tokenizer = tmp_path / "no_tokenizer"
    shutil.copytree(export / "boson", no_tokenizer)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (no_tokenizer / name).unlink()
    (tmp_path / "file").write_text("")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty_run" / "checkpoints").mkdir(parents=True)
    cases = {
        tmp_path / "missing": "not found (expected a training run's out_dir, a checkpoint tag directory, or an export",
        tmp_path / "file": "not a directory (expected",
        tmp_path / "empty": "no complete checkpoint or exported model here (expected",
        tmp_path / "empty_run": "no complete checkpoint in this run",
        incomplete: "an incomplete checkpoint (no COMPLETE: its save never finished)",
        copy: f"checkpoint step00000002 is damaged: {copy}/checkpoints/step00000002/rank0.pt has 9 bytes, ",
        no_tokenizer: "no tokenizer files (tokenizer.json / tokenizer_config.json) beside the weights",
    }
    for source, message in cases.items():
        with pytest.raises(ValueError) as error:
            load_source(source)
        assert str(error.value).startswith(f"SOURCE {source}: {message}"), str(error.value)
        assert "\n" not in str(error.value)


# -------------------------------------------------------------------------------------------------------- codec


def test_the_codec_writes_t_frames_as_t_hops_at_its_rate(codec_dir, tmp_path):
    codec = CodecDecoder(codec_dir, AudioSettings())
    assert (codec.sample_rate, codec.hop_length) == (CODEC_RATE, HOP)
    codes = np.random.default_rng(0).integers(0, 1024, (8, 7))
    samples = codec.decode(codes)
    assert samples.dtype == np.float32 and samples.shape == (7 * HOP,) and samples.std() > 0
    codec.write_wav(tmp_path / "a.wav", codes)
    read, rate = soundfile.read(tmp_path / "a.wav", dtype="float32")
    assert rate == CODEC_RATE and np.array_equal(read, samples), "float WAV: the decoded samples as they are"

    codes[3, 2] = 1025  # a stream eos left in
    with pytest.raises(ValueError, match=r"^codec: codes span \[\d+, 1025\], the codec takes \[0, 1024\) \(stream "
                                         r"bos/eos must not reach it: pass de-delayed codes\)$"):
        codec.decode(codes)
    with pytest.raises(ValueError, match=r"^codec: expected integer codes \[8, T>=1\], got int64 \(8, 0\)$"):
        codec.decode(codes[:, :0])


# ---------------------------------------------------------------------------------------------------- the command


def write_prompts(directory: Path, lines: list) -> Path:
    """prompts.jsonl (objects as JSON, strings as they are) with clip.npy (6 frames) beside it."""
    directory.mkdir(parents=True, exist_ok=True)
    np.save(directory / "clip.npy", np.random.default_rng(1).integers(0, 1024, (8, 6)).astype(np.int16))
    path = directory / "prompts.jsonl"
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


CLIP = {"type": "audio", "audio_url": "clip.npy"}
PROMPTS = [
    {"id": "tts", "messages": [{"role": "system", "content": "Generate audio following instruction."},
                               {"role": "user", "content": "Say hello there."}]},
    {"id": "clone.2", "messages": [{"role": "user", "content": "Say it."}, {"role": "assistant", "content": CLIP},
                                   {"role": "user", "content": ["Again:", CLIP]}]},
    {"id": "chat", "force_audio": False, "messages": [{"role": "user", "content": "What is one plus one?"}]},
]


def test_generate_writes_each_prompts_codes_wav_and_text(export, codec_dir, tmp_path, capsys):
    prompts = write_prompts(tmp_path / "in", PROMPTS)
    out = tmp_path / "out"
    assert main([str(export), "--prompts", str(prompts), "--out", str(out), "--codec", str(codec_dir),
                 "--max-frames", "10", "--max-text-tokens", "5", "--batch-size", "2"]) == 0
    printed = capsys.readouterr()
    assert re.fullmatch(rf"done: 3 prompts in [\d.]+ s, \d+ audio frames; stop: eos \d, max_frames \d, "
                        rf"max_text_tokens \d; wrote {out}\n", printed.out)

    # what generate gives for the same prompts, written as it is
    loaded = load_source(export)
    want = generate(loaded.model, read_prompts(prompts, loaded.vocabulary), loaded.vocabulary.tokens,
                    SamplingConfig(max_frames=10, max_text_tokens=5), batch_size=2)
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == ["tts", "clone.2", "chat"]
    codec = CodecDecoder(codec_dir, AudioSettings())
    for row, g in zip(rows, want):
        codes = np.load(out / row["codes"])
        assert row["codes"] == f"codes/{g.id}.npy" and codes.dtype == np.int16 and np.array_equal(codes, g.codes)
        assert row["text"] == tiny_tokenizer().decode(g.text_ids, skip_special_tokens=False)
        assert (row["frames"], row["stop"]) == (g.frames, g.stop) and row["seconds"] > 0
        assert row["stream_ids"] == int((g.codes >= 1024).sum())  # kept in codes/, clipped for the codec
        if g.frames:
            samples, rate = soundfile.read(out / row["wav"], dtype="float32")
            assert row["wav"] == f"wav/{g.id}.wav" and rate == CODEC_RATE
            assert np.array_equal(samples, codec.decode(g.codes.clip(0, 1023))) and len(samples) == g.frames * HOP
        else:
            assert row["wav"] is None
    # --max-frames counts frames: an open segment stops when its last codebook has 10 codes
    assert [(r["frames"], r["stop"]) for r in rows][:2] == [(10, "max_frames"), (10, "max_frames")]
    assert sorted(p.name for p in (out / "wav").iterdir()) == sorted(f"{g.id}.wav" for g in want if g.frames)


def test_an_audio_file_in_a_prompt_is_encoded_as_the_shard_builder_encodes_it(export, codec_dir, tmp_path):
    from data_tools.build.codec import CodecEncoder

    loaded = load_source(export)
    directory = tmp_path / "in"
    directory.mkdir()
    tone = 0.3 * np.sin(2 * np.pi * 220 * np.arange(int(0.4 * 16000)) / 16000)
    soundfile.write(directory / "question.wav", tone.astype(np.float32), 16000)  # resampled to the codec's rate
    line = {"id": "q", "messages": [{"role": "user", "content": {"type": "audio", "audio_url": "question.wav"}}]}
    (got,) = read_prompts(write_prompts(directory, [line]), loaded.vocabulary, str(codec_dir))
    codes = CodecEncoder(str(codec_dir))(directory / "question.wav")
    assert codes.shape == (8, 10)
    want = build_prompt(line, loaded.vocabulary, lambda ref: codes, "q")
    assert torch.equal(got.input_ids, want.input_ids) and torch.equal(got.audio_codes, want.audio_codes)


BAD = {  # name: (prompt lines, extra arguments, the error after "error: ")
    "malformed JSON": ([PROMPTS[0], '{"id": "b", "messages": ['], [],
                       r"{prompts} line 2: malformed JSON \(JSONDecodeError: Expecting value"),
    "missing codes": ([{"id": "a", "messages": [{"role": "user", "content": {**CLIP, "audio_url": "gone.npy"}}]}],
                      [], r"{prompts} line 1 \(prompt 'a'\): audio\[0\]\.audio_url='gone\.npy': file .*gone\.npy not "
                          r"found"),
    "unknown item type": ([{"id": "a", "messages": [{"role": "user", "content": {"type": "video", "url": "v.mp4"}}]}],
                          [], r"{prompts} line 1 \(prompt 'a'\): messages\[0\]\.content: unknown content type "
                              r"'video' \(expected 'text' or 'audio'\)"),
    "duplicate id": ([PROMPTS[0], PROMPTS[0]], [], r"{prompts} line 2 \(prompt 'tts'\): duplicate id \(line 1 has it "
                                                   r"too\)"),
    "unsafe id": ([{**PROMPTS[0], "id": "../up"}], [], r"{prompts} line 1: id '\.\./up': expected a plain file name"),
    "audio file without --codec": (
        [{"id": "a", "messages": [{"role": "user", "content": {**CLIP, "audio_url": "clip.wav"}}]}], [],
        r"{prompts} line 1 \(prompt 'a'\): audio\[0\]\.audio_url='clip\.wav': an audio file, but no --codec"),
    "bad SOURCE": ([PROMPTS[0]], ["SOURCE={tmp}"], r"SOURCE {tmp}: no complete checkpoint or exported model here"),
    "bad --codec": ([PROMPTS[0]], ["--codec", "{tmp}"], r"--codec {tmp}: no config\.json \(expected a "
                                                        r"HiggsAudioV2TokenizerModel directory\)"),
    "no prompt": ([], [], r"--prompts {prompts}: no prompt in it"),
    "greedy with a temperature": ([PROMPTS[0]], ["--temperature", "0.7"],
                                  r"--temperature, --top-k, --top-p and --seed apply with --sample only"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_a_bad_input_is_one_error_line_exit_2_and_no_out(case, export, tmp_path, capsys):
    lines, extra, message = BAD[case]
    prompts = write_prompts(tmp_path / "in", lines)
    (tmp_path / "in" / "clip.wav").write_bytes(b"RIFF")
    source = str(export)
    extra = [a.format(tmp=tmp_path / "in") for a in extra]
    if extra and extra[0].startswith("SOURCE="):
        source, extra = extra[0].removeprefix("SOURCE="), extra[1:]
    out = tmp_path / "out"
    argv = [source, "--prompts", str(prompts), "--out", str(out), *extra]
    if case == "greedy with a temperature":
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        code = exit_.value.code
    else:
        code = main(argv)
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")
              or "error:" in line]
    assert code == 2 and not out.exists()
    assert len(errors) == 1, errors
    pattern = message.format(prompts=re.escape(str(prompts)), tmp=re.escape(str(tmp_path / "in")))
    assert re.search(rf"error: {pattern}", errors[0]), errors[0]
