"""The docs run: every fenced block of README.md and docs/*.md carries a `<!-- test: KIND -->` marker, and each
kind has a runner here — the CPU commands run verbatim from the repository root, one chain in the docs' order (data
→ stream → training → LoRA → loading the export → generation → comparing → TensorBoard); GPU, multi-node and SLURM commands are
validated with --dry-run (`dry-run` blocks; sbatch under a fake SLURM), after DeepSpeed's and torchrun's own parsers
accept their launcher flags; the ChatML examples build into shards. So docs and tests cannot drift apart. Also: every
command's --help (reference/ scripts without upstream's packages), console commands from outside the repository, and
examples/tiny is what examples/tiny/make_example.py writes."""
from __future__ import annotations

import argparse
import ast
import contextlib
import fcntl
import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

import processes
from helpers import fake_slurm, load_script
from higgs_ds.data.chatml import tokenize_chatml
from higgs_ds.data.shards import Manifest
from higgs_ds.data.tokens import AudioSettings, SpecialTokens
from higgs_ds.model_config import read_model_config

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "tiny"
OUT = Path("/tmp/higgs-example-shards")  # where the docs' commands write
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
KINDS = {"top-commands", "data-commands", "python-stream", "chatml", "train-commands", "lora-commands",
         "python-load", "generate-commands", "compare-commands", "tensorboard", "dry-run"}
BLOCK = re.compile(r"(?:<!-- test: (?P<kind>[\w-]+) -->\s*)?```(?P<lang>\w*)\n(?P<code>.*?)```", re.S)


def blocks(kind: str | None = None) -> list[tuple[Path, str | None, str]]:
    """(file, marker kind, code) of every fenced block in the docs but ```text ones (a file tree), in order; or only
    those of one kind."""
    found = [(path, m["kind"], m["code"]) for path in DOCS for m in BLOCK.finditer(path.read_text())
             if m["lang"] != "text"]
    return [b for b in found if kind is None or b[1] == kind]


def code(kind: str) -> str:
    found = blocks(kind)
    assert len(found) == 1, f"expected one {kind!r} block, found {len(found)}"
    return found[0][2]


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


def test_every_block_of_the_docs_is_marked_and_every_kind_has_a_block():
    unmarked = [(path.name, code_[:60]) for path, kind, code_ in blocks() if kind is None]
    assert unmarked == [], "every fenced block needs a <!-- test: KIND --> marker (and a runner here)"
    assert {kind for _, kind, _ in blocks()} == KINDS
    text = "".join(path.read_text() for path in DOCS)
    for ref in re.findall(r"tests/(test_\w+\.py)(?:::(\w+))?", text):  # the troubleshooting table's tests
        source = (ROOT / "tests" / ref[0]).read_text()
        assert not ref[1] or f"def {ref[1]}(" in source, ref
    for name in re.findall(r"(?:recipes|ds_configs)/[\w.]+\.(?:yaml|json)", text):
        assert (ROOT / name).is_file(), name
    assert {f"recipes/{p.name}" for p in (ROOT / "recipes").glob("*.yaml")} <= set(
        re.findall(r"recipes/[\w.]+\.yaml", "".join(c for *_, c in blocks("dry-run")))), \
        "every recipe is in a dry-run block"
    for link in re.findall(r"\]\(((?:docs/)?[\w/.-]+\.(?:md|png))\)", text):
        assert any((base / link).exists() for base in (ROOT, ROOT / "docs")), link


def test_the_top_commands_are_the_demo_and_the_tests():
    assert [line.split("#")[0].strip() for line in code("top-commands").splitlines()] == ["./demo.sh", "./test.sh"]
    assert "./test.sh" in (ROOT / ".ci" / "run").read_text().splitlines()[-1]
    # demo.sh end to end is tests/test_demo.py (short form); ./test.sh is what CI runs.


@pytest.mark.slow
def test_the_docs_cpu_commands_run_verbatim_in_order(tmp_path, readme_out_lock):
    root = repo_root_with_venv(tmp_path)
    env = code_env(root)
    shutil.rmtree(OUT, ignore_errors=True)

    def bash(kind: str, timeout: int = 900) -> str:
        outputs = []
        for _, _, block in blocks(kind):
            run = processes.run(["bash", "-e", "-c", block], cwd=root, env=env, capture_output=True, text=True,
                                 timeout=timeout)
            assert run.returncode == 0, f"{block}\nstdout:\n{run.stdout[-4000:]}\nstderr:\n{run.stderr[-4000:]}"
            assert "Traceback" not in run.stderr, run.stderr
            outputs.append(run.stdout)
        return "".join(outputs)

    def python(kind: str) -> list[str]:
        run = processes.run([str(venv_bin() / "python"), "-c", code(kind)], cwd=root, env=env, capture_output=True,
                             text=True, timeout=600)
        assert run.returncode == 0, f"{code(kind)}\nstdout:\n{run.stdout}\nstderr:\n{run.stderr}"
        return run.stdout.strip().splitlines()

    out = bash("data-commands")
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

    lines = python("python-stream")
    stats = ast.literal_eval(lines[-1])  # the dict printed by loader.stats()
    assert stats["planned_samples"] == stats["seen_samples"] == 20 and stats["dropped_samples"] == 0
    assert sum(len(ast.literal_eval(line.split(") ", 1)[1])) for line in lines[:-1] if "<blank>" not in line) == 20

    out = bash("train-commands")  # dry run, 2-rank ZeRO-3 run, evaluation, export, comparison
    # --dry-run's stdout is the JSON report alone (its summaries go to stderr), so the redirect wrote valid JSON.
    assert json.loads(Path("/tmp/higgs-example-plan.json").read_text())["data"]["samples"] == 20
    steps = [json.loads(line) for line in Path("/tmp/higgs-example-run/metrics.jsonl").read_text().splitlines()]
    assert len(steps) >= 4 and steps[-1]["loss/total"] < steps[0]["loss/total"]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator("/tmp/higgs-example-run/tensorboard/train", size_guidance={"scalars": 0})
    events.Reload()
    assert {e.value for e in events.Scalars("problems/alarms")} == {0.0}, "no guard (text or audio) fires on it"
    assert re.search(r"^loss/audio_cb7 +\d+\.\d+$", out, re.M)  # evaluate's table
    for layout in ("port", "boson"):
        assert (Path("/tmp/higgs-example-export") / layout / "model.safetensors").exists()
    assert re.search(r"^loss/total +\d+\.\d{4} / ", out, re.M)  # compare_runs' table
    assert (Path("/tmp/higgs-example-plots") / "loss.png").stat().st_size > 10_000

    bash("lora-commands")  # LoRA from the export, then merged + PEFT export
    lora = [json.loads(line) for line in Path("/tmp/higgs-example-lora/metrics.jsonl").read_text().splitlines()]
    assert lora[-1]["loss/total"] < lora[0]["loss/total"]
    for layout in ("port/model.safetensors", "boson/model.safetensors", "peft/adapter_model.safetensors"):
        assert (Path("/tmp/higgs-example-lora-export") / layout).exists(), layout
    assert (Path("/tmp/higgs-example-lora-export") / "peft" / "base" / "model.safetensors").exists()
    assert python("python-load")[-1].split()[::2] == ["HiggsAudioV2ForConditionalGeneration", "4"]

    bash("generate-commands")  # the run, the LoRA run (sampling) and the run's boson export
    speech = {}
    for name in ("speech", "speech-lora", "speech-export"):
        folder = Path(f"/tmp/higgs-example-{name}")
        results = [json.loads(line) for line in (folder / "results.jsonl").read_text().splitlines()]
        assert [r["id"] for r in results] == ["tts", "clone", "chat"], name
        speech[name] = {r["id"]: (r, np.load(folder / "codes" / f"{r['id']}.npy")) for r in results}
        for r, codes in speech[name].values():
            assert codes.shape == (8, r["frames"]) and r["stop"] in ("eos", "max_frames", "max_text_tokens")
    for prompt, (result, codes) in speech["speech"].items():  # the export holds the run's weights
        other, other_codes = speech["speech-export"][prompt]
        assert other["text"] == result["text"] and np.array_equal(other_codes, codes), prompt

    assert "/tmp/higgs-example-run" in bash("compare-commands")

    # TensorBoard, as the docs open it, on the example run: it serves train and eval as two runs that share the
    # loss tags (drawn as two lines of one chart).
    command = code("tensorboard").split("#")[0].replace("OUT", "/tmp/higgs-example-run").strip()
    server = processes.start(["bash", "-c", f"exec {command}"], cwd=root, env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        deadline, tags = time.time() + 120, {}
        while time.time() < deadline and not all("loss/audio" in tags.get(run, {}) for run in ("train", "eval")):
            time.sleep(1)
            try:
                tags = json.load(urllib.request.urlopen("http://localhost:6006/data/plugin/scalars/tags", timeout=5))
            except OSError:
                pass
        assert set(tags) == {"train", "eval"} and "loss/audio" in tags["train"] and "loss/audio" in tags["eval"], tags
    finally:
        processes.kill_group(server)


def test_the_chatml_examples_of_the_docs_build_into_shards(tmp_path):
    samples = [json.loads(block) for _, _, block in blocks("chatml")]
    assert {s["id"].split("-")[0] for s in samples} == {"tts", "clone", "scene", "asr"}
    (tmp_path / "codes").mkdir()
    rng = np.random.default_rng(0)
    for sample in samples:
        for message in sample["messages"]:
            items = message["content"] if isinstance(message["content"], list) else [message["content"]]
            for item in items:
                if isinstance(item, dict) and item["type"] == "audio":
                    np.save(tmp_path / item["audio_url"], rng.integers(0, 1024, (8, 20), dtype=np.int16))
    (tmp_path / "samples.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples))
    env = code_env(tmp_path)
    run = processes.run([str(venv_bin() / "higgs-build-shards"), str(tmp_path / "samples.jsonl"), "--tokenizer",
                         str(EXAMPLE / "tokenizer"), "--model-config", str(EXAMPLE), "--out", str(tmp_path / "out"),
                         "--val-fraction", "0"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    inspect = processes.run([str(venv_bin() / "higgs-shards"), "inspect", str(tmp_path / "out" / "train"), "--key",
                             "clone-0001", "--tokenizer", str(EXAMPLE / "tokenizer")], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    assert inspect.returncode == 0 and "<audio-out T=20 not trained>" in inspect.stdout, inspect.stdout
    assert Manifest.load(tmp_path / "out" / "train").totals["samples"] == 4


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory):
    """What the GPU commands' $CKPT and $SHARDS stand for here: a tiny boson-layout checkpoint with its tokenizer,
    and shards built for it."""
    import torch

    from higgs_ds.model import HiggsAudioForTraining
    from higgs_ds.model.checkpoint import save_checkpoint
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("stand_ins")
    config = read_model_config(EXAMPLE, AutoTokenizer.from_pretrained(str(EXAMPLE / "tokenizer")))
    torch.manual_seed(0)
    save_checkpoint(HiggsAudioForTraining(config).state_dict(), config, root / "ckpt", layout="boson")
    for name in (EXAMPLE / "tokenizer").iterdir():
        shutil.copy2(name, root / "ckpt" / name.name)
    samples = []  # the example's samples 10 times over (absolute codes paths): enough for 16 ranks' slots
    for copy in range(10):
        for line in (EXAMPLE / "samples.jsonl").read_text().splitlines():
            sample = json.loads(line.replace('"codes/', f'"{EXAMPLE}/codes/'))
            samples.append(json.dumps({**sample, "id": f"{sample['id']}-{copy}"}))
    (root / "samples.jsonl").write_text("\n".join(samples) + "\n")
    run = processes.run([str(venv_bin() / "higgs-build-shards"), str(root / "samples.jsonl"), "--tokenizer",
                         str(root / "ckpt"), "--model-config", str(root / "ckpt"), "--out", str(root / "shards"),
                         "--val-every", "6"], cwd=root, env=code_env(root), capture_output=True, text=True,
                        timeout=300)
    assert run.returncode == 0, run.stderr
    return root


def parse_launcher(command: list[str]) -> argparse.Namespace:
    """A docs line's launcher part as the launcher itself parses it (DeepSpeed's runner, torchrun): a mistyped or
    misplaced launcher flag fails here. The namespace names the script and the arguments it gets."""
    launcher, args = Path(command[0]).name, command[1:]
    if launcher == "deepspeed":
        from deepspeed.launcher.runner import parse_args
    else:
        assert launcher == "torchrun", launcher
        from torch.distributed.run import get_args_parser

        parse_args = get_args_parser().parse_args
    errors = io.StringIO()
    try:
        with contextlib.redirect_stderr(errors):
            return parse_args(args)
    except SystemExit:
        pytest.fail(f"{launcher} rejects this line of the docs: {shlex.join(command)}\n{errors.getvalue()}")


def as_dry_run(command: list[str], cwd: Path) -> list[str]:
    """A launcher command of the docs → the same training command as one `--dry-run` process for its world size."""
    python = str(venv_bin() / "python")
    launcher, args = Path(command[0]).name, command[1:]
    if launcher == "python":
        assert "--dry-run" in args
        return [python, *args]
    if launcher == "deepspeed":
        parsed = parse_launcher(command)
        script, rest = parsed.user_script, parsed.user_args
        hostfile = cwd / parsed.hostfile  # as DeepSpeed: the hostfile's slots when it exists, else --num_gpus
        world = (sum(int(line.split("slots=")[1]) for line in hostfile.read_text().splitlines() if line.strip())
                 if hostfile.is_file() else parsed.num_gpus)
    elif launcher == "torchrun":
        parsed = parse_launcher(command)
        script, rest = parsed.training_script, parsed.training_script_args
        world = int(parsed.nnodes) * int(parsed.nproc_per_node)
    else:  # sbatch: its own options are not checked here; the template itself runs under a fake SLURM below
        assert launcher == "sbatch", launcher
        index = next(i for i, a in enumerate(args) if a.endswith(".sh"))
        options, script, rest = args[:index], args[index], ["--config", *args[index + 1:]]
        nodes = options[options.index("--nodes") + 1] if "--nodes" in options else "1"
        world = int(nodes) * 8  # the template's 8 GPUs per node
        assert script == "launch/slurm_train.sh", script
    assert script in ("launch/train.py", "launch/slurm_train.sh"), script
    assert world >= 1, f"{shlex.join(command)}: give the GPU count explicitly (the dry run plans for it)"
    # The stand-in shards are small (200 training samples): a small budget gives each of the world's slots a batch
    # (the recipes' budgets are for real data; the data plan is not what this checks).
    small = ["data.max_tokens=256", "data.pack_length=256", "data.num_workers=1"]
    return [python, "launch/train.py", *rest, *small, "--dry-run", "--world-size", str(world)]


def docs_commands(kind: str, values: dict[str, str]) -> list[str]:
    """The command lines of the docs' blocks of `kind`, continuation lines joined, $CKPT/$SHARDS as in `values`."""
    commands = []
    for _, _, block in blocks(kind):
        for line in block.replace("\\\n", " ").splitlines():
            if not line.strip() or re.match(r"^(CKPT|SHARDS)=", line):
                continue  # the test's stand-ins replace the docs' example paths
            for name, value in values.items():
                line = line.replace(f"${name}", value)
            commands.append(line)
    return commands


@pytest.mark.slow
def test_the_docs_gpu_and_cluster_commands_pass_the_dry_run(stand_ins, tmp_path):
    root = repo_root_with_venv(tmp_path)
    env = code_env(root)
    values = {"CKPT": str(stand_ins / "ckpt"), "SHARDS": str(stand_ins / "shards")}
    seen = set()
    for line in docs_commands("dry-run", values):
        command = shlex.split(line)
        if command[0] == "printf":  # the hostfile
            assert processes.run(["bash", "-c", line], cwd=root).returncode == 0, line
            continue
        dry = as_dry_run(command, root)
        run = processes.run(dry, cwd=root, env=env, capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, f"{command}\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}"
        report = json.loads(run.stdout)  # stdout is the JSON report alone; the summaries go to stderr
        world = int(dry[-1]) if "--world-size" in dry else 1
        estimate = report["memory_estimate"]
        assert estimate["gpus_per_node"] == world and f"memory: ZeRO-{estimate['stage']}" in run.stderr
        recipe = Path(dry[dry.index("--config") + 1]).name
        trainable, total = report["model"]["trainable_parameters"], report["model"]["parameters"]
        assert (trainable < total) == (recipe.startswith(("lora", "audio_only"))), recipe
        seen.add((Path(command[0]).name, recipe))
    assert {launcher for launcher, _ in seen} == {"python", "deepspeed", "torchrun", "sbatch"}
    # sbatch's template itself, under a fake SLURM (one node, one 'GPU'): its torchrun reaches train.py.
    sbatch = next(shlex.split(c) for c in docs_commands("dry-run", values) if c.startswith("sbatch"))
    slurm_env = fake_slurm(tmp_path, env, gpus_per_node=1)
    script = sbatch.index("launch/slurm_train.sh")
    run = processes.run(["bash", *sbatch[script:], "--dry-run"], cwd=root, env=slurm_env, capture_output=True,
                        text=True, timeout=300)
    assert run.returncode == 0 and '"micro_batches_per_epoch_per_rank"' in run.stdout, run.stderr[-3000:]


def test_the_docs_launcher_lines_parse_with_the_launchers_own_parsers():
    """Every deepspeed / torchrun line of the docs (the dry-run blocks and the CPU chain), parsed by DeepSpeed's runner
    and torchrun: their flags exist and come before the script, which is launch/train.py. (The slow dry-run test runs
    what follows the script; sbatch's own options need SLURM and are not checked.)"""
    launchers = set()
    for kind in ("dry-run", "train-commands", "lora-commands"):
        for line in docs_commands(kind, {"CKPT": "/ckpt", "SHARDS": "/shards"}):
            command = shlex.split(line, comments=True)
            if command and Path(command[0]).name in ("deepspeed", "torchrun"):
                launcher, parsed = Path(command[0]).name, parse_launcher(command)
                script = parsed.user_script if launcher == "deepspeed" else parsed.training_script
                assert script == "launch/train.py", line
                launchers.add(launcher)
    assert launchers == {"deepspeed", "torchrun"}


COMMANDS = [["launch/train.py"], ["launch/evaluate.py"], ["launch/export.py"], ["launch/generate.py"],
            ["launch/compare_runs.py"], ["-m", "data_tools.build_shards"], ["-m", "data_tools.shard_tools"],
            ["examples/demo/make_corpus.py"],
            ["examples/tiny/make_example.py"], ["docs/make_screenshot.py"],
            *([f"benchmarks/{p.name}"] for p in sorted((ROOT / "benchmarks").glob("*.py")))]
SCRIPTS = ["demo.sh", "test.sh", "setup.sh", "launch/slurm_train.sh",
           *(f"reference/{p.name}" for p in sorted((ROOT / "reference").glob("*.sh")))]
# Run in the reference venv (upstream boson-multimodal, transformers 4.46): their --help must answer without it.
REFERENCE = [f"reference/{p.name}" for p in sorted((ROOT / "reference").glob("*.py"))]


def check_help(argv: list[str], cwd: Path, env: dict[str, str]) -> None:
    run = processes.run([*argv, "--help"], cwd=cwd, env={**env, "PYTHONDONTWRITEBYTECODE": "1"}, capture_output=True,
                        text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.lower().startswith("usage") and len(run.stdout.split()) > 12, run.stdout
    assert list(cwd.iterdir()) == [], "--help writes nothing"


def tool_parsers() -> dict[str, argparse.ArgumentParser]:
    """The argument parsers of the product's commands: the launch tools and the data tools (each subcommand)."""
    from data_tools import build_shards, shard_tools
    from higgs_ds.generate import cli as generate
    from higgs_ds.hooks import compare
    from higgs_ds.train import evaluate, export, runtime

    parsers = {p.prog: p for p in (runtime.parser(), evaluate.parser(), export.parser(), generate.parser(),
                                   compare.parser(), build_shards.parser(), shard_tools.parser())}
    tools = parsers[shard_tools.parser().prog]
    commands = next(a for a in tools._actions if isinstance(a, argparse._SubParsersAction)).choices
    return {**parsers, **{p.prog: p for p in commands.values()}}


@pytest.mark.parametrize("prog", sorted(tool_parsers()))
def test_every_option_says_what_it_does_and_its_default(prog):
    """Every option of launch/train.py, evaluate.py, export.py, generate.py, compare_runs.py, higgs-build-shards and
    each higgs-shards subcommand has help, and the help of one with a default (not None) shows that default."""
    parser = tool_parsers()[prog]
    entries = [" ".join(entry.split()) for entry in re.split(r"\n(?=  \S)", parser.format_help())]
    for action in parser._actions:
        if not action.option_strings or isinstance(action, argparse._HelpAction) or action.help == argparse.SUPPRESS:
            continue
        entry = next(e for e in entries if e.split()[0].rstrip(",") in action.option_strings)
        assert action.help, f"{prog} {action.option_strings[0]} has no help"
        if action.default is not None:
            shown = (f"(default: {action.default})", f"'{action.default}' (default)")
            assert any(text in entry for text in shown), f"{prog}: {entry}"


@pytest.mark.parametrize("command", COMMANDS + SCRIPTS, ids=str)
def test_every_command_has_help_that_says_what_it_does(command, tmp_path):
    argv = ["bash", str(ROOT / command)] if isinstance(command, str) else [str(venv_bin() / "python"), *[
        str(ROOT / c) if c.endswith(".py") else c for c in command]]
    check_help(argv, tmp_path, code_env(tmp_path))


@pytest.mark.parametrize("script", REFERENCE)
def test_the_reference_scripts_help_without_upstreams_packages(script, tmp_path):
    """In the project venv, with `import boson_multimodal` made to fail: --help answers before any upstream import."""
    stub, cwd = tmp_path / "stub" / "boson_multimodal", tmp_path / "cwd"
    stub.mkdir(parents=True)
    cwd.mkdir()
    (stub / "__init__.py").write_text("raise ImportError('boson_multimodal imported by --help')\n")
    env = code_env(cwd)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(stub.parent), env.get("PYTHONPATH")]))
    check_help([str(venv_bin() / "python"), str(ROOT / script)], cwd, env)


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

def files(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*"))
            if p.is_file() and "__pycache__" not in p.parts}


def test_example_is_what_make_example_writes(tmp_path, capsys):
    load_script(EXAMPLE / "make_example.py", "make_example").main(tmp_path / "tiny")
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
