"""LoRA target presets on the DualFFN decoder (issue 10, first part: which modules, checked; PEFT injects them).

Anchored patterns over HiggsAudioForTraining's module names, so that a text-MLP preset never also wraps
`audio_mlp` (a bare "gate_proj" would match both):
  attention            self_attn.{q,k,v,o}_proj
  attention_text_mlp   + mlp.{gate,up,down}_proj
  all_linear (default) + audio_mlp.{gate,up,down}_proj — every linear layer of the decoder, both DualFFN paths
The heads and embeddings are not nn.Linear LoRA targets (PEFT refuses our fused head): train them in full."""
from __future__ import annotations

import re

import torch

ATTENTION = r"^model\.layers\.\d+\.self_attn\.(q|k|v|o)_proj$"
TEXT_MLP = r"^model\.layers\.\d+\.mlp\.(gate|up|down)_proj$"
AUDIO_MLP = r"^model\.layers\.\d+\.audio_mlp\.(gate|up|down)_proj$"
PRESETS = {"attention": (ATTENTION,), "attention_text_mlp": (ATTENTION, TEXT_MLP),
           "all_linear": (ATTENTION, TEXT_MLP, AUDIO_MLP)}


def lora_targets(model: torch.nn.Module, preset: str | None = "all_linear", patterns: list[str] | None = None,
                 rank: int | None = None) -> list[str]:
    """The exact module names a preset (or explicit regexes) selects. Refused: a selection that names no module,
    a non-linear module, or a rank larger than a selected layer's smaller side (PEFT would accept it silently)."""
    if patterns is None:
        if preset not in PRESETS:
            raise ValueError(f"lora preset {preset!r}: expected one of {sorted(PRESETS)}")
        patterns = list(PRESETS[preset])
    compiled = [re.compile(p) for p in patterns]
    chosen = [(name, module) for name, module in model.named_modules() if any(p.search(name) for p in compiled)]
    if not chosen:
        raise ValueError(f"lora targets {patterns}: no module of the model matches (names look like "
                         "model.layers.0.self_attn.q_proj, model.layers.0.audio_mlp.gate_proj)")
    for name, module in chosen:
        if not isinstance(module, torch.nn.Linear):
            raise ValueError(f"lora target {name} is a {type(module).__name__}, not a Linear layer")
        if rank is not None and rank > min(module.in_features, module.out_features):
            raise ValueError(f"lora rank {rank} is larger than {name}'s width "
                             f"({module.in_features} → {module.out_features})")
    return [name for name, _ in chosen]


def inject_lora(model: torch.nn.Module, targets: list[str], rank: int, alpha: float, dropout: float = 0.0):
    """PEFT's LoRA layers on exactly `targets` (in place); only the adapters require grad afterwards."""
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets)
    for param in model.parameters():
        param.requires_grad_(False)
    return inject_adapter_in_model(config, model)
