"""shard_tools: `validate` reports every bad sample by shard and key; `inspect` renders masks, counts and dumps."""
from __future__ import annotations

import io
import json
import re
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from data_tools.shard_tools import main
from helpers import TINY_TOKENIZER, build, make_corpus, rewrite_shard
from higgs_ds.data.collator import Collator
from higgs_ds.data.shards import Manifest, decode_sample, read_shard
from higgs_ds.data.tokens import AudioSettings

AUDIO = AudioSettings()


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tools")
    jsonl = make_corpus(root, 20)
    assert build(jsonl, root / "out", "--shard-samples", "4", "--val-fraction", "0.2") == 0
    return root / "out"


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def edit_array(field: str, key: str, edit):
    """A rewrite_shard change: apply `edit(array) -> array` to one member."""
    def change(name: str, data: bytes) -> bytes:
        return npy_bytes(edit(np.load(io.BytesIO(data)))) if name == f"{key}.{field}" else data
    return change


def bad_lines(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith("BAD ")]


def test_validate_clean(built, capsys):
    assert main(["validate", str(built)]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == "5 shards, 20 good samples, 0 problems"


def test_validate_reports_every_problem(built, tmp_path, tokens, capsys):
    out = shutil.copytree(built, tmp_path / "out")
    train = out / "train"
    for tar in train.glob("*.tar"):
        tar.chmod(0o644)
    out_id = tokens.audio_out
    rewrite_shard(train / "train-000000.tar", lambda name, data: b"junk" if name == "000001.input_ids.npy" else data)
    rewrite_shard(train / "train-000001.tar", edit_array("audio_codes.npy", "000000", lambda c: c + 1024))
    rewrite_shard(train / "train-000001.tar", edit_array("audio_codes.npy", "000002", lambda c: c[:7]))
    for field in ("input_ids.npy", "label_ids.npy"):  # the <|AUDIO_OUT|> placeholder becomes a text token
        rewrite_shard(train / "train-000002.tar",
                      edit_array(field, "000003", lambda ids: np.where(ids == out_id, 5, ids).astype(np.int32)))
    with tarfile.open(train / "train-000003.tar") as tar:
        third_sample = tar.getmembers()[10].offset  # 5 members per sample
    data = (train / "train-000003.tar").read_bytes()
    (train / "train-000003.tar").write_bytes(data[:third_sample])  # cut at a member boundary: tarfile is silent
    manifest = json.loads((out / "val" / "manifest.json").read_text())
    manifest["shards"][0]["learnable_text_tokens"] += 1
    (out / "val" / "manifest.json").write_text(json.dumps(manifest))
    shutil.copy(out / "val" / "val-000000.tar", train / "stray.tar")

    assert main(["validate", str(out)]) == 1
    bad = bad_lines(capsys.readouterr().out)
    expected = [
        r"train-000000\.tar: key '000001' \(sample '.+'\): input_ids\.npy: not a \.npy array",
        r"train-000000\.tar: 30720 bytes, sha256 \w+…; the manifest says 30720 bytes, sha256 \w+…",
        r"train-000001\.tar: key '000000' \(sample '.+'\): audio_codes\[0\]: codes span \[\d+, \d+\], expected "
        r"\[0, 1024\)",
        r"train-000001\.tar: key '000002' \(sample '.+'\): audio_codes\[0\]: expected an integer array \[8, T>=1\], got int16 \(7, \d+\)",
        r"train-000002\.tar: key '000003' \(sample '.+'\): audio_codes: [12] segments but input_ids hold 0 "
        r"<\|AUDIO\|>/<\|AUDIO_OUT\|> placeholders",
        r"train-000003\.tar: truncated: the file ends at offset 10240 \(after member '000001\.meta\.json'\) without "
        r"the end-of-archive marker$",
        r"train-000003\.tar: manifest says samples=4, the shard has 2",
        r"stray\.tar: in .* but not in its manifest",
        r"val-000000\.tar: manifest says learnable_text_tokens=\d+, the shard has \d+",
    ]
    for pattern in expected:
        assert any(re.search(pattern, line) for line in bad), f"no BAD line matches {pattern!r}:\n" + "\n".join(bad)
    sample_level = [line for line in bad if re.search(r"\.tar: key '\d+'", line)]
    assert len(sample_level) == 4, "every bad sample is reported, once"


def test_validate_loose_shard(built, tmp_path, capsys):
    shard = shutil.copy(built / "train" / "train-000001.tar", tmp_path / "loose.tar")
    with pytest.raises(SystemExit, match="no manifest.json beside it; pass --tokenizer and --model-config"):
        main(["validate", str(shard)])
    config = built.parent / "config.json"
    assert main(["validate", str(shard), "--tokenizer", str(TINY_TOKENIZER), "--model-config", str(config)]) == 0
    assert "1 shards, 4 good samples, 0 problems" in capsys.readouterr().out


def test_inspect_renders_the_label_mask(built, capsys):
    assert main(["inspect", str(built), "--key", "utt.0", "--tokenizer", str(TINY_TOKENIZER)]) == 0
    text = capsys.readouterr().out
    # TTS sample 0: prompt unlearnable, the assistant's audio frame markers and turn end learnable.
    assert ("<|start_header_id|>assistant<|end_header_id|>\n\n⟦<|audio_out_bos|>⟧<audio-out T=5 trained>"
            "⟦<|audio_eos|><|eot_id|>⟧") in text
    assert "Generate audio following instruction." in text and "⟦Generate" not in text

    # Voice cloning with start_index: the reference clip is shown as not trained.
    assert main(["inspect", str(built), "--key", "2", "--tokenizer", str(TINY_TOKENIZER)]) == 0
    text = capsys.readouterr().out
    assert "<audio-out T=5 not trained>" in text and "<audio-out T=7 trained>" in text
    assert main(["inspect", str(built), "--key", "2"]) == 0  # no tokenizer: ids
    assert f"#{Manifest.load(built / 'train').tokens.audio_out_bos}" in capsys.readouterr().out


def test_inspect_statistics_match_the_manifest(built, capsys):
    assert main(["inspect", str(built), "--tokenizer", str(TINY_TOKENIZER)]) == 0
    rows = {}
    lines = capsys.readouterr().out.splitlines()
    for line in lines[lines.index(next(x for x in lines if x.startswith("role"))) + 1:]:
        role, modality, positions, learnable = line.split()
        rows[role, modality] = (int(positions), int(learnable))
    totals = [Manifest.load(built / s).totals for s in ("train", "val")]
    assert sum(p for p, _ in rows.values()) == sum(t["expanded_tokens"] for t in totals)
    assert sum(n for (_, m), (_, n) in rows.items() if m == "text") == sum(t["learnable_text_tokens"] for t in totals)
    assert rows["assistant", "audio-out"][1] == sum(t["learnable_audio_tokens"] for t in totals)
    assert rows["user", "audio-in"][1] == 0 and rows["system", "text"][1] == 0 and rows["user", "text"][1] == 0
    assert rows["assistant", "text"][1] > 0


@pytest.mark.parametrize("suffix", [".npz", ".safetensors"])
def test_dump_batch(built, tmp_path, tokens, suffix):
    path = tmp_path / f"batch{suffix}"
    assert main(["inspect", str(built / "train"), "--key", "000002", "--dump-batch", str(path),
                 "--batch-size", "3"]) == 0
    first = Manifest.load(built / "train").shards[0].name
    samples = [decode_sample(raw, tokens, AUDIO) for raw in read_shard(built / "train" / first)][2:]
    samples += [decode_sample(raw, tokens, AUDIO) for raw in read_shard(built / "train" / "train-000001.tar")]
    expected = Collator(tokens, AUDIO)(samples[:3])
    if suffix == ".npz":
        with np.load(path, allow_pickle=False) as z:
            got = {k: torch.from_numpy(z[k]) for k in z.files if k != "sample_keys"}
            keys = z["sample_keys"].tolist()
    else:
        got = load_file(path)
        with safe_open(path, "pt") as f:
            keys = json.loads(f.metadata()["sample_keys"])
    assert keys == expected.sample_keys
    assert got.keys() == expected.tensors().keys()
    for name, value in expected.tensors().items():
        assert torch.equal(got[name], value), name
