"""Everything checked before any process group forms: the config against the tokenizer, model config, weights,
shards, output folder and checkpoints; who learns what in the train split; the data plan for the world size. A
problem is one RunConfigError message (printed once, by rank 0, as an `error:` line). Also the `--dry-run` report:
the resolved config, the data plan and the model-state memory per GPU."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..data.shards import FetchError, Manifest, check_fingerprint
from ..model import HiggsAudioForTraining
from ..vocabulary import Vocabulary, VocabularyError, load_vocabulary
from . import checkpointing
from .components import apply_freeze, trainable_names
from .config import RESUMABLE, RunConfig, RunConfigError, deepspeed_config, fingerprint
from .loaders import make_collator, make_loader, steps_left
from .lora import apply_lora, select as lora_select
from .weights import weight_plan


@dataclass
class Setup:
    """Everything read and checked before any process group forms."""

    config: RunConfig
    ds: dict
    vocabulary: Vocabulary
    world_size: int
    masking: str = ""  # the masking summary of the train split (printed, saved, logged)
    resume_from: Path | None = None  # the checkpoint tag the run continues from

    @property
    def model_config(self):
        return self.vocabulary.model_config

    @property
    def zero3(self) -> bool:
        return self.ds.get("zero_optimization", {}).get("stage") == 3

    def collator(self):
        return make_collator(self.config, self.vocabulary.tokens, self.model_config.audio)


def preflight(config: RunConfig, world_size: int, rank: int = 0, local_rank: int = 0) -> Setup:
    """Every rank runs it alike from the files; rank 0 says what it decided (a damaged checkpoint skipped). The first
    rank of each node also plans the train and val splits' first epoch for `world_size` (reading every shard's length
    sidecar): too little data for the ranks fails here, not after the process group and the engine are built. Its
    node's launcher then ends the node's other ranks, which wait for the process group."""
    m = config.model
    ds = deepspeed_config(config, world_size)
    try:
        vocabulary = load_vocabulary(m.tokenizer, m.pretrained or m.config, "model.tokenizer",
                                     "model.pretrained" if m.pretrained else "model.config")
    except VocabularyError as exc:
        raise RunConfigError(str(exc)) from None
    for key, split in (("data.train", config.data.train), ("data.val", config.data.val)):
        if split is not None:
            try:
                check_fingerprint(Manifest.load(split), vocabulary.fingerprint())
            except (ValueError, FetchError) as exc:
                raise RunConfigError(f"{key}: {exc}") from None
    if m.pretrained is not None:
        try:
            weight_plan(m.pretrained)  # the headers of every weight file: a truncated file is named here
        except (OSError, ValueError) as exc:
            raise RunConfigError(f"model.pretrained: {exc}") from None
    names = trained_names(config, vocabulary)
    check_out_dir(config.train.out_dir)
    setup = Setup(config, ds, vocabulary, world_size,
                  resume_from=checkpointing.resume_target(Path(config.train.out_dir) / "checkpoints",
                                                          config.train.resume, announce=rank == 0))
    if setup.resume_from is not None:
        saved = checkpointing.load_client(setup.resume_from)["fingerprint"]
        if saved != fingerprint(config) and not saved_by_an_earlier_version(config, saved):
            raise RunConfigError(f"train.resume {setup.resume_from}: saved by a run with another config (fingerprint "
                                 f"{saved} vs {fingerprint(config)}; only {', '.join(RESUMABLE)} may change)")
    if local_rank == 0:
        for key, split, train in (("data.train", config.data.train, True), ("data.val", config.data.val, False)):
            if split is not None:
                try:
                    make_loader(config, setup.collator(), split, 0, world_size, train)
                except (ValueError, FetchError) as exc:  # the planner says what cannot be given to the ranks
                    raise RunConfigError(f"{key}: {exc}") from None
    setup.masking = masking_summary(config, vocabulary, names)
    return setup


def trained_names(config: RunConfig, vocabulary: Vocabulary) -> list[str]:
    """The model's parameter names; LoRA targets are checked, and a freeze recipe must leave something to train."""
    with torch.device("meta"):
        model = HiggsAudioForTraining(vocabulary.model_config)
        names = [n for n, _ in model.named_parameters()]
        if config.lora.rank:
            try:
                lora_select(model, config.lora)
            except ValueError as exc:
                raise RunConfigError(str(exc)) from None
        elif not trainable_names(names, config.train.freeze, config.train.trainable):
            which = (f"train.trainable={config.train.trainable}" if config.train.trainable is not None
                     else f"train.freeze={config.train.freeze}")
            raise RunConfigError(f"{which}: no parameter of this model would train (names look like {names[0]}, "
                                 f"{names[-1]})")
    return names


def saved_by_an_earlier_version(config: RunConfig, saved: str) -> bool:
    """A checkpoint whose fingerprint is its run's OUT/config.json as an earlier version wrote it (with switches
    since retired), when that config, those dropped, is this run's."""
    path = Path(config.train.out_dir) / "config.json"
    try:
        raw = json.loads(path.read_text())
        return fingerprint(raw) == saved and fingerprint(RunConfig.from_saved(path.parent)) == fingerprint(config)
    except (OSError, ValueError, KeyError, RunConfigError):
        return False


def check_out_dir(out_dir: str) -> None:
    """OUT must be a folder this process can create or write in; nothing is created here."""
    path = Path(out_dir)
    if path.exists() and not path.is_dir():
        raise RunConfigError(f"train.out_dir {path}: exists and is not a directory")
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise RunConfigError(f"train.out_dir {path}: cannot write in {existing}")


def masking_summary(config: RunConfig, vocabulary: Vocabulary, names: list[str], max_samples: int = 500) -> str:
    """Who learns what in the first samples of the train split; a split with nothing the run trains is refused."""
    from ..data.masking import learnable_share_rows, split_masking, table

    manifest = Manifest.load(config.data.train)
    stats, read = split_masking(manifest, max_samples, vocabulary.tokenizer)
    learnable = {modality: sum(n for (_, m, kind), n in stats.items() if m == modality and kind == "learnable")
                 for modality in ("text", "audio-out")}
    # What each loss reaches: every trained parameter but the other modality's head (the decoder, its adapters and
    # both embeddings feed every position through the shared attention).
    trained = {"lora"} if config.lora.rank else set(trainable_names(names, config.train.freeze, config.train.trainable))
    heads = {"text": bool(trained - {"audio_lm_head.weight"}) and config.model.text_weight > 0,
             "audio-out": bool(trained - {"text_lm_head.weight"}) and config.model.audio_weight > 0}
    if not any(learnable[m] for m, on in heads.items() if on):
        wanted = " or ".join(m for m, on in heads.items() if on) or "anything"
        raise RunConfigError(f"data.train: the first {read} samples hold no learnable {wanted} token, which this "
                             f"run trains (train.freeze={config.train.freeze}): every such label is -100 — check "
                             "start_index and the roles of the data")
    rows = learnable_share_rows(stats, manifest.audio.num_codebooks)
    return (f"masking over the first {read} samples of {config.data.train}:\n"
            + table(("role", "modality", "positions", "labels (per codebook)", "share"), rows, right=(2, 3, 4)))


def hook_class(spec: str):
    """The StepHook class named "package.module:Class" (train.hooks)."""
    import importlib

    module, _, name = spec.partition(":")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as exc:
        raise RunConfigError(f"train.hooks: {spec!r} is not an importable module:Class ({exc})") from None


# ------------------------------------------------------------------------------------------------ --dry-run


def dry_run(setup: Setup) -> dict[str, Any]:
    """The resolved config, the data plan and the model-state memory per GPU (higgs_ds.train.memory: frozen and
    LoRA parameters counted as such, unlike DeepSpeed's estimator), without a process group."""
    config = setup.config
    loader = make_loader(config, setup.collator(), config.data.train, 0, setup.world_size, train=True)
    counts, estimate = model_memory(setup.model_config, config, setup.ds, setup.world_size)
    return {"config": config.to_dict(), "deepspeed": setup.ds,
            "data": {"samples": loader.manifest.totals["samples"],
                     "expanded_tokens": loader.manifest.totals["expanded_tokens"],
                     "micro_batches_per_epoch_per_rank": [loader.batches_in(e) for e in range(config.train.epochs)],
                     "steps": steps_left(config, loader)},
            "model": {"parameters": counts.total, "trainable_parameters": counts.trainable,
                      "largest_layer_parameters": counts.largest_layer},
            "memory_estimate": estimate}


def model_memory(model_config, config: RunConfig, ds: dict, world_size: int):
    """Parameter counts (trainable as the run trains them: LoRA, a freeze recipe) and the model-state estimate per
    GPU for `world_size` GPUs, on a meta-device model."""
    from .memory import count_params, format_estimate, model_states_estimate

    t = config.train
    with torch.device("meta"):
        model = HiggsAudioForTraining(model_config)
        if config.lora.rank:
            apply_lora(model, config.lora)
        else:
            apply_freeze(model, t.freeze, t.trainable)
    counts = count_params(model)
    zero = ds.get("zero_optimization", {})
    offload = {key: zero.get(key, {}).get("device", "none") != "none" for key in ("offload_optimizer", "offload_param")}
    estimate = model_states_estimate(counts.total, counts.trainable, counts.largest_layer, world_size,
                                     stage=zero.get("stage", 3), precision=t.precision, **offload)
    estimate["summary"] = format_estimate(estimate)
    return counts, estimate
