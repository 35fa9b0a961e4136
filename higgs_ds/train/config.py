"""The run's configuration: typed sections loaded from YAML with `key=value` overrides (OmegaConf structured
configs: an unknown key, a wrong type or a missing value is an error), and the DeepSpeed JSON reconciled with it.

One source of truth: micro-batch size (1 by our convention: batches are token budgets), gradient accumulation,
precision and gradient clipping are the run YAML's; the DeepSpeed JSON may repeat them only with the same value.
Everything here runs before any process group forms, so a bad config stops every rank with one message.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import MISSING, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ..data.shards import is_remote
from ..model.heads import IMPLS as HEAD_IMPLS
from ..model.modeling import ATTENTION_IMPLEMENTATIONS
from .components import RECIPES as FREEZE_RECIPES
from .lora import PRESETS as LORA_PRESETS

PRECISIONS = ("fp32", "bf16")


class RunConfigError(ValueError):
    """A run config (YAML, overrides or DeepSpeed JSON) that cannot run; the message names the key and the file."""


@dataclass
class ModelSection:
    pretrained: Optional[str] = None  # checkpoint directory (boson or transformers layout) to start from
    config: Optional[str] = None  # model config (directory or config.json) to start from random weights instead
    tokenizer: str = MISSING  # tokenizer directory (special-token ids; checked against the shards)
    attn_implementation: str = "auto"  # auto | sdpa | flash_attention_2
    head_impl: str = "auto"  # auto | chunked | liger | materialized
    activation_checkpointing: bool = False
    text_weight: float = 1.0
    audio_weight: float = 1.0
    audio_reduction: str = "sum"  # sum | mean over codebooks
    init_seed: int = 0  # random initialisation (model.config only)


@dataclass
class DataSection:
    train: str = MISSING  # split directory (data_tools.build_shards OUT/train)
    val: Optional[str] = None
    layout: str = "packed"  # padded | packed
    pack_length: Optional[int] = 4096  # packed layout only
    max_tokens: Optional[int] = 16384  # batch budget per micro-batch (positions of the collated tensor)
    batch_size: Optional[int] = None  # or a fixed number of samples per micro-batch (set max_tokens: null)
    round_to: int = 64
    shuffle: bool = True
    num_workers: int = 2
    shuffle_buffer: int = 1000
    seed: int = 0


@dataclass
class OptimSection:
    name: str = "adamw"  # adamw | sgd (plain SGD: a step anyone can check by hand)
    lr: float = 1e-5
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 100
    weight_decay: float = 0.0  # not applied to norms, biases and embeddings
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # 0 = off


@dataclass
class TrainSection:
    out_dir: str = MISSING  # checkpoints/ and the resolved config go here
    deepspeed: str = MISSING  # DeepSpeed JSON (ds_configs/)
    precision: str = "bf16"  # fp32 | bf16
    grad_accum: int = 1  # micro-batches per optimizer step
    epochs: int = 1
    max_steps: Optional[int] = None  # stop earlier than `epochs`
    freeze: str = "none"  # none | audio_only | text_head_only
    trainable: Optional[list[str]] = None  # instead of a recipe: regexes of the parameter names to train
    log_every: int = 10
    eval_every: int = 0  # 0 = only at the end (when data.val is set)
    save_every: int = 0  # 0 = only at the end
    keep_last: int = 2  # complete checkpoints kept
    max_skipped_steps: int = 5  # steps in a row with a non-finite loss/gradient (skipped) before the run stops
    resume: str = "none"  # none | auto (newest complete checkpoint in out_dir, if any) | a checkpoint directory
    seed: int = 0  # each rank's runtime RNG (dropout) is seeded seed + rank after the weights' init (model.init_seed)
    # Every rank appends to OUT/trace/rank{r}.jsonl one row per micro-batch, {"step", "micro", "keys"}: the sample
    # keys it consumed (which data trained which step; docs/training.md).
    trace_samples: bool = False
    hooks: list[str] = field(default_factory=list)  # "module:Class" StepHooks built on rank 0 with the RunConfig
    tensorboard: bool = True  # OUT/tensorboard event files (higgs_ds.hooks.TensorBoardHook)
    slice_every: int = 50  # prediction-vs-label slices in TensorBoard every N steps (0 = never)
    # throughput/mfu's peak per rank in TFLOPS; None: the GPU table (bf16 dense) or, on the CPU, a matmul measured
    # at start-up (higgs_ds/train/flops.py). Set it for a GPU the table does not know.
    peak_tflops: Optional[float] = None


@dataclass
class LoraSection:
    """LoRA adapters (PEFT, higgs_ds.train.lora) on the decoder's linear layers instead of full fine-tuning."""

    rank: int = 0  # 0 = off (full fine-tuning, or train.freeze); > 0 = the adapters' rank
    alpha: Optional[float] = None  # scaling alpha / rank; None: 2 × rank
    dropout: float = 0.0
    preset: str = "all_linear"  # attention | attention_text_mlp | all_linear (every decoder linear, both DualFFN paths)
    targets: Optional[list[str]] = None  # instead of the preset: regexes of module names
    # Parameters trained in full beside the adapters (regexes of parameter names); default: the audio embedding
    # and the audio head (25 M each at the release's widths). The 394 M text head/embedding work too, at full cost.
    train_in_full: list[str] = field(default_factory=lambda: [r"^model\.embed_audio_tokens\.", r"^audio_lm_head\."])


@dataclass
class GuardSection:
    """Rank-0 guards (higgs_ds.hooks.guards): warn, or stop every rank with `strict`."""

    enabled: bool = True
    audio_loss_floor: Optional[float] = None  # loss/audio below this is a collapse; None: 1 % of the uniform loss
    copy_margin: float = 0.3  # predictions equal their own input frame this much more often than the labels do
    strict: bool = False  # stop the run on a collapse alarm (else warn)
    no_learnable_steps: int = 20  # report a rank whose batches had nothing to learn for this many steps in a row
    check_every: int = 10  # steps between prediction checks (copy detection); the loss floor is checked every step


@dataclass
class RunConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    train: TrainSection = field(default_factory=TrainSection)
    guards: GuardSection = field(default_factory=GuardSection)
    lora: LoraSection = field(default_factory=LoraSection)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_saved(cls, run_dir: str | Path) -> "RunConfig":
        """The resolved config a run saved as OUT/config.json (what evaluate and export read), typed (an unknown key
        or a wrong type is an error, as in a run YAML; a switch earlier versions wrote, saved off, is dropped).
        Values are not checked: a finished run's shards may be gone."""
        path = Path(run_dir) / "config.json"
        try:
            saved = retire_switches(json.loads(path.read_text()))
            merged = OmegaConf.merge(OmegaConf.structured(cls), OmegaConf.create(saved))
            return OmegaConf.to_object(merged)
        except (OSError, ValueError, OmegaConfBaseException) as exc:
            raise RunConfigError(f"{path}: not a run's saved config ({str(exc).splitlines()[0]})") from None


def load_config(path: str | Path | None, overrides: list[str] = ()) -> RunConfig:
    """YAML file (optional) + `section.key=value` overrides → a checked RunConfig."""
    try:
        merged = OmegaConf.structured(RunConfig)
        if path is not None:
            if not Path(path).is_file():
                raise RunConfigError(f"--config {path}: no such file")
            merged = OmegaConf.merge(merged, OmegaConf.load(path))
            _absolute_paths(merged, Path(path).resolve().parent)  # a YAML's relative paths: from its own folder
        for item in overrides:
            if "=" not in item:
                raise RunConfigError(f"override {item!r}: expected section.key=value")
        merged = OmegaConf.merge(merged, OmegaConf.from_dotlist(list(overrides)))
        _absolute_paths(merged, Path.cwd())  # an override's: from where the command runs
        config: RunConfig = OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:
        where = f"{path} + overrides" if path is not None else "overrides"
        key = getattr(exc, "full_key", None)
        raise RunConfigError(f"{where}: {key + ': ' if key else ''}{str(exc).splitlines()[0]}") from None
    check(config)
    return config


PATH_KEYS = ("model.pretrained", "model.config", "model.tokenizer", "data.train", "data.val", "train.out_dir",
             "train.deepspeed", "train.resume")


def _absolute_paths(merged, base: Path) -> None:
    """Relative local paths → absolute against `base`, so a run works from any folder and the config it saves
    (OUT/config.json, read by export and evaluate) names the same files from anywhere."""
    for key in PATH_KEYS:
        value = OmegaConf.select(merged, key, throw_on_missing=False)
        if (isinstance(value, str) and value and not os.path.isabs(value) and not is_remote(value)
                and not (key == "train.resume" and value in ("none", "auto"))):
            OmegaConf.update(merged, key, os.path.normpath(base / value))


def check(config: RunConfig) -> None:
    """Values each section can check alone (paths, choices, ranges); data/model agreement is checked by the
    engine's preflight once the tokenizer and manifests are read, still before any process group."""
    m, d, o, t = config.model, config.data, config.optim, config.train

    def need(ok: bool, key: str, why: str) -> None:
        if not ok:
            raise RunConfigError(f"{key}: {why}")

    need((m.pretrained is None) != (m.config is None), "model.pretrained / model.config",
         "give exactly one: a checkpoint to fine-tune, or a model config to start from random weights")
    for key, value in (("model.pretrained", m.pretrained), ("model.config", m.config), ("model.tokenizer", m.tokenizer),
                       ("data.train", d.train), ("data.val", d.val), ("train.deepspeed", t.deepspeed)):
        remote = key.startswith("data.") and value is not None and is_remote(value)  # fetched (and checked) later
        need(value is None or remote or Path(value).exists(), key, f"{value}: no such file or directory")
    need(d.layout in ("padded", "packed"), "data.layout", f"expected padded or packed, got {d.layout!r}")
    need((d.layout == "packed") == (d.pack_length is not None), "data.pack_length",
         "set for, and only for, data.layout=packed (use null with padded)")
    need(m.head_impl in HEAD_IMPLS, "model.head_impl", f"expected one of {HEAD_IMPLS}, got {m.head_impl!r}")
    need(m.attn_implementation in ("auto", *ATTENTION_IMPLEMENTATIONS), "model.attn_implementation",
         f"expected one of {('auto', *ATTENTION_IMPLEMENTATIONS)}, got {m.attn_implementation!r}")
    need(m.audio_reduction in ("sum", "mean"), "model.audio_reduction",
         f"expected sum or mean, got {m.audio_reduction!r}")
    need(o.name in ("adamw", "sgd"), "optim.name", f"expected adamw or sgd, got {o.name!r}")
    need(t.precision in PRECISIONS, "train.precision", f"expected one of {PRECISIONS}, got {t.precision!r}")
    need(t.freeze in FREEZE_RECIPES, "train.freeze", f"expected one of {tuple(FREEZE_RECIPES)}, got {t.freeze!r}")
    need(t.resume in ("none", "auto") or Path(t.resume).is_dir(), "train.resume",
         f"expected none, auto or a checkpoint directory, got {t.resume!r}")
    for key, value, low in (("train.grad_accum", t.grad_accum, 1), ("train.epochs", t.epochs, 1),
                            ("train.keep_last", t.keep_last, 1), ("train.log_every", t.log_every, 1),
                            ("train.max_skipped_steps", t.max_skipped_steps, 1),
                            ("data.round_to", d.round_to, 1),
                            ("data.num_workers", d.num_workers, 0), ("optim.warmup_steps", o.warmup_steps, 0),
                            ("train.eval_every", t.eval_every, 0), ("train.save_every", t.save_every, 0)):
        need(value >= low, key, f"must be >= {low}, got {value}")
    need(t.peak_tflops is None or (math.isfinite(t.peak_tflops) and t.peak_tflops > 0), "train.peak_tflops",
         f"must be > 0 (or null: the GPU table, or measured on the CPU), got {t.peak_tflops}")
    need((d.max_tokens is None) != (d.batch_size is None), "data.max_tokens / data.batch_size",
         "give exactly one (the other null)")
    need((d.max_tokens or 1) >= 1 and (d.batch_size or 1) >= 1, "data.max_tokens / data.batch_size", "must be >= 1")
    lora = config.lora
    need(lora.rank >= 0, "lora.rank", f"must be >= 0 (0 = off), got {lora.rank}")
    if lora.rank:
        need(m.pretrained is not None, "lora.rank", "LoRA adapts a pretrained checkpoint: set model.pretrained")
        need(t.freeze == "none" and t.trainable is None, "lora.rank / train.freeze",
             "with LoRA, what trains beside the adapters is lora.train_in_full (leave train.freeze=none, "
             "train.trainable unset)")
        need(0 <= lora.dropout < 1, "lora.dropout", f"must be in [0, 1), got {lora.dropout}")
        # alpha 0 zeroes the adapters' output and their gradient: only the extras would train, silently
        need(lora.alpha is None or (math.isfinite(lora.alpha) and lora.alpha > 0), "lora.alpha",
             f"must be > 0 (or null: 2 × rank), got {lora.alpha}")
        need(lora.targets is not None or lora.preset in LORA_PRESETS, "lora.preset",
             f"expected one of {sorted(LORA_PRESETS)} (or lora.targets), got {lora.preset!r}")
    need(o.lr > 0 and 0 <= o.min_lr_ratio <= 1, "optim.lr / optim.min_lr_ratio", "need lr > 0, 0 <= ratio <= 1")


def deepspeed_config(config: RunConfig, world_size: int) -> dict[str, Any]:
    """The DeepSpeed JSON with our values filled in; a JSON value that contradicts the run config is refused."""
    t, o = config.train, config.optim
    path = Path(t.deepspeed)
    try:
        ds = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise RunConfigError(f"train.deepspeed {path}: not readable JSON ({exc})") from None
    if not isinstance(ds, dict):
        raise RunConfigError(f"train.deepspeed {path}: expected a JSON object")
    ours = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": t.grad_accum,
            "train_batch_size": world_size * t.grad_accum, "gradient_clipping": o.grad_clip}
    why = {"train_micro_batch_size_per_gpu": "batches are token budgets (data.max_tokens): the micro-batch is 1",
           "gradient_accumulation_steps": "set train.grad_accum in the run config",
           "train_batch_size": "it follows from world size × train.grad_accum",
           "gradient_clipping": "set optim.grad_clip in the run config"}
    for key, value in ours.items():
        if key in ds and ds[key] not in ("auto", value):
            raise RunConfigError(f"train.deepspeed {path}: {key}={ds[key]!r} contradicts the run config ({value}): "
                                 f"{why[key]}")
        ds[key] = value
    for key in ("optimizer", "scheduler"):
        if key in ds:
            raise RunConfigError(f"train.deepspeed {path}: remove {key!r}: the optimizer and schedule come from the "
                                 "run config's optim section")
    bf16 = bool(ds.get("bf16", {}).get("enabled", False))
    fp16 = bool(ds.get("fp16", {}).get("enabled", False))
    if fp16:
        raise RunConfigError(f"train.deepspeed {path}: fp16 is not supported (use bf16 or fp32)")
    if bf16 != (t.precision == "bf16"):
        raise RunConfigError(f"train.deepspeed {path}: bf16.enabled={bf16} contradicts train.precision="
                             f"{t.precision}")
    stage = ds.get("zero_optimization", {}).get("stage", 0)
    if stage not in (2, 3):
        raise RunConfigError(f"train.deepspeed {path}: zero_optimization.stage must be 2 or 3, got {stage}")
    return ds


def retire_switches(saved: dict) -> dict:
    """A saved config without the switches later versions retired: unknown keys saved as `false` (off, as every
    run that kept working saved them). Any other unknown key stays, and the caller refuses it."""
    fields = asdict(RunConfig())
    return {section: {k: v for k, v in values.items() if k in fields.get(section, {}) or v is not False}
            if isinstance(values, dict) else values for section, values in saved.items()}


# Train-section keys a resumed run may change (logging, stopping, where things go); the rest must match.
RESUMABLE = ("resume", "max_steps", "epochs", "log_every", "hooks", "trace_samples", "tensorboard", "eval_every",
             "max_skipped_steps", "slice_every", "save_every", "keep_last", "out_dir", "deepspeed", "peak_tflops")


def fingerprint(config: RunConfig | dict) -> str:
    """What a resumed run must share with the saved one (everything but the knobs that may change on resume); of a
    RunConfig or of a config dict as a run saved it (OUT/config.json, whichever version wrote it)."""
    import copy
    import hashlib

    d = copy.deepcopy(config) if isinstance(config, dict) else config.to_dict()
    for key in RESUMABLE:
        d["train"].pop(key, None)
    d["data"].pop("num_workers", None)
    d.pop("guards", None)
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]
