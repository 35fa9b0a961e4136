"""The one model-config reader: both layouts, with and without each optional key; data and model settings agree."""
import itertools
import json

import pytest
import torch

from helpers import BOSON
from higgs_ds.data.tokens import AudioSettings, SpecialTokens
from higgs_ds.model import HiggsAudioForTraining, load_model, save_checkpoint
from higgs_ds.model_config import ConfigError, read_model_config

BOSON_RAW = json.loads((BOSON / "config.json").read_text())
# Optional keys of a boson config, and what the reader must assume without them (upstream's defaults).
BOSON_OPTIONAL = {"use_delay_pattern": False, "audio_codebook_size": 1024, "audio_stream_bos_id": None,
                  "audio_stream_eos_id": None, "audio_in_token_idx": None, "audio_out_token_idx": None,
                  "audio_out_bos_token_id": None, "audio_eos_token_id": None, "pad_token_id": "text_config"}


def port_raw(tokenizer) -> dict:
    """The port-layout config.json our export writes for the tiny boson checkpoint."""
    return read_model_config(BOSON, tokenizer).port_dict()


def agree(config, tokenizer=None) -> None:
    """Data settings (AudioSettings) and model settings (HiggsAudioV2Config and the built modules) describe the
    same audio streams and token ids."""
    audio, port = config.audio, config.transformers_config()
    assert isinstance(audio, AudioSettings)
    assert audio.num_codebooks == port.num_codebooks == config.num_codebooks
    assert audio.stream_bos_id == port.audio_stream_bos_id and audio.stream_eos_id == port.audio_stream_eos_id
    assert port.codebook_size == config.ids_per_codebook > max(audio.stream_bos_id, audio.stream_eos_id)
    assert audio.codes_per_codebook == config.codes_per_codebook <= min(audio.stream_bos_id, audio.stream_eos_id)
    with torch.device("meta"):
        model = HiggsAudioForTraining(config)
    rows = model.model.embed_audio_tokens.embed_audio_tokens.weight.shape[0]
    assert rows == model.audio_lm_head.weight.shape[0] == config.num_codebooks * config.ids_per_codebook
    if tokenizer is not None:
        tokens = SpecialTokens.from_tokenizer(tokenizer, config.pad_token_id)
        assert (config.audio_in_token_id, config.audio_out_token_id, config.audio_out_bos_token_id,
                config.audio_eos_token_id) == (tokens.audio_in, tokens.audio_out, tokens.audio_out_bos,
                                               tokens.audio_eos)
        assert port.audio_token_id == tokens.audio_out and port.audio_bos_token_id == tokens.audio_out_bos
        assert port.audio_delay_token_id == tokenizer.convert_tokens_to_ids("<|audio_delay|>")


def test_boson_and_port_give_the_same_settings(tokenizer, tmp_path):
    boson = read_model_config(BOSON, tokenizer)
    (tmp_path / "config.json").write_text(json.dumps(port_raw(tokenizer)))
    port = read_model_config(tmp_path, tokenizer)
    assert (boson.layout, port.layout) == ("boson", "port")
    assert boson.audio == port.audio == AudioSettings(num_codebooks=4, codes_per_codebook=30, stream_bos_id=30,
                                                      stream_eos_id=31, use_delay_pattern=True)
    assert (boson.codes_per_codebook, boson.ids_per_codebook) == (port.codes_per_codebook, port.ids_per_codebook) \
        == (30, 32)
    assert boson.transformers_config().to_dict() == port.transformers_config().to_dict()
    agree(boson, tokenizer)
    agree(port, tokenizer)
    # The file, a directory and the parsed dict read the same.
    assert read_model_config(BOSON / "config.json").audio == read_model_config(BOSON_RAW).audio


@pytest.mark.parametrize("removed", [()] + [(k,) for k in BOSON_OPTIONAL] + [tuple(BOSON_OPTIONAL)])
@pytest.mark.parametrize("with_tokenizer", [False, True])
def test_boson_optional_keys(tokenizer, removed, with_tokenizer):
    raw = json.loads(json.dumps(BOSON_RAW))
    for key in removed:
        raw.pop(key)
    if "audio_codebook_size" in removed and "audio_stream_bos_id" not in removed:
        # the default (1024 codes) puts the stated stream ids 30/31 inside the code range
        with pytest.raises(ConfigError, match=r"stream bos/eos ids 30/31 fall inside the code range \[0, 1024\)"):
            read_model_config(raw)
        return
    config = read_model_config(raw, tokenizer if with_tokenizer else None)
    agree(config, tokenizer if with_tokenizer else None)
    expected_delay = "use_delay_pattern" not in removed  # upstream's default is False
    assert config.use_delay_pattern is expected_delay and config.audio.use_delay_pattern is expected_delay
    if "audio_stream_bos_id" in removed:
        assert config.stream_bos_id == config.codes_per_codebook  # default: right after the codes
    if "pad_token_id" in removed:
        assert config.pad_token_id == BOSON_RAW["text_config"]["pad_token_id"]
    if with_tokenizer:  # missing ids come from the tokenizer, the delay id always
        assert config.audio_delay_token_id == tokenizer.convert_tokens_to_ids("<|audio_delay|>")
    else:
        for key, name in (("audio_in_token_idx", "audio_in_token_id"), ("audio_out_token_idx", "audio_out_token_id")):
            assert getattr(config, name) == (None if key in removed else BOSON_RAW[key])
        assert config.audio_delay_token_id is None


PORT_OPTIONAL = ("audio_delay_token_id", "audio_token_id", "audio_bos_token_id", "pad_token_id", "audio_in_token_id",
                 "audio_eos_token_id", "audio_stream_bos_id", "audio_stream_eos_id")


@pytest.mark.parametrize("removed", [()] + [(k,) for k in PORT_OPTIONAL])
@pytest.mark.parametrize("with_tokenizer", [False, True])
def test_port_optional_keys(tokenizer, removed, with_tokenizer):
    raw = port_raw(tokenizer)
    for key in removed:
        raw.pop(key)
    if {"audio_stream_bos_id", "audio_stream_eos_id"} & set(removed):
        # The port's defaults (1024/1025) are outside a 32-id codebook: refused, not guessed.
        with pytest.raises(ConfigError, match=r"codebook_size=32 does not cover the stream bos/eos ids"):
            read_model_config(raw)
        return
    config = read_model_config(raw, tokenizer if with_tokenizer else None)
    agree(config, tokenizer if with_tokenizer else None)
    assert config.use_delay_pattern is True  # the port always uses it
    if not with_tokenizer and removed:
        # A port default (the release's ids, outside this vocabulary) is never taken for a fact.
        name = {"audio_token_id": "audio_out_token_id", "audio_bos_token_id": "audio_out_bos_token_id"}.get(
            removed[0], removed[0])
        assert getattr(config, name) is None


def test_no_delay_checkpoint_is_not_exported_to_the_port_layout(tokenizer, tmp_path):
    raw = dict(BOSON_RAW)
    raw.pop("use_delay_pattern")
    config = read_model_config(raw, tokenizer)
    assert config.use_delay_pattern is False and config.audio.use_delay_pattern is False
    model = HiggsAudioForTraining(config)
    with pytest.raises(ConfigError, match=r"use_delay_pattern is false .*always generates with the delay pattern"):
        save_checkpoint(model.state_dict(), model.model_config, tmp_path / "port", layout="port")
    assert not (tmp_path / "port").exists()
    out = save_checkpoint(model.state_dict(), model.model_config, tmp_path / "boson", layout="boson")
    assert json.loads((out / "config.json").read_text())["use_delay_pattern"] is False
    assert read_model_config(out).use_delay_pattern is False


def test_loading_the_tiny_checkpoint_with_its_tokenizer_warns_nothing(tokenizer, caplog):
    with caplog.at_level("WARNING"):
        model = load_model(BOSON, tokenizer=tokenizer)
    assert not [r for r in caplog.records if "audio_delay_token_id" in r.getMessage()]
    assert model.config.audio_delay_token_id == tokenizer.convert_tokens_to_ids("<|audio_delay|>")


def test_port_export_needs_the_ids_the_config_lacks():
    with pytest.raises(ConfigError, match=r"\['audio_delay_token_id'\] unknown .*read the config with the tokenizer"):
        read_model_config(BOSON).port_dict()


def test_config_contradicting_the_tokenizer_is_refused(tokenizer):
    raw = dict(BOSON_RAW, audio_out_token_idx=BOSON_RAW["audio_in_token_idx"])
    with pytest.raises(ConfigError, match=r"audio_out_token_id=411, but the tokenizer .* has <\|AUDIO_OUT\|> = 412"):
        read_model_config(raw, tokenizer)


@pytest.mark.parametrize("edit, message", [
    (lambda c: c.update(audio_stream_bos_id=5), r"stream bos/eos ids 5/31 fall inside the code range \[0, 30\)"),
    (lambda c: c.update(audio_stream_eos_id=30), "stream bos and eos share the id 30"),
    (lambda c: c.update(audio_num_codebooks=0), "need >= 1 codebook"),
    (lambda c: c.update(audio_num_codebooks="8"), "audio_num_codebooks: expected an integer, got '8'"),
    (lambda c: c.update(audio_stream_eos_id=40), r"32 ids per codebook do not cover the stream bos/eos ids 30/40"),
    (lambda c: c.update(use_delay_pattern="yes"), "use_delay_pattern: expected true/false"),
    (lambda c: c.update(pad_token_id=999999), r"pad_token_id=999999 outside the text vocabulary \[0, 416\)"),
    (lambda c: c.pop("text_config"), "not a Higgs Audio config|text_config: expected an object"),
    (lambda c: c["text_config"].pop("hidden_size"), r"text_config lacks \['hidden_size'\]"),
    (lambda c: c.update(encode_whisper_embed=True), "encode_whisper_embed=True is not supported"),
])
def test_bad_boson_configs_name_the_field(edit, message):
    raw = json.loads(json.dumps(BOSON_RAW))
    edit(raw)
    with pytest.raises(ConfigError, match=message):
        read_model_config(raw)


@pytest.mark.parametrize("content, message", [
    (None, "not found"), ("{not json", "cannot read the model config"), ("[1, 2]", "expected a JSON object"),
    ('{"model_type": "llama"}', "not a Higgs Audio config"),
])
def test_unreadable_config_files(tmp_path, content, message):
    path = tmp_path / "config.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ConfigError, match=message):
        read_model_config(tmp_path)


def test_every_combination_of_audio_fields_is_consistent():
    """AudioSettings accepts exactly the stream layouts the model can embed."""
    for k, codes, bos, eos in itertools.product([0, 1, 8], [1, 30], [0, 29, 30, 31, 32], [30, 31]):
        ok = k >= 1 and min(bos, eos) >= codes and bos != eos
        try:
            AudioSettings(num_codebooks=k, codes_per_codebook=codes, stream_bos_id=bos, stream_eos_id=eos)
        except ValueError:
            assert not ok, (k, codes, bos, eos)
        else:
            assert ok, (k, codes, bos, eos)
