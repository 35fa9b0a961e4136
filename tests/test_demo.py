"""The demo (demo.sh, examples/demo/): its loss floor computed by hand on small cases, checked against the true
log-likelihood of a large sample and against the collator's label counts; the generator is deterministic; and the
short demo end to end from another folder: a sound run ends between the floor and uniform, a rerun reuses data and
shards, and the planted unshifted-loss bug ends below the floor with the collapse alarm."""
from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

import processes
from helpers import ROOT, TESTS, fault_env, load_script
from higgs_ds.data.chatml import sample_from_chatml
from higgs_ds.data.collator import Collator
from higgs_ds.data.tokens import SpecialTokens
from higgs_ds.model import learnable_counts
from higgs_ds.model_config import read_model_config

DEMO = ROOT / "examples" / "demo"
PARAMS = json.loads((DEMO / "params.json").read_text())
CONFIG = json.loads((DEMO / "config.json").read_text())
STEPS = 80  # the short demo: about 40 s of training here (the full one runs 300)


gen = load_script(DEMO / "make_corpus.py", "demo_make_corpus")


def entropy(p) -> float:
    p = np.asarray(p, dtype=float)
    return float(-(p * np.log(p)).sum())


# ---------------------------------------------------------------------------------------------- the floor by hand

def small_process(voices, eps0=0.5, eps=0.5):
    """2 codebooks of 4 codes, every code in the palette, the speakers' frame-0 codes set by hand."""
    params = {**PARAMS, "speakers": [f"speaker {s}" for s in range(len(voices))], "codes_used": 4,
              "first_frame_noise": eps0, "frame_noise": eps}
    process = gen.Process(params, num_codebooks=2, num_codes=4)
    process.palette = np.tile(np.arange(4), (2, 1))
    process.voices = np.array(voices)
    return process


def test_mixture_entropy_by_hand():
    # copy w.p. 1 - eps = 0.5, else uniform over 4 codes: the copied code has 0.625, the 3 others 0.125 each
    assert gen.mixture_entropy(np.array([0.5]), 4, 0.5) == pytest.approx(entropy([0.625, 0.125, 0.125, 0.125]))
    assert small_process([[0, 1]]).copy_entropy == pytest.approx(entropy([0.625, 0.125, 0.125, 0.125]))
    # two speakers equally likely, different codes: 0.5 * 0.5 + 0.125 each, the 2 other codes 0.125
    assert gen.mixture_entropy(np.array([0.25, 0.25]), 4, 0.5) == pytest.approx(entropy([.375, .375, .125, .125]))


def test_first_frame_entropy_follows_the_speaker_posterior_by_hand():
    """Unknown speaker (uniform prior), voices [0, 1] and [2, 3]. Codebook 0 of frame 0: a two-speaker mixture.
    Seeing code 0 there makes speaker 0 five times as likely (0.5 + 0.125 against 0.125): codebook 1's
    predictive is 0.5 * 5/6 + 0.125 on code 1, 0.5 * 1/6 + 0.125 on code 3, 0.125 on the other two."""
    process = small_process([[0, 1], [2, 3]])
    clip = np.array([[0], [3]])  # one frame: only frame-0 labels (and the eos, entropy 0)
    first, second = process.clip_entropy(clip, np.ones(2))
    assert first == pytest.approx(entropy([0.375, 0.375, 0.125, 0.125]))
    assert second == pytest.approx(entropy([0.5 * 5 / 6 + 0.125, 0.5 / 6 + 0.125, 0.125, 0.125]))
    # A named speaker: both codebooks are the point-mass mixture, and later frames add the copy entropy each.
    named = process.clip_entropy(np.array([[0, 0, 1], [3, 3, 3]]), np.array([0.0, 1.0]))
    assert named == pytest.approx([3 * process.copy_entropy] * 2)  # eps0 = eps here


def test_floor_of_two_samples_by_hand():
    """A TTS clip of T frames and a text answer of n words: the floor is summed entropy / learnt labels."""
    process = small_process([[0, 1], [2, 3]], eps0=0.2, eps=0.4)
    clips = {}
    rng = np.random.default_rng(5)
    records = [process.sample(rng, "a", "tts", lambda name, codes: clips.setdefault(name, codes) is None)[1],
               process.sample(rng, "b", "text", None)[1]]
    frames = clips["a"].shape[1]
    n = records[1]["text"][1] - 1
    h0, h = gen.mixture_entropy(np.array([0.8]), 4, 0.2), gen.mixture_entropy(np.array([0.6]), 4, 0.4)
    floor = gen.floor(records, num_codebooks=2, text_head=416, ids_per_codebook=6)
    # text: 3 determined labels of the TTS turn (audio_out_bos, audio_eos, eot), n words and the eot of the answer
    assert floor["text_floor"] == pytest.approx(n * math.log(16) / (3 + n + 1))
    assert floor["audio_floor_per_codebook"] == pytest.approx([(h0 + (frames - 1) * h) / (frames + 1)] * 2)
    assert floor["audio_floor"] == pytest.approx(2 * (h0 + (frames - 1) * h) / (frames + 1))
    assert (floor["uniform_text"], floor["uniform_audio"]) == (math.log(416), 2 * math.log(6))
    assert floor["text_labels"] == 3 + n + 1 and floor["audio_labels"] == [frames + 1] * 2


# ------------------------------------------------------------------------------ the floor against the process

def true_nll(process, clip: np.ndarray, posterior: np.ndarray) -> np.ndarray:
    """-log p of each codebook's labels of a learnt clip under the process, from what the model sees (written
    apart from make_corpus.py's entropy code): frame 0 through the speaker posterior, then the copy rule; eos: 0."""
    eps0, eps, used = process.p["first_frame_noise"], process.p["frame_noise"], process.palette.shape[1]
    posterior = posterior / posterior.sum()
    out = np.zeros(process.k)
    for k in range(process.k):
        given = (1 - eps0) * (process.voices[:, k] == clip[k, 0]) + eps0 / used  # p(code | each speaker)
        out[k] -= math.log(float(posterior @ given))
        posterior = posterior * given / float(posterior @ given)
        same = clip[k, 1:] == clip[k, :-1]
        out[k] -= np.log(np.where(same, 1 - eps + eps / used, eps / used)).sum()
    return out


def test_floor_equals_the_true_log_likelihood_of_a_large_sample():
    """Averaged the way the loss is (sums over labels / labels), the process's own -log p of 20000 generated
    samples matches their floor within sampling error: the generator draws what the entropy describes."""
    process = gen.Process(PARAMS, CONFIG["audio_num_codebooks"], CONFIG["audio_codebook_size"])
    rng = np.random.default_rng(123)
    kinds, weights = zip(*PARAMS["mix"].items())
    records, nll = [], []
    for i in range(20000):
        kind = kinds[rng.choice(len(kinds), p=np.array(weights) / sum(weights))]
        clips = []
        sample, record = process.sample(rng, str(i), kind, lambda name, codes: clips.append(codes) or name)
        audio = np.zeros(process.k)
        if kind == "tts":
            speaker = PARAMS["speakers"].index(sample["messages"][1]["content"].split(":")[0])
            audio = true_nll(process, clips[0], np.eye(len(PARAMS["speakers"]))[speaker])
        elif kind == "clone":
            ref = clips[0]
            prior = np.prod([(1 - PARAMS["first_frame_noise"]) * (process.voices[:, k] == ref[k, 0])
                             + PARAMS["first_frame_noise"] / process.palette.shape[1] for k in range(process.k)], 0)
            audio = true_nll(process, clips[1], prior)
        # The generator's own realised -log p (a perfect model's loss) equals this independent computation.
        np.testing.assert_allclose(record["audio_nll"], audio, rtol=1e-12, atol=1e-12)
        words = sample["messages"][-1]["content"].split() if kind == "text" else []
        assert set(words) <= set(PARAMS["words"])
        records.append(record)
        nll.append([len(words) * math.log(len(PARAMS["words"])), *audio])
    nll = np.array(nll)
    counts = np.array([[r["text"][1], *(a[1] for a in r["audio"])] for r in records], dtype=float)
    floor = gen.floor(records, process.k, 416, 1026)
    floors = np.array([floor["text_floor"], *floor["audio_floor_per_codebook"]])
    estimate = nll.sum(0) / counts.sum(0)
    # Standard error of a ratio of sums: the spread of each sample's (nll - floor * labels).
    error = (nll - floors * counts).std(0) * math.sqrt(len(nll)) / counts.sum(0)
    assert (error[1:] < 0.01 * floors[1:]).all(), "a sample large enough to test against"
    assert np.abs(estimate - floors)[1:] == pytest.approx(0, abs=float(4 * error[1:].max()))
    assert estimate[0] == pytest.approx(floors[0], rel=1e-9)  # text: every word costs ln W, exactly
    assert estimate[1:].sum() == pytest.approx(floor["audio_floor"], abs=float(4 * error[1:].sum()))
    # The perfect model's loss on these samples sits within sampling noise of the floor, with the generator's
    # standard error: smaller than the spread over sample compositions above, and not zero.
    assert floor["process_audio"] == pytest.approx(nll[:, 1:].sum(0) @ (1 / counts[:, 1:].sum(0)), rel=1e-12)
    assert 0 < floor["audio_floor_se"] < error[1:].sum()
    assert abs(floor["process_audio"] - floor["audio_floor"]) < 4 * floor["audio_floor_se"]
    assert floor["process_text"] == pytest.approx(floor["text_floor"], rel=1e-12) and floor["text_floor_se"] == 0


# ------------------------------------------------------------------------------- the generator and its counts

def generate(out: Path, **changes) -> dict:
    return gen.generate(out, {**PARAMS, "train_samples": 40, "val_samples": 60, **changes}, CONFIG)


def files(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def test_the_generator_is_deterministic_for_a_seed(tmp_path):
    generate(tmp_path / "a")
    generate(tmp_path / "b")
    generate(tmp_path / "c", seed=1)
    assert files(tmp_path / "a") == files(tmp_path / "b")
    assert (tmp_path / "a" / "val.jsonl").read_bytes() != (tmp_path / "c" / "val.jsonl").read_bytes()
    assert gen.main([str(tmp_path / "d")]) == 0  # the CLI with the shipped params
    assert json.loads((tmp_path / "d" / "floor.json").read_text())["samples"] == PARAMS["val_samples"]


@pytest.mark.parametrize("layout", ["packed", "padded"])
def test_floor_counts_are_the_collated_learnable_labels(tmp_path, layout):
    """The floor divides by learnt labels: exactly those the collator labels and the loss counts (text labels,
    codes and the one eos per codebook; not the reference clip, not the delay pattern's -100 fill)."""
    floor = generate(tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(str(ROOT / "examples" / "tiny" / "tokenizer"))
    config = read_model_config(DEMO, tokenizer)
    tokens = SpecialTokens.from_tokenizer(tokenizer, config.pad_token_id)
    samples = []
    for line in (tmp_path / "val.jsonl").read_text().splitlines():
        row = json.loads(line)
        samples.append(sample_from_chatml(row, tokenizer, tokens, config.audio, key=row["id"],
                                          load_codes=lambda ref: np.load(tmp_path / ref.item["audio_url"])))
    assert {s.key.rsplit("-", 1)[1] for s in samples} == {"tts", "clone", "text"}
    collator = Collator(tokens, config.audio, layout=layout, round_to=8,
                        pack_length=1024 if layout == "packed" else None)
    text, audio = 0, torch.zeros(config.num_codebooks, dtype=torch.long)
    for start in range(0, len(samples), 16):
        counts = learnable_counts(collator(samples[start:start + 16]))
        text, audio = text + int(counts.text), audio + counts.audio
    assert text == floor["text_labels"] and audio.tolist() == floor["audio_labels"]
    # The words' entropy holds token by token: each word is one token of its own.
    ids = [tokenizer.encode(" " + word, add_special_tokens=False) for word in PARAMS["words"]]
    assert all(len(i) == 1 for i in ids) and len({i[0] for i in ids}) == len(PARAMS["words"])
    assert floor["uniform_text"] == pytest.approx(math.log(CONFIG["text_config"]["vocab_size"]))
    assert floor["uniform_audio"] == pytest.approx(8 * math.log(1026))


# ---------------------------------------------------------------------------------------------- end to end

def run_demo(cwd: Path, *args: str, env: dict | None = None):
    """demo.sh verbatim by its path, from `cwd`; a worktree without a .venv of its own (none, or a link to another
    checkout's: demo.sh's setup would repair that one) runs the tests' venv."""
    env = {**os.environ, **(env or {})}
    if not (ROOT / ".venv").is_dir() or (ROOT / ".venv").is_symlink():
        env["HIGGS_DS_VENV"] = str(Path(sys.executable).parent.parent)
    done = processes.run([str(ROOT / "demo.sh"), *args], cwd=cwd, env=env, timeout=600)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    return done


def summary(out: Path, output: str) -> dict:
    run = Path(next(line.split()[-1] for line in output.splitlines() if line.startswith("run directory")))
    assert run.parent == out / "runs"
    return json.loads((run / "demo_summary.json").read_text())


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The short demo run from a folder outside the repository, then rerun with the planted leak."""
    out, elsewhere = tmp_path_factory.mktemp("demo"), tmp_path_factory.mktemp("elsewhere")
    sound = run_demo(elsewhere, "--out", str(out), "--steps", str(STEPS))
    shards = {p: p.stat().st_mtime_ns for p in (out / "shards").rglob("*")}
    # The same program with the unshifted loss planted in its training launch (tests/demo_with_faults.py).
    leak = processes.run([sys.executable, str(TESTS / "demo_with_faults.py"), "--out", str(out), "--steps",
                          str(STEPS)], cwd=elsewhere, env=fault_env({"leak_labels": True}), timeout=600)
    assert leak.returncode == 0, leak.stdout[-4000:] + leak.stderr[-4000:]
    assert shards == {p: p.stat().st_mtime_ns for p in (out / "shards").rglob("*")}, "the rerun rebuilt shards"
    assert sorted(os.listdir(elsewhere)) == [], "nothing written where it ran"
    return out, sound, leak


def test_demo_help_from_another_folder(tmp_path):
    done = run_demo(tmp_path, "--help")
    assert done.stdout.startswith("usage: demo.sh") and "--steps" in done.stdout and "--out" in done.stdout


@pytest.mark.slow
def test_short_demo_ends_between_the_floor_and_uniform(demo):
    out, done, _ = demo
    result = summary(out, done.stdout)
    floor = result["floor"]
    assert result["steps"] == STEPS and result["alarms"] == [] and "COLLAPSE ALARM" not in done.stdout
    for m in ("text", "audio"):
        low, high = floor[f"{m}_floor"], floor[f"uniform_{m}"]
        for source in ("run_eval", "evaluate"):
            loss = result[source][m]
            assert low < loss <= low + 0.3 * (high - low), (m, source, loss, low, high)
        # The run's own last evaluation and launch/evaluate.py agree: the same weights on the same split.
        assert result["run_eval"][m] == pytest.approx(result["evaluate"][m], rel=1e-4)
    run = Path(result["run"])
    assert (run / "export" / "port" / "model.safetensors").exists()
    assert (run / "export" / "boson" / "model.safetensors").exists()
    assert list((run / "tensorboard" / "train").glob("events.out.tfevents.*"))
    assert f"tensorboard --logdir {run / 'tensorboard'}" in done.stdout
    assert f"step {STEPS}/{STEPS} loss" in done.stdout, "progress shown"
    assert "data: generating" in done.stdout and "shards: building" in done.stdout


@pytest.mark.slow
def test_rerun_reuses_the_data_and_a_leak_ends_below_the_floor_with_the_alarm(demo):
    out, sound, leak = demo
    assert "data: reusing" in leak.stdout and "shards: reusing" in leak.stdout
    result = summary(out, leak.stdout)
    assert Path(result["run"]) != Path(summary(out, sound.stdout)["run"]), "a fresh run directory"
    floor = result["floor"]
    for m in ("text", "audio"):
        assert result["run_eval"][m] < floor[f"{m}_floor"], (m, result["run_eval"], floor)
        # Evaluated with the correct shift (launch/evaluate.py), the leaking run's model is above the floor and
        # worse than the sound run's: its "below the floor" was the leak. (Not useless for audio: copying the
        # current frame predicts this process's next frame often.)
        sound_result = summary(out, sound.stdout)
        assert result["evaluate"][m] > floor[f"{m}_floor"], (m, result["evaluate"])
        assert result["evaluate"][m] > sound_result["evaluate"][m], (m, result["evaluate"], sound_result["evaluate"])
    assert "BELOW the floor" in leak.stdout
    copies = "COLLAPSE ALARM at step 1: 100% of the audio labels equal their own input frame"
    below = f"is below the floor {0.8 * floor['audio_floor']:.4f} (guards.audio_loss_floor)"
    assert copies in leak.stdout and below in leak.stdout
    assert any(copies in a for a in result["alarms"]) and any(below in a for a in result["alarms"])
