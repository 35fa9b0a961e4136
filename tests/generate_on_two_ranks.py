"""Generation from inside the training loop under ZeRO-3, on two ranks with unequal work:
`deepspeed --num_gpus 2 tests/generate_on_two_ranks.py RUN_YAML CASES_JSON PROMPTS_PT OUT_DIR`.

Each case of CASES_JSON ({name: [section.key=value, ...]}) runs what launch/train.py runs (preflight, Trainer,
train) for train.max_steps steps. Right after step 1, on every rank as a probe would, unless the name ends in
"_no_probe":
  * "lockstep/RUN": rank r generates PROMPTS[r] with RUNS[RUN][r] (BATCH_SIZE a batch) on the engine's
    partitioned module, `generate(..., lockstep=True)`;
  * "gathered/RUN": the same on `gathered_copy(module)`, without collectives;
  * "on_ranks/MODE": `generate_on_ranks` over PROMPTS[0] + PROMPTS[1], greedy, in each mode (rank 0 gets all).
Rank r writes OUT_DIR/NAME/rank{r}.pt ({key: [Generation]}) and rank{r}.json (per key: forwards through the
model, dummy forwards, seconds; the gathered copy's bytes and memory); rank 0 also OUT_DIR/NAME/weights.pt, the
step-1 weights the single-process reference loads."""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import torch

from higgs_ds.generate import Generation, Prompt, SamplingConfig

BATCH_SIZE = 2
GREEDY = SamplingConfig(max_frames=16, max_text_tokens=6)
# Sampled: rank 1's budget is the larger, so that rank 0 (three prompts) idles in it; greedy, rank 1 idles.
SAMPLED = dict(do_sample=True, temperature=0.8, top_k=50, top_p=0.9, seed=11)
RUNS = {"greedy": (GREEDY, GREEDY),
        "sampled": (SamplingConfig(**SAMPLED, max_frames=5, max_text_tokens=4),
                    SamplingConfig(**SAMPLED, max_frames=30, max_text_tokens=8))}
MODES = ("lockstep", "gathered")


KINDS = {"Prompt": Prompt, "Generation": Generation}


def plain(value):
    """Prompts and Generations (nested in dicts and lists) as dicts of tensors, lists and strings: files that
    `torch.load(..., weights_only=True)` reads, no pickle. `restored` undoes it."""
    if isinstance(value, (Prompt, Generation)):
        fields = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
        if isinstance(value, Generation):
            fields["codes"] = torch.from_numpy(value.codes)
        return {"kind": type(value).__name__, **fields}
    if isinstance(value, dict):
        return {key: plain(item) for key, item in value.items()}
    if isinstance(value, list):
        return [plain(item) for item in value]
    return value


def restored(value):
    if isinstance(value, dict) and value.get("kind") in KINDS:
        fields = {key: item for key, item in value.items() if key != "kind"}
        if value["kind"] == "Generation":
            fields["codes"] = fields["codes"].numpy()
        return KINDS[value["kind"]](**fields)
    if isinstance(value, dict):
        return {key: restored(item) for key, item in value.items()}
    if isinstance(value, list):
        return [restored(item) for item in value]
    return value


def rss_mib(field: str) -> float:
    """VmRSS (now) or VmHWM (peak) of this process."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


def probe(trainer, prompts: list, out: Path) -> None:
    """Every generation of the module docstring, on this rank; results and counts written to `out`."""
    import deepspeed
    import torch.distributed as dist

    from higgs_ds.generate import decode, generate
    from higgs_ds.generate.zero import gathered_copy, generate_on_ranks, stop_trace_recording

    rank, module, tokens = trainer.rank, trainer.engine.module, trainer.setup.vocabulary.tokens
    mine = prompts[rank]
    counts = {"forwards": 0, "dummies": 0}
    hook = module.model.embed_tokens.register_forward_hook(lambda *args: counts.update(forwards=counts["forwards"] + 1))
    dummy_step = decode._Decoder.dummy_step

    def counted_dummy(self):
        counts["dummies"] += 1
        dummy_step(self)

    decode._Decoder.dummy_step = counted_dummy
    results, stats = {}, {}

    def timed(key: str, run):
        counts.update(forwards=0, dummies=0)
        started = time.perf_counter()
        results[key] = run()
        stats[key] = {**counts, "seconds": time.perf_counter() - started}

    trace = trainer.engine.optimizer.parameter_offload.get_param_coordinator()
    stats["trace_recording_before"] = trace.is_record_trace()  # step 1 was DeepSpeed's trace-recording step
    for run, samplings in RUNS.items():
        stop_trace_recording(module)
        timed(f"lockstep/{run}", lambda: generate(module, mine, tokens, samplings[rank], BATCH_SIZE, lockstep=True))
    rss, peak = rss_mib("VmRSS"), rss_mib("VmHWM")
    started = time.perf_counter()
    replica = gathered_copy(module)
    stats["gathered_copy"] = {
        "seconds": time.perf_counter() - started, "rss_before_mib": rss, "rss_after_mib": rss_mib("VmRSS"),
        "peak_before_mib": peak, "peak_after_mib": rss_mib("VmHWM"),
        "replica_bytes": sum(p.numel() * p.element_size() for p in replica.parameters()),
        "model_bytes": sum(getattr(p, "ds_numel", p.numel()) * p.element_size() for p in module.parameters()),
        "partitioned": all(hasattr(p, "ds_id") for p in module.parameters())}
    for run, samplings in RUNS.items():
        timed(f"gathered/{run}", lambda: generate(replica, mine, tokens, samplings[rank], BATCH_SIZE))
    del replica
    everything = prompts[0] + prompts[1]
    for mode in MODES:
        timed(f"on_ranks/{mode}", lambda: generate_on_ranks(module, everything, tokens, GREEDY, mode,
                                                            batch_size=BATCH_SIZE))
    hook.remove()
    decode._Decoder.dummy_step = dummy_step
    stats["trace_recording_after"] = trace.is_record_trace()

    params = list(module.named_parameters())
    with deepspeed.zero.GatheredParameters([p for _, p in params]):
        weights = {name: p.detach().clone() for name, p in params}
    out.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        torch.save(weights, out / "weights.pt")
    torch.save(plain(results), out / f"rank{rank}.pt")
    (out / f"rank{rank}.json").write_text(json.dumps(stats, indent=1))
    dist.barrier()


def main(run_yaml: str, cases_json: str, prompts_pt: str, out_dir: str) -> int:
    from higgs_ds.hooks import Hooks
    from higgs_ds.train.config import load_config
    from higgs_ds.train.preflight import preflight
    from higgs_ds.train.runtime import start_process_group
    from higgs_ds.train.trainer import Trainer

    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    prompts = restored(torch.load(prompts_pt, weights_only=True))
    out = Path(out_dir)
    setups = {}  # every preflight before the process group, as launch/train.py runs it
    for name, overrides in json.loads(Path(cases_json).read_text()).items():
        config = load_config(run_yaml, [*overrides, f"train.out_dir={out / name}"])
        setups[name] = preflight(config, world, rank)
    start_process_group()

    step = Trainer._step

    def step_then_probe(self, *args, **kwargs):
        done = step(self, *args, **kwargs)
        if self.step == 1 and not self.out.name.endswith("_no_probe"):
            probe(self, prompts, self.out / "probe")
        return done

    Trainer._step = step_then_probe
    Trainer.save = lambda self: None  # checkpoints are the other launch tests' concern; here they only cost time
    for setup in setups.values():
        trainer = Trainer(setup, Hooks([]))
        trainer.resume()
        trainer.train()
        trainer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(*[a for a in sys.argv[1:] if not a.startswith("--local_rank")]))
