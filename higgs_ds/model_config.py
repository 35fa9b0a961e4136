"""The one reader of a Higgs Audio v2 `config.json`, in either layout, into one typed `HiggsModelConfig`.

Both sides derive their settings from it: the data side its `AudioSettings` (`config.audio`), the model side its
transformers `HiggsAudioV2Config` (`config.transformers_config()`). Neither parses config.json on its own.

Layouts (docs/design.md §2):
  boson: upstream HiggsAudioConfig: nested `text_config`, `audio_num_codebooks`, `audio_codebook_size` = codes per
         codebook (1024), `use_delay_pattern` (upstream's default when the key is absent: **False**), token ids
         `audio_in_token_idx`, `audio_out_token_idx`, `audio_out_bos_token_id`, `audio_eos_token_id`.
  port:  transformers' HiggsAudioV2Config: flat, `num_codebooks`, `codebook_size` = ids per codebook **including**
         stream bos/eos (1026 for the converted release), no delay-pattern key: the port always uses it.
Two names that cannot be confused: `codes_per_codebook` (real codes, 0..1023) and `ids_per_codebook` (rows of the
audio embedding/head per codebook: the codes plus stream bos/eos, 1026).

Token ids: those the config holds are checked against the tokenizer when one is given; those it lacks (boson
configs have no `audio_delay_token_id`) come from the tokenizer. Without a tokenizer they stay unknown (None), and
writing a port-layout config that needs them is refused.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, Mapping

from .data.tokens import AudioSettings

Layout = Literal["boson", "port"]


class ConfigError(ValueError):
    """A model config that cannot be read or is not supported; the message names the file and the field."""


# Boson fields with the only value we accept, and why (absent keys take upstream's defaults, which agree).
BOSON_ACCEPTED = {
    "use_audio_out_self_attention": (False, "the audio self-attention variant is not the released model"),
    "skip_audio_tower": (True, "the whisper audio tower is not used by the released model"),
    "encode_whisper_embed": (False, "whisper features are not supported"),
    "encode_audio_in_tokens": (True, "audio-in positions must be embedded from their codes"),
    "audio_decoder_proj_num_layers": (0, "extra decoder-projection layers are not supported"),
    "use_audio_out_embed_projector": (False, "the audio-out embedding projector is not supported"),
    "audio_embed_avg": (False, "codebook embeddings are summed, not averaged"),
    "use_rq_transformer": (False, "the RQ-transformer head is not supported"),
}
# The port config rejects these: the transformers port has no whisper tower either.
PORT_REJECTED = {"encode_whisper_embed": True, "skip_audio_tower": False}
BOSON_REQUIRED_TEXT = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
# Our token-id field -> (boson key, port key). None: that layout has no such key. The port config has no field for
# the audio-in and audio-eos ids; we keep them as extra keys so a round trip through the port layout loses nothing.
TOKEN_ID_KEYS = {
    "pad_token_id": ("pad_token_id", "pad_token_id"),
    "audio_in_token_id": ("audio_in_token_idx", "audio_in_token_id"),
    "audio_out_token_id": ("audio_out_token_idx", "audio_token_id"),
    "audio_out_bos_token_id": ("audio_out_bos_token_id", "audio_bos_token_id"),
    "audio_eos_token_id": ("audio_eos_token_id", "audio_eos_token_id"),
    "audio_delay_token_id": (None, "audio_delay_token_id"),
}
PORT_NEEDS = ("pad_token_id", "audio_out_token_id", "audio_out_bos_token_id", "audio_delay_token_id")
# Token strings for the ids above (the delay token has a second spelling in the released tokenizer).
TOKEN_STRINGS = {
    "audio_in_token_id": ("<|AUDIO|>",),
    "audio_out_token_id": ("<|AUDIO_OUT|>",),
    "audio_out_bos_token_id": ("<|audio_out_bos|>",),
    "audio_eos_token_id": ("<|audio_eos|>",),
    "audio_delay_token_id": ("<|audio_delay|>", "<|reserved_special_token_6|>"),
}


@dataclass(frozen=True)
class TextConfig:
    """The Llama backbone's shape (what the modules are built from)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 2048
    rope_parameters: dict = field(default_factory=dict)  # transformers' rope_parameters (rope_type, rope_theta, ...)
    attention_bias: bool = False
    mlp_bias: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None


@dataclass(frozen=True)
class HiggsModelConfig:
    source: str  # the file (or "<dict>") it was read from, for messages
    layout: Layout  # the layout of that file
    text: TextConfig
    num_codebooks: int
    codes_per_codebook: int  # real codes 0..codes_per_codebook-1 (1024)
    ids_per_codebook: int  # rows per codebook in the audio embedding and head: codes + stream bos/eos (1026)
    stream_bos_id: int
    stream_eos_id: int
    use_delay_pattern: bool
    pad_token_id: int | None = None
    audio_in_token_id: int | None = None
    audio_out_token_id: int | None = None
    audio_out_bos_token_id: int | None = None
    audio_eos_token_id: int | None = None
    audio_delay_token_id: int | None = None

    def __post_init__(self):
        self.audio  # noqa: B018 - the audio settings validate themselves (raises ConfigError below)
        if self.ids_per_codebook <= max(self.stream_bos_id, self.stream_eos_id):
            raise ConfigError(f"{self.source}: {self.ids_per_codebook} ids per codebook do not cover the stream "
                              f"bos/eos ids {self.stream_bos_id}/{self.stream_eos_id} (the release has 1026)")
        for name in TOKEN_ID_KEYS:
            value = getattr(self, name)
            if value is not None and not 0 <= value < self.text.vocab_size:
                raise ConfigError(f"{self.source}: {name}={value} outside the text vocabulary "
                                  f"[0, {self.text.vocab_size})")

    @property
    def audio(self) -> AudioSettings:
        """What the collator needs (data/ derives nothing from config.json itself)."""
        try:
            return AudioSettings(num_codebooks=self.num_codebooks, codes_per_codebook=self.codes_per_codebook,
                                 stream_bos_id=self.stream_bos_id, stream_eos_id=self.stream_eos_id,
                                 use_delay_pattern=self.use_delay_pattern)
        except ValueError as exc:
            raise ConfigError(f"{self.source}: {exc}") from exc

    # ------------------------------------------------------------------------------------------ derived configs

    def transformers_config(self):
        """transformers' HiggsAudioV2Config with these shapes: what the training model's modules are built from.
        Token ids the port requires but we do not know are 0 here (never used in training; a port-layout save
        refuses unknown ones, see `port_dict`)."""
        from transformers import HiggsAudioV2Config

        text = self.text
        ids = {key: getattr(self, name) for name, (_, key) in TOKEN_ID_KEYS.items()
               if key is not None and getattr(self, name) is not None}
        ids.setdefault("pad_token_id", None)  # never the port's default (the release's id)
        for key in ("audio_token_id", "audio_bos_token_id", "audio_delay_token_id"):
            ids.setdefault(key, 0)  # required ints in the port config, unused in training; port_dict refuses unknowns
        return HiggsAudioV2Config(
            architectures=["HiggsAudioV2ForConditionalGeneration"], vocab_size=text.vocab_size,
            hidden_size=text.hidden_size, intermediate_size=text.intermediate_size,
            num_hidden_layers=text.num_hidden_layers, num_attention_heads=text.num_attention_heads,
            num_key_value_heads=text.num_key_value_heads, head_dim=text.head_dim, hidden_act=text.hidden_act,
            rms_norm_eps=text.rms_norm_eps, max_position_embeddings=text.max_position_embeddings,
            rope_parameters=dict(text.rope_parameters), attention_bias=text.attention_bias, mlp_bias=text.mlp_bias,
            tie_word_embeddings=False, bos_token_id=text.bos_token_id, eos_token_id=text.eos_token_id,
            num_codebooks=self.num_codebooks, codebook_size=self.ids_per_codebook,
            audio_stream_bos_id=self.stream_bos_id, audio_stream_eos_id=self.stream_eos_id, **ids)

    def port_dict(self) -> dict[str, Any]:
        """config.json for a transformers-layout checkpoint. Refused when the port would use the checkpoint
        differently from how it was trained: it always generates with the delay pattern."""
        if not self.use_delay_pattern:
            raise ConfigError(f"{self.source}: use_delay_pattern is false (upstream's default when the key is "
                              "absent), but transformers' HiggsAudioV2ForConditionalGeneration always generates with "
                              "the delay pattern: converting this checkpoint to the port layout would silently change "
                              "how its audio is read. Keep the boson layout.")
        unknown = [name for name in PORT_NEEDS if getattr(self, name) is None]
        if unknown:
            raise ConfigError(f"{self.source}: {unknown} unknown (the config lacks them): read the config with the "
                              "tokenizer to write a port-layout config")
        return dict(self.transformers_config().to_dict(), architectures=["HiggsAudioV2ForConditionalGeneration"])

    def boson_dict(self) -> dict[str, Any]:
        """config.json for a boson-layout checkpoint (upstream HiggsAudioConfig fields; DualFFN in every layer)."""
        text, rope = self.text, dict(self.text.rope_parameters)
        theta, rope_type = rope.pop("rope_theta", 10000.0), rope.pop("rope_type", "default")
        text_config = dict(
            model_type="llama", vocab_size=text.vocab_size, hidden_size=text.hidden_size,
            intermediate_size=text.intermediate_size, num_hidden_layers=text.num_hidden_layers,
            num_attention_heads=text.num_attention_heads, num_key_value_heads=text.num_key_value_heads,
            head_dim=text.head_dim, hidden_act=text.hidden_act, rms_norm_eps=text.rms_norm_eps,
            max_position_embeddings=text.max_position_embeddings, rope_theta=theta,
            rope_scaling=None if rope_type == "default" else {"rope_type": rope_type, **rope},
            attention_bias=text.attention_bias, mlp_bias=text.mlp_bias, tie_word_embeddings=False,
            bos_token_id=text.bos_token_id, eos_token_id=text.eos_token_id, pad_token_id=self.pad_token_id)
        raw = dict(architectures=["HiggsAudioModel"], model_type="higgs_audio", text_config=text_config,
                   audio_adapter_type="dual_ffn_fast_forward",
                   audio_dual_ffn_layers=list(range(text.num_hidden_layers)),
                   audio_num_codebooks=self.num_codebooks, audio_codebook_size=self.codes_per_codebook,
                   audio_stream_bos_id=self.stream_bos_id, audio_stream_eos_id=self.stream_eos_id,
                   use_delay_pattern=self.use_delay_pattern,
                   **{name: accepted for name, (accepted, _) in BOSON_ACCEPTED.items()})
        raw.update({key: getattr(self, name) for name, (key, _) in TOKEN_ID_KEYS.items()
                    if key is not None and getattr(self, name) is not None})
        return raw

    def with_tokenizer(self, tokenizer) -> "HiggsModelConfig":
        """Token ids checked against `tokenizer`, and those the config lacks filled from it."""
        found = {}
        for name, strings in TOKEN_STRINGS.items():
            tid = _token_id(tokenizer, strings)
            mine = getattr(self, name)
            if mine is not None and tid is not None and mine != tid:
                raise ConfigError(f"{self.source}: {name}={mine}, but the tokenizer "
                                  f"{getattr(tokenizer, 'name_or_path', '?')!r} has {strings[0]} = {tid}: the config "
                                  "and the tokenizer belong to different checkpoints")
            if mine is None and tid is not None:
                found[name] = tid
        if self.pad_token_id is None and getattr(tokenizer, "pad_token_id", None) is not None:
            found["pad_token_id"] = int(tokenizer.pad_token_id)
        return replace(self, **found) if found else self


def _token_id(tokenizer, strings: tuple[str, ...]) -> int | None:
    for string in strings:
        tid = tokenizer.convert_tokens_to_ids(string)
        if tid is not None and tid != tokenizer.unk_token_id:
            return int(tid)
    return None


# ---------------------------------------------------------------------------------------------------- reading


def read_model_config(source: str | Path | Mapping[str, Any], tokenizer=None) -> HiggsModelConfig:
    """A checkpoint directory, its config.json, or the parsed dict (either layout) -> HiggsModelConfig."""
    if isinstance(source, Mapping):
        raw, where = dict(source), "<config dict>"
    else:
        path = Path(source)
        path = path / "config.json" if path.is_dir() else path
        where = str(path)
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{where}: not found (expected a checkpoint directory or its config.json)") from None
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise ConfigError(f"{where}: cannot read the model config ({exc})") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{where}: expected a JSON object, got {type(raw).__name__}")
    layout = config_layout(raw, where)
    try:
        config = _from_boson(raw, where) if layout == "boson" else _from_port(raw, where)
    except (KeyError, TypeError, ValueError) as exc:
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(f"{where}: malformed {layout} config ({type(exc).__name__}: {exc})") from None
    return config.with_tokenizer(tokenizer) if tokenizer is not None else config


def config_layout(raw: Mapping[str, Any], where: str = "<config dict>") -> Layout:
    if "audio_num_codebooks" in raw or "text_config" in raw:
        return "boson"
    if "num_codebooks" in raw or raw.get("model_type") == "higgs_audio_v2":
        return "port"
    raise ConfigError(f"{where}: not a Higgs Audio config (no audio_num_codebooks / num_codebooks)")


def _int(raw: Mapping, key: str, where: str, default: int | None = None) -> int:
    value = raw.get(key, default)
    if type(value) is not int:
        raise ConfigError(f"{where}: {key}: expected an integer, got {value!r}")
    return value


def _from_boson(raw: Mapping, where: str) -> HiggsModelConfig:
    for name, (accepted, why) in BOSON_ACCEPTED.items():
        if name in raw and raw[name] != accepted:
            raise ConfigError(f"{where}: {name}={raw[name]!r} is not supported ({why}); expected {accepted!r}")
    text = raw.get("text_config")
    if not isinstance(text, Mapping):
        raise ConfigError(f"{where}: text_config: expected an object (the Llama backbone's config)")
    if missing := [key for key in BOSON_REQUIRED_TEXT if key not in text]:
        raise ConfigError(f"{where}: text_config lacks {missing}")
    layers = _int(text, "num_hidden_layers", where)
    if raw.get("audio_adapter_type") not in ("dual_ffn", "dual_ffn_fast_forward"):
        raise ConfigError(f"{where}: audio_adapter_type={raw.get('audio_adapter_type')!r} is not supported; "
                          "expected dual_ffn or dual_ffn_fast_forward")
    if sorted(raw.get("audio_dual_ffn_layers") or []) != list(range(layers)):
        raise ConfigError(f"{where}: audio_dual_ffn_layers={raw.get('audio_dual_ffn_layers')} must list all "
                          f"{layers} layers (fast-forward layers are not supported)")
    if text.get("tie_word_embeddings"):
        raise ConfigError(f"{where}: text_config.tie_word_embeddings=true is not supported (the text head is "
                          "separate)")
    heads = _int(text, "num_attention_heads", where)
    codes = _int(raw, "audio_codebook_size", where, 1024)
    delay = raw.get("use_delay_pattern", False)  # upstream HiggsAudioConfig's default
    if not isinstance(delay, bool):
        raise ConfigError(f"{where}: use_delay_pattern: expected true/false, got {delay!r}")
    scaling = dict(text.get("rope_scaling") or {})
    rope_type = scaling.pop("rope_type", scaling.pop("type", "default"))
    return HiggsModelConfig(
        source=where, layout="boson",
        text=TextConfig(
            vocab_size=_int(text, "vocab_size", where), hidden_size=_int(text, "hidden_size", where),
            intermediate_size=_int(text, "intermediate_size", where), num_hidden_layers=layers,
            num_attention_heads=heads, num_key_value_heads=int(text.get("num_key_value_heads") or heads),
            head_dim=int(text.get("head_dim") or _int(text, "hidden_size", where) // heads),
            hidden_act=text.get("hidden_act", "silu"), rms_norm_eps=float(text.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=int(text.get("max_position_embeddings", 2048)),
            rope_parameters={"rope_type": rope_type, "rope_theta": float(text.get("rope_theta", 10000.0)), **scaling},
            attention_bias=bool(text.get("attention_bias", False)), mlp_bias=bool(text.get("mlp_bias", False)),
            bos_token_id=text.get("bos_token_id"), eos_token_id=text.get("eos_token_id")),
        num_codebooks=_int(raw, "audio_num_codebooks", where, 12), codes_per_codebook=codes,
        ids_per_codebook=codes + 2,  # upstream's embedding/head: codebook_size + 2 rows per codebook
        stream_bos_id=_int(raw, "audio_stream_bos_id", where, codes),
        stream_eos_id=_int(raw, "audio_stream_eos_id", where, codes + 1), use_delay_pattern=delay,
        **{name: raw.get(key, text.get(key) if name == "pad_token_id" else None)
           for name, (key, _) in TOKEN_ID_KEYS.items() if key is not None})


def _from_port(raw: Mapping, where: str) -> HiggsModelConfig:
    for key, rejected in PORT_REJECTED.items():
        if raw.get(key) is rejected:
            raise ConfigError(f"{where}: {key}={rejected} is not supported (whisper audio features; the released "
                              "Higgs Audio v2 uses audio codes only)")
    from transformers import HiggsAudioV2Config

    port = HiggsAudioV2Config.from_dict({k: v for k, v in raw.items() if k not in PORT_REJECTED})
    bos, eos = port.audio_stream_bos_id, port.audio_stream_eos_id
    if port.codebook_size <= max(bos, eos):
        raise ConfigError(f"{where}: codebook_size={port.codebook_size} does not cover the stream bos/eos ids "
                          f"{bos}/{eos} (the port counts them: the converted release needs 1026)")
    return HiggsModelConfig(
        source=where, layout="port",
        text=TextConfig(
            vocab_size=port.vocab_size, hidden_size=port.hidden_size, intermediate_size=port.intermediate_size,
            num_hidden_layers=port.num_hidden_layers, num_attention_heads=port.num_attention_heads,
            num_key_value_heads=port.num_key_value_heads, head_dim=port.head_dim, hidden_act=port.hidden_act,
            rms_norm_eps=port.rms_norm_eps, max_position_embeddings=port.max_position_embeddings,
            rope_parameters=dict(port.rope_parameters), attention_bias=port.attention_bias,
            mlp_bias=port.mlp_bias, bos_token_id=port.bos_token_id, eos_token_id=port.eos_token_id),
        num_codebooks=port.num_codebooks, codes_per_codebook=min(bos, eos), ids_per_codebook=port.codebook_size,
        stream_bos_id=bos, stream_eos_id=eos, use_delay_pattern=True,  # the port always uses the delay pattern
        # Only ids the file states: the port's defaults are the release's ids, wrong for any other tokenizer.
        **{name: getattr(port, key) for name, (_, key) in TOKEN_ID_KEYS.items() if key is not None and key in raw})


def as_model_config(config) -> HiggsModelConfig:
    """A HiggsModelConfig as is; a transformers HiggsAudioV2Config read as a port-layout config."""
    if isinstance(config, HiggsModelConfig):
        return config
    return read_model_config(config.to_dict())


__all__ = ["ConfigError", "HiggsModelConfig", "TextConfig", "as_model_config", "config_layout", "read_model_config"]
