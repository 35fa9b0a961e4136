"""Run-config paths: a YAML's relative paths are read from the YAML's folder, an override's from the working
directory, so a run (and the config it saves for export/evaluate) works from any folder."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from higgs_ds.train.config import RunConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]


def test_relative_paths_resolve_against_the_yaml_then_the_working_directory(tmp_path, monkeypatch):
    (tmp_path / "shards" / "train").mkdir(parents=True)
    (tmp_path / "elsewhere" / "val").mkdir(parents=True)
    yaml = tmp_path / "cfg" / "run.yaml"
    yaml.parent.mkdir()
    yaml.write_text(f"model: {{config: {ROOT}/examples/tiny, tokenizer: ../tok}}\n"
                    "data: {train: ../shards/train, val: 'https://host/val'}\n"
                    f"train: {{out_dir: out, deepspeed: {ROOT}/ds_configs/cpu_zero3_fp32.json, resume: auto}}\n")
    (tmp_path / "tok").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    config = load_config(yaml, ["data.val=val"])
    assert config.model.tokenizer == str(tmp_path / "tok")
    assert config.data.train == str(tmp_path / "shards" / "train")
    assert config.data.val == str(tmp_path / "elsewhere" / "val"), "an override is relative to the working dir"
    assert config.train.out_dir == str(tmp_path / "cfg" / "out") and config.train.resume == "auto"
    assert load_config(yaml, []).data.val == "https://host/val", "a URL is not a path"
    with pytest.raises(RunConfigError, match=r"data.train: .*/elsewhere/nope: no such file"):
        load_config(yaml, ["data.train=nope"])


def test_the_example_run_yaml_loads_from_any_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "train").mkdir()
    config = load_config(ROOT / "examples" / "tiny" / "run.yaml", ["data.train=train", "data.val=null"])
    assert config.model.config == str(ROOT / "examples" / "tiny") and os.path.isdir(config.model.tokenizer)
    assert config.train.deepspeed == str(ROOT / "ds_configs" / "cpu_zero3_fp32.json")
