"""Checkpoint layouts: boson <-> port round trips, split-tensor merge, file formats, clear mismatch errors."""
import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from transformers import HiggsAudioV2ForConditionalGeneration

from helpers import BOSON, SPLIT, TINY_TOKENIZER
from higgs_ds.model import load_model, read_model_config, read_port_state_dict, save_checkpoint
from higgs_ds.model.checkpoint import merge_split_tensors, read_state_dict



def assert_same_tensors(got: dict, expected: dict) -> None:
    assert sorted(got) == sorted(expected)
    for key in expected:
        assert got[key].dtype == expected[key].dtype and torch.equal(got[key], expected[key]), key


def test_boson_to_port_to_boson_is_tensor_identical(tmp_path, tokenizer):
    original = read_state_dict(BOSON)
    assert "audio_codebook_embeddings.weight" in original and "norm.weight" in original
    model = load_model(BOSON, tokenizer=tokenizer)  # the port config needs the delay token id: from the tokenizer
    save_checkpoint(model.state_dict(), model.model_config, tmp_path / "port", layout="port")
    port = read_state_dict(tmp_path / "port")
    assert {"model.embed_audio_tokens.embed_audio_tokens.weight", "audio_lm_head.weight",
            "text_lm_head.weight", "model.layers.1.audio_mlp.up_proj.weight"} <= port.keys()
    assert torch.equal(port["model.embed_audio_tokens.embed_audio_tokens.weight"],
                       original["audio_codebook_embeddings.weight"])

    reloaded = load_model(tmp_path / "port")
    save_checkpoint(reloaded.state_dict(), reloaded.model_config, tmp_path / "boson", layout="boson")
    assert_same_tensors(read_state_dict(tmp_path / "boson"), original)

    # One HiggsModelConfig from all three config.json files; the boson fields upstream reads survive.
    configs = [read_model_config(path, tokenizer) for path in (BOSON, tmp_path / "port", tmp_path / "boson")]
    assert [c.layout for c in configs] == ["boson", "port", "boson"]
    assert replace(configs[0], source="", layout="port") == replace(configs[1], source="") \
        == replace(configs[2], source="", layout="port")
    assert configs[0].transformers_config().to_dict() == configs[1].transformers_config().to_dict()
    assert (configs[0].ids_per_codebook, configs[0].codes_per_codebook, configs[0].num_codebooks) == (32, 30, 4)
    raw, written = (json.loads((path / "config.json").read_text()) for path in (BOSON, tmp_path / "boson"))
    for key in ("audio_num_codebooks", "audio_codebook_size", "audio_stream_bos_id", "audio_stream_eos_id",
                "audio_in_token_idx", "audio_out_token_idx", "audio_out_bos_token_id", "audio_eos_token_id",
                "pad_token_id", "use_delay_pattern", "skip_audio_tower", "audio_dual_ffn_layers"):
        assert written[key] == raw[key], key
    for key in ("hidden_size", "num_hidden_layers", "num_key_value_heads", "head_dim", "rope_theta", "rope_scaling",
                "rms_norm_eps", "vocab_size", "intermediate_size"):
        assert written["text_config"][key] == raw["text_config"][key], key


def test_split_tensors_are_merged_on_load():
    raw = read_state_dict(SPLIT)
    assert {"embed_tokens.embedding_frozen.weight", "audio_decoder_proj.text_lm_head.linear_trainable.weight",
            "audio_decoder_proj.audio_lm_head.linear_frozen.weight"} <= raw.keys()
    assert (SPLIT / "model.safetensors.index.json").exists()  # and sharded
    assert_same_tensors(read_port_state_dict(SPLIT), read_port_state_dict(BOSON))
    orphan = {k: v for k, v in raw.items() if k != "embed_tokens.embedding_frozen.weight"}
    with pytest.raises(ValueError, match=r"embed_tokens.embedding_trainable.weight'\] have no \*_frozen partner"):
        merge_split_tensors(orphan)


def test_sharded_and_bin_files_load_the_same_tensors(tmp_path, tokenizer):
    model = load_model(BOSON, tokenizer=tokenizer)
    expected = model.state_dict()
    out = save_checkpoint(expected, model.model_config, tmp_path / "sharded", max_shard_bytes=40_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 3 and sorted(index["weight_map"]) == sorted(expected)
    assert_same_tensors(read_port_state_dict(out), expected)

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    shutil.copy(out / "config.json", bin_dir / "config.json")
    torch.save(dict(expected), bin_dir / "pytorch_model.bin")
    assert_same_tensors(read_port_state_dict(bin_dir), expected)
    assert_same_tensors(load_model(bin_dir).state_dict(), expected)


def test_our_port_layout_loads_in_transformers(tmp_path, tokenizer):
    model = load_model(SPLIT, tokenizer=tokenizer)
    save_checkpoint(model.state_dict(), model.model_config, tmp_path, layout="port")
    port = HiggsAudioV2ForConditionalGeneration.from_pretrained(str(tmp_path), use_text_head=True)
    assert port.config.codebook_size == 32
    assert_same_tensors(port.state_dict(), model.state_dict())


def test_export_converts_a_model_directory_tensor_by_tensor_in_its_dtype(tmp_path, tokenizer, capsys):
    """launch/export.py on a model directory (the release is boson-layout, with upstream's split tensors; a PEFT
    adapter loads onto the port layout): every tensor as stored, merged split halves, either way round."""
    from higgs_ds.train.export import main as export_main

    bf16 = tmp_path / "bf16_split"  # the split checkpoint stored in bf16: the conversion keeps the dtype
    shutil.copytree(SPLIT, bf16)
    for file in bf16.glob("*.safetensors"):
        from safetensors.torch import load_file, save_file

        save_file({k: v.to(torch.bfloat16) for k, v in load_file(str(file)).items()}, str(file),
                  metadata={"format": "pt"})
    expected = {k: v.to(torch.bfloat16) for k, v in read_port_state_dict(SPLIT, read_model_config(SPLIT, tokenizer))
                .items()}
    assert export_main([str(bf16), "--out", str(tmp_path / "port"), "--layout", "port",
                        "--tokenizer", str(TINY_TOKENIZER)]) == 0
    assert_same_tensors(read_state_dict(tmp_path / "port"), expected)
    assert (tmp_path / "port" / "tokenizer.json").exists()
    port = HiggsAudioV2ForConditionalGeneration.from_pretrained(str(tmp_path / "port"), use_text_head=True)
    assert_same_tensors({k: v for k, v in port.state_dict().items() if k in expected}, expected)
    assert export_main([str(tmp_path / "port"), "--out", str(tmp_path / "boson"), "--layout", "boson"]) == 0
    assert_same_tensors(read_port_state_dict(tmp_path / "boson", read_model_config(tmp_path / "boson", tokenizer)),
                        expected)
    # No tokenizer beside the weights and none given: one error line, nothing written.
    capsys.readouterr()
    assert export_main([str(SPLIT), "--out", str(tmp_path / "none"), "--layout", "port"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and not (tmp_path / "none").exists(), err
    assert export_main([str(SPLIT), "--out", str(tmp_path / "peft"), "--layout", "peft",
                        "--tokenizer", str(TINY_TOKENIZER)]) == 2
    assert "no LoRA adapter" in capsys.readouterr().err


def write_variant(tmp_path: Path, edit_config=None, edit_state=None) -> Path:
    state = read_state_dict(BOSON)
    raw = json.loads((BOSON / "config.json").read_text())
    if edit_config:
        edit_config(raw)
    if edit_state:
        edit_state(state)
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "config.json").write_text(json.dumps(raw))
    torch.save(state, tmp_path / "pytorch_model.bin")
    return tmp_path


def test_config_weight_mismatches_are_refused_clearly(tmp_path):
    wider = write_variant(tmp_path / "wider", edit_config=lambda c: c["text_config"].update(intermediate_size=96))
    with pytest.raises(ValueError, match=r"(?s)wider: checkpoint does not match the config.*shape mismatch: "
                                         r"model.layers.0.audio_mlp.down_proj.weight: expected \(32, 96\), "
                                         r"checkpoint has \(32, 80\)"):
        load_model(wider)
    missing = write_variant(tmp_path / "missing", edit_state=lambda s: s.pop("audio_decoder_proj.text_lm_head.weight"))
    with pytest.raises(ValueError, match=r"missing keys: \['text_lm_head.weight'\]"):
        load_model(missing)
    extra = write_variant(tmp_path / "extra", edit_state=lambda s: s.update({"layers.0.gate.weight": torch.zeros(2)}))
    with pytest.raises(ValueError, match=r"unexpected keys: \['model.layers.0.gate.weight'\]"):
        load_model(extra)
    with pytest.raises(ValueError, match=r"(?s)state to save: .*missing keys: \['text_lm_head.weight'\]"):
        model = load_model(BOSON)
        state = {k: v for k, v in model.state_dict().items() if k != "text_lm_head.weight"}
        save_checkpoint(state, model.model_config, tmp_path / "never", layout="boson")


@pytest.mark.parametrize("edit, message", [
    (lambda c: c.update(use_audio_out_self_attention=True), "use_audio_out_self_attention=True is not supported"),
    (lambda c: c.update(audio_dual_ffn_layers=[1]), r"audio_dual_ffn_layers=\[1\] must list all 2 layers"),
    (lambda c: c.update(audio_adapter_type="stack"), "audio_adapter_type='stack' is not supported"),
    (lambda c: c.update(skip_audio_tower=False), "skip_audio_tower=False is not supported"),
])
def test_unsupported_boson_configs_are_refused(tmp_path, edit, message):
    with pytest.raises(ValueError, match=f"config.json: {message}"):
        read_model_config(write_variant(tmp_path, edit_config=edit))


def test_port_config_must_count_stream_bos_and_eos(tmp_path, tokenizer):
    model = load_model(BOSON, tokenizer=tokenizer)
    save_checkpoint(model.state_dict(), model.model_config, tmp_path, layout="port")
    raw = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(dict(raw, codebook_size=30)))
    with pytest.raises(ValueError, match="codebook_size=30 does not cover the stream bos/eos ids 30/31"):
        read_model_config(tmp_path)
