"""The data tools under failure: a failed build leaves OUT as it was, every error is one line (no traceback),
unexpected per-sample exceptions become bad samples, unknown roles are kept and reported, shard_tools reports
damaged inputs as BAD lines."""
from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from numpy.lib import format as npy_format

import processes
from data_tools import build_shards, shard_tools
from data_tools.build import pool, samples as worker, writing
from helpers import ROOT, TINY_MODEL, TINY_TOKENIZER, build, make_corpus
from higgs_ds.data.shards import Manifest, SplitWriter, decode_sample, read_shard


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every path under root (directories as None) with its bytes: equal snapshots = nothing changed."""
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


def err_lines(err: str) -> list[str]:
    """stderr as lines; progress-bar redraws (carriage returns) split lines too."""
    return [line for line in err.splitlines() if line.strip()]


def run_cli(module: str, *args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return processes.run([sys.executable, "-m", module, *args], cwd=cwd, timeout=300)


@pytest.fixture
def corpus(tmp_path) -> Path:
    return make_corpus(tmp_path / "data", 8)


def with_lines(jsonl: Path, *lines: str, name: str = "extra.jsonl") -> Path:
    """jsonl's lines followed by `lines` (numbered from len(jsonl) + 1), as a new file beside it."""
    out = jsonl.with_name(name)
    out.write_text(jsonl.read_text() + "".join(line + "\n" for line in lines))
    return out


def missing_audio(jsonl: Path) -> tuple[Path, str]:
    """Line 3 (an ASR sample) points to a codes file that does not exist → (jsonl, the file it names)."""
    lines = jsonl.read_text().splitlines()
    lines[2] = lines[2].replace("codes/", "codes/nowhere_")
    bad = jsonl.with_name("bad.jsonl")
    bad.write_text("\n".join(lines) + "\n")
    return bad, str(jsonl.resolve().parent / "codes" / "nowhere_asr2.npy")


# ------------------------------------------------------------------------------- 1. a failed build changes nothing

@pytest.mark.parametrize("out_state, workers", [("absent", "1"), ("empty", "1"), ("empty", "2")])
def test_failed_build_leaves_out_as_it_was(corpus, tmp_path, capsys, out_state, workers):
    bad, missing = missing_audio(corpus)
    out = tmp_path / "out"
    if out_state == "empty":
        out.mkdir()
    inode = out.stat().st_ino if out.exists() else None
    before = snapshot(tmp_path)
    assert build(bad, out, "--shard-samples", "1", "--workers", workers) == 1
    err = capsys.readouterr().err
    assert (f"error: line 3 (sample '3'): audio[0].audio_url='codes/nowhere_asr2.npy': file {missing} not found "
            f"(--on-error fail: nothing written to {out}; --on-error skip skips bad samples)") in err_lines(err)
    assert "Traceback" not in err
    assert snapshot(tmp_path) == before, "OUT (and its folder) are exactly as before"
    # ... so the rerun is not refused (it used to find empty train/ and val/ folders left behind)
    assert build(corpus, out, "--shard-samples", "1", "--workers", workers) == 0
    assert Manifest.load(out / "train").totals["samples"] == 8
    assert not list(tmp_path.glob("out.partial-*")) and not list(out.glob(".partial-*"))
    if inode is not None:  # an existing empty OUT is filled, not replaced (it may be a mount point)
        assert out.stat().st_ino == inode


def test_failed_build_removes_the_parents_it_created(corpus, tmp_path):
    bad, _ = missing_audio(corpus)
    before = snapshot(tmp_path)
    assert build(bad, tmp_path / "new" / "deeper" / "out") == 1
    assert snapshot(tmp_path) == before
    assert build(corpus, tmp_path / "new" / "deeper" / "out") == 0


def test_refuses_a_non_empty_or_non_directory_out(corpus, tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    (tmp_path / "file").write_text("x")
    before = snapshot(tmp_path)
    with pytest.raises(SystemExit) as exc:
        build(corpus, tmp_path / "full")
    assert exc.value.code == f"error: --out {tmp_path / 'full'}: exists and is not empty; refusing to mix builds"
    with pytest.raises(SystemExit) as exc:
        build(corpus, tmp_path / "file")
    assert exc.value.code == f"error: --out {tmp_path / 'file'}: exists and is not a directory"
    assert snapshot(tmp_path) == before


class Boom(RuntimeError):
    pass


def test_crash_in_the_writer_leaves_nothing_behind(corpus, tmp_path, monkeypatch):
    """--workers 1: an exception while shards are half written (finished .tar + .lengths.npy, an open .tar.tmp)
    removes them all; a programming error still shows its traceback (it is re-raised)."""
    add = SplitWriter.add
    seen: list[set[str]] = []

    def failing_add(self, sample):
        if len(seen) == 3:
            seen.append({p.name for p in self.directory.iterdir()})
            raise Boom("planted")
        seen.append(set())
        add(self, sample)

    monkeypatch.setattr(SplitWriter, "add", failing_add)
    before = snapshot(tmp_path)
    with pytest.raises(Boom):
        build(corpus, tmp_path / "out", "--shard-samples", "1", "--workers", "1")
    written = seen[-1]
    assert {"train-000000.tar", "train-000000.lengths.npy", "train-000002.tar.tmp"} <= written, written
    assert snapshot(tmp_path) == before


def test_disk_error_is_one_line_and_leaves_nothing(corpus, tmp_path, monkeypatch, capsys):
    add, calls = SplitWriter.add, []

    def full_disk(self, sample):
        calls.append(1)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        add(self, sample)

    monkeypatch.setattr(SplitWriter, "add", full_disk)
    before = snapshot(tmp_path)
    assert build(corpus, tmp_path / "out", "--shard-samples", "1") == 1
    err = capsys.readouterr().err
    assert err_lines(err)[-1] == (f"error: OSError: [Errno 28] No space left on device (nothing written to "
                                  f"{tmp_path / 'out'})")
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("how", ["ctrl-c", "sigterm"])
def test_interrupted_build_leaves_nothing(corpus, tmp_path, monkeypatch, capsys, how):
    process, calls = pool.process_line, []

    def interrupted(job):
        calls.append(job)
        if len(calls) == 4:
            if how == "ctrl-c":
                raise KeyboardInterrupt
            if signal.getsignal(signal.SIGTERM) is not getattr(build_shards, "_sigterm", None):
                raise AssertionError("no SIGTERM handler: the signal would end the test run")
            signal.raise_signal(signal.SIGTERM)  # the builder's handler turns it into the same clean-up
        return process(job)

    monkeypatch.setattr(pool, "process_line", interrupted)
    before = snapshot(tmp_path)
    code = build(corpus, tmp_path / "out", "--shard-samples", "1", "--workers", "1")
    err = capsys.readouterr().err
    by = " by SIGTERM" if how == "sigterm" else ""
    assert code == (143 if by else 130)
    assert err_lines(err)[-1] == f"interrupted{by}: nothing written to {tmp_path / 'out'}"
    assert snapshot(tmp_path) == before
    assert signal.getsignal(signal.SIGTERM) is not build_shards._sigterm, "the handler is restored"


# ----------------------------------------------------------------------------------- 2. messages and the bar

def test_errors_are_not_glued_to_the_bar(corpus, tmp_path, capsys):
    bad, missing = missing_audio(corpus)
    assert build(bad, tmp_path / "skip", "--on-error", "skip") == 0
    lines = err_lines(capsys.readouterr().err)
    skipped = (f"skipped: line 3 (sample '3'): audio[0].audio_url='codes/nowhere_asr2.npy': file {missing} not "
               "found")
    assert skipped in lines, "the message has its own line (tqdm.write)"
    assert lines[-1] == f"1 bad samples skipped, listed in {tmp_path / 'skip' / 'errors.jsonl'}"
    assert lines[-2].startswith("samples: 100%"), "the bar is closed before the final message"

    assert build(bad, tmp_path / "fail") == 1
    lines = err_lines(capsys.readouterr().err)
    assert lines[-1].startswith("error: line 3 (sample '3'): "), "nothing (no bar redraw) after the error"
    assert lines[-2].startswith("samples: ") and "error" not in lines[-2]


def test_many_skipped_samples_are_summarised(corpus, tmp_path, capsys):
    jsonl = with_lines(corpus, *(["{broken"] * (writing.SHOWN_ERRORS + 5)))
    assert build(jsonl, tmp_path / "out", "--on-error", "skip") == 0
    lines = err_lines(capsys.readouterr().err)
    assert sum(line.startswith("skipped: line ") for line in lines) == writing.SHOWN_ERRORS
    assert lines.count("skipped: more bad samples, not shown; errors.jsonl lists them all") == 1
    assert len((tmp_path / "out" / "errors.jsonl").read_text().splitlines()) == writing.SHOWN_ERRORS + 5


# -------------------------------------------------------------------------- 3. bad tool arguments: one line each

def test_bad_tokenizer_is_one_line(corpus, tmp_path, tokenizer):
    config = str(corpus.parent / "config.json")
    empty = tmp_path / "empty"
    empty.mkdir()
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        (broken / name).write_bytes((TINY_TOKENIZER / name).read_bytes())
    (broken / "tokenizer.json").write_text("{not json")
    plain = tmp_path / "plain"  # loads, but lacks the Higgs special tokens
    _plain_tokenizer(plain)
    cases = {
        tmp_path / "nowhere": "not found (expected a tokenizer directory, as written by save_pretrained)",
        corpus: "not a directory (expected a tokenizer directory, as written by save_pretrained)",
        empty: r"cannot load a tokenizer \(ValueError: Couldn't instantiate the backend tokenizer from one of:\)",
        broken: r"cannot load a tokenizer \(Exception: key must be a string at line 1 column 2\)",
        plain: r"tokenizer '.*plain' lacks special token <\|begin_of_text\|>",
    }
    for directory, why in cases.items():
        with pytest.raises(SystemExit) as exc:
            build_shards.main([str(corpus), "--tokenizer", str(directory), "--model-config", config, "--out",
                               str(tmp_path / "out")])
        message = exc.value.code
        assert isinstance(message, str) and "\n" not in message
        pattern = re.escape(why) if "(expected" in why else why
        assert re.fullmatch(re.escape(f"error: --tokenizer {directory}: ") + pattern, message), message
    assert not (tmp_path / "out").exists()


def _plain_tokenizer(directory: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(["plain text only"], trainer=trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    PreTrainedTokenizerFast(tokenizer_object=tok).save_pretrained(str(directory))


def test_bad_model_config_is_one_line(corpus, tmp_path):
    good = TINY_MODEL
    huge = json.loads(json.dumps(good))
    huge["text_config"]["num_hidden_layers"] = 10 ** 30  # escapes read_model_config's ConfigError
    files = {"malformed.json": "{not json", "list.json": "[1, 2]", "other.json": json.dumps({"model_type": "bert"}),
             "huge.json": json.dumps(huge), "four.json": json.dumps(good | {"audio_num_codebooks": "4"})}
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    t = tmp_path
    cases = {
        t / "nowhere": f"--model-config: {t / 'nowhere'}: not found (expected a checkpoint directory or its "
                       "config.json)",
        t / "malformed.json": f"--model-config: {t / 'malformed.json'}: cannot read the model config (Expecting "
                              "property name enclosed in double quotes: line 1 column 2 (char 1))",
        t / "list.json": f"--model-config: {t / 'list.json'}: expected a JSON object, got list",
        t / "other.json": f"--model-config: {t / 'other.json'}: not a Higgs Audio config (no audio_num_codebooks / "
                          "num_codebooks)",
        t / "huge.json": f"--model-config {t / 'huge.json'}: cannot read the model config (OverflowError: Python "
                         "int too large to convert to C ssize_t)",
        t / "four.json": f"--model-config: {t / 'four.json'}: audio_num_codebooks: expected an integer, got '4'",
    }
    for source, message in cases.items():
        with pytest.raises(SystemExit) as exc:
            build_shards.main([str(corpus), "--tokenizer", str(TINY_TOKENIZER), "--model-config", str(source),
                               "--out", str(tmp_path / "out")])
        assert exc.value.code == f"error: {message}"
    assert not (tmp_path / "out").exists()


def test_bad_codec_is_one_line(corpus, tmp_path):
    from transformers import HiggsAudioV2TokenizerConfig

    t = tmp_path
    (t / "empty").mkdir()
    (t / "malformed").mkdir()
    (t / "malformed" / "config.json").write_text("{not json")
    config_only = t / "config_only"  # a valid codec config, no weights
    HiggsAudioV2TokenizerConfig().save_pretrained(str(config_only))
    cases = {
        t / "nowhere": "not found (expected a HiggsAudioV2TokenizerModel directory)",
        corpus: "not a directory (expected a HiggsAudioV2TokenizerModel directory)",
        t / "empty": "no config.json (expected a HiggsAudioV2TokenizerModel directory)",
        t / "malformed": "cannot read config.json (JSONDecodeError: Expecting property name enclosed in double "
                         "quotes: line 1 column 2 (char 1))",
        corpus.parent: "config.json is not a codec config (model_type=None, expected 'higgs_audio_v2_tokenizer')",
        config_only: "no weights (model.safetensors or pytorch_model.bin)",
    }
    for directory, why in cases.items():
        with pytest.raises(SystemExit) as exc:
            build(corpus, tmp_path / "out", "--codec", str(directory))
        assert exc.value.code == f"error: --codec {directory}: {why}"
    assert not (tmp_path / "out").exists()


def test_cli_errors_have_no_traceback(corpus, tmp_path):
    """The console path: exactly one line on stderr, exit status 1."""
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "tokenizer_config.json").write_bytes((TINY_TOKENIZER / "tokenizer_config.json").read_bytes())
    (broken / "tokenizer.json").write_text("{not json")
    config = str(corpus.parent / "config.json")
    for tokenizer, why in ((tmp_path / "nowhere", "not found (expected a tokenizer directory, as written by "
                                                  "save_pretrained)"),
                           (broken, "cannot load a tokenizer (Exception: key must be a string at line 1 column 2)")):
        run = run_cli("data_tools.build_shards", str(corpus), "--tokenizer", str(tokenizer), "--model-config",
                      config, "--out", str(tmp_path / "out"))
        assert (run.returncode, run.stderr) == (1, f"error: --tokenizer {tokenizer}: {why}\n")
    run = run_cli("data_tools.shard_tools", "validate", str(tmp_path / "nowhere"))
    assert (run.returncode, run.stderr, run.stdout) == (1, f"error: {tmp_path / 'nowhere'}: no such file or "
                                                           "directory\n", "")


@pytest.fixture
def shards(corpus, tmp_path) -> Path:
    assert build(corpus, tmp_path / "out", "--shard-samples", "4", "--val-fraction", "0.25") == 0
    return tmp_path / "out"


def bad(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith("BAD ")]


def test_validate_missing_path_is_one_line(shards, capsys):
    for command in ("validate", "inspect"):
        with pytest.raises(SystemExit) as exc:
            shard_tools.main([command, str(shards / "nowhere")])
        assert exc.value.code == f"error: {shards / 'nowhere'}: no such file or directory"


def test_shard_tools_bad_settings_are_one_line(shards, tmp_path):
    shard = str(shards / "train" / "train-000000.tar")
    nowhere = tmp_path / "nowhere"
    cases = [
        (["inspect", shard, "--tokenizer", str(nowhere)],
         f"--tokenizer {nowhere}: not found (expected a tokenizer directory, as written by save_pretrained)"),
        (["validate", shard, "--tokenizer", str(TINY_TOKENIZER), "--model-config", str(nowhere)],
         f"--model-config: {nowhere}: not found (expected a checkpoint directory or its config.json)"),
        (["validate", shard, "--model-config", str(nowhere)], "--model-config needs --tokenizer (special token ids)"),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit) as exc:
            shard_tools.main(argv)
        assert exc.value.code == f"error: {message}"


def test_validate_shard_that_is_a_directory(shards, capsys):
    shard = shards / "train" / "train-000000.tar"
    shard.unlink()
    shard.mkdir()
    assert shard_tools.main(["validate", str(shards)]) == 1
    out = capsys.readouterr().out
    assert bad(out) == ["BAD train-000000.tar: a directory, not a shard file (listed in the manifest)"]
    assert out.splitlines()[-1] == "3 shards, 4 good samples, 1 problems"


@pytest.mark.parametrize("entry, why", [
    ("oops", "expected an object, got str"),
    ({"name": "train-000001.tar"}, "sha256: expected 64 lowercase hex digits, got None"),
    ("bytes", "bytes: expected a non-negative integer, got 'many'"),
    ("samples", "samples: expected a non-negative integer, got -1"),
    ({"name": "../val/val-000000.tar"}, "name: expected a .tar file name beside the manifest, got "
                                        "'../val/val-000000.tar'"),
])
def test_validate_malformed_manifest_entry(shards, capsys, entry, why):
    path = shards / "train" / "manifest.json"
    manifest = json.loads(path.read_text())
    if entry == "bytes":
        manifest["shards"][1]["bytes"] = "many"
    elif entry == "samples":
        manifest["shards"][1]["samples"] = -1
    else:
        manifest["shards"][1] = entry
    path.write_text(json.dumps(manifest))
    assert shard_tools.main(["validate", str(shards)]) == 1
    out = capsys.readouterr().out
    name = "" if isinstance(entry, str) and entry == "oops" or isinstance(entry, dict) and "/" in entry["name"] \
        else " (train-000001.tar)"
    assert bad(out) == [f"BAD {path}: shards[1]{name}: {why}"]
    assert out.splitlines()[-1] == "1 shards, 2 good samples, 1 problems", "the other split is still checked"
    with pytest.raises(SystemExit) as exc:  # inspect cannot go on without the manifest
        shard_tools.main(["inspect", str(shards / "train")])
    assert exc.value.code == f"error: {path}: shards[1]{name}: {why}"


def test_validate_tells_corrupt_from_truncated(shards, capsys):
    train = shards / "train"
    with tarfile.open(train / "train-000000.tar") as tar:
        members = tar.getmembers()
    third = members[10]  # 5 members per sample
    data = bytearray((train / "train-000000.tar").read_bytes())
    data[third.offset + 100:third.offset + 164] = b"\xff" * 64  # inside the header block (its checksum fails)
    (train / "train-000000.tar").write_bytes(bytes(data))
    with tarfile.open(train / "train-000001.tar") as tar:
        second = tar.getmembers()[5]
    data = (train / "train-000001.tar").read_bytes()
    (train / "train-000001.tar").write_bytes(data[:second.offset_data + 40])  # cut inside a member's data

    assert shard_tools.main(["validate", str(shards)]) == 1
    lines = bad(capsys.readouterr().out)
    corrupt = [line for line in lines if line.startswith("BAD train-000000.tar")]
    assert corrupt[0] == (f"BAD train-000000.tar: corrupt: invalid tar header at offset {third.offset} (after member "
                          "'000001.meta.json'): bad checksum; the members from there on cannot be read")
    assert not any("truncated" in line for line in corrupt), corrupt
    cut = [line for line in lines if line.startswith("BAD train-000001.tar")]
    assert cut[0] == (f"BAD train-000001.tar: truncated: member {second.name!r} at offset {second.offset} needs "
                      f"{512 + -(-second.size // 512) * 512} bytes, the file ends at {second.offset_data + 40}")
    assert not any("unreadable" in line or "corrupt" in line for line in cut), cut


# ------------------------------------------------------------------------------------------ 4. unknown roles

def narrated(i: int, role: str = "narrator") -> str:
    return json.dumps({"id": f"story{i}", "messages": [
        {"role": role, "content": f"Chapter {i}."}, {"role": "user", "content": "Go on."},
        {"role": "assistant", "content": "Once upon a time."}]})


def test_unknown_roles_are_kept_counted_and_reported(corpus, tmp_path, capsys, tokenizer, tokens):
    jsonl = with_lines(corpus, narrated(1), narrated(2), narrated(3, "scene"),
                       json.dumps({"id": "both", "messages": [{"role": "narrator", "content": "A."},
                                                              {"role": "scene", "content": "B."},
                                                              {"role": "assistant", "content": "C."}]}))
    assert build(jsonl, tmp_path / "out", "--val-fraction", "0.25") == 0
    err = capsys.readouterr().err
    assert err_lines(err)[-1] == ("warning: 4 samples have turns with roles outside system/user/assistant: "
                                  "narrator ×3, scene ×2 (kept as upstream does)")
    manifests = [Manifest.load(tmp_path / "out" / split) for split in ("train", "val")]
    assert sum(m.totals["samples"] for m in manifests) == 12, "kept"
    roles, samples = {}, 0
    for m in manifests:
        samples += m.build["samples_with_unknown_roles"]
        for role, n in m.build["unknown_roles"].items():
            roles[role] = roles.get(role, 0) + n
        found = [decode_sample(raw, m.tokens, m.audio) for s in m.shards for raw in read_shard(m.shard_path(s))]
        assert m.build["unknown_roles"] == {r: n for r in ("narrator", "scene")
                                            if (n := sum(r in s.meta.get("unknown_roles", []) for s in found))}
    assert roles == {"narrator": 3, "scene": 2} and samples == 4
    story = next(decode_sample(raw, m.tokens, m.audio) for m in manifests for s in m.shards
                 for raw in read_shard(m.shard_path(s)) if json.loads(raw["meta.json"])["key"] == "story1")
    assert tokenizer.decode(story.input_ids).startswith("<|begin_of_text|><|start_header_id|>narrator"
                                                            "<|end_header_id|>"), "the role as spelled (upstream)"

    assert build(corpus, tmp_path / "plain") == 0
    assert "outside system/user/assistant" not in capsys.readouterr().err
    plain = Manifest.load(tmp_path / "plain" / "train")
    assert plain.build["unknown_roles"] == {} and plain.build["samples_with_unknown_roles"] == 0

    assert build(with_lines(corpus, narrated(1), name="one.jsonl"), tmp_path / "one") == 0
    assert err_lines(capsys.readouterr().err)[-1] == ("warning: 1 sample has turns with roles outside "
                                                      "system/user/assistant: narrator ×1 (kept as upstream does)")


# -------------------------------------------------------------------------------- 5. help and inspect's table

def test_on_error_has_help(capsys):
    with pytest.raises(SystemExit) as exc:
        build_shards.main(["--help"])
    assert exc.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert re.search(r"--on-error \{fail,skip\} what a bad sample does: 'fail' \(default\) stops the build .* "
                     r"'skip' leaves it out, lists it in OUT/errors\.jsonl", text), text


def test_inspect_table_is_aligned_without_tokenizer(shards, capsys):
    assert shard_tools.main(["inspect", str(shards)]) == 0
    lines = capsys.readouterr().out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("role"))
    header, rows = lines[start], lines[start + 1:]
    assert len(rows) >= 5 and all(row.startswith("ids:") for row in rows), rows  # roles as header token ids
    cells = re.compile(r"(\S+)( {2,})(\S+)( {2,})(\d+)( {2,})(\d+)")
    spans = [cells.fullmatch(line) for line in (header.replace("positions", "0" * 9)
                                                .replace("learnable", "0" * 9), *rows)]
    assert all(spans), "\n".join(lines[start:])
    starts = {m.start(3) for m in spans}
    ends = {(m.end(5), m.end(7)) for m in spans}
    assert len(starts) == 1 and len(ends) == 1, "\n".join(lines[start:])  # modality left-, numbers right-aligned


def test_table_format():
    assert shard_tools.table(("role", "modality", "n"), [("assistant", "text", "5"), ("ids:1,2,3,4,5", "audio-out",
                                                                                      "12345")], right=(2,)) == (
        "role           modality       n\n"
        "assistant      text           5\n"
        "ids:1,2,3,4,5  audio-out  12345")


# ------------------------------------------------------------------ 6. with --on-error skip nothing is fatal

def _hostile_lines(root: Path) -> dict[str, tuple[str, str]]:
    """kind → (JSONL line, regex of its error without the 'line N' prefix)."""
    codes = root / "codes"
    (codes / "empty.npy").write_bytes(b"")
    with open(codes / "huge.npy", "wb") as stream:  # a header claiming 1.4 PiB: np.load raises MemoryError
        npy_format.write_array_header_1_0(stream, {"descr": "<i2", "fortran_order": False, "shape": (8, 10 ** 14)})
        stream.write(b"\0" * 64)

    def tts(url: str, **extra) -> str:
        return json.dumps({**extra, "messages": [{"role": "user", "content": "Say it."}, {
            "role": "assistant", "content": {"type": "audio", "audio_url": url}}]})

    text = '{"messages": [{"role": "user", "content": "a\\ud800b"}, {"role": "assistant", "content": "ok"}]}'
    return {
        "surrogate text": (text, r": sample '\d+': messages\[0\]\.content: text the tokenizer cannot encode "
                                 r"\(TypeError: .+\)"),
        "deep nesting": ("[" * 100_000 + "]" * 100_000, r": malformed JSON \(RecursionError: maximum recursion "
                                                        r"depth exceeded.*\)"),
        "empty npy": (tts("codes/empty.npy"), r" \(sample '\d+'\): audio\[0\]\.audio_url='codes/empty\.npy': not a "
                                              r"readable \.npy array \(EOFError: No data left in file\)"),
        "long name": (tts("codes/" + "x" * 300 + ".npy"), r" \(sample '\d+'\): audio\[0\]\.audio_url='codes/x+\.npy':"
                                                          r" not a usable path \(OSError: \[Errno 36\] File name too "
                                                          r"long: .*\)"),
        "huge npy": (tts("codes/huge.npy"), r" \(sample '\d+'\): unexpected MemoryError: Unable to allocate 1\.42 "
                                            r"PiB for an array with shape \(800000000000000,\) and data type int16 "
                                            r"\(raised at \w+\.py:\d+ in \w+\)"),
        "surrogate speaker": (tts("codes/tts0.npy", speaker="\ud800"),
                              r" \(sample '\d+'\): cannot be stored in a shard \(UnicodeEncodeError: 'utf-8' codec "
                              r"can't encode character '\\ud800' in position \d+: surrogates not allowed\)"),
        "surrogate id": (tts("codes/tts0.npy", id="a\ud800"),
                         r" \(sample 'a\\ud800'\): cannot be stored in a shard \(UnicodeEncodeError: .*\)"),
    }


@pytest.mark.parametrize("workers", ["1", "2"])
def test_skip_survives_hostile_samples(corpus, tmp_path, capsys, workers):
    hostile = _hostile_lines(corpus.parent)
    jsonl = with_lines(corpus, *(line for line, _ in hostile.values()))
    assert build(jsonl, tmp_path / "out", "--on-error", "skip", "--workers", workers) == 0
    err = capsys.readouterr().err
    assert "Traceback" not in err
    errors = [json.loads(x) for x in (tmp_path / "out" / "errors.jsonl").read_text().splitlines()]
    assert [e["line"] for e in errors] == list(range(9, 9 + len(hostile)))
    for error, (kind, (_, why)) in zip(errors, hostile.items()):
        assert re.fullmatch(f"line {error['line']}" + why, error["error"]), (kind, error["error"])
    manifest = Manifest.load(tmp_path / "out" / "train")
    assert manifest.skipped == len(hostile) and manifest.totals["samples"] == 8


@pytest.mark.parametrize("kind", ["surrogate text", "deep nesting", "empty npy", "long name", "huge npy",
                                  "surrogate speaker", "surrogate id"])
def test_fail_names_hostile_samples(corpus, tmp_path, capsys, kind):
    line, why = _hostile_lines(corpus.parent)[kind]
    assert build(with_lines(corpus, line), tmp_path / "out") == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert re.fullmatch("error: line 9" + why + r" \(--on-error fail: nothing written to .*\)", err_lines(err)[-1])
    assert not (tmp_path / "out").exists()


def test_worker_that_cannot_start_fails_each_sample(tmp_path, tokens):
    from higgs_ds.data.tokens import AudioSettings

    spec = worker.BuildSpec(tmp_path, str(tmp_path / "no_tokenizer"), None, tokens, AudioSettings())
    worker.init_worker(spec)
    try:
        result = worker.process_line((4, "train", b'{"messages": []}'))
    finally:
        worker._worker.clear()
    assert result.sample is None
    assert re.fullmatch(r"line 4: the worker process could not start \(OSError: .+\)", result.error), result.error


@pytest.mark.slow
def test_ctrl_c_with_workers_is_clean(tmp_path):
    """Ctrl-C reaches the whole process group: the workers ignore it (no worker tracebacks), the builder stops
    them, removes its temporary folder and exits 130."""
    import os
    import time

    jsonl = tmp_path / "chat.jsonl"
    jsonl.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"What is {i} plus one?"},
                                                      {"role": "assistant", "content": f"It is {i + 1}."}]}) + "\n"
                             for i in range(20000)))
    (tmp_path / "config.json").write_text(json.dumps(TINY_MODEL))
    before = snapshot(tmp_path)
    command = [sys.executable, "-m", "data_tools.build_shards", str(jsonl), "--tokenizer", str(TINY_TOKENIZER),
               "--model-config", str(tmp_path / "config.json"), "--out", str(tmp_path / "out"), "--workers", "2"]
    with processes.start(command, cwd=ROOT, text=False) as proc:
        try:
            seen = b""
            while b"samples:" not in seen:  # the bar is drawn just before the workers start
                chunk = proc.stderr.read1(4096)
                assert chunk, f"the build ended early: {seen!r}"
                seen += chunk
            time.sleep(2.0)  # workers starting or running
            os.killpg(proc.pid, signal.SIGINT)
            out, err = proc.communicate(timeout=120)
        finally:
            processes.kill_group(proc)  # on a failure or timeout: no builder or worker left behind
    err = (seen + err).decode()
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert err_lines(err)[-1] == f"interrupted: nothing written to {tmp_path / 'out'}"
    assert snapshot(tmp_path) == before
