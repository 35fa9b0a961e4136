"""Rank 0's guards and the hooks' seam, in process: the collapse guard's branches on hand-made step reports, its
floor from the objective's reduction, the typed stop request, and a failing hook switched off once."""
from __future__ import annotations

import math

import pytest
import torch

from higgs_ds.hooks import CollapseGuard, Hooks, StepReport, StopRequest
from higgs_ds.train.config import GuardSection, ModelSection, RunConfig

IDS, K = 1026, 8


def guard(strict: bool = True, reduction: str = "sum", **guards) -> CollapseGuard:
    config = RunConfig(model=ModelSection(audio_reduction=reduction), guards=GuardSection(strict=strict, **guards))
    return CollapseGuard(config, IDS, K)


def report(step: int = 5, audio_loss: float = 40.0, predictions: dict | None = None) -> StepReport:
    return StepReport(step, 10, {"loss/audio": audio_loss, "tokens/audio_learnable": 100.0}, [[3, *[10] * K]] * 2,
                      predictions)


def frames(copy_predicted: float, copy_labels: float, rows: int = 40, seed: int = 0) -> dict:
    """Audio inputs, labels and predictions of `rows` logged frames; the given shares of the label and prediction
    cells equal their input cell (the rest differ from it)."""
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randint(0, 1024, (rows, K), generator=generator)

    def equal_to_inputs(share: float) -> torch.Tensor:
        same = torch.rand(rows, K, generator=generator) < share
        return torch.where(same, inputs, (inputs + 1 + torch.randint(0, 1000, (rows, K), generator=generator)) % 1024)

    return {"audio_inputs": inputs, "audio_labels": equal_to_inputs(copy_labels),
            "audio_predictions": equal_to_inputs(copy_predicted)}


def test_predictions_copying_their_input_raise_the_alarm_and_predictions_that_do_not_stay_quiet():
    """The copy branch on its own (labels rarely equal their input): predictions that copy it alarm, predictions
    that copy it no more often than the labels do not, whatever the direction of the difference."""
    copying = guard()
    copying.on_step(report(predictions=frames(copy_predicted=0.9, copy_labels=0.05)))
    assert len(copying.alarms) == 1 and "audio predictions equal their input frame" in copying.alarms[0]
    assert copying.stop_requested() == StopRequest(copying.alarms[0], failed=True)
    for predicted, labels in ((0.05, 0.05), (0.05, 0.3), (0.2, 0.05)):  # below the margin, or the labels copy more
        quiet = guard()
        quiet.on_step(report(predictions=frames(copy_predicted=predicted, copy_labels=labels)))
        assert quiet.alarms == [] and quiet.stop_requested() is None, (predicted, labels)


def test_labels_equal_to_their_inputs_name_the_unshifted_loss():
    labels_copy = guard()
    labels_copy.on_step(report(predictions=frames(copy_predicted=1.0, copy_labels=1.0)))
    assert labels_copy.alarms == ["COLLAPSE ALARM at step 5: 100% of the audio labels equal their own input frame: "
                                  "the loss is not shifted (labels must be the next frame's codes)"]


@pytest.mark.parametrize("reduction, uniform", [("sum", K * math.log(IDS)), ("mean", math.log(IDS))])
def test_the_loss_floor_is_one_percent_of_the_uniform_loss_of_the_objectives_reduction(reduction, uniform):
    below, above = guard(reduction=reduction), guard(reduction=reduction)
    assert below.floor == pytest.approx(0.01 * uniform)
    below.on_step(report(audio_loss=0.99 * below.floor))
    above.on_step(report(audio_loss=1.01 * above.floor))
    assert len(below.alarms) == 1 and "is below the floor" in below.alarms[0] and above.alarms == []


def test_a_warning_guard_never_asks_to_stop(capsys):
    warn = guard(strict=False)
    warn.on_step(report(audio_loss=0.0))
    assert warn.alarms and warn.stop_requested() is None
    assert capsys.readouterr().err.startswith("warning: COLLAPSE ALARM at step 5")


class Broken:
    def on_step(self, report):
        raise KeyError("boom")

    def stop_requested(self):
        return None


class Stops:
    def __init__(self, request):
        self.request, self.steps = request, []

    def on_step(self, report):
        self.steps.append(report.step)

    def stop_requested(self):
        return self.request


def test_a_failing_hook_is_switched_off_with_one_line_and_a_failing_stop_wins(capsys):
    plain, failing = StopRequest("enough"), StopRequest("collapse", failed=True)
    first, second = Stops(plain), Stops(failing)
    hooks = Hooks([Broken(), first, second])
    assert hooks.on_step(report(step=1)) == failing, "a failing request before a plain one"
    assert hooks.on_step(report(step=2)) == failing
    err = capsys.readouterr().err.splitlines()
    assert err == ["error: hook Broken failed at step 1 and is switched off: KeyError: 'boom'"]
    assert first.steps == second.steps == [1, 2]
    assert Hooks([Stops(None)]).on_step(report()) is None


def test_a_hook_answering_stop_requested_with_anything_but_a_stop_request_is_switched_off(capsys):
    class Legacy(Stops):  # the untyped answer of earlier versions
        pass

    legacy = Legacy(True)
    hooks = Hooks([legacy])
    assert hooks.on_step(report(step=3)) is None and hooks.hooks == []
    assert capsys.readouterr().err.splitlines() == [
        "error: hook Legacy failed at step 3 and is switched off: TypeError: stop_requested() returned True, not a "
        "StopRequest or None"]


def text_rows(tokens: list[int], shifted: bool, predictions: str = "random") -> dict:
    """The logged text rows of one reply as the model hands them over: the input ids, each row's position, its
    label (the next token; unshifted: the token itself) and a prediction (random, or a copy of the input)."""
    ids = torch.tensor([tokens])
    positions = torch.arange(len(tokens) - 1)
    inputs = ids.flatten()[positions]
    labels = ids.flatten()[positions + 1] if shifted else inputs
    predicted = inputs if predictions == "copy" else torch.randint(0, 400, (len(positions),),
                                                                   generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "text_positions": positions, "text_labels": labels, "text_predictions": predicted}


@pytest.fixture(scope="module")
def repetitive_reply(tokenizer) -> list[int]:
    """A reply that repeats one token 100 times ('!!!!…'), between its header's last token and <|eot_id|>: the
    most label-equals-input text we measured (98 %); a correct loss must not raise the alarm on it."""
    header = tokenizer.convert_tokens_to_ids("<|end_header_id|>")
    eot = tokenizer.convert_tokens_to_ids("<|eot_id|>")
    return [header, *tokenizer("!" * 100, add_special_tokens=False)["input_ids"], eot]


def test_a_text_only_unshifted_loss_raises_the_alarm_and_repetitive_text_does_not(repetitive_reply):
    shifted = text_rows(repetitive_reply, shifted=True)
    inputs = shifted["input_ids"].flatten()[shifted["text_positions"]]
    share = float((shifted["text_labels"] == inputs).float().mean())
    assert 0.95 < share < 0.99, share
    quiet = guard()
    step = report(predictions=shifted)
    quiet.on_step(step)
    assert quiet.alarms == step.alarms == []
    leaking, step = guard(), report(step=1, predictions=text_rows(repetitive_reply, shifted=False))
    leaking.on_step(step)
    assert leaking.alarms == step.alarms == [
        "COLLAPSE ALARM at step 1: 100% of the text labels equal their own input token: the loss is not shifted "
        "(labels must be the next token)"]


def test_text_predictions_copying_their_input_raise_the_alarm(tokenizer):
    tokens = tokenizer("the quick brown fox jumps over the lazy dog", add_special_tokens=False)["input_ids"]
    copying, step = guard(), report(predictions=text_rows(tokens, shifted=True, predictions="copy"))
    copying.on_step(step)
    assert len(step.alarms) == 1 and "text predictions equal their input token 100% of the time, the labels only " \
                                     "0%: the model copies its input" in step.alarms[0]
    honest = guard()
    honest.on_step(report(predictions=text_rows(tokens, shifted=True)))
    assert honest.alarms == []
