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
