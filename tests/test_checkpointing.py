"""Which checkpoint a run resumes from, decided from the files before any process group (higgs_ds/train/
checkpointing.py), and metrics.jsonl after a resume (higgs_ds/train/metrics.py). The launches that write real
checkpoints are in test_train.py; here tags are made by hand, in the layout `checkpointing.save` writes."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from higgs_ds.train import checkpointing
from higgs_ds.train.config import RunConfigError
from higgs_ds.train.metrics import MetricsLog


def tag(checkpoints: Path, step: int, files: dict[str, int] | None = None, complete: bool = True) -> Path:
    path = checkpoints / checkpointing.tag_name(step)
    path.mkdir(parents=True)
    for name, size in (files or {"zero_pp_rank_0_mp_rank_00_optim_states.pt": 300, "rank0.pt": 40}).items():
        (path / name).write_bytes(b"x" * size)
    (path / "client.json").write_text(json.dumps({"step": step}))
    if complete:
        checkpointing.mark_complete(path)
    return path


def test_complete_records_every_file_with_its_size(tmp_path):
    path = tag(tmp_path, 2)
    recorded = json.loads((path / checkpointing.COMPLETE).read_text())["files"]
    assert recorded == {"client.json": len(json.dumps({"step": 2})), "rank0.pt": 40,
                        "zero_pp_rank_0_mp_rank_00_optim_states.pt": 300}
    assert checkpointing.damage(path) == []


def test_auto_skips_a_truncated_newest_tag_and_says_so(tmp_path, capsys):
    older, newer = tag(tmp_path, 2), tag(tmp_path, 4)
    tag(tmp_path, 6, complete=False)  # a crash before the mark: never a candidate
    optim = newer / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    optim.write_bytes(b"x" * 128)  # truncated
    assert checkpointing.resume_target(tmp_path, "auto") == older
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"warning: resuming from {older}: skipped the damaged newer step00000004 ({optim} has 128 bytes, "
                   "300 were written)"]
    assert checkpointing.resume_target(tmp_path, "auto", announce=False) == older
    assert capsys.readouterr().err == "", "ranks other than 0 decide alike and say nothing"


def test_a_missing_file_or_unreadable_mark_is_damage(tmp_path):
    missing = tag(tmp_path, 2)
    (missing / "rank0.pt").unlink()
    assert checkpointing.damage(missing) == [f"{missing / 'rank0.pt'} is missing"]
    garbled = tag(tmp_path, 4)
    (garbled / checkpointing.COMPLETE).write_text("{not json")
    assert checkpointing.damage(garbled) == [f"{garbled / checkpointing.COMPLETE} is unreadable"]


def test_every_tag_damaged_or_a_named_damaged_tag_stops_with_one_line_naming_the_files(tmp_path):
    only = tag(tmp_path, 2)
    (only / "rank0.pt").write_bytes(b"")
    with pytest.raises(RunConfigError) as auto:
        checkpointing.resume_target(tmp_path, "auto")
    assert str(auto.value) == (f"train.resume=auto: every checkpoint in {tmp_path} is damaged: step00000002 "
                               f"({only / 'rank0.pt'} has 0 bytes, 40 were written) — remove them, or start over "
                               "with train.resume=none")
    with pytest.raises(RunConfigError, match=rf"^train.resume {only}: damaged: {only / 'rank0.pt'} has 0 bytes"):
        checkpointing.resume_target(tmp_path, str(only))
    incomplete = tag(tmp_path, 4, complete=False)
    with pytest.raises(RunConfigError, match="not a complete checkpoint"):
        checkpointing.resume_target(tmp_path, str(incomplete))
    assert "\n" not in str(auto.value)


def test_tags_written_before_sizes_were_recorded_still_resume(tmp_path):
    old = tag(tmp_path, 2, complete=False)
    (old / checkpointing.COMPLETE).write_bytes(b"")  # the mark of earlier versions: empty
    assert checkpointing.resume_target(tmp_path, "auto") == old
    assert checkpointing.resume_target(tmp_path, "none") is None


def test_no_checkpoint_yet_starts_fresh(tmp_path):
    assert checkpointing.resume_target(tmp_path / "checkpoints", "auto") is None


def rows(path: Path) -> list[int]:
    return [json.loads(line)["step"] for line in path.read_text().splitlines()]


def test_a_resumed_run_drops_the_metrics_rows_after_its_checkpoint(tmp_path):
    """Steps 1-6 were logged, then the run died after its step-4 checkpoint (and mid-write of a row): resumed at
    step 4, the log keeps steps 1-4 and the new steps follow; no step appears twice."""
    log = tmp_path / "metrics.jsonl"
    log.write_text("".join(json.dumps({"step": s, "loss/total": float(s)}) + "\n" for s in range(1, 7)) + '{"st')
    metrics = MetricsLog(tmp_path, start_step=4)
    assert rows(log) == [1, 2, 3, 4]
    for step in (5, 6, 7):
        metrics.write(step, {"loss/total": 0.5})
    assert rows(log) == [1, 2, 3, 4, 5, 6, 7]
    MetricsLog(tmp_path, start_step=0)
    assert log.read_text() == "", "a run started over (resume=none in the same folder) starts its log over"


def test_a_run_sets_aside_the_tags_after_its_start_so_pruning_keeps_its_own(tmp_path):
    """Resumed from step 100 past a damaged step 200: step 200 is renamed, no longer a tag; the run's step 150 then
    survives pruning (by name, 200 would have stayed the newest and 150 been deleted with keep_last=1)."""
    good, damaged = tag(tmp_path, 100), tag(tmp_path, 200)
    (damaged / "rank0.pt").write_bytes(b"x")
    assert checkpointing.resume_target(tmp_path, "auto", announce=False) == good
    unfinished = tmp_path / "step00000300"
    unfinished.mkdir()
    (unfinished / "rank0.pt").write_bytes(b"y")  # a save that never reached COMPLETE
    assert checkpointing.set_aside_newer(tmp_path, 100) == (["step00000200"], ["step00000300"])
    assert (tmp_path / "step00000200.set-aside" / "rank0.pt").read_bytes() == b"x", "kept, renamed"
    assert not unfinished.exists(), "nothing in an unfinished save loads: removed, as pruning would"
    own = tag(tmp_path, 150)
    checkpointing._prune(tmp_path, keep_last=1)
    assert checkpointing.complete_tags(tmp_path) == [own] and checkpointing.latest(tmp_path) == own
    assert (tmp_path / "step00000200.set-aside").is_dir()
    # A fresh start (resume=none) in a used folder sets every tag aside.
    assert checkpointing.set_aside_newer(tmp_path, 0) == (["step00000150"], []) and checkpointing.tags(tmp_path) == []


def test_the_schedule_resumes_over_this_runs_horizon_not_the_saved_one():
    """Loading the scheduler state puts the saved WarmupCosine's fields back (LambdaLR saves a callable object's
    __dict__): a resumed run whose train.max_steps changed must decay over its own total."""
    import torch

    from higgs_ds.train.components import warmup_cosine
    from higgs_ds.train.engine import Engine, WarmupCosine, set_schedule

    def parts(total: int) -> Engine:
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        factor = WarmupCosine(2, total, 0.1)
        return Engine(None, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor), factor, None, [])

    saved, resumed = parts(10), parts(40)
    resumed.schedule.load_state_dict(saved.schedule.state_dict())
    assert resumed.lr_factor.total_steps == 10, "what loading does"
    set_schedule(resumed, applied_steps=6, total_steps=40)
    assert resumed.optimizer.param_groups[0]["lr"] == pytest.approx(warmup_cosine(6, 2, 40, 0.1))
    resumed.optimizer.step()
    resumed.schedule.step()
    assert resumed.optimizer.param_groups[0]["lr"] == pytest.approx(warmup_cosine(7, 2, 40, 0.1))


def test_runs_saved_by_earlier_versions_still_load_and_resume(tmp_path):
    """OUT/config.json of a run from before model.leak_labels_for_tests was removed loads (the key dropped), and its
    checkpoints' fingerprint is accepted: 977063432e8af0fe is what that version (128f7ab) computed for this config."""
    from higgs_ds.train.config import RunConfig, fingerprint

    config = RunConfig()
    config.model.tokenizer, config.data.train, config.train.out_dir, config.train.deepspeed = "x", "y", "o", "d"
    saved = config.to_dict()
    saved["model"]["leak_labels_for_tests"] = False
    (tmp_path / "config.json").write_text(json.dumps(saved))
    assert RunConfig.from_saved(tmp_path) == config
    assert fingerprint(saved) == "977063432e8af0fe" != fingerprint(config)
    from higgs_ds.train.preflight import saved_by_an_earlier_version

    config.train.out_dir = str(tmp_path)
    saved["train"]["out_dir"] = str(tmp_path)  # out_dir may change on resume: the fingerprint leaves it out
    (tmp_path / "config.json").write_text(json.dumps(saved))
    assert saved_by_an_earlier_version(config, "977063432e8af0fe")
    config.optim.lr *= 2  # another config: refused
    assert not saved_by_an_earlier_version(config, "977063432e8af0fe")
    saved["model"]["no_such_key"] = 1  # anything else unknown is still an error
    (tmp_path / "config.json").write_text(json.dumps(saved))
    with pytest.raises(RunConfigError, match=r"config\.json: not a run's saved config \(Key 'no_such_key' not in"):
        RunConfig.from_saved(tmp_path)
