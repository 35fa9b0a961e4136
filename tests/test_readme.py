"""The README's data commands run verbatim on examples/tiny, the console commands run from outside the repository,
and examples/tiny is what examples/tiny/make_example.py writes (a codes shape the example's model config accepts)."""
from __future__ import annotations

import ast
import fcntl
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import processes
from higgs_ds.data.chatml import tokenize_chatml
from higgs_ds.data.shards import Manifest
from higgs_ds.data.tokens import AudioSettings, SpecialTokens
from higgs_ds.model_config import read_model_config

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "tiny"
MARKER = "<!-- test: data-commands -->"
OUT = Path("/tmp/higgs-example-shards")  # where the README's commands write


def section(title: str) -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index(f"\n## {title}")
    end = text.find("\n## ", start + 1)
    return text[start:end if end != -1 else None]


def data_section() -> str:
    return section("Data")


def command_blocks() -> list[str]:
    """The fenced bash blocks of the data section that follow the marker comment."""
    return [m.group(1) for m in re.finditer(re.escape(MARKER) + r"\s*```bash\n(.*?)```", data_section(), re.S)]


def venv_bin() -> Path:
    """The venv's bin folder: the checkout's .venv (setup.sh), else the one running the tests (e.g. a git worktree
    that shares another checkout's venv)."""
    own = ROOT / ".venv" / "bin"
    return own if own.is_dir() else Path(sys.executable).parent


def code_env(cwd: Path) -> dict[str, str]:
    """The environment for commands run from `cwd`: PYTHONPATH only when the venv's install of the project is not
    this checkout (the commands must run this checkout's code)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    found = processes.run([str(venv_bin() / "python"), "-c", "import data_tools; print(data_tools.__file__)"],
                           cwd=cwd, env=env, capture_output=True, text=True, timeout=120).stdout.strip()
    if not found.startswith(str(ROOT) + os.sep):
        env["PYTHONPATH"] = str(ROOT)
    return env


def repo_root_with_venv(tmp_path: Path) -> Path:
    """The repository root to run README commands from. Without a .venv of its own (a worktree sharing a venv) a
    stand-in root: links to every top-level entry plus .venv → the running venv, so the text still runs verbatim."""
    if (ROOT / ".venv").is_dir():
        return ROOT
    shadow = tmp_path / "root"
    shadow.mkdir()
    for entry in ROOT.iterdir():
        if entry.name != ".venv":
            (shadow / entry.name).symlink_to(entry)
    (shadow / ".venv").symlink_to(Path(sys.executable).parent.parent)
    return shadow


@pytest.fixture
def readme_out_lock():
    """The README's fixed output folder is shared by concurrent test runs on this machine: one at a time."""
    with open("/tmp/higgs-example-shards.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield
        fcntl.flock(lock, fcntl.LOCK_UN)


def test_every_data_command_block_is_tested():
    section = data_section()
    blocks = command_blocks()
    assert blocks, f"no {MARKER} bash block in the README's data section"
    assert section.count("```bash") == len(blocks), "every bash block of the data section is marked (and run)"
    text = (ROOT / "README.md").read_text()
    assert "shards.py" not in text and "from_model_config" not in text, "stale names"
    assert "read_model_config(" in section
    training = globals()["section"]("Training")
    assert training.count("```bash") == training.count("<!-- test: train-commands -->") == 1


@pytest.mark.slow
@pytest.mark.slow
def test_readme_data_commands_run_verbatim(tmp_path, readme_out_lock):
    root = repo_root_with_venv(tmp_path)
    env = code_env(root)
    shutil.rmtree(OUT, ignore_errors=True)
    outputs = []
    for block in command_blocks():
        run = processes.run(["bash", "-e", "-c", block], cwd=root, env=env, capture_output=True, text=True,
                             timeout=600)
        assert run.returncode == 0, f"{block}\nstdout:\n{run.stdout}\nstderr:\n{run.stderr}"
        assert "Traceback" not in run.stderr, run.stderr
        outputs.append(run.stdout)
    out = "".join(outputs)
    train, val = Manifest.load(OUT / "train"), Manifest.load(OUT / "val")
    assert (train.totals["samples"], val.totals["samples"]) == (20, 4)  # --val-every 6 of 24
    assert f"train: {len(train.shards)} shards; samples 20," in out and "val: 1 shards; samples 4," in out
    assert "4 shards, 24 good samples, 0 problems" in out  # validate
    assert "sample 'clone-01'" in out and "<audio-out T=11 not trained>" in out  # inspect: the reference clip
    assert re.search(r"⟦<\|audio_out_bos\|>⟧<audio-out T=\d+ trained>", out)
    assert re.search(r"^assistant +audio-out +\d+ +\d+$", out, re.M)  # the statistics table
    assert "wrote a batch of 4 samples" in out
    with np.load("/tmp/higgs-example-batch.npz", allow_pickle=False) as batch:
        assert len(batch["sample_keys"]) == 4


    python = re.search(r"<!-- test: python-stream -->\s*```python\n(.*?)```", data_section(), re.S).group(1)
    run = processes.run([str(venv_bin() / "python"), "-c", python], cwd=root, env=env, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, f"{python}\nstdout:\n{run.stdout}\nstderr:\n{run.stderr}"
    lines = run.stdout.strip().splitlines()
    stats = ast.literal_eval(lines[-1])  # the dict printed by loader.stats()
    assert stats["planned_samples"] == stats["seen_samples"] == 20 and stats["dropped_samples"] == 0
    assert sum(len(ast.literal_eval(line.split(") ", 1)[1])) for line in lines[:-1] if "<blank>" not in line) == 20

    # The training section's commands, verbatim, on the shards just built: dry run, 2-rank ZeRO-3 run, evaluation
    # and export.
    train = re.search(r"<!-- test: train-commands -->\s*```bash\n(.*?)```", section("Training"), re.S).group(1)
    run = processes.run(["bash", "-e", "-c", train], cwd=root, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, f"{train}\nstdout:\n{run.stdout[-4000:]}\nstderr:\n{run.stderr[-4000:]}"
    plan = Path("/tmp/higgs-example-plan.json").read_text()
    assert json.loads(plan[plan.index("{\n"):])["data"]["samples"] == 20
    steps = [json.loads(line) for line in Path("/tmp/higgs-example-run/metrics.jsonl").read_text().splitlines()]
    assert len(steps) >= 4 and steps[-1]["loss/total"] < steps[0]["loss/total"]
    assert re.search(r"^loss/audio_cb7 +\d+\.\d+$", run.stdout, re.M)  # evaluate's table
    for layout in ("port", "boson"):
        assert (Path("/tmp/higgs-example-export") / layout / "model.safetensors").exists()
    assert re.search(r"^loss/total +\d+\.\d{4} / ", run.stdout, re.M)  # compare_runs' table
    assert (Path("/tmp/higgs-example-plots") / "loss.png").stat().st_size > 10_000


@pytest.mark.slow
def test_console_commands_from_outside_the_repository(tmp_path):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    assert not outside.resolve().is_relative_to(ROOT)
    env = code_env(outside)
    build, shards = venv_bin() / "higgs-build-shards", venv_bin() / "higgs-shards"
    assert build.exists() and shards.exists(), "console scripts missing: run ./setup.sh (pip install -e .)"

    def run(*command: str) -> subprocess.CompletedProcess:
        done = processes.run([str(c) for c in command], cwd=outside, env=env, capture_output=True, text=True,
                              timeout=600)
        assert "Traceback" not in done.stderr, done.stderr
        return done

    help_run = run(build, "--help")
    assert help_run.returncode == 0 and help_run.stdout.startswith("usage: higgs-build-shards")
    assert "--on-error {fail,skip}" in help_run.stdout
    out = outside / "shards"
    done = run(build, EXAMPLE / "samples.jsonl", "--tokenizer", EXAMPLE / "tokenizer", "--model-config", EXAMPLE,
               "--out", out, "--val-fraction", "0.25", "--workers", "2")
    assert done.returncode == 0, done.stderr
    assert "train: 1 shards; samples 18," in done.stdout and "val: 1 shards; samples 6," in done.stdout
    checked = run(shards, "validate", out)
    assert (checked.returncode, checked.stdout.splitlines()[-1]) == (0, "2 shards, 24 good samples, 0 problems")
    assert sorted(p.name for p in outside.iterdir()) == ["shards"], "nothing else written where it ran"


# ------------------------------------------------------------------------------------------- examples/tiny

def load_make_example():
    spec = importlib.util.spec_from_file_location("make_example", EXAMPLE / "make_example.py")
    module = importlib.util.module_from_spec(spec)
    writes, sys.dont_write_bytecode = sys.dont_write_bytecode, True  # no __pycache__ in examples/
    try:
        spec.loader.exec_module(module)
    finally:
        sys.dont_write_bytecode = writes
    return module


def files(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*"))
            if p.is_file() and "__pycache__" not in p.parts}


def test_example_is_what_make_example_writes(tmp_path, capsys):
    load_make_example().main(tmp_path / "tiny")
    expected = files(tmp_path / "tiny")
    checked_in = {name: data for name, data in files(EXAMPLE).items() if name not in ("make_example.py", "run.yaml")}
    assert sorted(checked_in) == sorted(expected), "rerun examples/tiny/make_example.py and commit its output"
    assert [name for name in expected if checked_in[name] != expected[name]] == []
    tokenizer_files = files(ROOT / "tests" / "assets" / "tiny_tokenizer")
    assert {name: data for name, data in checked_in.items() if name.startswith("tokenizer/")} == {
        f"tokenizer/{name}": data for name, data in tokenizer_files.items()}


def test_example_matches_its_model_config(tokenizer):
    config = read_model_config(EXAMPLE, tokenizer)  # also checks the config's token ids against the tokenizer
    assert config.audio == AudioSettings(num_codebooks=8, codes_per_codebook=1024, stream_bos_id=1024,
                                         stream_eos_id=1025, use_delay_pattern=True)
    config.transformers_config()  # the model side can build from it too
    tokens = SpecialTokens.from_tokenizer(tokenizer, config.pad_token_id)
    samples = [json.loads(line) for line in (EXAMPLE / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 24 and len({s["id"] for s in samples}) == 24
    kinds = {s["id"].rsplit("-", 1)[0] for s in samples}
    assert kinds == {"tts", "clone", "chat-audio", "asr", "text"}
    used = set()
    for sample in samples:
        chat = tokenize_chatml(sample, tokenizer, tokens, key=sample["id"])
        assert chat.unknown_roles == []
        for ref in chat.audio:
            codes = np.load(EXAMPLE / ref.item["audio_url"], allow_pickle=False)
            assert codes.dtype == np.int16 and codes.shape[0] == config.num_codebooks and codes.shape[1] >= 1
            assert 0 <= codes.min() and codes.max() < config.codes_per_codebook
            used.add(ref.item["audio_url"])
        if sample["id"].startswith("clone"):  # the reference clip is before start_index: context, not learnt
            assert sample["start_index"] == 3 and [ref.is_out for ref in chat.audio] == [True, True]
        if sample["id"].startswith("asr"):
            assert [ref.is_out for ref in chat.audio] == [False]
        if sample["id"].startswith("text"):
            assert chat.audio == []
    assert used == {f"codes/{p.name}" for p in (EXAMPLE / "codes").iterdir()}, "every codes file is used"
