"""The TensorBoard hook's event files, read back as TensorBoard reads them (EventAccumulator per run folder): train
and eval overlay under the same loss tags, the groups TensorBoard opens first are the losses, the codebooks share a
Custom Scalars chart, every alarm is a text entry and a count at its step, a resume purges both runs."""
from __future__ import annotations

import pytest

import processes
from higgs_ds.hooks import Hooks, StepReport
from higgs_ds.hooks.tensorboard import EVAL, TRAIN, TensorBoardHook, metric_name, tensorboard_tag
from higgs_ds.train.config import RunConfig, TrainSection

K = 8
# The metric names a step and an evaluation report (higgs_ds/train/metrics.py, trainer.py), as in metrics.jsonl.
STEP = ["loss/total", "loss/text", "loss/audio", *(f"loss/audio_cb{k}" for k in range(K)), "lr", "grad_norm",
        "tokens/text_learnable", "tokens/audio_learnable", "tokens/total", "tokens/learnable_share",
        "throughput/tokens_per_s", "throughput/tokens_per_s_per_rank", "throughput/model_tflops_per_rank",
        "throughput/mfu", "throughput/samples_per_s", "time/step_s", "time/data_wait_share", "time/eta_s",
        "memory/peak_rss_gib", "train/step_skipped", "train/skipped_steps"]
EVALUATED = ["eval/total", "eval/text", "eval/audio", *(f"eval/audio_cb{k}" for k in range(K))]
STREAM = {"epoch": 0, "position": 3, "batches_per_epoch": 9, "planned_samples": 40, "seen_samples": 12,
          "corrupt_samples": 1, "missing_samples": 0, "dropped_samples": 2, "too_long_samples": 0, "stray_members": 2,
          "bad_shards": 0, "blank_batches": 0, "padding_batches": 0}


def natural_order(a: str, b: str) -> int:
    """TensorBoard 2.21's Time Series order of card tags (its bundled webfiles.zip, index.js): digit runs compare
    as numbers, and '/' and digits sort before every other character."""
    import re

    def parts(tag):
        return [(0, float(p), "") if p[0].isdigit() else (0 if p == "/" else 1, 0.0, p)
                for p in re.findall(r"\d+(?:\.\d+)?|.", tag)]

    return (parts(a) > parts(b)) - (parts(a) < parts(b))


def group_order(tags: set[str]) -> list[str]:
    """Time Series groups: cards sorted by natural_order, grouped by the text before the first '/' in the order
    their first card appears; the first two are expanded when the user saved nothing."""
    import functools

    groups = []
    for tag in sorted(tags, key=functools.cmp_to_key(natural_order)):
        if (group := tag.split("/", 1)[0]) not in groups:
            groups.append(group)
    return groups


def values(step: int, names: list[str]) -> dict[str, float]:
    return {name: step + n / 100 for n, name in enumerate(names)}


def read(run_folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_folder), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    return events


def texts(events, tag: str) -> dict[int, str]:
    return {e.step: e.tensor_proto.string_val[0].decode() for e in events.Tensors(f"{tag}/text_summary")}


@pytest.fixture
def hook_run(tmp_path):
    config = RunConfig(train=TrainSection(out_dir=str(tmp_path), slice_every=0))

    def run(steps, start=0, alarms=None, eval_at=()):
        hook = TensorBoardHook(config, num_codebooks=K)
        hooks = Hooks([hook])
        hooks.on_start(start)
        for step in steps:
            report = StepReport(step, 10, values(step, STEP), [[1] * (K + 1)], None, dict(STREAM),
                                alarms=list((alarms or {}).get(step, [])))
            hooks.on_step(report)
            if step in eval_at:
                hooks.on_eval(step, values(step, EVALUATED))
        hooks.close()
        return tmp_path / "tensorboard"

    return run


def test_metric_names_map_to_tags_and_back():
    for name in STEP + EVALUATED + [f"data/{n}" for n in STREAM]:
        run, tag = tensorboard_tag(name)
        assert metric_name(run, tag) == name, (name, run, tag)
        assert run == (EVAL if name.startswith("eval/") else TRAIN)
    assert tensorboard_tag("eval/audio_cb3") == (EVAL, "loss_codebook/cb3") and tensorboard_tag("loss/audio_cb3") == (
        TRAIN, "loss_codebook/cb3")


def test_train_and_eval_share_the_loss_tags_and_the_losses_are_the_groups_opened_first(hook_run):
    folder = hook_run(range(1, 4), eval_at=(3,))
    train, evaluation = read(folder / TRAIN), read(folder / EVAL)
    train_tags, eval_tags = set(train.Tags()["scalars"]), set(evaluation.Tags()["scalars"])
    losses = {"loss/total", "loss/text", "loss/audio", *(f"loss_codebook/cb{k}" for k in range(K))}
    assert eval_tags == losses and losses <= train_tags, "eval writes exactly the loss tags, under train's names"
    for name in STEP:  # every value at its step, under its tag
        tag = tensorboard_tag(name)[1]
        assert [(e.step, e.value) for e in train.Scalars(tag)] == [
            (s, pytest.approx(values(s, STEP)[name])) for s in (1, 2, 3)], name
    expected = values(3, EVALUATED)["eval/text"]
    assert [(e.step, e.value) for e in evaluation.Scalars("loss/text")] == [(3, pytest.approx(expected))]
    groups = group_order(train_tags | eval_tags)
    assert groups[:2] == ["loss", "loss_codebook"], groups
    assert not any(tag.startswith("data/") for tag in train_tags), "the stream's counters are in stream/"
    # The healthy-zero counters fold into one chart: 1 corrupt + 2 stray members.
    assert [e.value for e in train.Scalars("problems/data")] == [3, 3, 3]
    assert [e.value for e in train.Scalars("time/hooks_s")] and all(
        e.value >= 0 for e in train.Scalars("time/hooks_s")), "this step's hooks, logged at this step"


def test_the_codebooks_share_one_custom_scalars_chart(hook_run):
    from tensorboard.plugins.custom_scalar import layout_pb2

    folder = hook_run([1])
    events = read(folder / TRAIN)
    (event,) = events.Tensors("custom_scalars__config__")
    layout = layout_pb2.Layout.FromString(event.tensor_proto.string_val[0])
    charts = {chart.title: list(chart.multiline.tag) for category in layout.category for chart in category.chart}
    assert charts["codebooks (train and eval)"] == [f"loss_codebook/cb{k}" for k in range(K)]


def test_every_alarm_is_a_text_entry_and_a_count_at_its_step(hook_run):
    folder = hook_run([1, 2, 3], alarms={1: ["COLLAPSE ALARM at step 1: 100% of the text labels equal their own "
                                             "input token: the loss is not shifted (labels must be the next token)"],
                                         3: ["step 3 skipped: non-finite loss or gradient (loss nan); 1 in a row",
                                             "COLLAPSE ALARM at step 3: loss/audio 0.0100 is below the floor"]})
    train = read(folder / TRAIN)
    assert [(e.step, e.value) for e in train.Scalars("problems/alarms")] == [(1, 1), (2, 1), (3, 3)]
    entries = texts(train, "problems/alarm")
    assert sorted(entries) == [1, 3]
    assert "100% of the text labels equal their own input token" in entries[1]
    assert "step 3 skipped" in entries[3] and "below the floor" in entries[3]


def test_a_hook_switched_off_is_an_alarm_of_its_step(tmp_path):
    class Raises:
        def on_step(self, report):
            if report.step == 2:
                raise RuntimeError("disk quota")

        def stop_requested(self):
            return None

    config = RunConfig(train=TrainSection(out_dir=str(tmp_path), slice_every=0))
    hooks = Hooks([Raises(), TensorBoardHook(config, num_codebooks=K)])
    hooks.on_start(0)
    for step in (1, 2, 3):
        hooks.on_step(StepReport(step, 3, values(step, STEP), [[1] * (K + 1)], None, dict(STREAM)))
    hooks.close()
    train = read(tmp_path / "tensorboard" / TRAIN)
    assert [(e.step, e.value) for e in train.Scalars("problems/alarms")] == [(1, 0), (2, 1), (3, 1)]
    assert texts(train, "problems/alarm") == {
        2: "**hook Raises failed at step 2 and is switched off: RuntimeError: disk quota**"}


def test_a_resumed_run_purges_the_steps_it_repeats_in_both_runs(hook_run):
    import time

    hook_run(range(1, 7), eval_at=(3, 6))
    time.sleep(1.1)  # event files are read in name order, whose first key is the second they were opened in
    folder = hook_run(range(5, 8), start=4, eval_at=(6, 7))  # resumed from step 4's checkpoint
    train, evaluation = read(folder / TRAIN), read(folder / EVAL)
    assert [e.step for e in train.Scalars("loss/total")] == list(range(1, 8))
    assert [e.step for e in evaluation.Scalars("loss/total")] == [3, 6, 7], "eval 6 once"


@pytest.mark.slow
@pytest.mark.skipif(not __import__("os").path.exists("/usr/bin/chromium"), reason="needs Debian's chromium "
                    "(apt-get install -y chromium) for the headless-browser check")
def test_the_first_screen_a_user_gets_shows_the_losses_and_the_old_layout_did_not(hook_run, tmp_path):
    """docs/make_screenshot.py --check opens TensorBoard's default view (Time Series, nothing chosen) in headless
    Chromium and lists the charts drawn in the window. Before this layout the same run opened on data/ counters."""
    import subprocess
    import sys

    from torch.utils.tensorboard import SummaryWriter

    from helpers import ROOT

    def check(run_dir, port):
        return subprocess.run([sys.executable, str(ROOT / "docs" / "make_screenshot.py"), str(run_dir), "--check",
                               "--port", str(port)], capture_output=True, text=True, timeout=180)

    hook_run(range(1, 21), eval_at=(10, 20))
    done = check(tmp_path, processes.free_port())
    assert done.returncode == 0, done.stdout + done.stderr
    shown = done.stdout.split("first screen: ", 1)[1].strip().split(", ")
    assert {"loss/text", "loss/audio"} <= set(shown) and all(tag.startswith("loss") for tag in shown), shown
    old = tmp_path / "old"  # one folder, eval/ beside loss/, the stream's counters under data/
    writer = SummaryWriter(str(old / "tensorboard"))
    for step in range(1, 21):
        for name, value in {**values(step, STEP), **values(step, EVALUATED),
                            **{f"data/{n}": v for n, v in STREAM.items()}}.items():
            writer.add_scalar(name, value, step)
    writer.close()
    done = check(old, processes.free_port())
    assert done.returncode == 1 and "error: the first screen does not show loss/text and loss/audio" in done.stderr, (
        done.stdout + done.stderr)
