"""Shard format and builder: round trips through tarfile and webdataset, manifest counts, determinism, bad input."""
from __future__ import annotations

import io
import json
import os
import re
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds

import processes
from helpers import AUDIO, ROOT, TINY_TOKENIZER, build, chatml, make_corpus
from higgs_ds.data.chatml import sample_from_chatml
from higgs_ds.data.collator import Collator
from higgs_ds.data.sample import TokenizedSample
from higgs_ds.data.shards import (FIELDS, Manifest, ShardError, SplitWriter, check_fingerprint, data_fingerprint,
                                  decode_sample, encode_sample, read_shard)
from higgs_ds.data.tokens import AudioSettings

def source_samples(jsonl: Path, tokenizer, tokens) -> dict[str, TokenizedSample]:
    """What the shards must hold, computed straight from the JSONL."""
    out = {}
    for line, text in enumerate(jsonl.read_text().splitlines(), start=1):
        sample = json.loads(text)
        key = str(sample.get("id", line))
        out[key] = sample_from_chatml(sample, tokenizer, tokens, AUDIO, key=key, meta={"line": line},
                                      load_codes=lambda ref: np.load(jsonl.parent / ref.item["audio_url"]))
    return out


def tar_samples(path: Path) -> list[tuple[str, dict[str, np.ndarray | dict]]]:
    """A shard read with nothing but Python's tarfile: [(key, {field: array or JSON})] in tar order."""
    samples: list[tuple[str, dict]] = []
    with tarfile.open(path) as tar:
        for member in tar.getmembers():
            key, field = member.name.split(".", 1)
            data = tar.extractfile(member).read()
            value = json.loads(data) if field.endswith(".json") else np.load(io.BytesIO(data), allow_pickle=False)
            if not samples or samples[-1][0] != key:
                samples.append((key, {}))
            samples[-1][1][field] = value
    return samples


def wds_samples(path: Path) -> list[tuple[str, dict[str, np.ndarray | dict]]]:
    """The same shard read by webdataset's own pipeline (no decoder: raw bytes, decoded here)."""
    out = []
    for raw in wds.WebDataset(str(path), shardshuffle=False, empty_check=False):
        fields = {k: json.loads(v) if k.endswith(".json") else np.load(io.BytesIO(v), allow_pickle=False)
                  for k, v in raw.items() if not k.startswith("__")}
        out.append((raw["__key__"], fields))
    return out


def assert_same_sample(a: TokenizedSample, b: TokenizedSample) -> None:
    assert a.key == b.key
    np.testing.assert_array_equal(a.input_ids, b.input_ids)
    np.testing.assert_array_equal(a.label_ids, b.label_ids)
    assert len(a.audio_codes) == len(b.audio_codes)
    for x, y in zip(a.audio_codes, b.audio_codes):
        np.testing.assert_array_equal(x, y)


@pytest.fixture
def sample(tokenizer, tokens) -> TokenizedSample:
    rng = np.random.default_rng(1)
    frames = iter([4, 9])
    sample = sample_from_chatml(chatml(1, lambda name, t: name), tokenizer, tokens, AUDIO, key="clone.1",
                                load_codes=lambda ref: rng.integers(0, 1024, (8, next(frames))).astype(np.int16),
                                meta={"line": 7})
    sample.meta["speaker"] = "x"
    return sample


def test_encode_decode_round_trip(sample, tokens):
    raw = encode_sample(sample, "000003")
    assert raw["__key__"] == "000003" and sorted(k for k in raw if k != "__key__") == sorted(FIELDS)
    decoded = decode_sample({**raw, "__url__": "x/train-000001.tar"}, tokens, AUDIO)
    assert_same_sample(decoded, sample)
    assert decoded.meta == {"line": 7, "speaker": "x"}
    assert decoded.input_ids.dtype == np.int32 and decoded.audio_codes[0].dtype == np.int16
    with pytest.raises(ValueError, match="must not contain"):
        encode_sample(sample, "a.b")


def _npy(array) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


@pytest.mark.parametrize("field, value, why", [
    ("meta.json", None, r"meta\.json: missing"),
    ("input_ids.npy", b"not an array", r"input_ids\.npy: not a \.npy array"),
    ("input_ids.npy", "pickled", r"input_ids\.npy: not a readable \.npy"),
    ("label_ids.npy", np.zeros(3, np.int64), r"label_ids\.npy: expected int32"),
    ("label_ids.npy", "shifted", r"label_ids: \d+ at position \d+: labels must be -100 or equal"),
    ("audio_codes.npy", np.full((8, 13), 1024, np.int16), r"audio_codes\[0\]: codes span \[1024, 1024\]"),
    ("audio_codes.npy", np.zeros((7, 13), np.int16), r"audio_codes\[0\]: expected an integer array \[8, T>=1\], got int16 \(7, 4\)"),
    ("audio_lengths.npy", np.array([4, 8], np.int32), r"audio_lengths\.npy: segment lengths \[4, 8\]"),
    ("audio_lengths.npy", np.array([13], np.int32), r"audio_codes: 1 segments but input_ids hold 2 "),
    ("meta.json", b"{bad json", r"meta\.json: not valid JSON"),
])
def test_decode_names_shard_key_and_field(sample, tokens, field, value, why):
    raw = {**encode_sample(sample, "000003"), "__url__": "/data/train-000001.tar"}
    if value is None:
        del raw[field]
    elif isinstance(value, str) and value == "pickled":
        buffer = io.BytesIO()
        np.save(buffer, np.array([{"a": 1}], dtype=object), allow_pickle=True)
        raw[field] = buffer.getvalue()
    elif isinstance(value, str) and value == "shifted":
        labels = np.load(io.BytesIO(raw["label_ids.npy"]))
        raw[field] = _npy(np.roll(labels, 1))
    else:
        raw[field] = value if isinstance(value, bytes) else _npy(value)
    with pytest.raises(ShardError, match=r"^train-000001\.tar: key '000003'.*: " + why):
        decode_sample(raw, tokens, AUDIO)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("corpus"), 23)


@pytest.fixture(scope="module")
def built(corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("built") / "out"
    assert build(corpus, out, "--shard-samples", "4", "--val-fraction", "0.2", "--seed", "3") == 0
    return out


def test_builder_shards_read_back_identically(built, corpus, tokenizer, tokens):
    expected = source_samples(corpus, tokenizer, tokens)
    seen = []
    for split in ("train", "val"):
        manifest = Manifest.load(built / split)
        for shard in manifest.shards:
            path = built / split / shard.name
            by_tarfile, by_wds = tar_samples(path), wds_samples(path)
            assert [k for k, _ in by_tarfile] == [k for k, _ in by_wds] == [f"{i:06d}" for i in range(shard.samples)]
            for (_, a), (_, b) in zip(by_tarfile, by_wds):
                assert a.keys() == b.keys() == set(FIELDS)
                for name in FIELDS:
                    if name.endswith(".npy"):
                        assert a[name].dtype == b[name].dtype
                        np.testing.assert_array_equal(a[name], b[name])
                    else:
                        assert a[name] == b[name]
            for raw in read_shard(path):
                got = decode_sample(raw, tokens, AUDIO)
                assert_same_sample(got, expected[got.key])
                assert got.meta["line"] == expected[got.key].meta["line"]
                seen.append((split, got.key))
    assert sorted(key for _, key in seen) == sorted(expected)  # every line exactly once
    assert sum(split == "val" for split, _ in seen) == round(0.2 * 23)


def test_manifest_counts(built, tokens):
    """Counts recomputed independently: each sample collated alone, counted from the Batch tensors."""
    collate = Collator(tokens, AUDIO)
    for split in ("train", "val"):
        manifest = Manifest.load(built / split)
        assert manifest.tokens == tokens and manifest.audio == AUDIO
        for shard in manifest.shards:
            counts = dict.fromkeys(("samples", "text_tokens", "audio_frames", "learnable_text_tokens",
                                    "learnable_audio_tokens", "expanded_tokens"), 0)
            lengths = []
            for raw in read_shard(built / split / shard.name):
                sample = decode_sample(raw, tokens, AUDIO)
                batch = collate([sample])
                audio_positions = int(batch.audio_in_mask.sum() + batch.audio_out_mask.sum())
                counts["samples"] += 1
                counts["text_tokens"] += batch.num_tokens - audio_positions
                counts["audio_frames"] += sum(c.shape[1] for c in sample.audio_codes)
                counts["learnable_text_tokens"] += int((batch.label_ids != -100).sum())
                counts["learnable_audio_tokens"] += int((batch.audio_out_labels != -100).sum())
                counts["expanded_tokens"] += batch.num_tokens
                lengths.append(batch.num_tokens)
            assert {k: getattr(shard, k) for k in counts} == counts
            np.testing.assert_array_equal(manifest.lengths(shard), lengths)
            assert shard.bytes == (built / split / shard.name).stat().st_size
        assert manifest.totals["samples"] == sum(s.samples for s in manifest.shards)
    train = Manifest.load(built / "train")
    assert [s.samples for s in train.shards] == [4, 4, 4, 4, 2]  # 18 train samples, --shard-samples 4


def test_fingerprint_refuses_other_tokenizer_or_config(built, tokenizer, tokens):
    manifest = Manifest.load(built / "train")
    check_fingerprint(manifest, data_fingerprint(tokenizer, tokens, AUDIO))
    with pytest.raises(ValueError, match="audio"):
        check_fingerprint(manifest, data_fingerprint(tokenizer, tokens, AudioSettings(use_delay_pattern=False)))
    other_pad = type(tokens)(**{**tokens.__dict__, "pad": tokens.eot})
    with pytest.raises(ValueError, match="special_tokens"):
        check_fingerprint(manifest, data_fingerprint(tokenizer, other_pad, AUDIO))


def _files(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def test_builder_is_byte_identical(corpus, built, tmp_path):
    assert build(corpus, tmp_path / "again", "--shard-samples", "4", "--val-fraction", "0.2", "--seed", "3") == 0
    assert build(corpus, tmp_path / "two", "--shard-samples", "4", "--val-fraction", "0.2", "--seed", "3",
                 "--workers", "2") == 0
    reference = _files(built)
    assert any(name.endswith(".tar") for name in reference)
    assert _files(tmp_path / "again") == reference
    assert _files(tmp_path / "two") == reference
    assert build(corpus, tmp_path / "seed4", "--shard-samples", "4", "--val-fraction", "0.2", "--seed", "4") == 0
    assert _files(tmp_path / "seed4")["train/train-000000.tar"] != reference["train/train-000000.tar"]
    with tarfile.open(built / "train" / "train-000000.tar") as tar:
        assert {(m.mtime, m.uid, m.gid, m.uname, m.mode) for m in tar.getmembers()} == {(0, 0, 0, "higgs", 0o444)}


def test_shard_bytes_and_val_every(corpus, tmp_path):
    assert build(corpus, tmp_path / "out", "--shard-bytes", "12000", "--val-every", "5") == 0
    train, val = Manifest.load(tmp_path / "out" / "train"), Manifest.load(tmp_path / "out" / "val")
    assert val.totals["samples"] == 23 // 5 and train.totals["samples"] == 23 - 23 // 5
    assert len(train.shards) > 1
    # Every shard but a one-sample one stays within the byte budget (tar end blocks aside).
    assert all(s.bytes <= 12000 + 10240 or s.samples == 1 for s in train.shards)


def _bad_corpus(root: Path, bad: str) -> tuple[Path, int, str]:
    """A 6-sample corpus whose line 3 (an ASR sample) is bad in one way → (jsonl, bad line, message regex)."""
    jsonl = make_corpus(root, 6)
    lines = jsonl.read_text().splitlines()
    codes = root / "codes"
    if bad == "json":
        lines[2] = lines[2][:-5]
        why = r"line 3: malformed JSON"
    elif bad == "missing":
        lines[2] = lines[2].replace("codes/", "codes/nowhere_")
        why = r"line 3 \(sample '3'\): audio\[0\]\.audio_url='codes/nowhere_.*not found"
    elif bad == "shape":
        np.save(codes / "extra.npy", np.zeros((30, 8), np.int16))  # time first: transposed
        lines[2] = json.dumps(json.loads(lines[2]) | {"messages": [{"role": "assistant", "content": {
            "type": "audio", "audio_url": "codes/extra.npy"}}]})
        why = r"line 3: sample '3': audio\[0\]\.audio_url='codes/extra\.npy': expected an integer array \[8, T>=1\], got int16 \(30, 8\)"
    elif bad == "range":
        np.save(codes / "extra.npy", np.full((8, 5), 1024, np.int16))
        lines[2] = json.dumps(json.loads(lines[2]) | {"messages": [{"role": "assistant", "content": {
            "type": "audio", "audio_url": "codes/extra.npy"}}]})
        why = r"line 3: sample '3': audio\[0\].*codes span \[1024, 1024\], expected \[0, 1024\)"
    else:  # a literal placeholder in the text would misalign every later audio segment
        lines[2] = json.dumps({"messages": [{"role": "user", "content": "say <|AUDIO|> now"},
                                            {"role": "assistant", "content": "ok"}]})
        why = r"line 3: sample '3': messages\[0\]\.content: text contains a literal"
    jsonl.write_text("\n".join(lines) + "\n")
    return jsonl, 3, why


@pytest.mark.parametrize("bad", ["json", "missing", "shape", "range", "placeholder"])
def test_builder_bad_input(tmp_path, capsys, bad):
    jsonl, line, why = _bad_corpus(tmp_path, bad)
    assert build(jsonl, tmp_path / "failed") == 1
    assert re.search(why, capsys.readouterr().err)
    assert not any(p.is_file() for p in (tmp_path / "failed").rglob("*")), "a failed build leaves no files"

    assert build(jsonl, tmp_path / "skipped", "--on-error", "skip") == 0
    errors = [json.loads(x) for x in (tmp_path / "skipped" / "errors.jsonl").read_text().splitlines()]
    assert [e["line"] for e in errors] == [line] and re.search(why, errors[0]["error"])
    manifest = Manifest.load(tmp_path / "skipped" / "train")
    assert manifest.skipped == 1 and manifest.totals["samples"] == 5


def test_builder_cli_exit_code(tmp_path):
    jsonl, _, _ = _bad_corpus(tmp_path, "missing")
    run = processes.run([sys.executable, "-m", "data_tools.build_shards", str(jsonl), "--tokenizer",
                         str(TINY_TOKENIZER), "--model-config", str(tmp_path / "config.json"), "--out",
                         str(tmp_path / "out")], cwd=ROOT, timeout=120)
    assert run.returncode == 1 and "line 3 (sample '3'): audio[0].audio_url" in run.stderr


def test_builder_rejects_duplicate_ids(tmp_path):
    jsonl = make_corpus(tmp_path, 4)
    lines = jsonl.read_text().splitlines()
    jsonl.write_text("\n".join(lines + [lines[0]]) + "\n")  # line 5 repeats id "utt.0"
    assert build(jsonl, tmp_path / "out", "--on-error", "skip") == 0
    errors = [json.loads(x) for x in (tmp_path / "out" / "errors.jsonl").read_text().splitlines()]
    assert len(errors) == 1 and "id 'utt.0' already used by line" in errors[0]["error"]


def test_split_writer_is_atomic(tmp_path, sample, tokenizer, tokens):
    writer = SplitWriter(tmp_path, "train", data_fingerprint(tokenizer, tokens, AUDIO), tokens, AUDIO,
                         shard_samples=2)
    writer.add(sample)
    assert sorted(os.listdir(tmp_path)) == ["train-000000.tar.tmp"]  # nothing under a final name yet
    writer.add(sample)
    writer.add(sample)  # closes shard 0 under its final name
    assert sorted(os.listdir(tmp_path)) == ["train-000000.lengths.npy", "train-000000.tar", "train-000001.tar.tmp"]
    writer.abort()
    assert os.listdir(tmp_path) == []


def _damaged(path: Path, damage: str) -> tuple[bytes, str | None]:
    """The shard's bytes damaged one way → (bytes, what tar_problem must say; {o}/{m}/... filled in by the test)."""
    data = path.read_bytes()
    with tarfile.open(path) as tar:
        members = tar.getmembers()
    third, last = members[10], members[-1]  # 5 members per sample: the third sample's first member
    after = "(after member '000001.meta.json')"
    end = last.offset_data + -(-last.size // 512) * 512  # where the end-of-archive marker starts
    if damage == "intact":
        return data, None
    if damage == "cut at a member boundary":
        return data[:third.offset], f"truncated: the file ends at offset {third.offset} {after} without the " \
                                    "end-of-archive marker"
    if damage == "cut inside a header":
        return data[:third.offset + 100], f"truncated: the file ends inside the header at offset {third.offset} " \
                                          f"{after} without the end-of-archive marker"
    if damage == "cut inside data":
        return data[:third.offset_data + 10], f"truncated: member {third.name!r} at offset {third.offset} needs " \
                                              f"{512 + -(-third.size // 512) * 512} bytes, the file ends at " \
                                              f"{third.offset_data + 10}"
    if damage == "cut in the end marker":
        return data[:end + 512], f"truncated: the file ends after one zero block at offset {end} (after member " \
                                 f"{last.name!r}), without the second block of the end-of-archive marker"
    if damage == "header overwritten":
        return data[:third.offset + 20] + b"\xff" * 8 + data[third.offset + 28:], \
            f"corrupt: invalid tar header at offset {third.offset} {after}: bad checksum; the members from there on " \
            "cannot be read"
    if damage == "header zeroed":
        return data[:third.offset] + bytes(512) + data[third.offset + 512:], \
            f"corrupt: a zero block at offset {third.offset} {after} followed by data (a header overwritten with " \
            "zeros?); the members from there on cannot be read"
    assert damage == "data appended"
    return data + b"junk", f"corrupt: data at offset {len(data)} after the end-of-archive marker at offset {end} " \
                           f"(after member {last.name!r}): blocks overwritten with zeros, or data appended"


@pytest.mark.parametrize("damage", ["intact", "cut at a member boundary", "cut inside a header", "cut inside data",
                                    "cut in the end marker", "header overwritten", "header zeroed", "data appended"])
def test_tar_problem_tells_truncated_from_corrupt(built, tmp_path, damage):
    from higgs_ds.data.shards import tar_complete, tar_problem

    data, expected = _damaged(built / "train" / "train-000000.tar", damage)
    path = tmp_path / "train-000000.tar"
    path.write_bytes(data)
    assert tar_problem(path) == expected
    assert tar_complete(path) is (expected is None)
    try:
        read = len(list(read_shard(path)))
    except ShardError as exc:
        assert damage == "cut inside data" and str(exc) == \
            "train-000000.tar: truncated tar (the file ends inside a member)"
    else:  # Python's tar reader stops silently at a member boundary: the count tells (vs the manifest)
        assert read == {"intact": 4, "data appended": 4, "cut in the end marker": 4}.get(damage, 2), damage
