"""Checkpoints in both layouts (docs/design.md §2): boson's original and transformers' port (our native one).

  boson: embed_tokens.* layers.* norm.* audio_codebook_embeddings.weight audio_decoder_proj.{text,audio}_lm_head.weight
         (+ upstream's "partially frozen" splits *.embedding_frozen/_trainable.weight and
         *.linear_frozen/_trainable.weight, merged on load), config.json with a nested text_config
  port:  model.embed_tokens.* model.layers.* model.norm.* model.embed_audio_tokens.embed_audio_tokens.weight
         audio_lm_head.weight text_lm_head.weight, config.json of HiggsAudioV2Config (codebook_size incl. bos/eos)
Weights: model.safetensors, sharded *.safetensors with model.safetensors.index.json, or pytorch_model*.bin (read with
torch.load(weights_only=True)). Both configs are read by `higgs_ds.model_config` into one HiggsModelConfig; we save
safetensors + config.json.

    model = load_model(path)                          # any layout -> HiggsAudioForTraining
    state = read_port_state_dict(path, config)        # validated port-layout tensors (e.g. to load under ZeRO-3)
    save_checkpoint(model.state_dict(), model.model_config, out_dir, layout="boson")
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any, Literal, Mapping

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..model_config import HiggsModelConfig, as_model_config, read_model_config
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


# ------------------------------------------------------------------------------------------------ tensors


def weight_files(path: str | Path) -> list[Path]:
    """The weight files of a checkpoint directory: its index's shards, else *.safetensors, else pytorch_model*.bin."""
    path = Path(path)
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (path / index_name).exists():
            return [path / name for name in sorted(set(json.loads((path / index_name).read_text())["weight_map"]
                                                       .values()))]
    for pattern in ("*.safetensors", "pytorch_model*.bin"):
        if files := sorted(path.glob(pattern)):
            return files
    raise FileNotFoundError(f"{path}: no model.safetensors, *.safetensors shards or pytorch_model*.bin found")


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor in a checkpoint directory, keys as stored."""
    return _read_files(weight_files(path))


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


def read_port_state_dict(path: str | Path, config: HiggsModelConfig | None = None) -> dict[str, torch.Tensor]:
    """A checkpoint of either layout as port-layout tensors, checked against `config` (default: its config.json)."""
    path = Path(path)
    config = config or read_model_config(path)
    state = read_state_dict(path)
    state = boson_to_port(state) if state_layout(state) == "boson" else merge_split_tensors(state)
    check_state_dict(state, expected_shapes(config), str(path))
    return state


def expected_shapes(config: HiggsModelConfig) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        return {key: tuple(value.shape) for key, value in HiggsAudioForTraining(config).state_dict().items()}


def check_state_dict(state: Mapping[str, Any], expected: Mapping[str, tuple[int, ...]], source: str) -> None:
    """`state`: name → tensor or shape. Missing, unexpected or misshapen tensors are refused by name, in one line."""
    shapes = {key: tuple(value.shape) if hasattr(value, "shape") else tuple(value) for key, value in state.items()}
    missing = sorted(expected.keys() - shapes.keys())
    unexpected = sorted(shapes.keys() - expected.keys())
    wrong = [f"{key}: expected {expected[key]}, checkpoint has {shapes[key]}"
             for key in sorted(expected.keys() & shapes.keys()) if shapes[key] != expected[key]]
    if missing or unexpected or wrong:
        problems = ([f"shape mismatch: {w}" for w in wrong] + ([f"missing keys: {missing}"] if missing else [])
                    + ([f"unexpected keys: {unexpected}"] if unexpected else []))
        raise ValueError(f"{source}: checkpoint does not match the config: {'; '.join(problems)}")


def load_model(path: str | Path, dtype: torch.dtype | None = None, tokenizer=None,
               **model_kwargs) -> HiggsAudioForTraining:
    """Build HiggsAudioForTraining from the checkpoint's config.json and load its weights (either layout).
    With `tokenizer`, the config's token ids are checked against it and the missing ones filled in."""
    config = read_model_config(path, tokenizer)
    model = HiggsAudioForTraining(config, **model_kwargs)
    model.load_state_dict(read_port_state_dict(path, config))
    return model.to(dtype) if dtype is not None else model


# ------------------------------------------------------------------------------------------------ saving


def save_checkpoint(state: Mapping[str, torch.Tensor], config: HiggsModelConfig, out_dir: str | Path,
                    layout: Layout = "port", max_shard_bytes: int = 5 * 2**30) -> Path:
    """Write port-layout `state` (e.g. model.state_dict() or a ZeRO-3 consolidated one, whose tensors may be lazy:
    each shard is materialized only while it is written) as `layout`: safetensors (sharded with an index above
    max_shard_bytes) + config.json. Returns out_dir. `config`: the model's
    `model_config` (a transformers HiggsAudioV2Config is read as a port-layout config). The port layout is refused
    for a checkpoint trained without the delay pattern (`HiggsModelConfig.port_dict`)."""
    out_dir = Path(out_dir)
    config = as_model_config(config)
    if layout not in ("boson", "port"):
        raise ValueError(f"layout must be 'boson' or 'port', got {layout!r}")
    raw_config = config.boson_dict() if layout == "boson" else config.port_dict()
    check_state_dict(state, expected_shapes(config), "state to save")
    tensors = port_to_boson(state) if layout == "boson" else dict(state)
    out_dir.mkdir(parents=True, exist_ok=True)
    shards = _shards(tensors, max_shard_bytes)
    if len(shards) == 1:
        save_file(_materialize(shards[0]), str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        for number, shard in enumerate(shards, start=1):
            name = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
            save_file(_materialize(shard), str(out_dir / name), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, name))
        total = sum(_nbytes(t) for t in tensors.values())
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    (out_dir / "config.json").write_text(json.dumps(raw_config, indent=2, sort_keys=True) + "\n")
    return out_dir


def _nbytes(tensor) -> int:
    """Bytes of a tensor, or of a lazy one (e.g. DeepSpeed's zero_to_fp32 GatheredTensor: shape and dtype only)."""
    return math.prod(tensor.shape) * torch.empty(0, dtype=tensor.dtype).element_size()


def _materialize(shard: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One shard's tensors in memory (lazy tensors gathered here, one shard at a time)."""
    return {key: (value.detach() if isinstance(value, torch.Tensor) else value.contiguous()).contiguous().cpu()
            for key, value in shard.items()}


def _shards(tensors: Mapping[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    shards, size = [{}], 0
    for key in sorted(tensors):
        nbytes = _nbytes(tensors[key])
        if shards[-1] and size + nbytes > max_bytes:
            shards, size = shards + [{}], 0
        shards[-1][key] = tensors[key]
        size += nbytes
    return shards
