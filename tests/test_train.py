"""The DeepSpeed engine end to end: real `deepspeed --num_gpus 2 launch/train.py` launches (ZeRO-3, CPU, gloo) of a
tiny config from shards. One reference run is shared by the tests that compare against it. Bad configs fail in
process, before any process group."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

import processes
from helpers import (CPU_DS, DEEPSPEED, ROOT, TINY_MODEL, TINY_TOKENIZER, base_config, consumed, ds_json, fake_slurm,
                     kill_after_save, launch, losses, make_samples, tiny_tokenizer, tiny_tokens,
                     write_split, write_yaml)
from higgs_ds.data.chatml import sample_from_chatml
from higgs_ds.data.collator import Collator
from higgs_ds.data.tokens import AudioSettings
from higgs_ds.model import HiggsAudioForTraining, LossNorm, learnable_counts, load_model, read_model_config
from higgs_ds.model.checkpoint import save_checkpoint
from higgs_ds.train import main as train_main
from higgs_ds.train.components import warmup_cosine
from higgs_ds.train.config import LoraSection
from higgs_ds.train.export import main as export_main
from higgs_ds.train.lora import apply_lora


PEAK_TFLOPS = 0.05  # the reference run's train.peak_tflops (the other launches measure the CPU's peak)


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory):
    """The uninterrupted 2-rank run every resume test compares with."""
    out = tmp_path_factory.mktemp("reference")
    config = write_yaml(out.parent / f"{out.name}.yaml", **base_config(corpus, out, save_every=2, keep_last=2,
                                                                         eval_every=3, peak_tflops=PEAK_TFLOPS))
    code, output = launch(config)
    assert code == 0, output[-3000:]
    return config, out, output


@pytest.mark.slow
def test_two_rank_zero3_run_trains_evaluates_and_saves(reference):
    config, out, output = reference
    steps = losses(out)
    assert sorted(steps) == list(range(1, 8)), "2 epochs of this split are 7 steps"
    assert steps[7] < steps[1] - 1.0, f"the loss must fall: {steps}"
    assert "eval step 7: eval/text" in output
    tags = sorted(p.name for p in (out / "checkpoints").iterdir() if p.is_dir())
    assert tags == ["step00000006", "step00000007"], "keep_last=2 complete tags"
    assert all((out / "checkpoints" / tag / "COMPLETE").exists() for tag in tags)
    events = sorted(p.relative_to(out).parent.name for p in (out / "tensorboard").rglob("events.out.tfevents.*"))
    assert events == ["eval", "train"], "hooks run on rank 0 only: one event file per run folder"
    # Each epoch sees a sample at most once, and the last epoch drops none (its short slot ends with a blank).
    keys = [k for k in consumed(out, range(1, 8)) if k != "<blank>"]
    assert len(set(keys)) == 80 and max(keys.count(k) for k in set(keys)) == 2 and len(keys) >= 150
    # Throughput: all ranks' tokens over rank 0's step time, per rank their mean; mfu against train.peak_tflops.
    assert f"throughput/mfu against a peak of {PEAK_TFLOPS:g} TFLOPS per rank (train.peak_tflops)" in output
    for row in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()):
        assert row["throughput/tokens_per_s"] == pytest.approx(row["tokens/total"] / row["time/step_s"], rel=1e-9)
        assert row["throughput/tokens_per_s_per_rank"] == pytest.approx(row["throughput/tokens_per_s"] / 2, rel=1e-12)
        assert row["throughput/mfu"] == pytest.approx(row["throughput/model_tflops_per_rank"] / PEAK_TFLOPS,
                                                      rel=1e-12)
        assert row["throughput/model_tflops_per_rank"] > 0 and "throughput/tps" not in row


@pytest.mark.slow
def test_a_crash_during_the_save_leaves_the_previous_checkpoint(corpus, reference, tmp_path):
    _, ref_out, _ = reference
    out = tmp_path / "run"
    config = write_yaml(tmp_path / "run.yaml", **base_config(corpus, out, save_every=2))
    code, output = launch(config, faults={"crash_in_save": 4})
    assert code != 0
    partial = out / "checkpoints" / "step00000004"
    assert partial.is_dir() and not (partial / "COMPLETE").exists(), "the kill came between the shards and the mark"
    assert (out / "checkpoints" / "step00000002" / "COMPLETE").exists()
    code, output = launch(config, "train.resume=auto", "train.peak_tflops=0.07")  # a resumed run may change the peak
    assert code == 0, output[-3000:]
    assert "step00000002 at step 2" in output
    assert "throughput/mfu against a peak of 0.07 TFLOPS per rank (train.peak_tflops)" in output
    ref, got = losses(ref_out), losses(out)
    for step in range(3, 8):
        assert got[step] == pytest.approx(ref[step], rel=1e-6, abs=1e-6), (step, got, ref)
    assert "removed unfinished checkpoint saves after step 2: step00000004" in output
    tags = sorted(p.name for p in (out / "checkpoints").iterdir() if p.is_dir())
    assert tags == ["step00000006", "step00000007"], "the unfinished step 4 removed, saved again, pruned (keep_last=2)"
    rows = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows == list(range(1, 8)), "steps 3-4, logged before the crash, are in metrics.jsonl once"
    # TensorBoard: the crashed run had logged steps 3-4 before resuming from step 2; the resumed one purged them.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard" / "train"), size_guidance={"scalars": 0})
    events.Reload()
    logged = [(e.step, e.value) for e in events.Scalars("loss/total")]
    assert [step for step, _ in logged] == list(range(1, 8)), "every step once"
    assert dict(logged) == pytest.approx(ref, rel=1e-6)


@pytest.mark.slow
def test_export_loads_in_transformers_and_gives_the_trained_logits(reference, corpus, tmp_path, tokenizer, tokens):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from transformers import HiggsAudioV2ForConditionalGeneration

    from higgs_ds.testing.port import port_inputs

    _, out, _ = reference
    assert export_main([str(out), "--out", str(tmp_path / "export")]) == 0
    trained = get_fp32_state_dict_from_zero_checkpoint(str(out / "checkpoints"), tag="step00000007")
    ours = load_model(tmp_path / "export" / "port")
    for name, value in ours.named_parameters():
        assert torch.equal(value, trained[name]), name
    boson = load_model(tmp_path / "export" / "boson")
    samples = make_samples(6, tokenizer, tokens, seed=11)
    batch = Collator(tokens, ours.model_config.audio)(samples)
    expected = ours.logits(**batch.model_inputs())
    got = boson.logits(**batch.model_inputs())
    assert torch.equal(got.text, expected.text) and torch.equal(got.audio, expected.audio)
    port = HiggsAudioV2ForConditionalGeneration.from_pretrained(str(tmp_path / "export" / "port"),
                                                                use_text_head=True).eval()
    inputs = {k: v for k, v in port_inputs(batch, port.config).items() if k not in ("labels", "audio_labels")}
    with torch.no_grad():
        hidden = port.model(**inputs).last_hidden_state
    real = batch.attention_mask
    torch.testing.assert_close(port.text_lm_head(hidden)[real], expected.text[real], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(port.audio_lm_head(hidden[batch.audio_out_mask]).view(expected.audio.shape),
                               expected.audio, rtol=1e-5, atol=1e-5)
    assert AutoTokenizer.from_pretrained(str(tmp_path / "export" / "port")).get_vocab() == tokenizer.get_vocab()


# ---------------------------------------------------------------------------------------------------- gradients

def chat(tokenizer, tokens, key: str, kind: str, rng):
    messages = {"audio": [{"role": "user", "content": "Say it."},
                          {"role": "assistant", "content": {"type": "audio", "audio_url": "a"}}],
                "text": [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello to you."}],
                "nothing": [{"role": "user", "content": "Only a prompt, nothing to learn."}]}[kind]
    frames = int(rng.integers(3, 9))
    return sample_from_chatml({"messages": messages}, tokenizer, tokens, AudioSettings(), key=key,
                              load_codes=lambda ref: rng.integers(0, 1024, (8, frames)).astype(np.int16))


@pytest.mark.slow
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_two_ranks_two_micro_batches_give_the_single_process_gradient(tmp_path, tokenizer, tokens, lora):
    """SGD, 2 steps of 2 ranks × 2 micro-batches of 2 samples, then the data's last, partial step (1 micro-batch
    per rank). Rank 1's first step: a text-only micro-batch and one with nothing to learn; its second step: nothing
    to learn at all. The trained weights must equal three plain SGD steps, each on its step's samples with the
    global mean; per-micro-batch means would give other weights, and so would a partial step left unapplied. With
    LoRA (adapters + the audio extras trained) the same holds for every trained parameter."""
    rng = np.random.default_rng(4)
    kinds = ["audio", "text", "audio", "audio", "text", "audio", "audio", "text", "audio", "text",  # rank 0
             "text", "text", "nothing", "nothing", "nothing", "nothing", "nothing", "nothing", "audio", "nothing"]
    samples = [chat(tokenizer, tokens, f"g{i}", kind, rng) for i, kind in enumerate(kinds)]
    write_split(tmp_path / "train", samples, (20,), tokenizer, tokens)
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text(json.dumps(TINY_MODEL))
    model_config = read_model_config(tmp_path / "model", tokenizer)
    torch.manual_seed(0)
    start = HiggsAudioForTraining(model_config)
    save_checkpoint(start.state_dict(), model_config, tmp_path / "start")
    out = tmp_path / "out"
    config = write_yaml(
        tmp_path / "run.yaml",
        model={"pretrained": str(tmp_path / "start"), "tokenizer": str(TINY_TOKENIZER)},
        data={"train": str(tmp_path / "train"), "layout": "padded", "pack_length": None, "max_tokens": None,
              "batch_size": 2, "round_to": 8, "num_workers": 0, "shuffle": False},
        optim={"name": "sgd", "lr": 0.5, "warmup_steps": 0, "min_lr_ratio": 1.0, "grad_clip": 0.0},
        train={"out_dir": str(out), "deepspeed": str(CPU_DS), "precision": "fp32", "grad_accum": 2, "epochs": 1,
               "trace_samples": True, "save_every": 1, "keep_last": 3},
        lora={"rank": 4, "alpha": 3.0} if lora else {})
    code, output = launch(config)
    assert code == 0, output[-3000:]
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    trained = get_fp32_state_dict_from_zero_checkpoint(str(out / "checkpoints"), tag="step00000003")
    if lora:  # PEFT's random lora_A init is the run's: B = 0 leaves A untouched by step 1, so step 1 holds it
        first = get_fp32_state_dict_from_zero_checkpoint(str(out / "checkpoints"), tag="step00000001")
        initial_a = {n: v for n, v in first.items() if ".lora_A." in n}
        assert len(initial_a) == 20 and set(trained) == set(first)

    # Which samples each (rank, step, micro-batch) got, from the engine's own trace.
    by_key = {s.key: s for s in samples}
    groups: dict[int, list[list[str]]] = {1: [], 2: [], 3: []}
    for rank in range(2):
        for line in (out / "trace" / f"rank{rank}.jsonl").read_text().splitlines():
            row = json.loads(line)
            groups[row["step"]].append(row["keys"])
    assert groups[2][2:] == [["g14", "g15"], ["g16", "g17"]], "rank 1's second step has nothing to learn"
    assert groups[3] == [["g8", "g9"], ["g18", "g19"]], "the last step: one micro-batch per rank"
    collator = Collator(tokens, model_config.audio, round_to=8)

    def sgd(per_micro_batch_mean: bool) -> dict[str, torch.Tensor]:
        model = load_model(tmp_path / "start")
        if lora:
            apply_lora(model, LoraSection(rank=4, alpha=3.0))
            missing, unexpected = model.load_state_dict(initial_a, strict=False)
            assert not unexpected
        for step in (1, 2, 3):
            batches = [collator([by_key[k] for k in keys]) for keys in groups[step]]
            counts = [learnable_counts(b) for b in batches]
            norm = LossNorm(float(sum(c.text for c in counts)), sum(c.audio for c in counts).double())
            model.zero_grad()
            for batch in batches:
                if per_micro_batch_mean:  # what averaging each micro-batch's own mean would train
                    loss = model(**batch.model_inputs()).loss / len(batches)
                else:
                    loss = model(**batch.model_inputs(), loss_norm=norm).loss
                loss.backward()
            with torch.no_grad():
                for param in model.parameters():
                    if param.requires_grad:
                        param -= 0.5 * param.grad
        return {n: p for n, p in model.state_dict().items() if n in trained}  # what the run trained

    def rel_err(a: dict, b: dict) -> float:
        return max(((a[n] - b[n]).abs().max() / b[n].abs().max().clamp_min(1e-12)).item() for n in b)

    expected, wrong = sgd(False), sgd(True)
    assert set(expected) == set(trained)
    moved = rel_err(trained, {n: v for n, v in start.state_dict().items() if n in trained})
    assert moved > 1e-2, "the steps changed the weights"
    if lora:
        assert rel_err({n: trained[n] for n in initial_a}, initial_a) > 1e-3, "step 2 trained the adapters' A"
    assert rel_err(trained, expected) <= 1e-5
    assert rel_err(wrong, expected) > 1e-3, "the test tells the global mean from per-micro-batch means"


# ---------------------------------------------------------------------------------------------------- bad configs

@pytest.fixture
def good(corpus, tmp_path) -> dict:
    return base_config(corpus, tmp_path / "out")


BAD = {
    "unknown key": (lambda c, p: ["train.foo=1"], r"train\.foo: Key 'foo' not in 'TrainSection'"),
    "wrong type": (lambda c, p: ["train.grad_accum=two"], r"train\.grad_accum: Value 'two'"),
    "micro-batch size": (lambda c, p: [f"train.deepspeed={ds_json(p, train_micro_batch_size_per_gpu=4)}"],
                         r"train_micro_batch_size_per_gpu=4 contradicts the run config \(1\)"),
    "accumulation": (lambda c, p: [f"train.deepspeed={ds_json(p, gradient_accumulation_steps=8)}"],
                     r"gradient_accumulation_steps=8 contradicts the run config \(2\)"),
    "precision": (lambda c, p: [f"train.deepspeed={ds_json(p, bf16={'enabled': True})}"],
                  r"bf16\.enabled=True contradicts train\.precision=fp32"),
    "optimizer in json": (lambda c, p: [f"train.deepspeed={ds_json(p, optimizer={'type': 'Adam'})}"],
                          r"remove 'optimizer'"),
    "missing path": (lambda c, p: ["data.train=/nonexistent/split"], r"data\.train: /nonexistent/split: no such"),
    "both batch budgets": (lambda c, p: ["data.batch_size=4"], r"data\.max_tokens / data\.batch_size: give exactly one"),
    "another model": (lambda c, p: [f"model.config={other_model(p)}"],
                      r"data\.train: .*shards were built for another tokenizer/model config \(audio"),
    "another tokenizer": (lambda c, p: [f"model.tokenizer={other_tokenizer(p)}"],
                          r"data\.train: .*shards were built for another tokenizer/model config \(tokenizer_vocab"),
    "unknown hook": (lambda c, p: ["train.hooks=[no_such_module:Hook]"], r"train\.hooks: 'no_such_module:Hook' is not"),
    "delay pattern": (lambda c, p: [f"model.config={other_model(p, use_delay_pattern=False)}"],
                      r"data\.train: .*shards were built for another tokenizer/model config \(audio: .*"
                      r"'use_delay_pattern': True"),
    "nothing to learn": (lambda c, p: [f"data.train={unlearnable_split(p)}", "data.val=null"],
                         r"data\.train: the first 6 samples hold no learnable text or audio-out token"),
    "freezes everything": (lambda c, p: ["train.trainable=[no_such_module]"],
                           r"train\.trainable=\['no_such_module'\]: no parameter of this model would train"),
    "no model": (lambda c, p: ["model.config=null"], r"model\.pretrained / model\.config: give exactly one"),
    "hook cannot start": (lambda c, p: ["train.hooks=[hooks_for_tests:FailsToStart]"],
                          r"^error: hooks_for_tests:FailsToStart: the hook cannot start \(ConnectionError: the metrics "
                          r"server at 10\.0\.0\.1:9000 refused the connection\)$"),
    "head misspelt": (lambda c, p: ["model.head_impl=ligre"],
                      r"^error: model\.head_impl: expected one of \('auto', 'chunked', 'liger', 'materialized'\), "
                      r"got 'ligre'$"),
    "attention misspelt": (lambda c, p: ["model.attn_implementation=flash_attention2"],
                           r"^error: model\.attn_implementation: expected one of \('auto', 'sdpa', "
                           r"'flash_attention_2'\), got 'flash_attention2'$"),
}


def other_tokenizer(tmp_path: Path) -> str:
    tokenizer = AutoTokenizer.from_pretrained(str(TINY_TOKENIZER))  # a fresh one: add_tokens changes it
    tokenizer.add_tokens(["<|not_in_the_shards|>"])
    tokenizer.save_pretrained(str(tmp_path / "tokenizer"))
    return str(tmp_path / "tokenizer")


def other_model(tmp_path: Path, **changes) -> str:
    (tmp_path / "other").mkdir(exist_ok=True)
    (tmp_path / "other" / "config.json").write_text(
        json.dumps({**TINY_MODEL, **(changes or {"audio_num_codebooks": 4})}))
    return str(tmp_path / "other")


def unlearnable_split(tmp_path: Path) -> str:
    """Six prompts with nothing to learn (no assistant turn)."""
    tokenizer, tokens = tiny_tokenizer(), tiny_tokens()
    rng = np.random.default_rng(0)
    samples = [chat(tokenizer, tokens, f"n{i}", "nothing", rng) for i in range(6)]
    return str(write_split(tmp_path / "unlearnable", samples, (6,), tokenizer, tokens))


@pytest.mark.parametrize("case", list(BAD))
def test_bad_configs_fail_before_any_process_group(good, tmp_path, capsys, case):
    overrides, message = BAD[case]
    config = write_yaml(tmp_path / "run.yaml", **good)
    assert train_main(["--config", str(config), *overrides(config, tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert re.search(message, err[0]), err[0]
    assert not torch.distributed.is_initialized()


def test_dry_run_prints_the_plan_and_memory_estimate(good, tmp_path, capsys):
    config = write_yaml(tmp_path / "run.yaml", **good)
    assert train_main(["--config", str(config), "--dry-run", "train.max_steps=3"]) == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out)  # stdout is the JSON alone
    assert "masking over the first" in captured.err and "memory: ZeRO-3" in captured.err
    assert report["data"]["samples"] == 80 and report["data"]["steps"] == 3
    assert report["deepspeed"]["gradient_accumulation_steps"] == 2
    assert report["model"]["parameters"] == report["model"]["trainable_parameters"] > 0  # full fine-tuning
    assert report["memory_estimate"]["device_bytes"] > 0
    assert not torch.distributed.is_initialized()


@pytest.mark.slow
def test_two_launchers_on_two_loopback_hosts_train_like_one(corpus, reference, tmp_path):
    """Multi-node for real: a hostfile of two hosts that resolve to loopback, one `deepspeed --no_ssh` launcher per
    node; world size 2, and the per-step losses are the single-launcher run's."""
    _, ref_out, _ = reference
    out = tmp_path / "run"
    config = write_yaml(tmp_path / "run.yaml", **base_config(corpus, out, save_every=2))
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=1\n127.0.0.1 slots=1\n")
    port = str(processes.free_port())
    launchers = [processes.start(
        [str(DEEPSPEED), "--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(node), "--master_addr",
         "127.0.0.1", "--master_port", port, str(ROOT / "launch" / "train.py"), "--config", str(config)],
        cwd=ROOT, stderr=subprocess.STDOUT) for node in (0, 1)]
    try:
        outputs = [processes.wait(p).stdout for p in launchers]
    finally:
        for p in launchers:
            processes.kill_group(p)
    assert [p.returncode for p in launchers] == [0, 0], outputs[0][-2000:] + outputs[1][-2000:]
    ref, got = losses(ref_out), losses(out)
    assert sorted(got) == sorted(ref)
    for step in ref:
        assert got[step] == pytest.approx(ref[step], rel=1e-6, abs=1e-6), (step, got, ref)


@pytest.fixture
def served(corpus):
    """The corpus served over HTTP on loopback (python's http.server in a thread of the test process)."""
    import functools
    import http.server
    import threading

    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(corpus))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.mark.slow
def test_torchrun_on_shards_behind_a_url_trains_like_the_reference(corpus, reference, tmp_path, served):
    """torchrun instead of the deepspeed launcher, and the train/val splits fetched over HTTP: the same losses;
    a rank-0 hook receives every step's values and its stop request stops every rank."""
    _, ref_out, _ = reference
    out = tmp_path / "run"
    config = base_config(corpus, out)
    config["data"].update(train=f"{served}/train", val=f"{served}/val")
    config = write_yaml(tmp_path / "run.yaml", **config)
    # With a hook (the seam of the hooks issue) that records what rank 0 receives and asks to stop after step 2.
    path = os.pathsep.join(filter(None, [str(ROOT / "tests"), os.environ.get("PYTHONPATH")]))  # keep the caller's
    env = {**os.environ, "PYTHONPATH": path}
    result = processes.run([str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node", "2", "--master_port",
                             str(processes.free_port()), str(ROOT / "launch" / "train.py"), "--config",
                             str(config), "train.max_steps=3", "train.hooks=[hooks_for_tests:RecordAndStop]"],
                            cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    ref, got = losses(ref_out), losses(out)
    assert sorted(got) == [1, 2], "the hook's stop reached both ranks after step 2 (max_steps was 3)"
    for step in got:  # losses 1-2 see update 1 only, whose learning rate (warmup) does not depend on max_steps
        assert got[step] == pytest.approx(ref[step], rel=1e-6, abs=1e-6), (step, got, ref)
    rows = [json.loads(line) for line in (out / "hook.jsonl").read_text().splitlines()]
    steps = [row for row in rows if "step" in row]
    assert [row["step"] for row in steps] == [1, 2] and steps[0]["loss"] == pytest.approx(ref[1], rel=1e-6)
    assert all(len(row["rank_learnable"]) == 2 and len(row["rank_learnable"][0]) == 1 + 8 for row in steps)
    assert steps[0]["sample_keys"] and steps[0]["shapes"]["audio_inputs"][1] == 8
    assert steps[0]["stream"]["planned_samples"] > 0
    assert any("eval_step" in row and row["eval_step"] == 2 for row in rows), "evaluation at the last step"
    assert (out / "checkpoints" / "step00000002" / "COMPLETE").exists(), "a stopped run saves its last step"


@pytest.mark.slow
def test_resume_on_one_rank_from_two_restores_model_optimizer_and_the_rest_of_the_epoch(corpus, tmp_path):
    """2 ranks stop after step 2 (mid-epoch); the run resumes on 1 rank through the universal checkpoint. The
    samples of the epoch are then consumed exactly once over the whole run, and the first resumed step is exactly
    AdamW from the step-2 weights and optimizer moments on that step's batches."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    out = tmp_path / "run"
    config = write_yaml(tmp_path / "run.yaml", **base_config(corpus, out, epochs=1))
    code, output = launch(config, "train.max_steps=2")
    assert code == 0, output[-3000:]
    code, resumed = launch(config, "train.resume=auto", "train.max_steps=null", "train.save_every=1",
                           "train.keep_last=100", gpus=1)
    assert code == 0, resumed[-3000:]
    assert "saved on 2 ranks, running on 1: universal checkpoint" in resumed
    # Samples: steps 1-2 on two ranks, then the rest of the epoch on one rank.
    keys = [k for k in consumed(out, range(1, 100)) if k != "<blank>"]
    assert sorted(keys) == sorted(set(keys)) and len(keys) == 80, "every sample of the epoch exactly once"
    # Step 3 by hand: AdamW from the step-2 fp32 weights and moments (the universal files), global normalisation,
    # clipping at 1.0, the learning rate the resumed schedule gives step 2 (the log's lr of the step before).
    universal = out / "universal" / "step00000002" / "zero"
    tokenizer, tokens = tiny_tokenizer(), tiny_tokens()
    model = HiggsAudioForTraining(read_model_config(corpus / "model", tokenizer))
    start = get_fp32_state_dict_from_zero_checkpoint(str(out / "checkpoints"), tag="step00000002")
    model.load_state_dict(start, strict=False)
    params = dict(model.named_parameters())
    total = int(re.search(r"step 3/(\d+)", resumed).group(1))
    lr = 3e-3 * warmup_cosine(2, 2, total, 0.1)
    optimizer = torch.optim.AdamW(list(params.values()), lr=lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)
    for name, param in params.items():
        optimizer.state[param] = {
            "step": torch.tensor(2.0),
            "exp_avg": torch.load(universal / name / "exp_avg.pt", weights_only=True).view_as(param).clone(),
            "exp_avg_sq": torch.load(universal / name / "exp_avg_sq.pt", weights_only=True).view_as(param).clone()}
    rows = [json.loads(line) for line in (out / "trace" / "rank0.jsonl").read_text().splitlines()]
    step3 = [row["keys"] for row in rows if row["step"] == 3][-2:]
    by_key = {s.key: s for s in make_samples(96, tokenizer, tokens, seed=0)}
    collator = Collator(tokens, model.model_config.audio, layout="packed", pack_length=256, round_to=8)
    batches = [collator([by_key[k] for k in keys]) for keys in step3]
    counts = [learnable_counts(b) for b in batches]
    norm = LossNorm(float(sum(c.text for c in counts)), sum(c.audio for c in counts).double())
    for batch in batches:
        model(**batch.model_inputs(), loss_norm=norm).loss.backward()
    torch.nn.utils.clip_grad_norm_(list(params.values()), 1.0)
    optimizer.step()
    trained = get_fp32_state_dict_from_zero_checkpoint(str(out / "checkpoints"), tag="step00000003")
    fresh = {n: p.detach() for n, p in params.items()}
    err = max(((trained[n] - fresh[n]).abs().max() / trained[n].abs().max()).item() for n in fresh)
    assert err <= 1e-5, err



def test_freezing_recipes_name_exactly_their_parameters(corpus, tokenizer):
    from higgs_ds.train.components import param_groups, trainable_names

    model = HiggsAudioForTraining(read_model_config(corpus / "model", tokenizer))
    names = [n for n, _ in model.named_parameters()]
    assert trainable_names(names, "none") == names
    audio = set(trainable_names(names, "audio_only"))
    expected = {n for n in names if ".audio_mlp." in n or ".audio_input_layernorm." in n
                or ".audio_post_attention_layernorm." in n}
    expected |= {"model.embed_audio_tokens.embed_audio_tokens.weight", "audio_lm_head.weight"}
    assert audio == expected and len(expected) == 2 * 5 + 2
    assert trainable_names(names, "text_head_only") == ["text_lm_head.weight"]
    decay, no_decay = param_groups(model, 0.1)
    no_decay_names = {n for n, p in model.named_parameters() if any(p is q for q in no_decay["params"])}
    assert no_decay["weight_decay"] == 0.0 and decay["weight_decay"] == 0.1
    assert no_decay_names == {n for n in names if "norm" in n or "embed" in n}
    # A recipe whose parameters all decay (or none does) gives one group: DeepSpeed drops an empty one, and a
    # schedule built with two would fail at the first step.
    from higgs_ds.train.components import apply_freeze

    apply_freeze(model, "text_head_only")
    assert [[p is model.text_lm_head.weight for p in g["params"]] for g in param_groups(model, 0.1)] == [[True]]


@pytest.mark.slow
def test_audio_only_recipe_trains_the_audio_path_and_leaves_the_rest_bit_identical(corpus, tmp_path, tokenizer):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    model_config = read_model_config(corpus / "model", tokenizer)
    torch.manual_seed(1)
    start = HiggsAudioForTraining(model_config).state_dict()
    save_checkpoint(start, model_config, tmp_path / "start")
    config = base_config(corpus, tmp_path / "out", freeze="audio_only", max_steps=2)
    config["model"] = {"pretrained": str(tmp_path / "start"), "tokenizer": str(TINY_TOKENIZER),
                       "activation_checkpointing": True}
    config = write_yaml(tmp_path / "run.yaml", **config)
    code, output = launch(config, gpus=1)
    assert code == 0, output[-2000:]
    trained = get_fp32_state_dict_from_zero_checkpoint(str(tmp_path / "out" / "checkpoints"), tag="step00000002")
    from higgs_ds.train.components import trainable_names

    audio = set(trainable_names(list(start), "audio_only"))
    for name, value in start.items():
        if name in audio:
            assert not torch.equal(trained[name], value), f"{name} should have trained"
        else:
            assert torch.equal(trained[name], value), f"{name} is frozen and must stay bit-identical"


@pytest.mark.slow
def test_evaluate_prints_the_runs_own_eval_breakdown(reference, corpus, capsys):
    from higgs_ds.train.evaluate import main as evaluate_main

    _, out, output = reference
    logged = dict(re.findall(r"(eval/\w+) ([\d.]+)", output.split("eval step 7:")[1].splitlines()[0]))
    assert evaluate_main([str(out), "--split", str(corpus / "val"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)  # stdout is the JSON alone
    for name in ("text", "audio", "total"):
        assert result[f"loss/{name}"] == pytest.approx(float(logged[f"eval/{name}"]), abs=1e-4)
    assert sum(result[f"loss/audio_cb{k}"] for k in range(8)) == pytest.approx(result["loss/audio"], rel=1e-6)
    assert result["seen_samples"] == result["planned_samples"] == 16


def test_slurm_template_runs_torchrun_per_node_in_a_fake_slurm_job(good, tmp_path):
    """launch/slurm_train.sh under a fake SLURM (scontrol and srun stand-ins on PATH, one node of 2 'GPUs'): it
    rendezvous on the first host and each of torchrun's ranks reaches train.py (--dry-run: no process group)."""
    config = write_yaml(tmp_path / "run.yaml", **good)
    env = fake_slurm(tmp_path, dict(os.environ), gpus_per_node=2)
    result = processes.run(["bash", str(ROOT / "launch" / "slurm_train.sh"), str(config), "train.max_steps=5",
                             "--dry-run"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert result.stdout.count('"micro_batches_per_epoch_per_rank"') == 2, "one dry run per torchrun rank"
    assert result.stdout.count('"steps": 5') == 2


def test_optimizer_choice_per_config_and_device(monkeypatch):
    """DeepSpeed's CPU Adam when the optimizer is offloaded, FusedAdam on CUDA, torch AdamW on the CPU, SGD for
    tests; the GPU/offload classes are stood in (building them needs their compiled ops)."""
    from deepspeed.ops import adam

    from higgs_ds.train.components import make_optimizer
    from higgs_ds.train.config import OptimSection

    made = []
    for name in ("DeepSpeedCPUAdam", "FusedAdam"):
        monkeypatch.setattr(adam, name, type(name, (), {"__init__": lambda self, *a, _n=name, **k: made.append(_n)}))
    groups = [{"params": [torch.nn.Parameter(torch.zeros(2))], "weight_decay": 0.0}]
    offload = {"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}}}
    plain = {"zero_optimization": {"stage": 3}}
    make_optimizer(groups, OptimSection(), offload, "cuda")
    make_optimizer(groups, OptimSection(), plain, "cuda")
    assert made == ["DeepSpeedCPUAdam", "FusedAdam"]
    optimizer, extra = make_optimizer(groups, OptimSection(beta2=0.99), plain, "cpu")
    assert isinstance(optimizer, torch.optim.AdamW) and optimizer.defaults["betas"] == (0.9, 0.99)
    assert extra == {"zero_allow_untested_optimizer": True}
    optimizer, _ = make_optimizer(groups, OptimSection(name="sgd"), plain, "cpu")
    assert isinstance(optimizer, torch.optim.SGD)


def test_rng_state_holds_the_accelerators_generator_and_restores_it(monkeypatch):
    """The CPU generator always; on a GPU also the device's (where dropout draws), through DeepSpeed's accelerator
    interface (stood in: no GPU here). A CPU checkpoint resumed on a GPU goes on without the device state."""
    import deepspeed

    from higgs_ds.train.checkpointing import rng_state, set_rng_state

    torch.manual_seed(5)
    state = rng_state(torch.device("cpu"))
    assert set(state) == {"torch_rng"}
    expected = torch.rand(3)
    torch.rand(7)
    set_rng_state(state, torch.device("cpu"))
    torch.testing.assert_close(torch.rand(3), expected, rtol=0, atol=0)

    calls = []

    class StandIn:
        def get_rng_state(self, device_index=None):
            calls.append(("get", device_index))
            return torch.tensor([device_index, 42], dtype=torch.uint8)

        def set_rng_state(self, new_state, device_index=None):
            calls.append(("set", new_state.tolist(), device_index))

    monkeypatch.setattr(deepspeed, "get_accelerator", StandIn)
    gpu = torch.device("cuda", 1)
    state = rng_state(gpu)
    assert state["device_rng"].tolist() == [1, 42] and calls == [("get", 1)]
    set_rng_state(state, gpu)
    assert calls[-1] == ("set", [1, 42], 1)
    set_rng_state({"torch_rng": state["torch_rng"]}, gpu)  # saved on the CPU: a warning, no device restore
    assert len(calls) == 2


@pytest.mark.parametrize("ds_file", sorted(p.name for p in (ROOT / "ds_configs").glob("*.json")))
def test_every_shipped_deepspeed_config_passes_the_dry_run(good, tmp_path, capsys, ds_file):
    config = write_yaml(tmp_path / "run.yaml", **good)
    precision = "fp32" if "fp32" in ds_file else "bf16"
    assert train_main(["--config", str(config), "--dry-run", f"train.deepspeed={ROOT / 'ds_configs' / ds_file}",
                       f"train.precision={precision}"]) == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    estimate = report["memory_estimate"]
    assert estimate["offload_optimizer"] == ("offload" in ds_file)
    assert estimate["offload_param"] == ("offload_all" in ds_file)
    assert estimate["stage"] == (2 if "zero2" in ds_file else 3) and estimate["precision"] == precision
    assert f"memory: {estimate['summary']}" in captured.err
    assert report["deepspeed"]["train_micro_batch_size_per_gpu"] == 1


# ---------------------------------------------------------------------------------------------------- TensorBoard

EXPECTED_LOSSES = Path(__file__).parent / "goldens" / "tiny_run_losses.json"


@pytest.mark.slow
def test_tensorboard_events_hold_every_step_value(reference, corpus, tokens):
    from higgs_ds.data.shards import Manifest, decode_sample, read_shard, sample_counts
    from higgs_ds.hooks.compare import read_scalars

    _, out, _ = reference
    scalars = read_scalars(out)
    rows = {row["step"]: row for row in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}
    expected_tags = {"loss/total", "loss/text", "loss/audio", *(f"loss/audio_cb{k}" for k in range(8)), "lr",
                     "grad_norm", "tokens/text_learnable", "tokens/audio_learnable", "tokens/learnable_share",
                     "throughput/tokens_per_s", "throughput/tokens_per_s_per_rank", "throughput/samples_per_s",
                     "throughput/model_tflops_per_rank", "throughput/mfu", "time/step_s", "time/data_wait_share",
                     "memory/peak_rss_gib", "data/seen_samples", "data/corrupt_samples", "data/dropped_samples",
                     "data/blank_batches", "eval/total", "eval/text", "eval/audio", "eval/audio_cb7"}
    assert expected_tags <= set(scalars), sorted(expected_tags - set(scalars))
    for tag in ("loss/total", "loss/audio_cb3", "lr", "tokens/text_learnable"):
        assert scalars[tag] == pytest.approx({s: rows[s][tag] for s in rows}, rel=1e-6), tag
    assert sorted(scalars["eval/total"]) == [3, 6, 7], "train.eval_every=3, and at the end"
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard" / "train"), size_guidance={"tensors": 0})
    events.Reload()
    texts = set(events.Tags()["tensors"])
    assert {"config/text_summary", "slices/text/text_summary", "slices/audio/text_summary",
            "sample/marked/text_summary"} <= texts, texts
    table = events.Tensors("slices/audio/text_summary")[0].tensor_proto.string_val[0].decode()
    assert re.match(r"\d+ learnable audio codes in this micro-batch · \*\*prediction = input: \d+%\*\*", table), table
    body = table.split("| sample | segment starts at | code t of T | input | label | prediction | hit | copies input |"
                       "\n|---|---|---|---|---|---|---|---|\n")[1].splitlines()
    assert body and "-100" not in "".join(body), "de-delayed rows: every codebook learnable"
    text = events.Tensors("slices/text/text_summary")[0].tensor_proto.string_val[0].decode()
    assert re.match(r"\d+ learnable text tokens in this micro-batch · \*\*prediction = input: \d+%\*\*", text), text
    assert 0 < min(scalars["tokens/learnable_share"].values()) <= max(scalars["tokens/learnable_share"].values()) < 1
    # Learnable tokens over the run = the manifest's per-sample counts of the samples the run consumed.
    manifest = Manifest.load(corpus / "train")
    per_key = {}
    for info in manifest.shards:
        for raw in read_shard(manifest.shard_path(info)):
            sample = decode_sample(raw, tokens, AudioSettings())
            per_key[sample.key] = sample_counts(sample, tokens, AudioSettings())
    keys = [k for k in consumed(out, range(1, 8)) if k != "<blank>"]
    for modality in ("text", "audio"):
        logged = sum(scalars[f"tokens/{modality}_learnable"].values())
        assert logged == sum(per_key[k][f"learnable_{modality}_tokens"] for k in keys), modality
    # The stream's counters are the whole run's (both ranks): epoch 0's plan accounts for every sample of the
    # split, and the samples seen are those the two ranks consumed.
    first = {name: scalars[f"data/{name}"][1] for name in ("planned_samples", "dropped_samples", "too_long_samples")}
    assert sum(first.values()) == manifest.totals["samples"], first
    assert scalars["data/seen_samples"][7] == len(keys)


@pytest.mark.slow
def test_compare_runs_table_plots_and_asserts(reference, tmp_path, capsys):
    from torch.utils.tensorboard import SummaryWriter

    from higgs_ds.hooks.compare import main as compare_main, read_scalars

    _, out, _ = reference
    assert compare_main([str(out), str(out), "--plots", str(tmp_path / "plots"), "--assert"]) == 0
    printed = capsys.readouterr().out
    assert re.search(r"^loss/audio_cb7 +\d+\.\d{4} / \d+\.\d{4} / \d+\.\d{4}", printed, re.M) and "OK: within" in printed
    steps = "7 training steps (1–7), evaluated at 3, 6–7"
    assert f"A: {steps}\nB: {steps}\n" in printed
    for group in ("loss", "codebooks"):
        assert (tmp_path / "plots" / f"{group}.png").stat().st_size > 10_000
    # A run whose text loss drifts by 1 % fails the assert mode, reported once at its first step; one that stops
    # after a first step whose audio loss is 1 % off reports that step first, then where it stopped. Both are written
    # in the metric-named single-folder layout of runs logged before OUT/tensorboard/{train,eval}.
    scalars = read_scalars(out)

    def write(name, factor, last=None):
        writer = SummaryWriter(str(tmp_path / name / "tensorboard"))
        for tag, values in scalars.items():
            for step, value in values.items():
                if last is None or step <= last:
                    writer.add_scalar(tag, value * factor.get(tag, 1.0), step)
        writer.close()
        return str(tmp_path / name)

    def drifted(tag, step):
        """The event file's float32 of 1.01 × the reference's value, the difference and the line's start."""
        value, got = scalars[tag][step], float(np.float32(scalars[tag][step] * 1.01))
        return f"  step {step} {tag}: A {value:.6f}, B {got:.6f}, B − A {got - value:+.6f} (+1.00%); beyond tolerance"

    assert compare_main([str(out), write("drifted", {"loss/text": 1.01}), "--assert"]) == 1
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "FAIL: B against A (rtol=0.0001 atol=1e-06): 1 problem, by step:"
    assert err[1].startswith(drifted("loss/text", 1) + " at 7 of 7 shared steps, the largest +") and len(err) == 2
    assert compare_main([str(out), write("stopped", {"loss/audio": 1.01}, last=1), "--assert"]) == 1
    captured = capsys.readouterr()
    assert "B: 1 training step (1), no evaluation — B stopped at step 1 of 7\n" in captured.out
    assert captured.err.splitlines() == [
        "FAIL: B against A (rtol=0.0001 atol=1e-06): 2 problems, by step:",
        drifted("loss/audio", 1) + " at 1 of 1 shared steps",
        "  B stopped at step 1 of 7: A's training steps 2–7 and evaluations at 3, 6–7 have no counterpart"]
    # The stored expected losses of this tiny CI config guard regressions.
    assert compare_main([str(out), "--expected", str(EXPECTED_LOSSES), "--rtol", "1e-3"]) == 0


@pytest.mark.slow
def test_a_skipped_step_then_kill_9_then_resume_continues_exactly_and_too_many_in_a_row_stop(corpus, tmp_path):
    """Rank 0's loss is NaN at step 3 and at steps 6-7. Uninterrupted: step 3 leaves the weights bit-identical,
    is counted and does not advance the schedule; with train.max_skipped_steps=2 the second in a row (step 7)
    stops every rank with one message. Killed with -9 after the step-4 checkpoint and resumed: the schedule
    stands where the applied steps left it (not where the step count would put it), so step 5's learning rate and
    loss, every later value and the samples consumed equal the uninterrupted run's."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    nan = {"nan_steps": [3, 6, 7]}
    runs = {name: tmp_path / name for name in ("whole", "killed")}
    configs = {name: write_yaml(tmp_path / f"{name}.yaml", **base_config(corpus, out, save_every=1, keep_last=100,
                                                                           max_skipped_steps=2))
               for name, out in runs.items()}
    code, output = launch(configs["whole"], faults=nan)
    stop = "error: stopping at step 7: 2 steps in a row had a non-finite loss or gradient"
    assert code == 3 and output.count(stop) == 1, output[-3000:]
    weights = {s: get_fp32_state_dict_from_zero_checkpoint(str(runs["whole"] / "checkpoints"), tag=f"step{s:08d}")
               for s in (2, 3, 4)}
    assert all(torch.equal(weights[3][n], weights[2][n]) for n in weights[2]), "the NaN step changed nothing"
    assert not all(torch.equal(weights[4][n], weights[3][n]) for n in weights[3]), "step 4 trained"
    whole = {row["step"]: row for row in map(json.loads, (runs["whole"] / "metrics.jsonl").read_text().splitlines())}
    assert [whole[s]["train/step_skipped"] for s in range(1, 8)] == [0, 0, 1, 0, 0, 1, 1]
    # A skipped step does not advance the schedule: after step 4 it stands where step 3 would have left it.
    assert whole[4]["lr"] == pytest.approx(3e-3 * warmup_cosine(3, 2, 7, 0.1))
    assert whole[4]["lr"] != pytest.approx(3e-3 * warmup_cosine(4, 2, 7, 0.1))

    kill_after_save(configs["killed"], runs["killed"], 4, faults=nan)
    code, output = launch(configs["killed"], "train.resume=auto", faults=nan)
    assert code == 3 and output.count(stop) == 1, output[-3000:]
    assert "resumed from" in output and "step00000004 at step 4" in output
    killed = {row["step"]: row for row in map(json.loads, (runs["killed"] / "metrics.jsonl").read_text().splitlines())}
    assert sorted(killed) == sorted(whole) == list(range(1, 8)), "each step once"
    for step in range(5, 8):
        for key in ("lr", "loss/total", "grad_norm", "train/skipped_steps"):
            assert killed[step][key] == pytest.approx(whole[step][key], rel=1e-6, abs=1e-9, nan_ok=True), (step, key)
    assert consumed(runs["killed"], range(1, 8)) == consumed(runs["whole"], range(1, 8)), "no sample repeated/skipped"


@pytest.mark.slow
def test_a_leaking_setup_trips_the_collapse_alarm_and_a_correct_run_does_not(corpus, reference, tmp_path):
    """The planted bug (unshifted labels: the model learns to copy its input), in both losses or in the text loss
    alone, stops a strict run at step 1 with the alarm's reason, which TensorBoard holds at that step (text and
    count); the reference run on the same data raised no alarm."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, ref_out, reference_output = reference
    assert "COLLAPSE ALARM" not in reference_output
    events = EventAccumulator(str(ref_out / "tensorboard" / "train"), size_guidance={"scalars": 0})
    events.Reload()
    assert {e.value for e in events.Scalars("problems/alarms")} == {0.0}
    config = base_config(corpus, tmp_path / "run")
    config["guards"] = {"strict": True}
    config = write_yaml(tmp_path / "run.yaml", **config)
    cases = (("leak_labels", "audio", "frame", 2), ("leak_text_labels", "text", "token", 1))
    for fault, modality, unit, alarms in cases:
        out = tmp_path / fault
        code, output = launch(config, f"train.out_dir={out}", faults={fault: True})
        assert code == 3, output[-3000:]
        alarm = f"COLLAPSE ALARM at step 1: 100% of the {modality} labels equal their own input {unit}"
        assert output.count(f"error: {alarm}") == 1 and output.count("error: ") == 1, "the run's one-line stop"
        assert len(losses(out)) == 1, "stopped at step 1"
        events = EventAccumulator(str(out / "tensorboard" / "train"), size_guidance={"scalars": 0, "tensors": 0})
        events.Reload()
        # Both losses unshifted: the audio and the text alarm, each an entry; the stop line names the first.
        assert [(e.step, e.value) for e in events.Scalars("problems/alarms")] == [(1, alarms)]
        (entry,) = events.Tensors("problems/alarm/text_summary")
        assert entry.step == 1 and alarm in entry.tensor_proto.string_val[0].decode(), "written before the stop"


@pytest.mark.slow
def test_preflight_masking_summary_matches_the_manifest(reference, corpus):
    from higgs_ds.data.shards import Manifest

    _, out, output = reference
    text = (out / "preflight.txt").read_text()
    assert text.splitlines()[0] == f"masking over the first 80 samples of {corpus / 'train'}:"
    assert text.strip() in output, "printed by rank 0"
    rows = {(r[0], r[1]): (int(r[2]), int(r[3])) for r in (line.split() for line in text.splitlines()[2:])}
    totals = Manifest.load(corpus / "train").totals
    assert sum(learnable for (_, m), (_, learnable) in rows.items() if m == "text") == \
        totals["learnable_text_tokens"] == rows["assistant", "text"][1]
    assert rows["assistant", "audio-out"][1] == totals["learnable_audio_tokens"]
    assert sum(p for (_, m), (p, _) in rows.items() if m == "text") == totals["text_tokens"]
    assert sum(p for (_, m), (p, _) in rows.items() if m != "text") == totals["expanded_tokens"] - totals["text_tokens"]
    assert all(learnable == 0 for (role, _), (_, learnable) in rows.items() if role != "assistant")


@pytest.mark.slow
def test_resume_auto_falls_back_past_a_truncated_newest_checkpoint(corpus, reference, tmp_path, capsys):
    """The reference run's last two checkpoints, the newest with a truncated optimizer shard: resume=auto takes
    the one before and says so in one line (decided from sizes written with COMPLETE, no file read); with both
    damaged, one error line names the files."""
    import shutil

    _, ref_out, _ = reference
    out = tmp_path / "run"
    shutil.copytree(ref_out / "checkpoints", out / "checkpoints")
    newest, older = out / "checkpoints" / "step00000007", out / "checkpoints" / "step00000006"
    shard = newest / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    size = shard.stat().st_size
    with open(shard, "r+b") as handle:
        handle.truncate(size // 2)
    config = write_yaml(tmp_path / "run.yaml", **base_config(corpus, out, save_every=2, keep_last=2, eval_every=3))
    assert train_main(["--config", str(config), "--dry-run", "train.resume=auto"]) == 0
    err = capsys.readouterr().err.splitlines()
    assert [line for line in err if line.startswith("warning: resuming")] == [
        f"warning: resuming from {older}: skipped the damaged newer step00000007 ({shard} has {size // 2} bytes, "
        f"{size} were written)"]
    (older / "rank0.pt").write_bytes(b"")
    assert train_main(["--config", str(config), "train.resume=auto"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    line = err[0]
    assert line.startswith(f"error: train.resume=auto: every checkpoint in {out / 'checkpoints'} is damaged: ")
    assert str(shard) in line and str(older / "rank0.pt") in line
