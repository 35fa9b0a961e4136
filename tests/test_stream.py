"""Streaming: ranks × workers see disjoint samples covering the epoch, equal batch counts, budgets, exact
mid-epoch resume, and corrupt data skipped and counted instead of crashing."""
from __future__ import annotations

import io
import itertools
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import assert_accounting, make_samples, rewrite_members, rewrite_shard, write_split
from higgs_ds.data.collator import Collator
from higgs_ds.data.sample import TokenizedSample
from higgs_ds.data.shards import Manifest, decode_sample, read_shard
from higgs_ds.data.plan import Budget, plan_epoch, shuffle_buffer
from higgs_ds.data.stream import ShardLoader
from higgs_ds.data.tokens import AudioSettings

AUDIO = AudioSettings()
SHARD_SIZES = (3, 9, 5, 12, 4, 7, 2, 6)  # uneven on purpose


@pytest.fixture(scope="module")
def samples(tokenizer, tokens) -> list[TokenizedSample]:
    return make_samples(sum(SHARD_SIZES), tokenizer, tokens)


@pytest.fixture(scope="module")
def split(tmp_path_factory, samples, tokenizer, tokens) -> Path:
    return write_split(tmp_path_factory.mktemp("split"), samples, SHARD_SIZES, tokenizer, tokens)


def run_epoch(loader: ShardLoader) -> list:
    return list(loader)


def assert_batches_equal(a, b) -> None:
    assert a.sample_keys == b.sample_keys
    for name, value in a.tensors().items():
        assert torch.equal(value, getattr(b, name)), name


def test_shuffle_buffer_is_a_seeded_permutation():
    items = np.arange(100, 200)
    once = shuffle_buffer(items, 10, np.random.default_rng(1))
    assert sorted(once.tolist()) == items.tolist() and once.tolist() != items.tolist()
    np.testing.assert_array_equal(once, shuffle_buffer(items, 10, np.random.default_rng(1)))
    assert shuffle_buffer(items, 10, np.random.default_rng(2)).tolist() != once.tolist()
    np.testing.assert_array_equal(shuffle_buffer(items, 1, np.random.default_rng(1)), items)
    # A buffer of 10 can hold an item back, but never emit one before it has been read.
    assert all(item <= i + 9 for i, item in enumerate((once - 100).tolist()))


def covered(plan, lengths) -> list[int]:
    """Global sample ids of every slot's pieces, slot by slot, checking each piece against its shard."""
    offsets = np.cumsum([0] + [len(x) for x in lengths])
    out = []
    for s in sorted(plan.slots):
        for piece in plan.slots[s].pieces:
            assert 0 <= piece.start < piece.end <= len(lengths[piece.shard])
            out += list(range(offsets[piece.shard] + piece.start, offsets[piece.shard] + piece.end))
    return out


@pytest.mark.parametrize("num_slots", [1, 2, 3, 8, 16])
def test_plan_splits_the_read_sequence_evenly(num_slots):
    rng = np.random.default_rng(num_slots)
    lengths = [rng.integers(10, 200, n).astype(np.int32) for n in (18, 50, 30, 0, 7)]
    total = sum(len(x) for x in lengths)
    plan = plan_epoch(lengths, epoch=3, seed=1, num_slots=num_slots, budget=Budget(max_tokens=400))
    ids = covered(plan, lengths)
    assert sorted(ids) == list(range(total)), "every sample is read by exactly one slot"
    every = np.concatenate(lengths).astype(np.int64)
    weights = [int(every[[i for p in slot.pieces for i in range(
        sum(len(x) for x in lengths[:p.shard]) + p.start, sum(len(x) for x in lengths[:p.shard]) + p.end)]].sum())
        for slot in plan.slots.values()]
    assert max(weights) - min(weights) <= 2 * int(every.max()), "slots differ by about one sample"
    for slot in plan.slots.values():
        assert slot.planned == len(slot.samples) + slot.dropped + slot.too_long
        assert len(slot.bounds) == plan.batches_per_slot + 1
        assert set(slot.samples.tolist()) <= set(covered(type(plan)(0, {0: slot}, 0, False), lengths))
    kept = np.concatenate([slot.samples for slot in plan.slots.values()])
    assert len(kept) == len(set(kept.tolist())) == total - plan.total("dropped") - plan.total("too_long")


def test_last_epoch_drops_nothing_and_pads_with_empty_batches():
    lengths = [np.full(n, 10, dtype=np.int32) for n in (18, 51, 30)]
    trimmed = plan_epoch(lengths, epoch=0, seed=0, num_slots=4, budget=Budget(batch_size=4), shuffle=False)
    padded = plan_epoch(lengths, epoch=0, seed=0, num_slots=4, budget=Budget(batch_size=4), shuffle=False,
                        last=True)
    sizes = sorted(s.planned for s in padded.slots.values())
    assert sizes == [24, 25, 25, 25] and trimmed.batches_per_slot == 6 and padded.batches_per_slot == 7
    assert trimmed.total("dropped") == 3 and padded.total("dropped") == 0
    kept = np.concatenate([s.samples for s in padded.slots.values()])
    assert sorted(kept.tolist()) == list(range(99))
    short = [s for s in padded.slots.values() if s.planned == 24][0]
    assert len(short.batch(6)) == 0 and all(len(short.batch(b)) == 4 for b in range(6))


def test_each_rank_plans_its_own_slots_and_agrees_through_agree_min():
    """Planned slot by slot with an injected minimum, the plan equals the whole plan made in one process."""
    rng = np.random.default_rng(0)
    lengths = [rng.integers(10, 90, n).astype(np.int32) for n in rng.integers(5, 40, 9)]
    budget, ranks, workers = Budget(max_tokens=300, layout="packed", pack_length=100), 3, 2
    for last in (False, True):
        whole = plan_epoch(lengths, epoch=2, seed=4, num_slots=ranks * workers, budget=budget, last=last)
        local = []
        for r in range(ranks):  # first round: what each rank would contribute to the all-reduce
            plan_epoch(lengths, 2, 4, ranks * workers, budget, slots=[2 * r, 2 * r + 1], last=last,
                       agree_min=lambda v: local.append(v) or v)
        for r in range(ranks):
            part = plan_epoch(lengths, 2, 4, ranks * workers, budget, slots=[2 * r, 2 * r + 1], last=last,
                              agree_min=lambda v: min(local))
            assert part.batches_per_slot == whole.batches_per_slot
            for s in (2 * r, 2 * r + 1):
                np.testing.assert_array_equal(part.slots[s].samples, whole.slots[s].samples)
                np.testing.assert_array_equal(part.slots[s].bounds, whole.slots[s].bounds)
    with pytest.raises(ValueError, match="needs agree_min"):
        plan_epoch(lengths, 0, 0, 6, budget, slots=[0, 1])


def test_too_little_data_for_the_slots_is_refused():
    lengths = [np.full(5, 10, dtype=np.int32)]
    with pytest.raises(ValueError, match=r"5 samples in 1 shards cannot give each of the 8 rank×worker slots a batch"):
        plan_epoch(lengths, epoch=0, seed=0, num_slots=8, budget=Budget(batch_size=4))
    assert plan_epoch(lengths, epoch=0, seed=0, num_slots=4, budget=Budget(batch_size=1)).batches_per_slot == 1


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_budget_cuts_full_batches_within_the_limit(tokens, layout):
    """Every batch fits max_tokens as the collator lays it out, and the sample that closed it would not have."""
    collator = Collator(tokens, AUDIO, layout=layout, round_to=16, pack_length=100 if layout == "packed" else None)
    budget = Budget(max_tokens=420, layout=layout, round_to=16, pack_length=collator.pack_length)
    lengths = np.random.default_rng(0).integers(40, 101, 400)  # many rows of just over half: packing matters

    def size(indices) -> int:
        text_only = [TokenizedSample(str(i), np.full(lengths[i], 7, np.int32), np.full(lengths[i], -100, np.int32))
                     for i in indices]
        batch = collator(text_only)
        return batch.input_ids.shape[0] * (budget.row_width if layout == "packed" else batch.input_ids.shape[1])

    batches, too_long = budget.cut(lengths)
    assert too_long == 0 and np.array_equal(np.concatenate(batches), np.arange(len(lengths)))
    for batch, following in zip(batches, batches[1:]):
        assert size(batch) <= 420 < size(np.append(batch, following[0]))
    assert budget.cut(np.array([50, 101, 60]))[1] == (1 if layout == "packed" else 0)


@pytest.mark.parametrize("layout, budget", [
    ("padded", {"max_tokens": 400}),
    ("packed", {"max_tokens": 600}),
    ("padded", {"batch_size": 3}),
])
def test_ranks_and_workers_cover_the_epoch_once(split, samples, tokens, layout, budget):
    collator = Collator(tokens, AUDIO, layout=layout, round_to=8, pack_length=200 if layout == "packed" else None)
    by_key = {s.key: s for s in samples}
    for epoch in range(2):
        seen, counts, orders = [], [], []
        for rank in range(2):
            loader = ShardLoader(split, collator, rank=rank, world_size=2, num_workers=2, seed=5, shuffle_buffer=4,
                                 **budget)
            loader.set_epoch(epoch)
            planned = len(loader)
            batches = run_epoch(loader)
            counts.append((len(batches), planned))
            stats = loader.plan(epoch)
            for batch in batches:
                if "max_tokens" in budget:
                    assert batch.input_ids.numel() <= budget["max_tokens"]
                    if layout == "packed":
                        assert batch.input_ids.shape[0] * collator.pack_length <= budget["max_tokens"]
                else:
                    assert len(batch.sample_keys) <= budget["batch_size"]
                if layout == "padded":  # the stream's batch is exactly the collator's on the source samples
                    assert_batches_equal(batch, collator([by_key[k] for k in batch.sample_keys]))
                seen += batch.sample_keys
            orders.append([k for b in batches for k in b.sample_keys])
        assert counts[0][0] == counts[1][0] == counts[0][1] == counts[1][1] > 0
        assert len(seen) == len(set(seen)), "a sample was seen twice"
        assert len(seen) == len(samples) - stats.total("dropped") - stats.total("too_long")
        if epoch == 0:
            first_epoch = orders
    assert orders != first_epoch, "the order must change between epochs"


def _children(pid: int) -> list[int]:
    return [int(c) for task in Path(f"/proc/{pid}/task").iterdir()
            for c in (task / "children").read_text().split()]


def test_workers_are_never_forked_from_the_training_process(split, tokens):
    """Forking a process that has threads can hang the child before it runs any code (CPython < 3.11.8,
    gh-112275; seen in CI as a rank waiting forever for its batch). The workers fork from a forkserver instead:
    while a batch is in hand, the only child of this process is that server, and the workers are its children."""
    import os

    loader = ShardLoader(split, Collator(tokens, AUDIO), world_size=1, num_workers=2, seed=3, max_tokens=600)
    for epoch in range(2):  # every epoch's workers are new processes
        batches = iter(loader)
        first = next(batches)
        commands = {c: Path(f"/proc/{c}/cmdline").read_bytes().replace(b"\0", b" ").decode()
                    for c in _children(os.getpid())}
        children = [c for c, command in commands.items() if "multiprocessing.resource_tracker" not in command]
        assert len(children) == 1 and "multiprocessing.forkserver" in commands[children[0]], commands
        assert len(_children(children[0])) == 2, "the epoch's two workers are the server's children"
        assert [first, *batches] and loader.epoch == epoch + 1


def test_workers_and_their_server_end_when_the_process_they_feed_is_killed(split):
    """A rank killed with SIGKILL (a crash, the launcher's kill) leaves no worker behind: an orphan worker would
    hold the job's stdout open, and the launcher's caller would wait forever."""
    import os
    import signal
    import subprocess
    import sys
    import time

    script = (f"from higgs_ds.data.collator import Collator\nfrom higgs_ds.data.shards import Manifest\n"
              f"from higgs_ds.data.stream import ShardLoader\nimport time\n"
              f"m = Manifest.load({str(split)!r})\n"
              f"loader = ShardLoader({str(split)!r}, Collator(m.tokens, m.audio), world_size=1, num_workers=2, "
              f"max_tokens=600)\nbatches = iter(loader)\nnext(batches)\nprint('ready', flush=True)\ntime.sleep(600)\n")
    process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout.readline().strip() == "ready"
        server = [c for c in _children(process.pid)
                  if b"multiprocessing.forkserver" in Path(f"/proc/{c}/cmdline").read_bytes()]
        assert len(server) == 1
        left = [server[0], *_children(server[0])]
        assert len(left) == 3, "the server and the two workers"
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
        deadline = time.monotonic() + 20
        while (left := [pid for pid in left if Path(f"/proc/{pid}").exists()
                        and "Z" not in Path(f"/proc/{pid}/stat").read_text().split(")")[1][:3]]):
            assert time.monotonic() < deadline, f"still running 20 s after the kill: {left}"
            time.sleep(0.2)
        assert process.stdout.read() == "", "nothing holds the output open"
    finally:
        process.kill()


@pytest.mark.parametrize("pidfd", [True, False], ids=["pidfd", "polling"])
def test_a_workers_watch_ends_it_when_its_owner_exits_not_before(monkeypatch, pidfd):
    import os
    import subprocess
    import threading

    from higgs_ds.data import stream

    exited = threading.Event()
    monkeypatch.setattr(os, "_exit", lambda code: exited.set())
    if not pidfd:
        monkeypatch.setattr(os, "pidfd_open", lambda pid: (_ for _ in ()).throw(OSError(38, "ENOSYS")))
    owner = subprocess.Popen(["sleep", "2"])
    stream._exit_with(owner.pid, worker_id=0)
    assert not exited.wait(1.0), "the owner is alive"
    owner.wait()
    assert exited.wait(5.0), "the owner has exited"


def test_too_long_samples_are_left_out_and_counted(split, samples, tokens):
    collator = Collator(tokens, AUDIO)
    lengths = np.array([s.num_expanded_tokens(AUDIO) for s in samples])
    limit = int(np.percentile(lengths, 80))
    loader = ShardLoader(split, collator, world_size=1, num_workers=0, max_tokens=limit)
    keys = [k for b in loader for k in b.sample_keys]
    assert loader.stats()["too_long_samples"] == int((lengths > limit).sum()) > 0
    assert not {s.key for s, n in zip(samples, lengths) if n > limit} & set(keys)


@pytest.mark.parametrize("stop", [3, 4, 11, 14])
def test_resume_mid_epoch_equals_uninterrupted(split, tokens, stop):
    collator = Collator(tokens, AUDIO)

    def loader():
        return ShardLoader(split, collator, rank=1, world_size=2, num_workers=2, seed=7, max_tokens=250,
                           shuffle_buffer=6)

    straight = loader()
    epoch0 = run_epoch(straight)
    expected = epoch0 + run_epoch(straight)
    assert len(epoch0) >= 8 and stop < len(expected)
    interrupted = loader()
    first = []
    while len(first) < stop:  # across the epoch boundary too
        for batch in interrupted:
            first.append(batch)
            if len(first) == stop:
                break
    state = json.loads(json.dumps(interrupted.state_dict()))
    in_epoch0 = stop < len(epoch0)
    assert (state["epoch"], state["position"]) == ((0, stop) if in_epoch0 else (1, stop - len(epoch0)))
    resumed = loader()
    resumed.load_state_dict(state)
    rest = [batch for epoch in range(state["epoch"], 2) for batch in run_epoch(resumed)]
    assert len(first) + len(rest) == len(expected)
    for a, b in zip(first + rest, expected):
        assert_batches_equal(a, b)


@pytest.mark.parametrize("workers", [0, 2])
def test_streaming_leaves_the_global_rng_alone(split, tokens, workers):
    """The trainer restores the global RNG at a resume (dropout masks): starting an epoch's DataLoader mid-run must
    not draw from it, or a resumed run's masks would differ from an uninterrupted run's."""
    loader = ShardLoader(split, Collator(tokens, AUDIO), rank=0, world_size=2, num_workers=workers, seed=7,
                         max_tokens=250)
    torch.manual_seed(0)
    expected = torch.rand(4)
    torch.manual_seed(0)
    assert len(run_epoch(loader)) > 0
    torch.testing.assert_close(torch.rand(4), expected, rtol=0, atol=0)


def test_state_refuses_another_layout(split, tokens):
    collator = Collator(tokens, AUDIO)
    state = ShardLoader(split, collator, rank=0, world_size=2, num_workers=2, max_tokens=500).state_dict()
    with pytest.raises(ValueError, match="pass all 2 saved rank states"):
        ShardLoader(split, collator, rank=0, world_size=4, num_workers=2, max_tokens=500).load_state_dict(state)
    other = Collator(type(tokens)(**{**tokens.__dict__, "pad": tokens.eot}), AUDIO)
    with pytest.raises(ValueError, match="special tokens"):
        ShardLoader(split, other, max_tokens=500)
    with pytest.raises(ValueError, match="cannot give each of the 96 rank×worker slots a batch"):
        ShardLoader(split, collator, rank=0, world_size=24, num_workers=4, max_tokens=500)


def _readable_keys(path: Path, tokens) -> set[str]:
    keys = set()
    try:
        for raw in read_shard(path):
            try:
                keys.add(decode_sample(raw, tokens, AUDIO).key)
            except ValueError:
                pass
    except ValueError:
        pass
    return keys


def test_corrupt_data_is_skipped_and_counted(split, samples, tokens, tmp_path, caplog):
    collator = Collator(tokens, AUDIO)
    damaged = shutil.copytree(split, tmp_path / "damaged")
    manifest = Manifest.load(damaged)
    names = [s.name for s in manifest.shards]
    keys_of = {name: [decode_sample(raw, tokens, AUDIO).key for raw in read_shard(damaged / name)] for name in names}

    # Shard 3: truncated mid-file. Shard 1: one undecodable array. Shard 5: one sample's codes out of range.
    truncated = damaged / names[3]
    data = truncated.read_bytes()
    truncated.chmod(0o644)
    truncated.write_bytes(data[:len(data) // 2 + 100])
    rewrite_shard(damaged / names[1], lambda name, data: b"junk" if name == "000002.input_ids.npy" else data)
    def out_of_range(name: str, data: bytes) -> bytes:
        if name != "000001.audio_codes.npy":
            return data
        codes = np.load(io.BytesIO(data))
        codes[0, 0] = 1024
        out = io.BytesIO()
        np.save(out, codes)
        return out.getvalue()

    rewrite_shard(damaged / names[5], out_of_range)
    lost_to_truncation = set(keys_of[names[3]]) - _readable_keys(truncated, tokens)
    corrupted = {keys_of[names[1]][2], keys_of[names[5]][1]}
    assert lost_to_truncation

    clean_seen, damaged_seen, stats = set(), set(), []
    for rank in range(2):
        clean = ShardLoader(split, collator, rank=rank, world_size=2, num_workers=2, seed=1, max_tokens=400)
        clean_batches = run_epoch(clean)
        clean_seen |= {k for b in clean_batches for k in b.sample_keys}
        with caplog.at_level(logging.WARNING, logger="higgs_ds.data.stream"):
            loader = ShardLoader(damaged, collator, rank=rank, world_size=2, num_workers=2, seed=1, max_tokens=400)
            batches = run_epoch(loader)
        assert len(batches) == len(clean_batches) == len(loader), "damage must not change the step count"
        damaged_seen |= {k for b in batches for k in b.sample_keys}
        stats.append(loader.stats())
    lost = (lost_to_truncation | corrupted) & clean_seen
    assert damaged_seen - {"<blank>"} == clean_seen - lost
    assert sum(s["corrupt_samples"] + s["missing_samples"] for s in stats) == len(lost)
    assert sum(s["corrupt_samples"] for s in stats) >= len(corrupted & clean_seen)
    assert sum(s["bad_shards"] for s in stats) >= 1
    log = caplog.text
    assert names[3] in log and "manifest says" in log
    assert f"{names[1]}: key '000002'" in log and "input_ids.npy: not a .npy array" in log
    assert f"{names[5]}: key '000001'" in log and "audio_codes[0]: codes span" in log


def test_batch_without_any_good_sample_becomes_blank(tmp_path, samples, tokenizer, tokens, caplog):
    split = write_split(tmp_path / "split", samples[:8], (2, 2, 2, 2), tokenizer, tokens)
    (split / "train-000001.tar").chmod(0o644)
    (split / "train-000001.tar").write_bytes(b"")  # both samples of the second batch gone
    collator = Collator(tokens, AUDIO)
    with caplog.at_level(logging.WARNING, logger="higgs_ds.data.stream"):
        loader = ShardLoader(split, collator, num_workers=0, batch_size=2, shuffle=False)
        batches = run_epoch(loader)
    assert [b.sample_keys for b in batches] == [["s0", "s1"], ["<blank>"], ["s4", "s5"], ["s6", "s7"]]
    blank = batches[1]
    assert (blank.label_ids == -100).all() and blank.audio_out_labels.numel() == 0
    assert blank.input_ids.tolist() == [[tokens.pad]]
    assert loader.stats()["blank_batches"] == 1 and loader.stats()["missing_samples"] == 2
    assert "train-000001.tar" in caplog.text and "unreadable tar" in caplog.text


def by_sample(members):
    groups: dict[str, list] = {}
    for name, data in members:
        groups.setdefault(name.split(".", 1)[0], []).append((name, data))
    return groups


DAMAGE = {
    # A sample's members moved after the next sample's: both still arrive and are used.
    "out of order": lambda m: (lambda g: g["000000"] + g["000002"] + g["000001"]
                               + [x for k, v in g.items() if k not in ("000000", "000001", "000002") for x in v])(
        by_sample(m)),
    # Members no sample position names: counted as strays, no sample lost. (A slot stops reading a shard after
    # its last wanted sample: strays past that point go unseen; `shard_tools validate` reads everything.)
    "stray keys": lambda m: [("².input_ids.npy", b"x"), ("zzz.meta.json", b"{}")] + m[:5] + [
        ("000099.meta.json", b"{}")] + m[5:],
    # A repeated sample: the second copy's five members are strays.
    "repeated key": lambda m: (lambda g: g["000000"] + g["000001"] + g["000002"] + g["000001"] + [
        x for k, v in g.items() if k not in ("000000", "000001", "000002") for x in v])(by_sample(m)),
    # A meta.json nested deeper than json can parse: that sample is corrupt.
    "deep meta.json": lambda m: [(n, b"[" * 100000 + b"]" * 100000 if n == "000001.meta.json" else d)
                                 for n, d in m],
    # A field of an unknown name (a stray) at the end, and one sample missing a field: its slot reads to the tar's
    # end, where the sample is known to be incomplete, and meets the stray on the way.
    "unknown field": lambda m: [(n, d) for n, d in m if n != "000002.label_ids.npy"] + [("000001.extra.bin", b"?")],
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_tar_member_damage_is_counted_exactly(tmp_path, samples, tokenizer, tokens, damage):
    split = write_split(tmp_path / "split", samples[:24], (6, 6, 6, 6), tokenizer, tokens)
    rewrite_members(split / "train-000001.tar", DAMAGE[damage])
    keys_in_shard = {s.key for s in samples[6:12]}
    collator = Collator(tokens, AUDIO)
    seen, stats = [], []
    for rank in range(2):
        loader = ShardLoader(split, collator, rank=rank, world_size=2, num_workers=0, seed=3, batch_size=2,
                             num_epochs=1)
        seen += [k for b in run_epoch(loader) for k in b.sample_keys if k != "<blank>"]
        stats.append(loader.stats())
        assert_accounting(stats[-1])
    total = {k: sum(s[k] for s in stats) for k in stats[0] if k.endswith(("samples", "members"))}
    assert total["planned_samples"] == 24 and total["dropped_samples"] == 0
    lost = {"out of order": 0, "stray keys": 0, "repeated key": 0, "deep meta.json": 1, "unknown field": 1}[damage]
    assert total["corrupt_samples"] == lost and total["missing_samples"] == 0
    assert total["stray_members"] == {"stray keys": 3, "repeated key": 5, "unknown field": 1}.get(damage, 0)
    assert len(seen) == len(set(seen)) == 24 - lost and len(keys_in_shard - set(seen)) == lost


def test_stats_after_an_epoch_report_that_epoch(split, samples, tokens):
    collator = Collator(tokens, AUDIO)
    loader = ShardLoader(split, collator, world_size=1, num_workers=0, seed=2, max_tokens=300)
    first = run_epoch(loader)
    after = loader.stats()
    assert after["batches_per_epoch"] == len(first) and after["epoch"] == 1 and after["position"] == 0
    assert after["seen_samples"] == sum(len(b.sample_keys) for b in first) and after["planned_samples"] == len(samples)
    assert_accounting(after)
    second = run_epoch(loader)
    assert loader.stats()["batches_per_epoch"] == len(second)
    assert loader.stats()["planned_samples"] == 2 * len(samples)
    assert_accounting(loader.stats())


def test_small_dataset_streams_on_8_ranks_x_2_workers(tmp_path, tokenizer, tokens):
    """A typical single-voice fine-tune (300 samples) in the builder's default single shard feeds 16 slots: every
    rank takes the same number of steps, and in the only epoch every sample is seen once."""
    many = make_samples(300, tokenizer, tokens, seed=1)
    split = write_split(tmp_path / "split", many, (300,), tokenizer, tokens)
    collator = Collator(tokens, AUDIO, layout="packed", pack_length=512)
    loaders = [ShardLoader(split, collator, rank=r, world_size=8, num_workers=2, seed=0, max_tokens=1024,
                           num_epochs=1) for r in range(8)]
    assert len({len(loader) for loader in loaders}) == 1 and len(loaders[0]) >= 2
    planned = [sid for loader in loaders for s in loader.my_slots for sid in loader.plan(0).slots[s].samples.tolist()]
    assert sorted(planned) == list(range(300))
    keys = [k for b in run_epoch(loaders[5]) for k in b.sample_keys if k != "<blank>"]
    expected = {many[sid].key for s in loaders[5].my_slots for sid in loaders[5].plan(0).slots[s].samples.tolist()}
    assert sorted(keys) == sorted(expected)


def test_state_records_the_samples_each_slot_consumed(split, tokens):
    collator = Collator(tokens, AUDIO)
    loader = ShardLoader(split, collator, rank=1, world_size=2, num_workers=2, seed=7, max_tokens=250)
    delivered = []
    for n, batch in enumerate(loader):
        delivered.append(batch.sample_keys)
        if n == 4:
            break
    state = json.loads(json.dumps(loader.state_dict()))
    consumed = {int(s): ids for s, ids in state["consumed"].items()}
    assert sorted(consumed) == [2, 3]
    names = [decode_sample(raw, tokens, AUDIO).key for info in loader.manifest.shards
             for raw in read_shard(loader.manifest.shard_path(info))]
    assert sorted(names[sid] for ids in consumed.values() for sid in ids) == sorted(k for b in delivered for k in b)


def test_a_shard_read_by_two_slots_reports_its_strays_once(tmp_path, samples, tokenizer, tokens):
    split = write_split(tmp_path / "split", samples[:12], (12,), tokenizer, tokens)
    rewrite_members(split / "train-000000.tar", lambda m: [("x.meta.json", b"{}"), ("y.meta.json", b"{}")] + m)
    collator = Collator(tokens, AUDIO)
    stats = []
    for rank in range(2):
        loader = ShardLoader(split, collator, rank=rank, world_size=2, num_workers=0, batch_size=2, num_epochs=1)
        assert loader.plan(0).slots[rank].pieces[0].shard == 0
        run_epoch(loader)
        stats.append(loader.stats())
    assert [s["stray_members"] for s in stats] == [2, 0] and sum(s["seen_samples"] for s in stats) == 12


@pytest.mark.parametrize("new_world, new_workers", [(1, 1), (3, 1), (1, 2)])
def test_resume_at_another_world_size_consumes_the_rest_of_the_epoch_once(split, samples, tokens, new_world,
                                                                        new_workers):
    """2 ranks × 2 workers stop mid-epoch; the run comes back on another layout: the rest of the epoch is every
    sample not consumed before, each exactly once, with equal step counts on the new ranks."""
    collator = Collator(tokens, AUDIO, layout="packed", pack_length=200)

    def loader(rank, world, workers):
        return ShardLoader(split, collator, rank=rank, world_size=world, num_workers=workers, seed=9,
                           max_tokens=400, num_epochs=1)

    before, states = [], []
    for rank in range(2):
        old = loader(rank, 2, 2)
        for n, batch in enumerate(old):
            before += [k for k in batch.sample_keys if k != "<blank>"]
            if n == 4:
                break
        states.append(json.loads(json.dumps(old.state_dict())))
    after, lengths = [], []
    for rank in range(new_world):
        new = loader(rank, new_world, new_workers)
        new.load_state_dict(states[min(rank, 1)], states)
        batches = run_epoch(new)
        lengths.append(len(batches))
        after += [k for b in batches for k in b.sample_keys if k != "<blank>"]
    assert len(set(lengths)) == 1
    assert len(after) == len(set(after)) and not set(after) & set(before)
    assert sorted(before + after) == sorted(s.key for s in samples)
    # A state saved after the re-plan resumes exactly at the new layout (the exclusion travels with it), through
    # the rest of this epoch and the next (one batch may finish the epoch: the state is then the next one's start).
    def through_epoch_1(stream: ShardLoader) -> list:
        keys = []
        while stream.epoch < 2:
            keys += [b.sample_keys for b in stream]
        return keys

    again = loader(0, new_world, new_workers)
    again.load_state_dict(states[0], states)
    iterator = iter(again)
    next(iterator)
    saved = json.loads(json.dumps(again.state_dict()))
    rest = [b.sample_keys for b in iterator] + through_epoch_1(again)
    repeat = loader(0, new_world, new_workers)
    repeat.load_state_dict(saved)
    assert through_epoch_1(repeat) == rest


def test_a_state_saved_at_an_epochs_end_resumes_with_the_next_epoch_on_any_layout(split, samples, tokens):
    """Saved right after an epoch's last batch (before the stream moves on): the state is the next epoch's start,
    so the same layout continues exactly and another one plans the next epoch instead of an empty rest."""
    collator = Collator(tokens, AUDIO, layout="packed", pack_length=200)

    def loader(rank, world, workers=1):
        return ShardLoader(split, collator, rank=rank, world_size=world, num_workers=workers, seed=9,
                           max_tokens=400, num_epochs=2)

    states = []
    for rank in range(2):
        old = loader(rank, 2)
        first = list(itertools.islice(iter(old), len(old)))  # the whole epoch, the generator not yet moved on
        assert old.epoch == 0 and old.position == len(old) == len(first)
        states.append(json.loads(json.dumps(old.state_dict())))
    assert [(s["epoch"], s["position"], s["consumed"]) for s in states] == [(1, 0, {})] * 2
    for rank in range(2):  # the same layout: exactly what an uninterrupted stream gives in epoch 1
        reference = loader(rank, 2)
        run_epoch(reference)
        resumed = loader(rank, 2)
        resumed.load_state_dict(states[rank])
        assert [b.sample_keys for b in run_epoch(resumed)] == [b.sample_keys for b in run_epoch(reference)]
    one = loader(0, 1)  # another layout: all of epoch 1, re-planned for one slot
    one.load_state_dict(states[0], states)
    keys = [k for b in run_epoch(one) for k in b.sample_keys if k != "<blank>"]
    assert one.epoch == 2 and sorted(keys) == sorted(s.key for s in samples)


@pytest.fixture
def http_server(split):
    """The module's split served over HTTP on loopback (python's http.server in a thread)."""
    import functools
    import http.server
    import threading

    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(split.parent))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_a_split_behind_a_url_streams_like_the_same_split_on_disk(split, tokens, http_server):
    collator = Collator(tokens, AUDIO, layout="packed", pack_length=200)
    url = f"{http_server}/{split.name}"
    for rank in range(2):
        local = ShardLoader(split, collator, rank=rank, world_size=2, num_workers=1, seed=4, max_tokens=400)
        remote = ShardLoader(url, collator, rank=rank, world_size=2, num_workers=1, seed=4, max_tokens=400)
        assert str(remote.manifest.shard_path(remote.manifest.shards[0])).startswith(url + "/")
        got, expected = run_epoch(remote), run_epoch(local)
        assert len(got) == len(expected) > 0
        for a, b in zip(got, expected):
            assert_batches_equal(a, b)
        assert remote.stats()["bad_shards"] == 0 and remote.stats()["seen_samples"] == local.stats()["seen_samples"]


def test_a_url_that_cannot_be_fetched_stops_with_the_url_named(split, tokens, http_server, tmp_path):
    from higgs_ds.data.shards import FetchError

    collator = Collator(tokens, AUDIO)
    with pytest.raises(FetchError, match=rf"^{http_server}/nowhere/manifest.json: could not fetch after 3 attempts"):
        ShardLoader(f"{http_server}/nowhere", collator, max_tokens=400)
    # A tar that disappears after the manifest was read: the run stops naming it (no silent "bad shard").
    moved = shutil.copytree(split, split.parent / "vanishing")
    loader = ShardLoader(f"{http_server}/vanishing", collator, num_workers=0, max_tokens=400, shuffle=False)
    (moved / loader.manifest.shards[0].name).unlink()
    with pytest.raises(FetchError, match=rf"{http_server}/vanishing/{loader.manifest.shards[0].name}: fetch failed"):
        run_epoch(loader)
    shutil.rmtree(moved)
