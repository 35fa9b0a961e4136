"""launch/compare_runs.py (higgs_ds/hooks/compare.py) on small event files written here with SummaryWriter: both
event-file layouts read under the metric names, the --assert report (per tag the first step beyond tolerance, each
run's steps, ordered by step), the PNGs' panels."""
from __future__ import annotations

from pathlib import Path

import pytest

from higgs_ds.hooks.compare import figures, main as compare_main, metric_name, read_scalars
from higgs_ds.hooks.tensorboard import tensorboard_tag

# TensorBoardHook's mapping, metric name -> (run folder, TensorBoard tag), as decided for OUT/tensorboard/{train,eval}.
LAYOUT = {"loss/total": ("train", "loss/total"), "loss/text": ("train", "loss/text"),
          "loss/audio": ("train", "loss/audio"),
          **{f"loss/audio_cb{k}": ("train", f"loss_codebook/cb{k}") for k in range(8)},
          "eval/total": ("eval", "loss/total"), "eval/text": ("eval", "loss/text"),
          "eval/audio": ("eval", "loss/audio"),
          **{f"eval/audio_cb{k}": ("eval", f"loss_codebook/cb{k}") for k in range(8)},
          "lr": ("train", "optim/lr"), "grad_norm": ("train", "optim/grad_norm"),
          "throughput/mfu": ("train", "throughput/mfu"), "data/seen_samples": ("train", "stream/seen_samples")}


def losses(steps: int, eval_every: int) -> dict[str, dict[int, float]]:
    """A run's metrics, binary fractions (exact in the event files' float32): codebook k at step s is
    7 - s/64 - k/128, audio their sum, text 5 - s/32, total text + audio; evaluations every `eval_every` steps at
    the training values + 1/4; lr and grad_norm."""
    run: dict[str, dict[int, float]] = {}
    for s in range(1, steps + 1):
        cbs = [7 - s / 64 - k / 128 for k in range(8)]
        values = {**{f"loss/audio_cb{k}": v for k, v in enumerate(cbs)}, "loss/audio": sum(cbs),
                  "loss/text": 5 - s / 32, "loss/total": 5 - s / 32 + sum(cbs), "lr": s / 1024, "grad_norm": 2 + s / 8}
        if s % eval_every == 0:
            values.update({f"eval/{name[len('loss/'):]}": v + 0.25 for name, v in values.items()
                           if name.startswith("loss/")})
        for name, value in values.items():
            run.setdefault(name, {})[s] = value
    return run


def write_run(out: Path, metrics: dict[str, dict[int, float]], layout: str = "new") -> Path:
    """Event files of `metrics` as TensorBoardHook writes them: OUT/tensorboard/{train,eval} with LAYOUT's tags
    ("new"), or the earlier single folder OUT/tensorboard with the metric names as tags ("old")."""
    from torch.utils.tensorboard import SummaryWriter

    writers = {}
    for name, values in metrics.items():
        folder, tag = tensorboard_tag(name) if layout == "new" else ("", name)
        if folder not in writers:
            writers[folder] = SummaryWriter(str(out / "tensorboard" / folder))
        for step, value in sorted(values.items()):
            writers[folder].add_scalar(tag, value, step)
    for writer in writers.values():
        writer.close()
    return out


def test_metric_name_is_the_inverse_of_the_tensorboard_layout():
    for name, (folder, tag) in LAYOUT.items():  # the table, written out: an oracle apart from the code
        assert tensorboard_tag(name) == (folder, tag) and metric_name(folder, tag) == name, (folder, tag)
    assert metric_name("eval", "tokens/text_learnable") == "eval/tokens/text_learnable"
    for tag in ("loss/text", "eval/audio_cb3", "lr", "data/seen_samples"):  # the earlier layout: tags are the names
        assert metric_name("", tag) == tag
    with pytest.raises(ValueError, match="unknown TensorBoard run folder 'slices'"):
        metric_name("slices", "loss/text")


@pytest.mark.parametrize("layout", ["new", "old"])
def test_read_scalars_returns_metric_names_in_either_layout(layout, tmp_path):
    metrics = losses(6, eval_every=3)
    metrics["data/seen_samples"] = {1: 4.0, 2: 8.0}
    run = write_run(tmp_path / "run", metrics, layout)
    assert sorted((run / "tensorboard").iterdir()) == (
        [run / "tensorboard" / "eval", run / "tensorboard" / "train"] if layout == "new" else
        [next((run / "tensorboard").glob("events.out.tfevents.*"))])
    assert read_scalars(run) == metrics
    assert read_scalars(run / "tensorboard") == metrics
    if layout == "new":
        assert read_scalars(run / "tensorboard" / "train") == metrics, "a run folder reads as its whole run"
    assert read_scalars(run)["eval/audio_cb7"] == {3: 7 - 3 / 64 - 7 / 128 + 0.25, 6: 7 - 6 / 64 - 7 / 128 + 0.25}


def test_a_run_resumed_across_the_layout_change_reads_as_one(tmp_path):
    """Steps 1-4 in the earlier layout (the killed run logged up to 4), resumed from step 2 in the new one: the new
    folders' steps 3-6 win over the old folder's 3-4."""
    whole = losses(6, eval_every=3)
    killed = {name: {s: v + 1 for s, v in values.items() if s <= 4} for name, values in whole.items()}
    write_run(tmp_path / "run", killed, "old")
    write_run(tmp_path / "run", {name: {s: v for s, v in values.items() if s >= 3} for name, values in whole.items()})
    got = read_scalars(tmp_path / "run")
    assert got == {name: {**{s: v + 1 for s, v in values.items() if s <= 2}, **{s: v for s, v in values.items()
                                                                              if s >= 3}}
                   for name, values in whole.items()}


def test_new_runs_match_an_old_layout_run_of_the_same_values(tmp_path, capsys):
    old = write_run(tmp_path / "old", losses(6, eval_every=3), "old")
    new = write_run(tmp_path / "new", losses(6, eval_every=3))
    longer = write_run(tmp_path / "longer", losses(8, eval_every=3))
    assert compare_main([str(old), str(new), str(longer), "--assert"]) == 0
    printed = capsys.readouterr().out
    assert f"A = {old}\nB = {new}\nC = {longer}\n" in printed
    assert "A: 6 training steps (1–6), evaluated at 3, 6\nB: 6 training steps (1–6), evaluated at 3, 6\n" \
           "C: 8 training steps (1–8), evaluated at 3, 6 — C ran to step 8, beyond A's 6 (not compared)\n" in printed
    assert "loss/audio_cb7 " in printed and printed.endswith("OK: within rtol=0.0001 atol=1e-06\n")


def test_an_early_stopping_run_reports_its_divergence_first_and_its_end_once(tmp_path, capsys):
    """B diverges at step 1 (audio codebook 3 by +0.5, so loss/audio and loss/total too) and stops there; A has 20
    steps and evaluates every 5. The report's first failure line is the divergence at step 1; B's missing steps
    are one line, not a line per (tag, step). docs/monitoring.md shows this report."""
    a = losses(20, eval_every=5)
    b = {name: {1: values[1] + (0.5 if name in ("loss/audio_cb3", "loss/audio", "loss/total") else 0)}
         for name, values in a.items() if 1 in values}
    write_run(tmp_path / "A", a, "old")  # an earlier run kept by its user, against a new one
    write_run(tmp_path / "B", b)
    assert compare_main([str(tmp_path / "A"), str(tmp_path / "B"), "--assert"]) == 1
    out, err = capsys.readouterr()
    assert "A: 20 training steps (1–20), evaluated at 5, 10, 15, 20\n" \
           "B: 1 training step (1), no evaluation — B stopped at step 1 of 20\n" in out
    # loss/audio at step 1: 8 codebooks 7 - 1/64 - k/128 sum to 55.65625; total: + text 4.96875 = 60.625.
    assert err.splitlines() == [
        "FAIL: B against A (rtol=0.0001 atol=1e-06): 4 problems, by step:",
        "  step 1 loss/audio: A 55.656250, B 56.156250, B − A +0.500000 (+0.90%); beyond tolerance at 1 of 1 shared "
        "steps",
        "  step 1 loss/audio_cb3: A 6.960938, B 7.460938, B − A +0.500000 (+7.18%); beyond tolerance at 1 of 1 "
        "shared steps",
        "  step 1 loss/total: A 60.625000, B 61.125000, B − A +0.500000 (+0.82%); beyond tolerance at 1 of 1 shared "
        "steps",
        "  B stopped at step 1 of 20: A's training steps 2–20 and evaluations at 5, 10, 15, 20 have no counterpart"]
    assert "None" not in err
    assert err in (Path(__file__).parents[1] / "docs" / "monitoring.md").read_text(), "the docs show this report"


def test_a_drift_is_reported_at_its_first_step_with_how_far_it_goes(tmp_path, capsys):
    """B's text loss drifts from step 4 on (+1/64 per step after 3), its codebook 5 lacks step 2, its evaluation at
    step 6 is missing and its step 5 total is NaN: one line each, by step. The expected-loss file written from A
    holds B to the same."""
    a = losses(8, eval_every=3)
    b = {name: dict(values) for name, values in a.items()}
    for s in range(4, 9):
        b["loss/text"][s] += (s - 3) / 64
    del b["loss/audio_cb5"][2]
    for name in [n for n in b if n.startswith("eval/")]:
        del b[name][6]
    b["loss/total"][5] = float("nan")
    write_run(tmp_path / "A", a)
    write_run(tmp_path / "B", b)
    assert compare_main([str(tmp_path / "A"), "--write-expected", str(tmp_path / "expected.json")]) == 0
    capsys.readouterr()
    assert compare_main([str(tmp_path / "A"), str(tmp_path / "B"), "--assert"]) == 1
    lines = capsys.readouterr().err.splitlines()
    assert lines == [
        "FAIL: B against A (rtol=0.0001 atol=1e-06): 4 problems, by step:",
        "  B has no loss/audio_cb5 at step 2 (A has)",
        "  step 4 loss/text: A 4.875000, B 4.890625, B − A +0.015625 (+0.32%); beyond tolerance at 5 of 8 shared "
        "steps, the largest +0.078125 at step 8",
        "  step 5 loss/total: A 60.000000, B nan, not finite; beyond tolerance at 1 of 8 shared steps",
        "  B has no eval/* at step 6 (A has)"]
    assert compare_main([str(tmp_path / "B"), "--expected", str(tmp_path / "expected.json")]) == 1
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == f"FAIL: A against expected = {tmp_path / 'expected.json'} (rtol=0.0001 atol=1e-06): 4 " \
                       f"problems, by step:"
    assert lines[2] == "  step 4 loss/text: expected 4.875000, A 4.890625, A − expected +0.015625 (+0.32%); beyond " \
                       "tolerance at 5 of 8 shared steps, the largest +0.078125 at step 8"
    assert compare_main([str(tmp_path / "A"), "--expected", str(tmp_path / "expected.json"), "--rtol", "0"]) == 0


def test_the_plots_overlay_the_codebooks_in_one_panel_and_train_with_eval(tmp_path):
    runs = {"runs/a": losses(10, eval_every=5), "runs/b": losses(6, eval_every=5)}
    made = figures(runs)
    assert sorted(made) == ["codebooks", "loss"]
    loss_axes = made["loss"].axes
    assert [axis.get_title() for axis in loss_axes] == ["total", "text", "audio"]
    assert [line.get_label() for line in loss_axes[1].get_lines()] == ["A train", "A eval", "B train", "B eval"]
    eval_line = loss_axes[1].get_lines()[1]
    assert list(eval_line.get_xdata()) == [5, 10] and list(eval_line.get_ydata()) == [5 - 5 / 32 + 0.25,
                                                                                      5 - 10 / 32 + 0.25]
    train, evals = made["codebooks"].axes
    assert (train.get_title(), evals.get_title()) == ("per codebook, train", "per codebook, eval")
    lines = train.get_lines()
    assert [line.get_label() for line in lines] == [f"{run} cb{k}" for run in "AB" for k in range(8)]
    assert len({line.get_color() for line in lines[:8]}) == 8, "a colour per codebook"
    assert [line.get_color() for line in lines[:8]] == [line.get_color() for line in lines[8:]]
    assert {line.get_linestyle() for line in lines[:8]} == {"-"} and {l.get_linestyle() for l in lines[8:]} == {"--"}
    assert list(lines[11].get_ydata()) == [7 - s / 64 - 3 / 128 for s in range(1, 7)]
    assert [t.get_text() for t in made["codebooks"].legends[0].get_texts()] == [
        *(f"cb{k}" for k in range(8)), "A runs/a", "B runs/b"]
