"""The tests' training entry point: launch/train.py with faults planted by patching, then the same `main`.

    deepspeed --num_gpus 2 tests/launch_with_faults.py --config run.yaml [overrides]      (HIGGS_DS_FAULTS=<json>)

The faults (a JSON object in the environment variable HIGGS_DS_FAULTS, which the launcher passes to every rank):
  nan_steps: [s, ...]      rank 0's training loss is NaN at these steps (a non-finite step on one rank)
  crash_in_save: s         rank 0 is SIGKILLed at step s's save, between every rank's files and the COMPLETE mark
  hang_after_save: s       after step s's save each rank writes OUT/saved.rank{r} and sleeps (the test kills -9)
  dump_weights: path       after training, every parameter (frozen ones too) gathered into one safetensors file
  leak_labels: true        the classic bug: the loss compares the logits at t with the labels at t (no shift)
  leak_text_labels: true   the same bug for the text loss only (the audio loss stays shifted)
The product holds none of these: each is a patch of a function the trainer calls."""
from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

from higgs_ds.model import modeling
from higgs_ds.model.losses import Targets
from higgs_ds.train import checkpointing, main
from higgs_ds.train.trainer import Trainer


def plant(faults: dict) -> None:
    # Each patch binds its own fault value (default arguments): the closures outlive this function's variables.
    if steps := faults.get("nan_steps"):
        forward = Trainer._forward

        def poisoned(self, batch, norm, want_predictions=False, steps=tuple(steps)):
            result = forward(self, batch, norm, want_predictions)
            if norm is not None and self.rank == 0 and self.step + 1 in steps:  # training, not evaluation
                result = result._replace(loss=result.loss * float("nan"))
            return result

        Trainer._forward = poisoned
    if (step := faults.get("crash_in_save")) is not None:
        mark = checkpointing.mark_complete

        def crash(path: Path, tag=checkpointing.tag_name(step)) -> None:
            if path.name == tag:
                os.kill(os.getpid(), signal.SIGKILL)  # every rank's files are written, the mark is not
            mark(path)

        checkpointing.mark_complete = crash
    if (step := faults.get("hang_after_save")) is not None:
        save = Trainer.save

        def save_then_hang(self, step=step):
            path = save(self)
            if self.step == step:
                (self.out / f"saved.rank{self.rank}").touch()
                time.sleep(3600)
            return path

        Trainer.save = save_then_hang
    if dump := faults.get("dump_weights"):
        train = Trainer.train

        def train_then_dump(self, dump=dump):
            result = train(self)
            dump_parameters(self, Path(dump))
            return result

        Trainer.train = train_then_dump
    if faults.get("leak_labels") or faults.get("leak_text_labels"):
        shifted = modeling.next_token_targets

        def unshifted(label_ids, audio_out_labels, index, text_only=bool(faults.get("leak_text_labels"))):
            text = label_ids.flatten()[index.text_target_positions]
            if text_only:
                return Targets(text=text, audio=shifted(label_ids, audio_out_labels, index).audio)
            return Targets(text=text, audio=audio_out_labels[:, index.audio_target_frames].T)

        modeling.next_token_targets = unshifted


def dump_parameters(trainer: Trainer, path: Path) -> None:
    """Every parameter, gathered one at a time, into one safetensors file on rank 0 (a LoRA checkpoint holds no
    frozen weight to compare with)."""
    import deepspeed
    from safetensors.torch import save_file

    tensors = {}
    for name, param in trainer.engine.module.named_parameters():
        with deepspeed.zero.GatheredParameters([param], enabled=trainer.setup.zero3):
            if trainer.rank == 0:
                tensors[name] = param.detach().clone().cpu()
    if trainer.rank == 0:
        save_file(tensors, str(path))


if __name__ == "__main__":
    plant(json.loads(os.environ.get("HIGGS_DS_FAULTS", "{}")))
    sys.exit(main())
