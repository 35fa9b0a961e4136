"""Training components, one job each: freezing recipes, optimizer parameter groups, the learning-rate schedule."""
from __future__ import annotations

import math
import re

import torch

# Trainable parameters per recipe (regexes over HiggsAudioForTraining's parameter names); "none" trains all.
RECIPES = {
    "none": (r".*",),
    # The audio path: DualFFN audio MLPs and their norms, the audio embedding and the audio head.
    "audio_only": (r"\.audio_mlp\.", r"\.audio_(input|post_attention)_layernorm\.", r"^model\.embed_audio_tokens\.",
                   r"^audio_lm_head\."),
    # The whole text path frozen except the text head (e.g. to adapt the output vocabulary only).
    "text_head_only": (r"^text_lm_head\.",),
}
NO_DECAY = (r"norm\.weight$", r"\.bias$", r"embed_tokens\.weight$", r"embed_audio_tokens\.weight$")


def trainable_names(names: list[str], recipe: str, patterns: list[str] | None = None) -> list[str]:
    """The names a recipe (or, when given, a list of regexes searched in each name) leaves trainable."""
    compiled = [re.compile(p) for p in (patterns if patterns is not None else RECIPES[recipe])]
    return [name for name in names if any(p.search(name) for p in compiled)]


def apply_freeze(model: torch.nn.Module, recipe: str, patterns: list[str] | None = None) -> list[str]:
    """requires_grad per recipe; returns the trainable names. A recipe that trains nothing is refused."""
    names = [name for name, _ in model.named_parameters()]
    keep = set(trainable_names(names, recipe, patterns))
    if not keep:
        raise ValueError(f"train.freeze={recipe} / train.trainable={patterns}: no parameter of this model would train")
    for name, param in model.named_parameters():
        param.requires_grad_(name in keep)
    return sorted(keep)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Trainable parameters in up to two groups: with weight decay, and without (norms, biases, embeddings). An
    empty group is left out: DeepSpeed drops it from the optimizer while a schedule built before would keep its
    learning rate, and the first step would fail (a recipe that trains only decayed or only undecayed weights)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if any(re.search(p, name) for p in NO_DECAY) else decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [group for group in groups if group["params"]]


def warmup_cosine(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """LR multiplier: linear warmup over `warmup` steps, then cosine from 1 to `min_ratio` at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def make_optimizer(groups: list[dict], optim, ds: dict, device_type: str) -> tuple[torch.optim.Optimizer, dict]:
    """The optimizer for the run, and DeepSpeed JSON additions it needs. plain SGD; AdamW as DeepSpeed's CPU Adam
    when the optimizer is offloaded, DeepSpeed's FusedAdam on CUDA, else torch's AdamW (this CPU machine)."""
    from deepspeed.ops import adam

    extra = {}
    betas = (optim.beta1, optim.beta2)
    if optim.name == "sgd":
        optimizer, extra["zero_allow_untested_optimizer"] = torch.optim.SGD(groups, lr=optim.lr), True
    elif ds.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none") != "none":
        optimizer = adam.DeepSpeedCPUAdam(groups, lr=optim.lr, betas=betas, eps=optim.eps)
    elif device_type == "cuda":
        optimizer = adam.FusedAdam(groups, lr=optim.lr, betas=betas, eps=optim.eps)
    else:
        optimizer = torch.optim.AdamW(groups, lr=optim.lr, betas=betas, eps=optim.eps)
        extra["zero_allow_untested_optimizer"] = True
    return optimizer, extra
