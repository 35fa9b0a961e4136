"""Checkpoints in both layouts (DESIGN §1): boson's original and transformers' port (our native one).

  boson: embed_tokens.* layers.* norm.* audio_codebook_embeddings.weight audio_decoder_proj.{text,audio}_lm_head.weight
         (+ upstream's "partially frozen" splits *.embedding_frozen/_trainable.weight and
         *.linear_frozen/_trainable.weight, merged on load), config.json with a nested text_config
  port:  model.embed_tokens.* model.layers.* model.norm.* model.embed_audio_tokens.embed_audio_tokens.weight
         audio_lm_head.weight text_lm_head.weight, config.json of HiggsAudioV2Config (codebook_size incl. bos/eos)
Weights: model.safetensors, sharded *.safetensors with model.safetensors.index.json, or pytorch_model*.bin (read with
torch.load(weights_only=True)). Both configs map to one HiggsAudioV2Config; we save safetensors + config.json.

    model = load_model(path)                          # any layout -> HiggsAudioForTraining
    state = read_port_state_dict(path, config)        # validated port-layout tensors (e.g. to load under ZeRO-3)
    save_checkpoint(model.state_dict(), model.config, out_dir, layout="boson")
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Literal, Mapping

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import HiggsAudioV2Config

from .modeling import HiggsAudioForTraining

Layout = Literal["boson", "port"]
BOSON_TO_PORT = ((r"^audio_codebook_embeddings\.", "model.embed_audio_tokens.embed_audio_tokens."),
                 (r"^(embed_tokens|layers|norm)\.", r"model.\1."),
                 (r"^audio_decoder_proj\.", ""))
PORT_TO_BOSON = ((r"^model\.embed_audio_tokens\.embed_audio_tokens\.", "audio_codebook_embeddings."),
                 (r"^model\.", ""),
                 (r"^(audio_lm_head|text_lm_head)\.", r"audio_decoder_proj.\1."))
# Buffers some upstream checkpoints carry; recomputed from the config.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq", "rotary_emb.original_inv_freq", "audio_codebook_weights")
SPLIT_KEY = re.compile(r"^(?P<module>.+)\.(?P<kind>embedding|linear)_(?P<part>frozen|trainable)\.weight$")
BOSON_ACCEPTED = {  # field: (the only value we accept, why)
    "use_audio_out_self_attention": (False, "the audio self-attention variant is not the released model"),
    "skip_audio_tower": (True, "the whisper audio tower is not used by the released model"),
    "encode_whisper_embed": (False, "whisper features are not supported"),
    "encode_audio_in_tokens": (True, "audio-in positions must be embedded from their codes"),
    "use_delay_pattern": (True, "the port layout (and its generation) always uses the delay pattern"),
    "audio_decoder_proj_num_layers": (0, "extra decoder-projection layers are not supported"),
    "use_audio_out_embed_projector": (False, "the audio-out embedding projector is not supported"),
    "audio_embed_avg": (False, "codebook embeddings are summed, not averaged"),
    "use_rq_transformer": (False, "the RQ-transformer head is not supported"),
}
BOSON_FIXED_FIELDS = {name: accepted for name, (accepted, _) in BOSON_ACCEPTED.items()}
BOSON_REQUIRED_TEXT = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
BOSON_TOKEN_ID_KEYS = (  # (HiggsAudioV2Config field, boson config key); the last two are not port fields
    ("pad_token_id", "pad_token_id"), ("audio_token_id", "audio_out_token_idx"),
    ("audio_bos_token_id", "audio_out_bos_token_id"), ("audio_in_token_id", "audio_in_token_idx"),
    ("audio_eos_token_id", "audio_eos_token_id"))


# ------------------------------------------------------------------------------------------------ configs


def read_config(path: str | Path) -> HiggsAudioV2Config:
    """config.json of either layout (a directory or the file) -> HiggsAudioV2Config."""
    path = Path(path)
    path = path / "config.json" if path.is_dir() else path
    raw = json.loads(path.read_text())
    return config_from_boson(raw, str(path)) if config_layout(raw) == "boson" else config_from_port(raw, str(path))


def config_layout(raw: Mapping) -> Layout:
    return "boson" if "text_config" in raw or "audio_num_codebooks" in raw else "port"


def config_from_port(raw: Mapping, source: str = "<config>") -> HiggsAudioV2Config:
    config = HiggsAudioV2Config.from_dict(dict(raw))
    if config.codebook_size <= max(config.audio_stream_bos_id, config.audio_stream_eos_id):
        raise ValueError(f"{source}: codebook_size={config.codebook_size} does not cover the stream bos/eos ids "
                         f"{config.audio_stream_bos_id}/{config.audio_stream_eos_id} (the release needs 1026)")
    return config


def config_from_boson(raw: Mapping, source: str = "<config>") -> HiggsAudioV2Config:
    for name, (accepted, why) in BOSON_ACCEPTED.items():
        if name in raw and raw[name] != accepted:
            raise ValueError(f"{source}: {name}={raw[name]!r} is not supported ({why}); expected {accepted!r}")
    text = raw.get("text_config") or {}
    if missing := [key for key in BOSON_REQUIRED_TEXT if key not in text]:
        raise ValueError(f"{source}: text_config lacks {missing}")
    layers, heads = int(text["num_hidden_layers"]), int(text["num_attention_heads"])
    if raw.get("audio_adapter_type") not in ("dual_ffn", "dual_ffn_fast_forward"):
        raise ValueError(f"{source}: audio_adapter_type={raw.get('audio_adapter_type')!r} is not supported; "
                         "expected dual_ffn or dual_ffn_fast_forward")
    if sorted(raw.get("audio_dual_ffn_layers") or []) != list(range(layers)):
        raise ValueError(f"{source}: audio_dual_ffn_layers={raw.get('audio_dual_ffn_layers')} must list all "
                         f"{layers} layers (fast-forward layers are not supported)")
    if text.get("tie_word_embeddings"):
        raise ValueError(f"{source}: text_config.tie_word_embeddings=true is not supported (the text head is separate)")
    codes = int(raw.get("audio_codebook_size", 1024))
    # Token ids the port config knows (else its defaults), and two it does not, kept for a boson re-save.
    token_ids = {name: raw[key] for name, key in BOSON_TOKEN_ID_KEYS if key in raw}
    return HiggsAudioV2Config(
        architectures=["HiggsAudioV2ForConditionalGeneration"], vocab_size=int(text["vocab_size"]),
        hidden_size=int(text["hidden_size"]), intermediate_size=int(text["intermediate_size"]),
        num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=int(text.get("num_key_value_heads") or heads),
        head_dim=int(text.get("head_dim") or int(text["hidden_size"]) // heads),
        hidden_act=text.get("hidden_act", "silu"), rms_norm_eps=float(text.get("rms_norm_eps", 1e-6)),
        max_position_embeddings=int(text.get("max_position_embeddings", 2048)),
        rope_parameters=_rope_parameters(text), attention_bias=bool(text.get("attention_bias", False)),
        mlp_bias=bool(text.get("mlp_bias", False)), tie_word_embeddings=False,
        bos_token_id=text.get("bos_token_id"), eos_token_id=text.get("eos_token_id"),
        num_codebooks=int(raw.get("audio_num_codebooks", 12)), codebook_size=codes + 2,
        audio_stream_bos_id=int(raw.get("audio_stream_bos_id", codes)),
        audio_stream_eos_id=int(raw.get("audio_stream_eos_id", codes + 1)), **token_ids)


def _rope_parameters(text: Mapping) -> dict:
    scaling = dict(text.get("rope_scaling") or {})
    rope_type = scaling.pop("rope_type", scaling.pop("type", "default"))
    return {"rope_type": rope_type, "rope_theta": float(text.get("rope_theta", 10000.0)), **scaling}


def boson_config_dict(config: HiggsAudioV2Config) -> dict:
    """The upstream HiggsAudioConfig fields for `config` (dual FFN in every layer, codes only, delay pattern)."""
    rope = dict(config.rope_parameters)
    theta, rope_type = rope.pop("rope_theta"), rope.pop("rope_type")
    text = dict(model_type="llama", vocab_size=config.vocab_size, hidden_size=config.hidden_size,
                intermediate_size=config.intermediate_size, num_hidden_layers=config.num_hidden_layers,
                num_attention_heads=config.num_attention_heads, num_key_value_heads=config.num_key_value_heads,
                head_dim=config.head_dim, hidden_act=config.hidden_act, rms_norm_eps=config.rms_norm_eps,
                max_position_embeddings=config.max_position_embeddings, rope_theta=theta,
                rope_scaling=None if rope_type == "default" else {"rope_type": rope_type, **rope},
                attention_bias=config.attention_bias, mlp_bias=config.mlp_bias, tie_word_embeddings=False,
                bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
                pad_token_id=config.pad_token_id)
    raw = dict(architectures=["HiggsAudioModel"], model_type="higgs_audio", text_config=text,
               audio_adapter_type="dual_ffn_fast_forward",
               audio_dual_ffn_layers=list(range(config.num_hidden_layers)),
               audio_num_codebooks=config.num_codebooks, audio_codebook_size=config.codebook_size - 2,
               audio_stream_bos_id=config.audio_stream_bos_id, audio_stream_eos_id=config.audio_stream_eos_id,
               **BOSON_FIXED_FIELDS)
    raw.update({key: getattr(config, name) for name, key in BOSON_TOKEN_ID_KEYS if hasattr(config, name)})
    return raw


# ------------------------------------------------------------------------------------------------ tensors


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor in a checkpoint directory, keys as stored."""
    path = Path(path)
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (path / index_name).exists():
            files = sorted(set(json.loads((path / index_name).read_text())["weight_map"].values()))
            return _read_files([path / name for name in files])
    for pattern in ("*.safetensors", "pytorch_model*.bin"):
        if files := sorted(path.glob(pattern)):
            return _read_files(files)
    raise FileNotFoundError(f"{path}: no model.safetensors, *.safetensors shards or pytorch_model*.bin found")


def _read_files(files: list[Path]) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for file in files:
        if file.suffix == ".safetensors":
            with safe_open(str(file), framework="pt") as handle:
                part = {key: handle.get_tensor(key) for key in handle.keys()}
        else:
            part = torch.load(file, map_location="cpu", weights_only=True)
        if duplicated := state.keys() & part.keys():
            raise ValueError(f"{file}: tensors {sorted(duplicated)} also appear in another shard")
        state.update(part)
    return state


def merge_split_tensors(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Upstream's PartiallyFrozenEmbedding/Linear store rows [0, k) as *_frozen and [k, n) as *_trainable."""
    merged = {key: value for key, value in state.items() if not SPLIT_KEY.match(key)}
    for key in state:
        match = SPLIT_KEY.match(key)
        if not match or match["part"] != "frozen":
            continue
        trainable = f"{match['module']}.{match['kind']}_trainable.weight"
        if trainable not in state:
            raise ValueError(f"split tensor {key} has no partner {trainable}")
        merged[f"{match['module']}.weight"] = torch.cat([state[key], state[trainable]], dim=0)
    orphans = [key for key in state if (m := SPLIT_KEY.match(key)) and m["part"] == "trainable"
               and f"{m['module']}.{m['kind']}_frozen.weight" not in state]
    if orphans:
        raise ValueError(f"split tensors {orphans} have no *_frozen partner")
    return merged


def _rename(state: Mapping[str, torch.Tensor], rules) -> dict[str, torch.Tensor]:
    renamed = {}
    for key, value in state.items():
        for pattern, replacement in rules:
            key = re.sub(pattern, replacement, key)
        renamed[key] = value
    return renamed


def boson_to_port(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    state = {k: v for k, v in merge_split_tensors(state).items() if not k.endswith(IGNORED_SUFFIXES)}
    return _rename(state, BOSON_TO_PORT)


def port_to_boson(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return _rename(state, PORT_TO_BOSON)


def state_layout(state: Mapping[str, torch.Tensor]) -> Layout:
    return "port" if any(key.startswith("model.") for key in state) else "boson"


def read_port_state_dict(path: str | Path, config: HiggsAudioV2Config | None = None) -> dict[str, torch.Tensor]:
    """A checkpoint of either layout as port-layout tensors, checked against `config` (default: its config.json)."""
    path = Path(path)
    config = config or read_config(path)
    state = read_state_dict(path)
    state = boson_to_port(state) if state_layout(state) == "boson" else merge_split_tensors(state)
    check_state_dict(state, expected_shapes(config), str(path))
    return state


def expected_shapes(config: HiggsAudioV2Config) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        return {key: tuple(value.shape) for key, value in HiggsAudioForTraining(config).state_dict().items()}


def check_state_dict(state: Mapping[str, torch.Tensor], expected: Mapping[str, tuple[int, ...]], source: str) -> None:
    missing = sorted(expected.keys() - state.keys())
    unexpected = sorted(state.keys() - expected.keys())
    wrong = [f"{key}: expected {expected[key]}, checkpoint has {tuple(state[key].shape)}"
             for key in sorted(expected.keys() & state.keys()) if tuple(state[key].shape) != expected[key]]
    if missing or unexpected or wrong:
        problems = ([f"shape mismatch: {w}" for w in wrong] + ([f"missing keys: {missing}"] if missing else [])
                    + ([f"unexpected keys: {unexpected}"] if unexpected else []))
        raise ValueError(f"{source}: checkpoint does not match the config:\n  " + "\n  ".join(problems))


def load_model(path: str | Path, dtype: torch.dtype | None = None, **model_kwargs) -> HiggsAudioForTraining:
    """Build HiggsAudioForTraining from the checkpoint's config.json and load its weights (either layout)."""
    config = read_config(path)
    model = HiggsAudioForTraining(config, **model_kwargs)
    model.load_state_dict(read_port_state_dict(path, config))
    return model.to(dtype) if dtype is not None else model


# ------------------------------------------------------------------------------------------------ saving


def save_checkpoint(state: Mapping[str, torch.Tensor], config: HiggsAudioV2Config, out_dir: str | Path,
                    layout: Layout = "port", max_shard_bytes: int = 5 * 2**30) -> Path:
    """Write port-layout `state` (e.g. model.state_dict() or a ZeRO-3 consolidated one) as `layout`: safetensors
    (sharded with an index above max_shard_bytes) + config.json. Returns out_dir."""
    out_dir = Path(out_dir)
    check_state_dict(state, expected_shapes(config), "state to save")
    tensors = {key: value.detach().contiguous().cpu() for key, value in state.items()}
    if layout == "boson":
        tensors, raw_config = port_to_boson(tensors), boson_config_dict(config)
    elif layout == "port":
        raw_config = dict(config.to_dict(), architectures=["HiggsAudioV2ForConditionalGeneration"])
    else:
        raise ValueError(f"layout must be 'boson' or 'port', got {layout!r}")
    out_dir.mkdir(parents=True, exist_ok=True)
    shards = _shards(tensors, max_shard_bytes)
    if len(shards) == 1:
        save_file(shards[0], str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        for number, shard in enumerate(shards, start=1):
            name = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(out_dir / name), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, name))
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    (out_dir / "config.json").write_text(json.dumps(raw_config, indent=2, sort_keys=True) + "\n")
    return out_dir


def _shards(tensors: Mapping[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    shards, size = [{}], 0
    for key in sorted(tensors):
        nbytes = tensors[key].numel() * tensors[key].element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards, size = shards + [{}], 0
        shards[-1][key] = tensors[key]
        size += nbytes
    return shards
