"""One launch, many runs: `deepspeed --num_gpus 2 tests/step_each_recipe.py RUN_YAML CASES_JSON OUT_JSON`.

For each case of CASES_JSON ({name: [section.key=value, ...]}) this runs what launch/train.py runs — preflight,
Trainer, resume, train — in one process group (a launch per recipe would cost a process group each), and records
which parameters the run trains and which its steps changed (every parameter gathered before and after). Rank 0
writes {name: {"steps", "trainable", "changed"}} to OUT_JSON. The final checkpoint is not written (the other launch
tests save every kind of run; here it would only cost time)."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch


def snapshot(trainer) -> dict[str, torch.Tensor]:
    import deepspeed

    params = list(trainer.engine.module.named_parameters())
    with deepspeed.zero.GatheredParameters([p for _, p in params], enabled=trainer.setup.zero3):
        return {name: param.detach().clone().cpu() for name, param in params}


def main(run_yaml: str, cases_json: str, out_json: str) -> int:
    from higgs_ds.hooks import Hooks
    from higgs_ds.train.config import load_config
    from higgs_ds.train.preflight import preflight
    from higgs_ds.train.runtime import start_process_group
    from higgs_ds.train.trainer import Trainer

    Trainer.save = lambda self: None
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    setups = {}  # every preflight before the process group, as launch/train.py runs it
    for name, overrides in json.loads(Path(cases_json).read_text()).items():
        config = load_config(run_yaml, [*overrides, f"train.out_dir={Path(out_json).parent / name}"])
        setups[name] = preflight(config, world, rank)
    start_process_group()
    results = {}
    for name, setup in setups.items():
        trainer = Trainer(setup, Hooks([]))
        trainer.resume()
        before = snapshot(trainer)
        trainer.train()
        after = snapshot(trainer)
        trainer.close()
        results[name] = {"steps": trainer.step,
                         "trainable": sorted(n for n, p in trainer.engine.module.named_parameters() if p.requires_grad),
                         "changed": sorted(n for n in before if not torch.equal(before[n], after[n]))}
    if rank == 0:
        Path(out_json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(*[a for a in sys.argv[1:] if not a.startswith("--local_rank")]))
