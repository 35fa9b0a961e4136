"""Seeded fuzzing of the data entry points: random ChatML through the one ChatML→sample function, and random shard
corruption through the stream. Every failure must be the project's own error (SampleError naming the sample) or a
counted problem; the stream's accounting must stay exact: planned = seen + corrupt + missing + dropped + too_long."""
from __future__ import annotations

import io
import json
import random
import re
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest

from helpers import assert_accounting, make_samples, rewrite_members, write_split
from higgs_ds.data.chatml import sample_from_chatml
from higgs_ds.data.collator import Collator
from higgs_ds.data.sample import SampleError, TokenizedSample
from higgs_ds.data.shards import FIELDS, Manifest
from higgs_ds.data.stream import ShardLoader
from higgs_ds.data.tokens import AudioSettings

AUDIO = AudioSettings()
TEXTS = ["hello", "", " ", "<|AUDIO|>", "<|AUDIO_OUT|>", "<|eot_id|>", "\ud800", "\udfff x", "é" * 50, "\x00",
         "<|start_header_id|>", "a" * 300, "Read this aloud.", "🙂", "\n\n"]
ROLES = ["user", "assistant", "system", "narrator", "", None, 7, "assistant<|AUDIO_OUT|>", "USER"]


def random_value(rng: random.Random, depth: int = 0):
    kind = rng.randrange(9 if depth < 3 else 5)
    if kind == 0:
        return rng.choice(TEXTS)
    if kind == 1:
        return rng.randint(-5, 10)
    if kind == 2:
        return rng.choice([None, True, False, 1.5])
    if kind == 3:
        return {"type": "audio", "audio_url": rng.choice(["a", "", "b.wav", "x" * 300])}
    if kind == 4:
        return {"type": rng.choice(["text", "audio", "image", None]), "text": rng.choice(TEXTS)}
    if kind == 5:
        return [random_value(rng, depth + 1) for _ in range(rng.randrange(4))]
    if kind == 6:
        return {rng.choice(["role", "content", "type", "text", "audio_url"]): random_value(rng, depth + 1)
                for _ in range(rng.randrange(3))}
    if kind == 7:
        nested = "leaf"
        for _ in range(rng.randrange(50, 3000)):
            nested = [nested]
        return nested
    return rng.choice(TEXTS)


def random_message(rng: random.Random):
    if rng.random() < 0.03:
        return random_value(rng)
    content = rng.choice([rng.choice(TEXTS[:6]), "Plain words.", {"type": "audio", "audio_url": "c"},
                          [rng.choice(TEXTS), {"type": "audio", "audio_url": "d"}], random_value(rng)])
    role = rng.choice(ROLES) if rng.random() < 0.1 else rng.choice(["user", "assistant", "system", "narrator"])
    message = {"role": role, "content": content}
    if rng.random() < 0.1:
        message["recipient"] = rng.choice(["tool", "", 3, None])
    if rng.random() < 0.05:
        del message["content"]
    return message


def random_chatml(rng: random.Random):
    if rng.random() < 0.05:
        return random_value(rng)
    sample = {"messages": [random_message(rng) for _ in range(rng.randrange(0, 6))]}
    if rng.random() < 0.3:
        sample["start_index"] = rng.choice([0, 1, 2, 5, -1, "1", None, 1.0, True])
    if rng.random() < 0.2:
        sample[rng.choice(["speaker", "misc"])] = rng.choice([None, "spk", 3, {"speaker": "s"}, {"speaker": 4}])
    return sample


def random_codes(rng: random.Random):
    kind = rng.randrange(16)
    frames = rng.randint(1, 6)
    if kind == 0:
        return np.zeros((AUDIO.num_codebooks, 0), np.int16)
    if kind == 1:
        return np.full((AUDIO.num_codebooks, frames), rng.choice([-1, 1024, 5000]), np.int64)
    if kind == 2:
        return np.zeros((rng.choice([1, 7, 9]), frames), np.int16)
    if kind == 3:
        return np.zeros((AUDIO.num_codebooks, frames), np.float32)
    if kind == 4:
        return np.zeros(frames, np.int16)
    return np.random.default_rng(rng.randrange(10**6)).integers(0, 1024, (AUDIO.num_codebooks, frames)).astype(
        np.int16)


def test_fuzzed_chatml_gives_valid_samples_or_sample_errors(tokenizer, tokens):
    rng = random.Random(1234)
    collator = Collator(tokens, AUDIO)
    outcomes = {"sample": 0, "error": 0}
    for i in range(20000):
        raw = random_chatml(rng)
        key = f"fuzz{i}"
        try:
            sample = sample_from_chatml(raw, tokenizer, tokens, AUDIO, lambda ref: random_codes(rng), key=key)
        except SampleError as exc:
            assert str(exc).startswith(f"sample {key!r}: ") and exc.why, exc
            outcomes["error"] += 1
            continue
        except Exception as exc:  # noqa: BLE001 - the point of the test
            pytest.fail(f"sample {i} {json.dumps(raw, default=str)[:300]} raised {type(exc).__name__}: {exc}")
        assert isinstance(sample, TokenizedSample)
        sample.validate(tokens, AUDIO, len(tokenizer))
        batch = collator([sample])
        batch.validate(len(tokenizer), AUDIO.codes_per_codebook + 2, AUDIO.num_codebooks)
        outcomes["sample"] += 1
    assert min(outcomes.values()) > 2000, outcomes  # the generator reaches both outcomes often


def corrupt(path: Path, rng: random.Random) -> None:
    """One random corruption of a shard file: byte flips, truncation, or a member-level edit."""
    data = bytearray(path.read_bytes())
    path.chmod(0o644)
    kind = rng.randrange(6)
    if kind == 0:
        for _ in range(rng.randint(1, 20)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        path.write_bytes(bytes(data))
    elif kind == 1:
        path.write_bytes(bytes(data[:rng.randrange(len(data))]))
    else:
        with tarfile.open(fileobj=io.BytesIO(bytes(data))) as tar:
            members = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]
        if kind == 2:
            rng.shuffle(members)
        elif kind == 3:
            for _ in range(rng.randint(1, 3)):
                members.insert(rng.randrange(len(members) + 1), rng.choice(
                    [("²." + "meta.json", b"{}"), ("000000.meta.json", b"[" * 5000), (rng.choice(members)[0], b"x"),
                     ("../evil.npy", b"\x93NUMPY"), ("000001.input_ids.npy", b"\x93NUMPY\x01\x00\xff\xff")]))
        elif kind == 4:
            del members[rng.randrange(len(members))]
        else:
            name, _ = members[rng.randrange(len(members))]
            members = [(n, bytes(rng.randrange(256) for _ in range(rng.randint(0, 200))) if n == name else d)
                       for n, d in members]
        with tarfile.open(path, "w") as tar:
            for name, payload in members:
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))


def test_fuzzed_shards_stream_with_exact_accounting(tmp_path, tokenizer, tokens):
    samples = make_samples(48, tokenizer, tokens, seed=3)
    clean = write_split(tmp_path / "clean", samples, (8, 8, 8, 8, 8, 8), tokenizer, tokens)
    keys = {s.key for s in samples}
    rng = random.Random(99)
    collator = Collator(tokens, AUDIO, layout="packed", pack_length=300)
    for round_ in range(300):
        split = shutil.copytree(clean, tmp_path / f"round{round_}")
        for name in rng.sample(sorted(p.name for p in split.glob("*.tar")), rng.randint(1, 3)):
            corrupt(split / name, rng)
        counts = []
        for rank in range(2):
            loader = ShardLoader(split, collator, rank=rank, world_size=2, num_workers=0, seed=round_,
                                 max_tokens=900, num_epochs=1, shuffle_buffer=5)
            batches = list(loader)
            seen = [k for b in batches for k in b.sample_keys if k != "<blank>"]
            stats = loader.stats()
            assert_accounting(stats)
            assert stats["seen_samples"] == len(seen) == len(set(seen)) and set(seen) <= keys
            counts.append(len(batches))
        assert counts[0] == counts[1]
        shutil.rmtree(split)


def validate_summary(split: Path, capsys) -> tuple[int, list[str]]:
    """`higgs-shards validate` on a split: (good samples, BAD lines)."""
    from data_tools.shard_tools import main as shard_tools

    shard_tools(["validate", str(split)])
    lines = capsys.readouterr().out.splitlines()
    good = int(re.fullmatch(r"\d+ shards, (\d+) good samples, \d+ problems", lines[-1])[1])
    return good, [line for line in lines if line.startswith("BAD ")]


def stream_all(split: Path, tokens, world_size: int = 1) -> tuple[list[str], dict[str, int]]:
    """Every rank's one epoch, in-process: (delivered sample keys, summed counters)."""
    collator = Collator(tokens, AUDIO)
    keys, total = [], {}
    for rank in range(world_size):
        loader = ShardLoader(split, collator, rank=rank, world_size=world_size, num_workers=0, seed=1, batch_size=2,
                             num_epochs=1)
        keys += [k for b in loader for k in b.sample_keys if k != "<blank>"]
        stats = loader.stats()
        assert_accounting(stats)
        total = {k: total.get(k, 0) + v for k, v in stats.items()}
    return keys, total


def plant(members: list, strays: list[tuple[int, str]]) -> list:
    """`members` with a stray member (name, 7 junk bytes) inserted before each given member index."""
    out = list(members)
    for index, name in sorted(strays, reverse=True):
        out.insert(index, (name, b"stray\x00\x01"))
    return out


def random_strays(rng: random.Random, members: list, samples: int) -> list[tuple[int, str]]:
    """1-4 strays at distinct member indices (never after the last member: the stream stops reading a shard at its
    last wanted sample), each with a key of its own that neither neighbour has: a sample position or not."""
    strays, used = [], set()
    for index in rng.sample(range(len(members)), rng.randint(1, 4)):
        neighbours = {members[i][0].split(".")[0] for i in (index - 1, index) if 0 <= i < len(members)}
        choices = [f"{p:06d}" for p in range(samples)] + ["zzz", "²", f"{samples:06d}", "-00001", "notes"]
        key = rng.choice([k for k in choices if k not in neighbours | used])
        used.add(key)
        strays.append((index, key if key == "notes" else f"{key}.{rng.choice(FIELDS + ('extra.bin',))}"))
    return strays


def test_stray_members_cost_only_themselves(tmp_path, tokenizer, tokens, capsys):
    """Members that belong to no sample, planted anywhere in a shard (the issue's case first: a member with a later
    sample's key between the members of sample 1), are each one stray; every sample arrives, in the stream and in
    `validate` alike."""
    samples = make_samples(20, tokenizer, tokens, seed=5)
    clean = write_split(tmp_path / "clean", samples, (20,), tokenizer, tokens)
    with tarfile.open(clean / "train-000000.tar") as tar:
        members = [(m.name, b"") for m in tar.getmembers()]
    assert members[5][0] == "000001.audio_codes.npy"  # 5 members per sample
    rng = random.Random(5)
    cases = [[(7, "000005.meta.json")]] + [random_strays(rng, members, 20) for _ in range(40)]
    for n, strays in enumerate(cases):
        split = shutil.copytree(clean, tmp_path / f"case{n}")
        rewrite_members(split / "train-000000.tar", lambda m: plant(m, strays))
        keys, total = stream_all(split, tokens)
        assert sorted(keys) == sorted(s.key for s in samples), strays
        assert (total["stray_members"], total["corrupt_samples"], total["missing_samples"]) == (len(strays), 0, 0)
        resized = (split / "train-000000.tar").stat().st_size != Manifest.load(split).shards[0].bytes
        assert total["bad_shards"] == resized, "a shard of another size than the manifest's is one bad shard"
        good, bad = validate_summary(split, capsys)
        assert good == len(keys) == 20
        assert len(bad) == len(strays) + 1 and sum("changed since the build" in line for line in bad) == 1, bad
        shutil.rmtree(split)


def damage_shard(path: Path, how: str) -> int:
    """Damages a 10-sample shard one way; returns how many of its samples can still be read."""
    data = path.read_bytes()
    path.unlink()
    if how == "truncated":  # inside the data of sample 3's first member
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            member = tar.getmembers()[15]
        path.write_bytes(data[:member.offset_data + 10])
        return 3
    if how == "garbage":
        path.write_bytes(random.Random(0).randbytes(len(data) // 2))
        return 0
    assert how == "directory"
    path.mkdir()
    return 0


@pytest.mark.parametrize("how", ["truncated", "garbage", "directory"])
@pytest.mark.parametrize("world_size", [1, 4])
def test_a_bad_shard_is_counted_once(tmp_path, tokenizer, tokens, capsys, how, world_size):
    """A truncated, garbage or directory shard adds exactly 1 to bad_shards in an epoch, however many slots read it
    (on 4 ranks each shard is split between two); its unreadable samples are missing, the rest arrive, as many as
    `validate` calls good."""
    samples = make_samples(20, tokenizer, tokens, seed=6)
    split = write_split(tmp_path / "split", samples, (10, 10), tokenizer, tokens)
    readable = damage_shard(split / "train-000001.tar", how)
    keys, total = stream_all(split, tokens, world_size)
    assert sorted(keys) == sorted(s.key for s in samples[:10 + readable])
    assert (total["bad_shards"], total["missing_samples"], total["corrupt_samples"]) == (1, 10 - readable, 0)
    good, _ = validate_summary(split, capsys)
    assert good == len(keys)
