"""Generation under ZeRO-3 on two CPU ranks, from inside the training loop (tests/generate_on_two_ranks.py), against
the single-process `generate` on the same weights: lockstep and gathered modes, a full fine-tune and a LoRA run."""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

import generate_on_two_ranks as launched_script
import processes
from helpers import (DEEPSPEED, ROOT, TESTS, TINY_TOKENIZER, base_config, ds_json, losses, randomize, tiny_config,
                     tiny_tokenizer, tiny_tokens, write_yaml)
from higgs_ds.generate import SamplingConfig, build_prompt, generate
from higgs_ds.generate.zero import gathered_copy
from higgs_ds.model import HiggsAudioForTraining, read_model_config
from higgs_ds.model.checkpoint import save_checkpoint
from higgs_ds.train.config import load_config
from higgs_ds.train.lora import apply_lora, inject_lora, lora_targets
from higgs_ds.vocabulary import Vocabulary, load_vocabulary

LORA = ["lora.rank=4", "lora.alpha=3.0", "lora.dropout=0.1", "model.activation_checkpointing=true"]
CASES = {"full": [], "lora": LORA, "lora_no_probe": LORA}


def pretrained_with_spread(corpus: Path, path: Path) -> Path:
    """The corpus's model with helpers.randomize weights: an init this small answers every prompt alike (greedy
    codes equal across prompts would hide rows mixed up between batches or ranks)."""
    model_config = read_model_config(corpus / "model", tiny_tokenizer())
    model = HiggsAudioForTraining(model_config)
    randomize(model, seed=4)
    save_checkpoint(model.state_dict(), model_config, path, layout="boson")
    return path


def prompts_of_ranks(vocabulary) -> list[list]:
    """Rank 0: TTS, voice cloning (reference audio in the context), a text turn (force_audio=False); rank 1: voice
    cloning with a longer reference. Codes are random, the same every time."""
    rng = np.random.default_rng(5)
    codes = {}

    def load_codes(ref):
        url = ref.item["audio_url"]
        return codes.setdefault(url, rng.integers(0, 1024, (8, int(url.split(":")[1]))).astype(np.int16))

    def clone(frames: int, line: str) -> dict:
        return {"messages": [
            {"role": "system", "content": "Generate audio following instruction."},
            {"role": "user", "content": "Say hello."},
            {"role": "assistant", "content": {"type": "audio", "audio_url": f"ref:{frames}"}},
            {"role": "user", "content": line}]}

    tts = {"messages": [{"role": "system", "content": "Generate audio following instruction."},
                        {"role": "user", "content": "Read this sentence aloud."}]}
    chat = {"messages": [{"role": "user", "content": "What is two plus two?"}]}
    made = [("tts", tts, True), ("clone", clone(4, "Now say goodbye."), True), ("chat", chat, False),
            ("clone_long", clone(17, "And now the weather."), True)]
    built = [build_prompt(sample, vocabulary, load_codes, key, force_audio) for key, sample, force_audio in made]
    assert len({len(p) for p in built}) == 4
    return [built[:3], built[3:]]


def reference_model(run_yaml: Path, overrides: list[str], vocabulary, weights: dict) -> HiggsAudioForTraining:
    """The run's model in one process (its LoRA adapters injected as the trainer does) with the step-1 weights."""
    model = HiggsAudioForTraining(vocabulary.model_config)
    config = load_config(run_yaml, overrides)
    if config.lora.rank:
        apply_lora(model, config.lora)
    model.load_state_dict(weights, strict=True)
    return model


def assert_same(got: list, want: list, what: str) -> None:
    assert [g.id for g in got] == [w.id for w in want], what
    for g, w in zip(got, want):
        where = f"{what} {w.id}"
        assert g.text_ids == w.text_ids, where
        assert len(g.segments) == len(w.segments) and all(torch.equal(a, b) for a, b in zip(g.segments, w.segments)), \
            where
        assert np.array_equal(g.codes, w.codes) and g.stop == w.stop and g.steps == w.steps, where


def own_forwards(prompts: list, results: list, batch_size: int) -> int:
    """The forwards a rank's own batches take: generate batches the longest prompts first; a batch runs until its
    last row stops."""
    steps = [g.steps for g in results]
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    return sum(max(steps[i] for i in order[s: s + batch_size]) for s in range(0, len(order), batch_size))


# ------------------------------------------------------------------------------------- one process: a plain copy

def lora_model() -> HiggsAudioForTraining:
    """The tiny model with PEFT adapters on every decoder linear, all weights random (B too: not the B = 0 init)."""
    model = HiggsAudioForTraining(tiny_config(num_codebooks=8, codes=1024))
    inject_lora(model, lora_targets(model), rank=4, alpha=3.0, dropout=0.1)
    randomize(model, seed=2)
    return model


def test_gathered_copy_of_a_model_not_partitioned_is_a_plain_copy():
    """Without ZeRO the replica is a copy: the same tensors, adapters included, frozen and in eval mode, built without
    touching the global RNG or the model's own mode, and it generates exactly what the model does."""
    model = lora_model().train()
    rng = torch.random.get_rng_state()
    replica = gathered_copy(model)
    assert torch.equal(torch.random.get_rng_state(), rng) and model.training
    assert not replica.training and not any(p.requires_grad for p in replica.parameters())
    ours, theirs = model.state_dict(), replica.state_dict()
    assert ours.keys() == theirs.keys() and any(".lora_B." in name for name in ours)
    assert all(torch.equal(ours[name], theirs[name]) for name in ours)
    prompts = sum(prompts_of_ranks(Vocabulary(tiny_tokenizer(), model.model_config, tiny_tokens())), [])
    sampling = SamplingConfig(do_sample=True, top_k=50, seed=3, max_frames=4, max_text_tokens=4)
    want = generate(model, prompts, tiny_tokens(), sampling, batch_size=2)
    assert_same(generate(replica, prompts, tiny_tokens(), sampling, batch_size=2), want, "replica")


def test_gathered_copy_refuses_another_architecture():
    """A `build` that does not make the module's architecture (here: no adapters) is named in one line."""
    def plain():
        return HiggsAudioForTraining(tiny_config(num_codebooks=8, codes=1024))

    with pytest.raises(ValueError, match=r"^gathered_copy: the replica's parameters differ from the module's \(only "
                                         r"the module's: \['model\.layers\.0\.audio_mlp\.down_proj\.base_layer"):
        gathered_copy(lora_model(), build=plain)


# ------------------------------------------------------------------------------------------ two ranks: one launch

@dataclass
class Launched:
    out: Path
    prompts: list[list]  # rank r's prompts
    tokens: object
    results: dict[str, list[dict]]  # case → per rank {key: [Generation]}
    stats: dict[str, list[dict]]  # case → per rank {key: counts}
    models: dict[str, HiggsAudioForTraining]  # case → the single-process model with the probe's weights


@pytest.fixture(scope="module")
def launched(corpus, tmp_path_factory) -> Launched:
    """One launch of tests/generate_on_two_ranks.py: a full fine-tune and a LoRA run (and the LoRA run again without
    the probe), 2 steps each, generating right after step 1 with every parameter partitioned (persistence
    threshold 0: each forward all-gathers every module)."""
    tmp = tmp_path_factory.mktemp("generate_zero3")
    config = base_config(corpus, tmp / "unused", max_steps=2, grad_accum=1, tensorboard=False, trace_samples=False)
    pretrained = pretrained_with_spread(corpus, tmp / "pretrained")
    config["model"] = {"pretrained": str(pretrained), "tokenizer": str(TINY_TOKENIZER)}  # LoRA needs one
    config["data"]["val"] = None
    config["train"]["deepspeed"] = ds_json(tmp, zero_optimization={
        "stage": 3, "reduce_bucket_size": 50000000, "stage3_param_persistence_threshold": 0})
    run_yaml = write_yaml(tmp / "run.yaml", **config)
    (tmp / "cases.json").write_text(json.dumps(CASES))
    vocabulary = load_vocabulary(TINY_TOKENIZER, pretrained)
    prompts = prompts_of_ranks(vocabulary)
    torch.save(launched_script.plain(prompts), tmp / "prompts.pt")
    started = time.perf_counter()
    done = processes.run([str(DEEPSPEED), "--num_gpus", "2", "--master_port", str(processes.free_port()),
                          str(TESTS / "generate_on_two_ranks.py"), str(run_yaml), str(tmp / "cases.json"),
                          str(tmp / "prompts.pt"), str(tmp / "out")], cwd=ROOT, timeout=240)
    print(f"launch: {time.perf_counter() - started:.1f} s")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    probes = {case: tmp / "out" / case / "probe" for case in ("full", "lora")}
    return Launched(
        tmp / "out", prompts, vocabulary.tokens,
        {case: [launched_script.restored(torch.load(p / f"rank{r}.pt", weights_only=True)) for r in range(2)]
         for case, p in probes.items()},
        {case: [json.loads((p / f"rank{r}.json").read_text()) for r in range(2)] for case, p in probes.items()},
        {case: reference_model(run_yaml, CASES[case], vocabulary, torch.load(p / "weights.pt", weights_only=True))
         for case, p in probes.items()})


@pytest.mark.slow
@pytest.mark.parametrize("case", ["full", "lora"])
def test_both_modes_equal_one_process(launched, case):
    """Ranks with 3 and 1 prompts, greedy and sampled (rank 1's budgets the larger): lockstep on the partitioned
    module and the gathered replica give exactly the single-process `generate` of each rank's prompts on the same
    weights; so does generate_on_ranks (prompts[r::2], all on rank 0 in prompt order, nothing on rank 1)."""
    model, prompts, tokens = launched.models[case], launched.prompts, launched.tokens
    for run, samplings in launched_script.RUNS.items():
        for r in range(2):
            want = generate(model, prompts[r], tokens, samplings[r], launched_script.BATCH_SIZE)
            for mode in launched_script.MODES:
                assert_same(launched.results[case][r][f"{mode}/{run}"], want, f"{case} {mode}/{run} rank {r}")
    everything = prompts[0] + prompts[1]
    want = [generate(model, everything[r::2], tokens, launched_script.GREEDY, launched_script.BATCH_SIZE)
            for r in range(2)]
    want = [want[i % 2][i // 2] for i in range(len(everything))]
    for mode in launched_script.MODES:
        assert_same(launched.results[case][0][f"on_ranks/{mode}"], want, f"{case} on_ranks/{mode}")
        assert launched.results[case][1][f"on_ranks/{mode}"] == []
    audio = [g.codes.tobytes() for g in want if g.frames]
    assert len(audio) == 3 and len(set(audio)) == 3  # every prompt its own answer: a mix-up would show


@pytest.mark.slow
@pytest.mark.parametrize("case", ["full", "lora"])
def test_lockstep_runs_as_many_forwards_on_every_rank(launched, case):
    """Both ranks ran the same number of forwards; the rank with less work ran dummy forwards (greedy: rank 1, one
    prompt; sampled: rank 0, the smaller budgets), its others being exactly its own batches' steps."""
    stats = launched.stats[case]
    for run in launched_script.RUNS:
        for r in range(2):
            done = launched.results[case][r][f"lockstep/{run}"]
            lockstep = stats[r][f"lockstep/{run}"]
            assert lockstep["forwards"] - lockstep["dummies"] == own_forwards(
                launched.prompts[r], done, launched_script.BATCH_SIZE), (run, r, lockstep)
        forwards = [s[f"lockstep/{run}"]["forwards"] for s in stats]
        dummies = [s[f"lockstep/{run}"]["dummies"] for s in stats]
        idle = 1 if run == "greedy" else 0
        assert forwards[0] == forwards[1] and dummies[idle] > 0 and dummies[1 - idle] == 0, (run, stats)
    assert stats[0]["on_ranks/lockstep"]["forwards"] == stats[1]["on_ranks/lockstep"]["forwards"]


@pytest.mark.slow
@pytest.mark.parametrize("case", ["full", "lora"])
def test_gathered_mode_copies_the_whole_model_once(launched, case):
    """The replica holds every parameter of the partitioned module at full size; generating on it ran no forward
    of the partitioned module (so no collective)."""
    for s in launched.stats[case]:
        copy = s["gathered_copy"]
        assert copy["partitioned"] and copy["replica_bytes"] == copy["model_bytes"], copy
        assert all(s[key]["forwards"] == 0 for key in s if key.startswith("gathered/") or key == "on_ranks/gathered")


@pytest.mark.slow
def test_training_after_generation_is_as_without(launched):
    """A LoRA run (dropout on) has the same losses with the probe after step 1 as without it: weights released,
    train mode and RNG restored. Step 1 was DeepSpeed's trace-recording step; generation must not have extended
    that trace (step 2 would replay it, scanning thousands of generation modules at every release):
    stop_trace_recording closed it, generation invalidated it, step 2 records afresh."""
    assert losses(launched.out / "lora") == losses(launched.out / "lora_no_probe")
    assert len(losses(launched.out / "lora")) == 2
    for case in ("full", "lora"):
        assert all(s["trace_recording_before"] and not s["trace_recording_after"] for s in launched.stats[case])
