"""Guards on rank 0 against a wrong training signal, from the step values the engine hands over:
  * collapse: loss/audio falls below a floor (default: 1 % of the uniform loss, K·ln(ids per codebook) summed or
    ln(ids) averaged over codebooks), or the audio or text predictions equal their own input (frame, token) much
    more often than the labels do (copy detection: the signature of an unshifted loss), or the labels themselves
    equal the inputs (an unshifted loss, audio or text alone);
  * a rank whose batches carry nothing to learn for many steps in a row is reported.
An alarm warns, or with guards.strict stops every rank (through the engine's broadcast stop flag) with its reason."""
from __future__ import annotations

import sys

from ..data.batch import IGNORE
from ..model.losses import uniform_audio_loss
from .base import StopRequest

# The share of learnable labels equal to their own input above which the loss is taken as unshifted. Unshifted, it
# is 100 % by construction; shifted, it is the rate at which consecutive tokens (codes) repeat. Measured on the
# training splits (docs/monitoring.md, "Guards"): text 0.3 % (tiny example) and 1.3 % (demo); 82-98 % in a reply
# that repeats one token 10-100 times ("aaaa…", "!!!!…"), never 100 % (its first label and <|eot_id|> differ);
# audio 0 % (tiny example) and 80 % (the demo's generated codes repeat on purpose).
LABELS_EQUAL_INPUTS = {"audio": 0.9, "text": 0.99}


class CollapseGuard:
    def __init__(self, config, ids_per_codebook: int, num_codebooks: int):
        self.config = config.guards
        uniform = uniform_audio_loss(ids_per_codebook, num_codebooks, config.model.audio_reduction)
        self.floor = self.config.audio_loss_floor if self.config.audio_loss_floor is not None else 0.01 * uniform
        self.text_trained, self.audio_trained = config.model.text_weight > 0, config.model.audio_weight > 0
        self.alarms: list[str] = []
        self.idle: dict[int, int] = {}
        self.reported: set[int] = set()

    def on_step(self, report) -> None:
        m = report.metrics
        if m.get("tokens/audio_learnable", 0) > 0 and m["loss/audio"] < self.floor:
            self._alarm(report, f"loss/audio {m['loss/audio']:.4f} is below the floor {self.floor:.4f} "
                                     "(guards.audio_loss_floor): the model may be copying its input")
        p = report.predictions
        if p is not None:
            self._check_copying(report, "audio", p.get("audio_inputs"), p.get("audio_labels"),
                                p.get("audio_predictions"))
            if p.get("text_positions") is not None and p.get("input_ids") is not None:
                inputs = p["input_ids"].flatten()[p["text_positions"]]  # the token each logged row predicts from
                self._check_copying(report, "text", inputs, p["text_labels"], p["text_predictions"])
        if report.step == 1:  # the first batches of every rank should carry each modality the run trains
            trains = {"text": self.text_trained, "audio": self.audio_trained}
            for rank, counts in enumerate(report.rank_learnable):
                have = {"text": counts[0] > 0, "audio": sum(counts[1:]) > 0}
                missing = [m for m, on in trains.items() if on and not have[m]]
                if missing:
                    print(f"warning: rank {rank}'s first step carries no learnable {' or '.join(missing)} token",
                          file=sys.stderr, flush=True)
        for rank, counts in enumerate(report.rank_learnable):
            self.idle[rank] = self.idle.get(rank, 0) + 1 if sum(counts) == 0 else 0
            if self.idle[rank] >= self.config.no_learnable_steps and rank not in self.reported:
                self.reported.add(rank)
                print(f"warning: rank {rank}'s batches had nothing to learn for {self.idle[rank]} steps in a row "
                      f"(step {report.step}): check the masking of its shards", file=sys.stderr, flush=True)

    def _check_copying(self, report, modality: str, inputs, labels, predictions) -> None:
        """An unshifted loss makes every learnable label equal its own input (the token or frame it is predicted
        from); a model that learnt to copy predicts its input much more often than the labels equal it. Shares
        over every learnable target of rank 0's last micro-batch (every codebook's cell, for audio)."""
        if inputs is None or labels is None or not inputs.numel():
            return
        learnable = labels != IGNORE
        if learnable.sum() < 8:
            return
        unit = {"audio": "frame", "text": "token"}[modality]
        label_copy = float(((labels == inputs) & learnable).sum() / learnable.sum())
        predicted_copy = float(((predictions == inputs) & learnable).sum() / learnable.sum())
        if label_copy > LABELS_EQUAL_INPUTS[modality]:
            target = {"audio": "the next frame's codes", "text": "the next token"}[modality]
            self._alarm(report, f"{label_copy:.0%} of the {modality} labels equal their own input {unit}: the loss "
                                f"is not shifted (labels must be {target})")
        elif predicted_copy - label_copy > self.config.copy_margin:
            self._alarm(report, f"{modality} predictions equal their input {unit} {predicted_copy:.0%} of the time, "
                                f"the labels only {label_copy:.0%}: the model copies its input")

    def _alarm(self, report, why: str) -> None:
        """A warning line (each kind once); with guards.strict the run's stop says it instead, as its error line.
        Every alarm also goes into the step's report (TensorBoard records it at its step)."""
        message = f"COLLAPSE ALARM at step {report.step}: {why}"
        report.alarms.append(message)
        new = message.split(": ", 1)[1] not in [a.split(": ", 1)[1] for a in self.alarms]
        if new and not self.config.strict:
            print(f"warning: {message}", file=sys.stderr, flush=True)
        self.alarms.append(message)

    def on_eval(self, step, metrics) -> None:
        pass

    def stop_requested(self) -> StopRequest | None:
        return StopRequest(self.alarms[0], failed=True) if self.alarms and self.config.strict else None
