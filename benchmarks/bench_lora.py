"""LoRA against full fine-tuning: trainable parameters and per-rank model-state memory (higgs_ds.train.memory),
computed at the release's widths and measured on the ZeRO-3 partitions of a real 2-rank DeepSpeed launch.

    .venv/bin/python benchmarks/bench_lora.py [--steps 2] [--skip-measured] [--timeout 240] [--release-widths]

(a) computed. The release's widths (hidden 3072, intermediate 8192, 24 / 8 KV heads, text vocab 128256, audio
    8 x 1026, DualFFN on every layer) with 1 and 2 decoder layers are *counted* on a meta-device
    HiggsAudioForTraining with PEFT injected (higgs_ds.train.lora, rank 16, alpha 32) and the extras trained in
    full (`model.embed_audio_tokens.*`, `audio_lm_head.*`); 28 layers are *extrapolated* (1 layer + 27 x the
    per-layer difference; checked against a direct meta count of 28 layers). Then model_states_estimate for
    1 and 8 GPUs: ZeRO-3 bf16 and ZeRO-2 bf16, each with and without optimizer offload; ratios LoRA / full.
(b) measured. For full fine-tuning and each preset, a 2-rank `deepspeed` launch of a worker of this script:
    HiggsAudioForTraining (the real vocabularies, hidden 512, 2 layers) built under deepspeed.zero.Init, LoRA
    injected after it (outside zero.Init, as PEFT is used on a built model), AdamW on the trainable parameters,
    deepspeed.initialize with ds_configs/cpu_zero3_fp32.json, `--steps` steps on one synthetic TTS batch; then the
    bytes of the ZeRO-3 partitions the engine holds (parameter partitions, fp32 master, AdamW moments, gradient
    partition; bench_train.zero3_state_bytes) against the estimate (fp32, 2 ranks, without the gathered layer).
    The worker also records whether the adapters PEFT created outside zero.Init were ZeRO parameters before
    deepspeed.initialize and partitioned after it, and whether their values were broadcast from rank 0 (each
    rank seeds PEFT's init differently on purpose).
    --release-widths: the presets measured at the release's widths with 1 decoder layer (1.0 B parameters) instead.
    Full fine-tuning is not launched there: its fp32 model states (20 B per parameter, ~20 GB over the 2 ranks)
    do not fit this 24 GiB machine beside the runtime; its row is the estimate, which (b) matches to the byte at
    hidden 512.
DeepSpeed 0.19.8's CPU all-reduce leaks /dev/shm/deepspeed_allreduce_buffer_* files; each launch's are removed.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# this tree's higgs_ds first (the venv's editable install points at the main checkout)
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks"), str(ROOT / "tests")]
from bench_train import CPU_DS, DEEPSPEED, GIB, LaunchFailed, boson_config, status, zero3_state_bytes  # noqa: E402

PRESETS = ("attention", "attention_text_mlp", "all_linear")
RANK, ALPHA = 16, 32
MEASURED = boson_config(512, 2, 1376, 8, 2)  # real vocabularies, small backbone (bench_step's widths)
RELEASE_ONE_LAYER = boson_config(3072, 1, 8192, 24, 8)  # --release-widths


def build(raw: dict, variant: str):
    """HiggsAudioForTraining in the current device / zero.Init context; LoRA + extras unless variant == 'full'."""
    from higgs_ds.model import HiggsAudioForTraining, read_model_config

    model = HiggsAudioForTraining(read_model_config(raw))
    if variant != "full":
        lora_extras(model, variant)
    return model


def lora_extras(model, preset) -> None:
    """The engine's own LoRA setup (higgs_ds.train.lora.apply_lora): adapters + the default extras trained in full
    (audio embedding and audio head), everything else frozen."""
    from higgs_ds.train.config import LoraSection
    from higgs_ds.train.lora import apply_lora

    apply_lora(model, LoraSection(rank=RANK, alpha=ALPHA, preset=preset))


# ---------------------------------------------------------------------------------------------------- (a)

def counts(layers: int) -> dict:
    import torch

    from higgs_ds.train.memory import count_params

    out = {}
    for variant in ("full", *PRESETS):
        with torch.device("meta"):
            out[variant] = count_params(build(boson_config(3072, layers, 8192, 24, 8), variant))
    return out


def computed() -> dict:
    from higgs_ds.train.memory import ParamCounts, format_estimate, model_states_estimate

    one, two = counts(1), counts(2)
    release = {}
    for v in one:
        assert one[v].largest_layer == two[v].largest_layer  # the text head / embedding, not a layer
        release[v] = ParamCounts(*(a + 27 * (b - a) for a, b in zip(one[v][:2], two[v][:2])), one[v].largest_layer)
    direct = counts(28)
    assert direct == release, (direct, release)  # the extrapolation is exact: layers are identical
    print("(a) trainable parameters, release widths, LoRA rank 16 / alpha 32 + audio embedding + audio head in full")
    print("  variant | 2 layers: trainable / total (counted) | 28 layers: trainable / total (extrapolated = direct "
          "meta count) | share | ratio to full")
    for v, c in release.items():
        print(f"  {v:18s} | {two[v].trainable / 1e6:9.2f} M / {two[v].total / 1e9:.4f} B | {c.trainable / 1e6:9.2f}"
              f" M / {c.total / 1e9:.4f} B | {c.trainable / c.total:7.3%} | "
              f"{c.trainable / release['full'].trainable:.4f}")
    extras = release["attention"].trainable - (release["attention"].total - release["full"].total)
    print(f"  extras trained in full (audio embedding + audio head): {extras / 1e6:.2f} M; largest layer "
          f"{release['full'].largest_layer / 1e6:.1f} M (text head = text embedding)")
    rows = []
    print("(a) model states per GPU / CPU per node at 28 layers (higgs_ds.train.memory; Adam; no activations, "
          "buckets or temporaries)")
    print("  setup | GPUs | variant | per GPU GiB | ratio to full | CPU GiB | ratio to full")
    for stage, offload in ((3, False), (3, True), (2, False), (2, True)):
        for gpus in (1, 8):
            full = model_states_estimate(*release["full"], gpus, stage=stage, offload_optimizer=offload)
            for v, c in release.items():
                e = model_states_estimate(*c, gpus, stage=stage, offload_optimizer=offload)
                rows.append(e | {"variant": v, "ratio_device": e["device_bytes"] / full["device_bytes"],
                                 "ratio_cpu": e["cpu_bytes"] / full["cpu_bytes"]})
                print(f"  ZeRO-{stage} bf16{' offload_optimizer' if offload else ''} | {gpus} | {v:18s} | "
                      f"{e['device_bytes'] / GIB:7.2f} | {rows[-1]['ratio_device']:.3f} | "
                      f"{e['cpu_bytes'] / GIB:7.2f} | {rows[-1]['ratio_cpu']:.3f}")
    print("  e.g. " + format_estimate(model_states_estimate(*release["all_linear"], 8)))
    return {"two_layers": {v: c._asdict() for v, c in two.items()},
            "release": {v: c._asdict() for v, c in release.items()}, "memory": rows}


# ---------------------------------------------------------------------------------------------------- (b)

def worker(args) -> int:
    import deepspeed
    import torch
    import torch.distributed as dist
    from deepspeed.runtime.zero.partition_parameters import is_zero_param

    importlib.import_module("higgs_ds.model")  # before zero.Init: torch._dynamo's import fails under its patches
    from helpers import make_batch, tts_sample

    deepspeed.init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    ds = {**json.loads(CPU_DS.read_text()), "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
          "zero_allow_untested_optimizer": True}
    torch.manual_seed(0)
    with deepspeed.zero.Init(config_dict_or_path=ds):
        model = build(RELEASE_ONE_LAYER if args.release_widths else MEASURED, "full")
    report: dict = {"rank": rank, "world": world, "variant": args.worker}
    adapters = []
    if args.worker != "full":
        torch.manual_seed(100 + rank)  # PEFT's lora_A init differs per rank: does initialize broadcast rank 0's?
        lora_extras(model, args.worker)
        adapters = [p for n, p in model.named_parameters() if ".lora_" in n]
        probe = next(p for n, p in model.named_parameters() if ".lora_A." in n)
        probe_init = probe.detach().clone()
        report["adapters_before_initialize"] = {
            "count": len(adapters), "numel": sum(p.numel() for p in adapters),
            "zero_params": sum(is_zero_param(p) for p in adapters)}
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-3)
    engine, optimizer, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds)
    if adapters:
        with deepspeed.zero.GatheredParameters([probe]):
            gathered = probe.detach().clone()
        rank0_init = probe_init.clone()
        dist.broadcast(rank0_init, 0)
        report["adapters_after_initialize"] = {
            "zero_params": sum(is_zero_param(p) for p in adapters),
            "local_numel": sum(p.data.numel() for p in adapters),  # 0 once partitioned and released
            "partition_numel": sum(p.ds_tensor.numel() for p in adapters if is_zero_param(p)),
            "expected_partition_numel": sum(-(-p.ds_numel // world) for p in adapters if is_zero_param(p)),
            "gathered_equals_rank0_init": torch.equal(gathered, rank0_init),
            "gathered_equals_own_init": torch.equal(gathered, probe_init)}
    report["optimizer_flat_numel"] = sum(t.numel() for t in optimizer.fp16_partitioned_groups_flat)
    report["trainable_partition_numel"] = sum(p.ds_tensor.numel() for p in trainable)
    g = torch.Generator().manual_seed(1)
    config = engine.module.config
    batch = make_batch([[tts_sample(g, config, prompt=24, frames=40, reference_frames=20, answer_text=4)]
                        for _ in range(2)], config)
    losses, started = [], time.perf_counter()
    engine.train()
    for _ in range(args.steps):
        loss = engine(**batch.model_inputs()).loss
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    report["step_s"] = (time.perf_counter() - started) / args.steps
    report["losses"] = losses
    if adapters:  # lora_B starts at zero: non-zero after the steps means the adapters trained
        probe_b = next(p for n, p in engine.module.named_parameters() if ".lora_B." in n)
        with deepspeed.zero.GatheredParameters([probe_b]):
            report["lora_B_trained"] = bool(probe_b.detach().abs().sum() > 0)
    state = zero3_state_bytes(engine, optimizer)
    state["frozen_param_partition"] = sum(p.ds_tensor.numel() * p.ds_tensor.element_size()
                                          for p in engine.module.parameters() if not p.requires_grad)
    report |= {"state": state, "total_params": sum(p.ds_numel for p in engine.module.parameters()),
               "trainable_params": sum(p.ds_numel for p in trainable), "peak_rss": status("VmHWM")}
    (Path(args.worker_out) / f"lora.rank{rank}.json").write_text(json.dumps(report, indent=1))
    dist.barrier()
    return 0


def launch(variant: str, out: Path, args) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # 2 ranks on 2 cores
    port = 29500 + os.getpid() % 200
    command = [str(DEEPSPEED), "--num_gpus", "2", "--master_port", str(port), str(Path(__file__).resolve()),
               "--worker", variant, "--worker-out", str(out), "--steps", str(args.steps),
               *(["--release-widths"] if args.release_widths else [])]
    started = time.perf_counter()
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, start_new_session=True)
    try:
        output, _ = process.communicate(timeout=args.timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        raise LaunchFailed(f"{variant}: timed out after {args.timeout} s", process.communicate()[0])
    finally:
        for leaked in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"):
            leaked.unlink(missing_ok=True)  # DeepSpeed 0.19.8's CPU shm all-reduce never unlinks its buffers
    if process.returncode != 0:
        raise LaunchFailed(f"{variant}: launch failed ({process.returncode})", output)
    return time.perf_counter() - started


def measured(args) -> list[dict]:
    from higgs_ds.train.memory import model_states_estimate

    root = Path(tempfile.mkdtemp(prefix="bench_lora."))
    rows = []
    try:
        for variant in PRESETS if args.release_widths else ("full", *PRESETS):
            seconds = launch(variant, root, args)
            reports = [json.loads((root / f"lora.rank{r}.json").read_text()) for r in range(2)]
            for r in reports:
                e = model_states_estimate(r["total_params"], r["trainable_params"], 0, 2, precision="fp32")
                s = r["state"]
                r["held"] = (s["param_partition"] + s["separate_fp32_master"] + s["adam_moments"]
                             + s["grad_partition"])
                r["estimated"] = e["device_parts"]["params"] + e["device_parts"]["grads_and_optimizer"]
            rows.append({"variant": variant, "seconds": seconds, "reports": reports})
            print(f"  launch {variant}: {seconds:.0f} s", flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    r0 = rows[0]["reports"][0]
    if args.release_widths:  # full fine-tuning: the estimate (it does not fit this machine; see the docstring)
        total = r0["total_params"] - r0["adapters_before_initialize"]["numel"]
        e = model_states_estimate(total, total, 0, 2, precision="fp32")
        full = e["device_parts"]["params"] + e["device_parts"]["grads_and_optimizer"]
        print(f"  full fine-tuning at these widths: {total / 1e9:.4f} B parameters, estimated {full / 2**20:.1f} MiB "
              "per rank (not launched: it does not fit this machine)")
    else:
        full = max(r["held"] for r in rows[0]["reports"])
    widths = "hidden 3072, 1 layer (the release's widths)" if args.release_widths else "hidden 512, 2 layers"
    print(f"(b) measured, 2 ranks, ZeRO-3 fp32 + torch AdamW, {widths}, real vocabularies: "
          f"{r0['total_params'] / 1e6:.1f} M parameters; {args.steps} steps on one batch of 2 rows, each a TTS sample "
          "(24 prompt tokens, 20 reference frames, 40 audio-out frames, 4 learnable text tokens)")
    print("  variant | trainable | rank | param partition (frozen part) | fp32 master | AdamW moments | grad "
          "partition | held | estimated | held / estimated | held / full | step s | losses | peak RSS")
    for row in rows:
        for r in row["reports"]:
            s = r["state"]
            print(f"  {row['variant']:18s} | {r['trainable_params'] / 1e6:7.2f} M | {r['rank']} | "
                  f"{s['param_partition'] / 2**20:7.1f} ({s['frozen_param_partition'] / 2**20:.1f}) MiB | "
                  f"{s['separate_fp32_master'] / 2**20:6.1f} | {s['adam_moments'] / 2**20:6.1f} | "
                  f"{s['grad_partition'] / 2**20:6.1f} | {r['held'] / 2**20:7.1f} MiB | {r['estimated'] / 2**20:7.1f}"
                  f" MiB | {r['held'] / r['estimated']:.4f} | {r['held'] / full:.3f} | {r['step_s']:.2f} | "
                  + " ".join(f"{v:.3f}" for v in r["losses"]) + f" | {r['peak_rss'] / GIB:.2f} GiB")
    print("  adapters created by PEFT outside zero.Init (per rank):")
    for row in rows[0 if args.release_widths else 1:]:
        for r in row["reports"]:
            b, a = r["adapters_before_initialize"], r["adapters_after_initialize"]
            print(f"    {row['variant']} rank {r['rank']}: {b['count']} tensors, {b['numel']} elements; ZeRO params "
                  f"before initialize {b['zero_params']}, after {a['zero_params']}; local data after "
                  f"{a['local_numel']} elements, partition {a['partition_numel']} (expected "
                  f"{a['expected_partition_numel']}); gathered lora_A == rank 0's init "
                  f"{a['gathered_equals_rank0_init']}, == own init {a['gathered_equals_own_init']}; optimizer flat "
                  f"{r['optimizer_flat_numel']} vs trainable partitions {r['trainable_partition_numel']}; lora_B "
                  f"trained {r['lora_B_trained']}")
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--timeout", type=int, default=240, help="seconds per launch")
    parser.add_argument("--skip-measured", action="store_true")
    parser.add_argument("--release-widths", action="store_true",
                        help="measure the LoRA presets at the release's widths with 1 decoder layer")
    parser.add_argument("--worker", choices=("full", *PRESETS), help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", help=argparse.SUPPRESS)
    args, rest = parser.parse_known_args()
    if args.worker:
        return worker(args)
    if rest:
        parser.error(f"unknown arguments {rest}")
    import torch

    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, "
          f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / GIB:.1f} GiB RAM, torch {torch.__version__}, "
          f"load {os.getloadavg()[0]:.2f}")
    started = time.perf_counter()
    computed()
    if not args.skip_measured:
        measured(args)
    print(f"total {time.perf_counter() - started:.0f} s, load at the end {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
