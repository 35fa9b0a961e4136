"""What a user who gets something wrong sees: one line naming the file or key and what was expected, once, before
any process group where it can be known; nothing created, the previous checkpoint untouched, no /dev/shm buffer
left behind. In process where the mistake is caught before the process group; otherwise a real 2-rank launch."""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
import torch

import processes
from helpers import TINY_TOKENIZER, base_config, launch, losses, make_samples, start_launch, write_split, write_yaml
from higgs_ds.train import checkpointing
from higgs_ds.train import main as train_main
from higgs_ds.train.export import main as export_main

pytestmark = pytest.mark.usefixtures("no_process_group")


@pytest.fixture
def no_process_group():
    yield
    assert not torch.distributed.is_initialized()


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every path under root with its bytes (directories as None): equal snapshots = nothing changed."""
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


def one_error(capsys) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_an_out_dir_that_is_a_file_is_refused_and_nothing_is_created(corpus, tmp_path, capsys):
    out = tmp_path / "out"
    out.write_text("not a folder")
    config = write_yaml(tmp_path / "run.yaml", **base_config(corpus, out))
    before = snapshot(tmp_path)
    assert train_main(["--config", str(config)]) == 2
    assert one_error(capsys) == f"error: train.out_dir {out}: exists and is not a directory"
    assert snapshot(tmp_path) == before


def test_too_little_data_for_the_world_size_is_one_line_before_the_process_group(corpus, tmp_path, capsys,
                                                                                 monkeypatch, tokenizer, tokens):
    """2 samples, 3 ranks: the planner's message, as the launch's one line (rank 0's preflight plans the data for
    the world size; the other ranks, planning nothing yet, wait for the process group and the launcher ends them)
    and in --dry-run."""
    split = write_split(tmp_path / "tiny", make_samples(2, tokenizer, tokens, seed=3), (2,), tokenizer, tokens)
    config = base_config(corpus, tmp_path / "out")
    config["data"].update(train=str(split), val=None, num_workers=0)
    config = write_yaml(tmp_path / "run.yaml", **config)
    planner = (r"^error: data\.train: epoch 0: 2 samples in 1 shards cannot give each of the (3|5) rank×worker slots "
               r"a batch at this budget: use fewer ranks or DataLoader workers, or a smaller batch budget$")
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("RANK", "0")
    assert train_main(["--config", str(config)]) == 2
    assert re.match(planner, one_error(capsys))
    monkeypatch.delenv("WORLD_SIZE")
    monkeypatch.delenv("RANK")
    assert train_main(["--config", str(config), "--dry-run", "--world-size", "5"]) == 2
    assert re.match(planner, one_error(capsys))
    assert not (tmp_path / "out").exists()


def truncated_checkpoint(tmp_path: Path, corpus: Path, tokenizer) -> Path:
    from higgs_ds.model import HiggsAudioForTraining, read_model_config
    from higgs_ds.model.checkpoint import save_checkpoint

    model_config = read_model_config(corpus / "model", tokenizer)
    path = save_checkpoint(HiggsAudioForTraining(model_config).state_dict(), model_config, tmp_path / "pretrained")
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])  # a download or copy cut short
    return path


def test_a_truncated_pretrained_checkpoint_is_named_by_train_and_export(corpus, tmp_path, capsys, tokenizer):
    pretrained = truncated_checkpoint(tmp_path, corpus, tokenizer)
    config = base_config(corpus, tmp_path / "out")
    config["model"] = {"pretrained": str(pretrained), "tokenizer": str(TINY_TOKENIZER)}
    config = write_yaml(tmp_path / "run.yaml", **config)
    named = (f"{pretrained / 'model.safetensors'}: truncated or corrupt safetensors file (Error while deserializing "
             "header: incomplete metadata, file not fully covered)")
    assert train_main(["--config", str(config)]) == 2
    assert one_error(capsys) == f"error: model.pretrained: {named}"
    assert export_main([str(pretrained), "--out", str(tmp_path / "converted"), "--tokenizer", str(TINY_TOKENIZER)]) == 2
    assert one_error(capsys) == f"error: {named}"
    assert not (tmp_path / "converted").exists()


# ------------------------------------------------------------------------------------------------ launches


def shm_buffers(port: int) -> list[Path]:
    return list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_{os.getuid()}_*_{port}_*"))


@pytest.mark.slow
def test_a_config_error_under_the_launcher_is_printed_once_and_exits_2(corpus, tmp_path):
    config = write_yaml(tmp_path / "run.yaml", **base_config(corpus, tmp_path / "out"))
    code, output = launch(config, "train.grad_accum=0")
    assert code == 2, output[-2000:]
    assert output.count("error: ") == 1 and "error: train.grad_accum: must be >= 1, got 0" in output
    assert "Traceback" not in output and not (tmp_path / "out").exists()


@pytest.mark.slow
def test_a_busy_rendezvous_port_is_named(corpus, tmp_path):
    """Another job's server on the launcher's port: rank 0 cannot listen there and says which port, once."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        config = write_yaml(tmp_path / "run.yaml", **base_config(corpus, tmp_path / "out"))
        code, output = launch(config, port=port)
    assert code != 0
    line = (f"error: the rendezvous port {port} on 127.0.0.1 is in use (another run on this machine?): choose a "
            "free one with --master_port")
    assert output.count(line) == 1 and output.count("error: ") == 1, output[-3000:]
    assert "Traceback" not in output


@pytest.mark.slow
def test_ctrl_c_stops_every_rank_with_one_line_and_the_checkpoint_to_resume_from(corpus, tmp_path):
    out = tmp_path / "run"
    config = write_yaml(tmp_path / "run.yaml", **base_config(corpus, out, save_every=2))
    port = processes.free_port()
    process = start_launch(config, port=port)
    try:
        deadline = time.time() + 300
        while not (out / "checkpoints" / "step00000002" / checkpointing.COMPLETE).exists():
            assert process.poll() is None and time.time() < deadline, process.stdout.read()[-3000:]
            time.sleep(0.2)
        os.killpg(process.pid, signal.SIGINT)  # what Ctrl-C in the terminal does: the whole foreground group
        output = processes.wait(process, timeout=120).stdout
    finally:
        processes.kill_group(process)
    step = max(losses(out))
    interrupted = re.findall(r"^interrupted at step (\d+): the last checkpoint is (\S+); continue from it with "
                             r"train\.resume=auto \(the same command with train\.resume=auto\)$", output, re.M)
    assert len(interrupted) == 1, output[-3000:]
    assert int(interrupted[0][0]) in (step, step + 1) and Path(interrupted[0][1]).name.startswith("step0000000")
    assert (Path(interrupted[0][1]) / checkpointing.COMPLETE).exists()
    # No rank prints a traceback (a rank's lines carry "[rank{r}]:"; gloo's complaint was rank 1's last words). The
    # deepspeed runner's own KeyboardInterrupt traceback, printed by DeepSpeed's launcher process, is not ours.
    assert "]: Traceback" not in output and "gloo" not in output and "error: " not in output, output[-3000:]
    tracebacks = output.split("Traceback (most recent call last):")[1:]
    assert all("deepspeed/launcher/runner.py" in t and "KeyboardInterrupt" in t for t in tracebacks), output[-3000:]
    assert shm_buffers(port) == [], "the interrupted run leaves no shared-memory buffer"


@pytest.mark.slow
def test_a_full_disk_during_a_save_is_one_line_and_the_previous_checkpoint_stays(corpus, tmp_path):
    """OUT on a small tmpfs (room for a checkpoint or two of the tiny model): every rank stops at the save that does
    not fit; one line says no space is left and which checkpoint is intact; that one still checks out."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=14m", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        out = disk / "run"
        config = base_config(corpus, out, save_every=2, keep_last=5, tensorboard=False, trace_samples=False)
        config = write_yaml(tmp_path / "run.yaml", **config)
        port = processes.free_port()
        code, output = launch(config, port=port)
        assert code == 1, output[-3000:]
        lines = [line for line in output.splitlines() if line.startswith("error: ")]
        failed = re.fullmatch(rf"error: saving checkpoint {out / 'checkpoints'}/step(\d+) failed: no space left on "
                              rf"device \(0\.00 GiB free there\); the previous checkpoint (\S+) is intact",
                              lines[0] if len(lines) == 1 else "")
        assert failed, output[-3000:]
        previous = Path(failed[2])
        assert previous.parent == out / "checkpoints" and int(failed[1]) == int(previous.name[4:]) + 2
        assert "Traceback" not in output
        assert checkpointing.damage(previous) == [] and checkpointing.resume_target(out / "checkpoints", "auto") == \
            previous
        assert shm_buffers(port) == []
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)


def test_the_interrupt_line_says_what_ended_the_run(monkeypatch):
    """Ctrl-C, or SIGTERM (the launcher ends every rank when one fails; a cancelled job): the line says which, the
    step, the checkpoint to continue from, or that there is none yet."""
    from types import SimpleNamespace

    from higgs_ds.train import runtime
    from higgs_ds.train.config import RunConfig

    config = RunConfig()
    trainer = SimpleNamespace(step=7, last_checkpoint=Path("/runs/a/checkpoints/step00000006"))
    monkeypatch.setattr(runtime._Interrupts, "seen", signal.SIGINT)
    assert runtime.interrupted_line(trainer, config) == (
        "interrupted at step 7: the last checkpoint is /runs/a/checkpoints/step00000006; continue from it with "
        "train.resume=auto (the same command with train.resume=auto)")
    monkeypatch.setattr(runtime._Interrupts, "seen", signal.SIGTERM)
    config.train.resume = "auto"
    assert runtime.interrupted_line(trainer, config).startswith(
        "stopped by SIGTERM (a failed rank above, or the job was cancelled) at step 7: the last checkpoint is")
    assert runtime.interrupted_line(SimpleNamespace(step=0, last_checkpoint=None), config).endswith(
        "at step 0: no checkpoint was saved yet; the same command starts over")
