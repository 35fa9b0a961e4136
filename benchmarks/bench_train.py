"""Training under DeepSpeed ZeRO-3: per-rank model-state memory (computed and measured), our engine's tokens/s against
the loop a user would write around transformers' HiggsAudioV2ForConditionalGeneration, and the data-wait share.

    .venv/bin/python benchmarks/bench_train.py [--warmup 1 --steps 3 --max-tokens 1024,2048] [--skip-memory]
                                               [--skip-throughput] [--no-bucket-variant] [--keep DIR]

(a) memory. (i) Computed at the release's widths (hidden 3072, 28 layers, intermediate 8192, 24 / 8 KV heads, text
    vocab 128256, audio 8 x 1026, DualFFN on every layer), parameters counted on a meta-device
    HiggsAudioForTraining: bytes per rank of fp32 ZeRO-3 + AdamW for N = 1, 2, 8 ranks, next to DeepSpeed's own
    `estimate_zero3_model_states_mem_needs` for 8 x 80 GB GPUs. (ii) Measured: peak RSS of each rank of real
    1-rank and 2-rank `deepspeed` launches of the engine (what launch/train.py runs: higgs_ds.train.main, in
    process, in a worker mode of this script that records VmRSS/VmHWM) on a model with the real vocabularies and
    hidden 1024, 2 layers (0.34 B parameters), ds_configs/cpu_zero3_fp32.json; the worker also sums the bytes of
    the ZeRO-3 partitions it finds in the engine (parameters, AdamW moments, gradient partition, reduce bucket).
    Then the same launches with reduce_bucket_size 5e7 (DeepSpeed's default is 5e8 elements, more than this
    model: the whole unpartitioned gradient then waits in the bucket on every rank), and with sub_group_size 5e7
    too (the optimizer step's temporaries per sub-group); --no-bucket-variant skips both. All 1-rank launches run
    first, the default 2-rank launch last; a launch killed for memory is retried for step 1 alone.
(b) tokens/s with 2 ranks: our engine (higgs_ds.train.main under deepspeed, throughput/tokens_per_s from OUT/metrics.jsonl)
    against a minimal DeepSpeed loop on transformers' HiggsAudioV2ForConditionalGeneration(use_text_head=True)
    with its own loss, same DeepSpeed JSON (deepspeed_config of the same run YAML), same AdamW, same shards and
    the same batches (the same ShardLoader plan, converted with higgs_ds.testing.port.port_inputs). Hidden 512,
    4 layers, real heads (128256 / 8 x 1026) as bench_step. Padded layout (one sample per row: the port cannot
    isolate packed samples), at each --max-tokens budget. `--warmup` steps, then `--steps` timed steps; one thread
    per rank. The port is built whole and partitioned by deepspeed.initialize (under deepspeed.zero.Init its
    post_init fails on the partitioned embedding); its weights are its own random init, ours our init_seed's.
(c) the data-wait share of our step time (time/data_wait_share in OUT/metrics.jsonl).
(d) MFU of each of our engine's launches in (a)(ii) and (b): the model FLOPs of its steps after the first
    (higgs_ds/train/flops.py; throughput/model_tflops_per_rank x step time) over their time x world x the peak each
    rank measured at start-up (an fp32 matmul with its torch threads: throughput/mfu's CPU peak). CPU-only numbers.

Each launch has its own process group; the final checkpoint is skipped in the worker (Trainer.save patched out:
it is not what is measured, and its full-model gather on rank 0 would add to that rank's peak). After each launch
the script removes the /dev/shm buffers DeepSpeed 0.19.8's CPU shared-memory all-reduce leaves behind for its
master port (66 MiB per rank per launch, never unlinked). Numbers swing with CPU contention: compare within a run.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = ROOT / "tests" / "assets" / "tiny_tokenizer"
CPU_DS = ROOT / "ds_configs" / "cpu_zero3_fp32.json"
DEEPSPEED = Path(sys.executable).parent / "deepspeed"
GIB, MIB = 2 ** 30, 2 ** 20
WORDS = "the quick brown fox jumps over a lazy dog while we read this text aloud in a calm voice".split()


def boson_config(hidden: int, layers: int, intermediate: int, heads: int, kv_heads: int,
                 vocab: int = 128256) -> dict:
    """A boson-layout config.json (the release's layout) with DualFFN on every layer and 8 x 1026 audio ids."""
    return {"audio_num_codebooks": 8, "audio_codebook_size": 1024, "use_delay_pattern": True,
            "skip_audio_tower": True, "audio_adapter_type": "dual_ffn_fast_forward",
            "audio_dual_ffn_layers": list(range(layers)),
            "text_config": {"vocab_size": vocab, "hidden_size": hidden, "intermediate_size": intermediate,
                            "num_hidden_layers": layers, "num_attention_heads": heads,
                            "num_key_value_heads": kv_heads, "head_dim": hidden // heads}}


RELEASE = boson_config(3072, 28, 8192, 24, 8)
MEMORY_MODEL = boson_config(1024, 2, 4096, 16, 8)  # real vocabularies, small backbone: 0.34 B parameters
SPEED_MODEL = boson_config(512, 4, 1376, 8, 2)  # bench_step's widths


def status(key: str) -> int:
    """VmRSS / VmHWM of this process in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


# ---------------------------------------------------------------------------------------------------- (a)(i)

def count_parameters(raw: dict) -> tuple[int, int]:
    """Total parameters and the largest single module (a decoder layer, the text head or the embedding), on meta."""
    import torch

    from higgs_ds.model import HiggsAudioForTraining, read_model_config

    with torch.device("meta"):
        model = HiggsAudioForTraining(read_model_config(raw))
    total = sum(p.numel() for p in model.parameters())
    largest = max(sum(p.numel() for p in m.parameters())
                  for m in [*model.model.layers, model.text_lm_head, model.model.embed_tokens])
    return total, largest


def computed_memory() -> dict:
    from deepspeed.runtime.zero.stage3 import (estimate_zero3_model_states_mem_needs,
                                               estimate_zero3_model_states_mem_needs_all_cold)

    total, largest = count_parameters(RELEASE)
    # fp32 ZeRO-3 + AdamW as DeepSpeed 0.19.8 lays it out here: the fp32 parameter partition (4 B), a separate fp32
    # master copy of it (4 B; stage3.py shares the two only when `partition.device == self.device`, a torch.device
    # compared with the accelerator's device *name* string, which is False: the worker below finds the copy),
    # AdamW's two moments (8 B) and the fp32 gradient partition (4 B): 20 B / param / N (16 B without the copy).
    # DeepSpeed's estimator uses 18 B (bf16 partition 2 + fp32 master 4 + moments 8 + fp32 grads 4).
    per_rank = {n: 20 * total / n for n in (1, 2, 8)}
    with contextlib.redirect_stdout(io.StringIO()) as table:
        estimate_zero3_model_states_mem_needs_all_cold(total, largest, num_gpus_per_node=8)
    estimates = {}
    for offload_optimizer, offload_params in ((False, False), (True, False), (True, True)):
        cpu, gpu, _ = estimate_zero3_model_states_mem_needs(total, largest, num_gpus_per_node=8,
                                                            cpu_offload=offload_optimizer,
                                                            cpu_offload_params=offload_params)
        estimates[(offload_optimizer, offload_params)] = (cpu, gpu)
    return {"total": total, "largest": largest, "per_rank": per_rank, "estimates": estimates,
            "table": table.getvalue()}


def print_computed(c: dict) -> None:
    total, largest = c["total"], c["largest"]
    print(f"(a)(i) release widths: {total / 1e9:.3f} B parameters, largest module {largest / 1e6:.1f} M "
          "(text head / embedding)")
    print("  fp32 ZeRO-3 + AdamW, 20 B/param/N (fp32 param partition 4 + its fp32 master copy 4 + AdamW moments 8 + "
          "fp32 grad partition 4):")
    for n, value in c["per_rank"].items():
        print(f"    N={n}: {value / GIB:7.1f} GiB per rank   ratio to N=1: {value / c['per_rank'][1]:.3f}")
    extra = 4 * largest + 4 * min(5e8, total)
    print("  + per rank, not partitioned: the largest module gathered (4 B x largest = "
          f"{4 * largest / GIB:.2f} GiB) and the filled part of the reduce bucket (<= reduce_bucket_size x 4 B, "
          f"5e8 by default = {5e8 * 4 / GIB:.2f} GiB); with them N=2 / N=1 = "
          f"{(c['per_rank'][2] + extra) / (c['per_rank'][1] + extra):.3f}, N=8 / N=1 = "
          f"{(c['per_rank'][8] + extra) / (c['per_rank'][1] + extra):.3f}")
    print("  DeepSpeed estimate_zero3_model_states_mem_needs, 8 GPUs on 1 node (per GPU / per CPU):")
    for (opt, par), (cpu, gpu) in c["estimates"].items():
        fits = "fits" if gpu <= 80e9 else "does not fit"
        print(f"    offload_optimizer={'cpu ' if opt else 'none'} offload_param={'cpu ' if par else 'none'}: "
              f"{gpu / GIB:6.2f} GiB per GPU ({fits} in 80 GB), {cpu / GIB:7.2f} GiB per CPU")


# ---------------------------------------------------------------------------------------------------- shards

def write_workspace(root: Path, samples: int, seed: int) -> None:
    """TTS-like samples (system + user text, 2-8 s of assistant audio, a third with a 1-3 s reference clip in the
    user turn; random codes), sharded for the tiny tokenizer; model configs for the memory and speed runs."""
    import numpy as np
    from transformers import AutoTokenizer

    from higgs_ds.data.chatml import sample_from_chatml
    from higgs_ds.data.shards import SplitWriter, data_fingerprint
    from higgs_ds.data.tokens import SpecialTokens
    from higgs_ds.model_config import read_model_config

    tokenizer = AutoTokenizer.from_pretrained(str(TOKENIZER))
    for name, raw in (("memory_model", MEMORY_MODEL), ("speed_model", SPEED_MODEL)):
        (root / name).mkdir(parents=True)
        (root / name / "config.json").write_text(json.dumps(raw))
    config = read_model_config(root / "speed_model", tokenizer)
    assert read_model_config(root / "memory_model", tokenizer).audio == config.audio
    tokens = SpecialTokens.from_tokenizer(tokenizer, config.pad_token_id)
    audio = config.audio
    rng = np.random.default_rng(seed)
    writer = SplitWriter(root / "train", "train", data_fingerprint(tokenizer, tokens, audio), tokens, audio,
                         shard_samples=32)
    for i in range(samples):
        clips = {}

        def clip(name: str, seconds: float) -> dict:
            clips[name] = rng.integers(0, 1024, (8, round(25 * seconds))).astype(np.int16)
            return {"type": "audio", "audio_url": name}

        user = [{"type": "text", "text": " ".join(rng.choice(WORDS, int(rng.integers(8, 40))))}]
        if i % 3 == 0:
            user.insert(0, clip("ref", rng.uniform(1, 3)))
        chat = {"messages": [{"role": "system", "content": "Generate audio following instruction."},
                             {"role": "user", "content": user},
                             {"role": "assistant", "content": clip("out", rng.uniform(2, 8))}]}
        writer.add(sample_from_chatml(chat, tokenizer, tokens, audio, key=f"s{i}",
                                      load_codes=lambda ref: clips[ref.item["audio_url"]]))
    writer.close()


def write_run(root: Path, name: str, model: str, max_tokens: int, steps: int, ds: Path) -> Path:
    import yaml

    out = root / name
    run = {"model": {"config": str(root / model), "tokenizer": str(TOKENIZER)},
           "data": {"train": str(root / "train"), "layout": "padded", "pack_length": None,
                    "max_tokens": max_tokens, "round_to": 64, "num_workers": 1, "seed": 0},
           "optim": {"lr": 1e-4, "warmup_steps": 0},
           "train": {"out_dir": str(out), "deepspeed": str(ds), "precision": "fp32", "grad_accum": 1,
                     "epochs": 1, "max_steps": steps, "log_every": 1}}
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(run))
    return path


def launch(ranks: int, worker: str, config: Path, out: Path, timeout: int) -> tuple[float, str]:
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // ranks))}
    port = 29700 + os.getpid() % 200
    command = [str(DEEPSPEED), "--num_gpus", str(ranks), "--master_port", str(port),
               str(Path(__file__).resolve()), "--worker", worker, "--worker-out", str(out), "--config", str(config)]
    print(f"  launch: {worker} on {ranks} rank(s), {config.stem}, load {os.getloadavg()[0]:.2f}", flush=True)
    started = time.perf_counter()
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, start_new_session=True)
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output = process.communicate()[0]
        raise LaunchFailed(f"{worker} launch on {ranks} rank(s) timed out after {timeout} s", output)
    finally:
        for leaked in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"):
            leaked.unlink(missing_ok=True)  # DeepSpeed 0.19.8's CPU shm all-reduce never unlinks its buffers
    seconds = time.perf_counter() - started
    if process.returncode != 0:
        killed = "return code = -9" in output
        raise LaunchFailed(f"{worker} launch on {ranks} rank(s) failed ({process.returncode}"
                           + (": a rank was SIGKILLed, out of memory?" if killed else "") + ")", output, killed)
    return seconds, output


class LaunchFailed(RuntimeError):
    def __init__(self, message: str, output: str, killed: bool = False):
        super().__init__(f"{message}\n{output[-6000:]}")
        self.message, self.output, self.killed = message, output, killed


def rank_reports(out: Path, ranks: int) -> list[dict]:
    return [json.loads((out / f"bench.rank{r}.json").read_text()) for r in range(ranks)]


# ---------------------------------------------------------------------------------------------------- workers

def zero3_state_bytes(engine, optimizer) -> dict[str, int]:
    """Bytes of what ZeRO-3 holds per rank, from the engine's own tensors."""
    import torch

    def size(t) -> int:
        return t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0

    params = sum(size(getattr(p, "ds_tensor", None)) for p in engine.module.parameters())
    inner = getattr(optimizer, "optimizer", optimizer)
    moments = sum(size(v) for state in inner.state.values() for v in state.values() if size(v) > 8)
    fp16 = getattr(optimizer, "fp16_partitioned_groups_flat", [])
    fp32 = getattr(optimizer, "fp32_partitioned_groups_flat", [])
    master = sum(size(b) for a, b in zip(fp16, fp32) if a.data_ptr() != b.data_ptr())
    grads = size(getattr(optimizer, "grad_partitions_flat_buffer", None))
    buckets = sum(size(getattr(b, "buffer", None)) for b in getattr(optimizer, "ipg_buckets", {}).values())
    return {"param_partition": params, "separate_fp32_master": master, "adam_moments": moments,
            "grad_partition": grads, "reduce_bucket_allocated": buckets}


def worker_train(args, rest: list[str]) -> int:
    """What launch/train.py runs (higgs_ds.train.main), in process, with RSS recorded."""
    import torch.distributed as dist

    from higgs_ds.train import main, trainer

    seen: dict = {}
    original_init, original_train = trainer.Trainer.__init__, trainer.Trainer.train

    def init(self, *a, **k):
        seen["rss_process_group"] = status("VmRSS")  # after deepspeed.init_distributed, before the model
        original_init(self, *a, **k)

    def train(self):
        seen["rss_before_steps"] = status("VmRSS")  # model partitions + AdamW states, no step yet
        seen["hwm_before_steps"] = status("VmHWM")
        result = original_train(self)
        seen["state"] = zero3_state_bytes(self.engine, self.parts.optimizer)
        return result

    trainer.Trainer.__init__, trainer.Trainer.train = init, train
    # Which phase of a step raises the peak: VmRSS / VmHWM after each engine forward, backward and step.
    from deepspeed.runtime.engine import DeepSpeedEngine

    phases = seen.setdefault("phases", [])
    for phase in ("forward", "backward", "step"):
        def wrapped(self, *a, _phase=phase, _original=getattr(DeepSpeedEngine, phase), **k):
            result = _original(self, *a, **k)
            phases.append([_phase, status("VmRSS"), status("VmHWM")])
            return result
        setattr(DeepSpeedEngine, phase, wrapped)
    trainer.Trainer.save = lambda self: None  # not measured: its file writes are not what this benchmark is about
    code = main(["--config", str(args.config)] + [a for a in rest if not a.startswith("--local_rank")])
    rank = dist.get_rank() if dist.is_initialized() else 0
    import torch

    report = {"rank": rank, "world": int(os.environ.get("WORLD_SIZE", 1)), "threads": torch.get_num_threads(),
              **seen,
              "peak_rss": status("VmHWM"), "ru_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    (Path(args.worker_out) / f"bench.rank{rank}.json").write_text(json.dumps(report, indent=1))
    return code


def worker_port(args, rest: list[str]) -> int:
    """The baseline: transformers' port + its own loss in a minimal DeepSpeed loop, same JSON, same batches."""
    import deepspeed
    import torch
    import torch.distributed as dist
    from transformers import HiggsAudioV2ForConditionalGeneration

    from higgs_ds.testing.port import port_inputs
    from higgs_ds.train.config import load_config
    from higgs_ds.train.loaders import make_loader
    from higgs_ds.train.preflight import preflight

    config = load_config(args.config)
    setup = preflight(config, int(os.environ.get("WORLD_SIZE", 1)))  # the same DeepSpeed JSON and loader plan
    deepspeed.init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(config.model.init_seed)
    port_config = setup.model_config.transformers_config()
    # Built whole and partitioned by deepspeed.initialize: under deepspeed.zero.Init, transformers' post_init
    # (zeroing the embedding's padding row) indexes the already partitioned, empty weight and fails.
    model = HiggsAudioV2ForConditionalGeneration(port_config, use_text_head=True)
    model.config._attn_implementation = "sdpa"
    o = config.optim
    optimizer = torch.optim.AdamW(model.parameters(), lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps,
                                  weight_decay=o.weight_decay)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer,
                                      config={**setup.ds, "zero_allow_untested_optimizer": True})
    rss_before_steps = status("VmRSS")
    loader = make_loader(config, setup.collator(), config.data.train, rank, world, train=True)
    batches = iter(loader)
    steps = []
    engine.train()
    for _ in range(min(config.train.max_steps, len(loader))):
        started = time.perf_counter()
        batch = next(batches)
        fetched = time.perf_counter()
        inputs = port_inputs(batch, port_config)
        converted = time.perf_counter()
        loss = engine(**inputs).loss
        engine.backward(loss)
        engine.step()
        sums = torch.tensor([float(batch.num_tokens), loss.item()], dtype=torch.float64)
        dist.all_reduce(sums)  # the global token count, as our engine's metrics all-reduce
        done = time.perf_counter()
        steps.append({"step_s": done - started, "data_s": fetched - started, "convert_s": converted - fetched,
                      "tokens": float(sums[0]), "loss_mean_over_ranks": float(sums[1]) / world})
        if rank == 0:
            print(f"port step {len(steps)}: {steps[-1]['step_s']:.2f} s, {sums[0] / steps[-1]['step_s']:.0f} tok/s, "
                  f"loss {steps[-1]['loss_mean_over_ranks']:.3f}", flush=True)
    report = {"rank": rank, "world": world, "threads": torch.get_num_threads(), "steps": steps,
              "rss_before_steps": rss_before_steps, "peak_rss": status("VmHWM")}
    Path(args.worker_out).mkdir(parents=True, exist_ok=True)
    (Path(args.worker_out) / f"bench.rank{rank}.json").write_text(json.dumps(report, indent=1))
    return 0


# ---------------------------------------------------------------------------------------------------- (a)(ii)

def measured_memory(root: Path, args, variants: list[tuple[str, Path]]) -> list[dict]:
    """Every variant on 1 rank, then on 2 ranks (the largest, the default, last); a launch that fails (e.g. a rank
    killed for memory) is reported, not fatal."""
    rows = []
    for (label, ds), ranks in [(v, 1) for v in variants] + [(v, 2) for v in reversed(variants)]:
        failed = None
        for steps in (args.memory_steps, 1):  # killed (out of memory?): once more for step 1 alone
            name = f"memory_{label.replace(' ', '_')}_{ranks}_{steps}"
            config = write_run(root, name, "memory_model", args.memory_max_tokens, steps, ds)
            free = available_memory()
            try:
                seconds, _ = launch(ranks, "train", config, root / name, args.timeout)
                break
            except LaunchFailed as exc:
                print(f"  {label:10s} {ranks} rank(s), {steps} step(s): FAILED: {exc.message} (MemAvailable before "
                      f"the launch {free / GIB:.1f} GiB)", flush=True)
                tail = [line for line in exc.output.splitlines() if "step " in line or "Error" in line][-3:]
                print("    " + "\n    ".join(tail), flush=True)
                failed = f"{steps} steps: {exc.message}"
                if not exc.killed or steps == 1:
                    break
        if not (root / name / "bench.rank0.json").exists():
            rows.append({"label": label, "ranks": ranks, "failed": failed, "available_before": free})
            continue
        reports = rank_reports(root / name, ranks)
        metrics = [json.loads(line) for line in (root / name / "metrics.jsonl").read_text().splitlines()]
        rows.append({"label": label, "ranks": ranks, "seconds": seconds, "reports": reports, "steps": steps,
                     "metrics": metrics, "available_before": free, "earlier_failure": failed})
        print(f"  {label:10s} {ranks} rank(s): peak RSS per rank "
              + ", ".join(f"{r['peak_rss'] / GIB:.2f}" for r in reports)
              + f" GiB (launch {seconds:.0f} s, {len(metrics)} steps, MemAvailable before {free / GIB:.1f} GiB)",
              flush=True)
    return rows


def available_memory() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def mfu(rows: list[dict], skip: int = 1) -> dict:
    """MFU over a launch's steps after the first `skip` (warm-up), from its metrics.jsonl rows: the steps' model
    FLOPs per rank over their time and the peak per rank (the same on every row: measured once at start-up)."""
    timed = rows[skip:] or rows
    seconds = sum(r["time/step_s"] for r in timed)
    tflops = sum(r["throughput/model_tflops_per_rank"] * r["time/step_s"] for r in timed) / seconds
    peak = timed[0]["throughput/model_tflops_per_rank"] / timed[0]["throughput/mfu"]
    return {"mfu": tflops / peak, "tflops": tflops, "peak": peak, "steps": len(timed),
            "tokens_per_s_per_rank": sum(r["throughput/tokens_per_s_per_rank"] * r["time/step_s"] for r in timed)
            / seconds}


def print_mfu(label: str, rows: list[dict], skip: int = 1) -> None:
    m = mfu(rows, skip)
    print(f"  (d) {label}: MFU {m['mfu']:.1%} over steps {len(rows) - m['steps'] + 1}-{len(rows)}: "
          f"{m['tflops'] * 1e3:.2f} model GFLOP/s per rank against a measured peak of {m['peak'] * 1e3:.1f} GFLOP/s "
          f"(fp32 matmul), {m['tokens_per_s_per_rank']:.0f} tokens/s per rank", flush=True)


def held(report: dict) -> int:
    """Model-state bytes found in the engine: parameter partition, fp32 master copy, AdamW moments, grad partition."""
    s = report["state"]
    return s["param_partition"] + s["separate_fp32_master"] + s["adam_moments"] + s["grad_partition"]


def print_measured(rows: list[dict], total: int) -> dict:
    print(f"(a)(ii) measured: hidden 1024, 2 layers, real vocabularies, {total / 1e9:.3f} B parameters, fp32 "
          f"ZeRO-3 + AdamW, 20 B/param = {20 * total / GIB:.2f} GiB of model states at N=1")
    print("  variant | ranks | rank | runtime (imports + process group) | RSS before step 1 | peak RSS | peak after "
          "step 1 forward / backward / optimizer step | model-state tensors found | reduce bucket (allocated)")
    for row in rows:
        if "failed" in row:
            print(f"  {row['label']} | {row['ranks']} | - | {row['failed']}")
            continue
        if row.get("earlier_failure"):
            print(f"  {row['label']} | {row['ranks']} | - | {row['earlier_failure']}; ran {row['steps']} step(s):")
        for r in row["reports"]:
            phases = r["phases"][:3]
            print(f"  {row['label']} | {row['ranks']} | {r['rank']} | {r['rss_process_group'] / MIB:.0f} MiB | "
                  f"{r['rss_before_steps'] / GIB:.2f} GiB | {r['peak_rss'] / GIB:.2f} GiB | "
                  + " / ".join(f"{p[2] / GIB:.2f}" for p in phases) + f" GiB | {held(r) / GIB:.2f} GiB | "
                  f"{r['state']['reduce_bucket_allocated'] / GIB:.2f} GiB")
    ratios = {}
    for label in dict.fromkeys(row["label"] for row in rows):
        one, two = ([row for row in rows if row["label"] == label and row["ranks"] == n][0] for n in (1, 2))
        if "failed" in one or "failed" in two:
            print(f"  {label}: no ratio (a launch failed)")
            continue
        base = one["reports"][0]
        before = max(r["rss_before_steps"] for r in two["reports"]) / base["rss_before_steps"]
        tensor = max(held(r) for r in two["reports"]) / held(base)
        first = max(r["phases"][2][2] for r in two["reports"]) / base["phases"][2][2]  # peak through step 1
        ratios[label] = {"before_steps": before, "tensors": tensor, "step1_peak": first}
        text = (f"  {label}: ratio 2 ranks / 1 rank (worst rank): model-state tensors {tensor:.3f} (computed "
                f"0.500), RSS before step 1 {before:.3f}, peak RSS through step 1 {first:.3f}")
        if one["steps"] == two["steps"]:
            ratios[label]["peak"] = max(r["peak_rss"] for r in two["reports"]) / base["peak_rss"]
            ratios[label]["peak_above_runtime"] = (max(r["peak_rss"] - r["rss_process_group"] for r in two["reports"])
                                                   / (base["peak_rss"] - base["rss_process_group"]))
            text += (f", peak RSS over {one['steps']} steps {ratios[label]['peak']:.3f} (minus the runtime "
                     f"{ratios[label]['peak_above_runtime']:.3f})")
        print(text)
    for row in rows:
        if "failed" not in row:
            print_mfu(f"{row['label']}, {row['ranks']} rank(s)", row["metrics"])
    return ratios


# ---------------------------------------------------------------------------------------------------- (b), (c)

def throughput(root: Path, args, max_tokens: int) -> dict:
    """Our engine, then the port loop: 2 ranks each, the same run YAML (shards, plan, batches, DeepSpeed JSON)."""
    results = {}
    for worker in ("train", "port"):
        name = f"speed_{max_tokens}_{worker}"
        config = write_run(root, name, "speed_model", max_tokens, args.warmup + args.steps, CPU_DS)
        seconds, _ = launch(2, worker, config, root / name, args.timeout)
        reports = rank_reports(root / name, 2)
        if worker == "train":  # rank 0's metrics: all-reduced tokens over rank 0's step clock
            steps = [json.loads(line) for line in (root / name / "metrics.jsonl").read_text().splitlines()]
            results["ours_mfu"] = mfu(steps, args.warmup)
            print_mfu(f"ours, 2 ranks, {max_tokens} positions per rank", steps, args.warmup)
            steps = [{"step_s": r["time/step_s"], "tokens": r["throughput/tokens_per_s"] * r["time/step_s"],
                      "wait_s": r["time/step_s"] * r["time/data_wait_share"], "loss": r["loss/total"]}
                     for r in steps]
        else:  # rank 0's clock, all-reduced tokens (as ours); the wait is data fetch + port_inputs conversion
            steps = [{"step_s": r["step_s"], "tokens": r["tokens"], "wait_s": r["data_s"] + r["convert_s"],
                      "convert_s": r["convert_s"], "loss": r["loss_mean_over_ranks"]} for r in reports[0]["steps"]]
        timed = steps[args.warmup:]
        tokens, total = sum(r["tokens"] for r in timed), sum(r["step_s"] for r in timed)
        waited = sum(r["wait_s"] for r in timed)
        results["ours" if worker == "train" else "port"] = {
            "tps": tokens / total, "tps_compute": tokens / (total - waited), "wait_share": waited / total,
            "step_s": statistics.median(r["step_s"] for r in timed), "tokens_per_step": tokens / len(timed),
            "steps": steps, "launch_s": seconds, "threads": reports[0]["threads"],
            "peak_rss": [r["peak_rss"] for r in reports],
            "convert_s": statistics.median(r.get("convert_s", 0.0) for r in timed)}
        print(f"  {worker} ({max_tokens} positions per rank): launch {seconds:.0f} s", flush=True)
    ours, port = results["ours"], results["port"]
    assert [round(r["tokens"]) for r in ours["steps"]] == [round(r["tokens"]) for r in port["steps"]], \
        "the two runs must see the same batches"
    return results


def print_throughput(results: dict, max_tokens: int, args) -> None:
    ours, port = results["ours"], results["port"]
    print(f"(b) 2 ranks x {ours['threads']} thread(s), hidden 512, 4 layers, real heads, padded batches of <= "
          f"{max_tokens} positions per rank, {args.warmup} warm-up + {args.steps} timed steps, "
          f"{ours['tokens_per_step']:.0f} real tokens per step (both ranks; the same batches in both runs)")
    for name, r in (("ours", ours), ("port", port)):
        print(f"  {name}: median step {r['step_s']:.2f} s, {r['tps']:.0f} tokens/s (data wait"
              + (" + port_inputs" if name == "port" else "") + f" {r['wait_share']:.1%} of step time; without it "
              f"{r['tps_compute']:.0f} tokens/s), loss step 1 {r['steps'][0]['loss']:.3f} -> step "
              f"{len(r['steps'])} {r['steps'][-1]['loss']:.3f}, peak RSS per rank "
              + ", ".join(f"{v / GIB:.2f}" for v in r["peak_rss"]) + " GiB")
    print(f"  speed-up ours / port: {ours['tps'] / port['tps']:.2f}x (whole step), "
          f"{ours['tps_compute'] / port['tps_compute']:.2f}x (without data wait); port_inputs "
          f"{port['convert_s'] * 1000:.0f} ms per step")
    share = [r["wait_s"] / r["step_s"] for r in ours["steps"]]
    print(f"(c) data-wait share of our step time: step 1 {share[0]:.2%}, steps 2-{len(share)} median "
          f"{statistics.median(share[1:]):.2%} (max {max(share[1:]):.2%})")


# ---------------------------------------------------------------------------------------------------- main

def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=3, help="timed steps of (b)")
    parser.add_argument("--warmup", type=int, default=1, help="warm-up steps of (b)")
    parser.add_argument("--max-tokens", default="1024,2048", help="batch budgets of (b), positions per rank")
    parser.add_argument("--memory-steps", type=int, default=3)
    parser.add_argument("--memory-max-tokens", type=int, default=1024)
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--timeout", type=int, default=600, help="seconds per launch")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--no-bucket-variant", action="store_true")
    parser.add_argument("--keep", type=Path, help="work in this (new) folder and keep it")
    parser.add_argument("--worker", choices=("train", "port"), help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", help=argparse.SUPPRESS)
    parser.add_argument("--config", type=Path, help=argparse.SUPPRESS)
    args, rest = parser.parse_known_args()
    if args.worker == "train":
        return worker_train(args, rest)
    if args.worker == "port":
        return worker_port(args, rest)
    if rest:
        parser.error(f"unknown arguments {rest}")

    import torch

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / GIB:.1f} GiB RAM, torch {torch.__version__}, "
          f"load {os.getloadavg()[0]:.2f}")
    print_computed(computed_memory())
    root = args.keep or Path(tempfile.mkdtemp(prefix="bench_train."))
    if args.keep:
        root.mkdir(parents=True)
    try:
        write_workspace(root, args.samples, seed=0)
        if not args.skip_memory:
            variants = [("default", CPU_DS)]
            if not args.no_bucket_variant:
                ds = json.loads(CPU_DS.read_text())
                ds["zero_optimization"]["reduce_bucket_size"] = int(5e7)
                (root / "cpu_zero3_fp32_bucket5e7.json").write_text(json.dumps(ds))
                variants.append(("bucket 5e7", root / "cpu_zero3_fp32_bucket5e7.json"))
                ds["zero_optimization"]["sub_group_size"] = int(5e7)
                (root / "cpu_zero3_fp32_small.json").write_text(json.dumps(ds))
                variants.append(("bucket+subgroup 5e7", root / "cpu_zero3_fp32_small.json"))
            rows = measured_memory(root, args, variants)
            print_measured(rows, count_parameters(MEMORY_MODEL)[0])
        if not args.skip_throughput:
            for max_tokens in (int(v) for v in args.max_tokens.split(",")):
                print_throughput(throughput(root, args, max_tokens), max_tokens, args)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    print(f"load at the end {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
