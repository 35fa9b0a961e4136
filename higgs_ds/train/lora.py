"""LoRA on the DualFFN decoder: target presets (which modules, checked), PEFT injection, merge and adapter export.

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
    modules = list(model.named_modules())
    chosen = [(name, module) for name, module in modules if any(p.search(name) for p in compiled)]
    # Each pattern must name something: a typo beside a good pattern would otherwise adapt less than asked, quietly.
    idle = [p.pattern for p in compiled if not any(p.search(name) for name, _ in modules)]
    if idle:
        raise ValueError(f"lora targets {idle}: no module of the model matches (names look like "
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


# ------------------------------------------------------------------------------------------------ the run's LoRA

ADAPTER = ".lora_"  # PEFT's parameter names: <module>.lora_A.default.weight, <module>.lora_B.default.weight


def alpha_of(section) -> float:
    return section.alpha if section.alpha is not None else 2.0 * section.rank


def select(model: torch.nn.Module, section) -> tuple[list[str], list[str]]:
    """The run's LoRA target modules and the parameter names trained in full beside them (both checked)."""
    targets = lora_targets(model, section.preset, section.targets, section.rank)
    names = [name for name, _ in model.named_parameters()]
    extras = []
    for pattern in section.train_in_full:
        found = [name for name in names if re.search(pattern, name)]
        if not found:
            raise ValueError(f"lora.train_in_full {pattern!r}: no parameter of the model matches (names look like "
                             f"{names[0]}, {names[-1]})")
        extras += [name for name in found if name not in extras]
    # A LoRA target's weight becomes <module>.base_layer.weight (frozen) once PEFT wraps it: it cannot also train
    # in full under its old name.
    both = sorted(set(extras) & {f"{t}.{kind}" for t in targets for kind in ("weight", "bias")})
    if both:
        raise ValueError(f"lora.train_in_full names parameters of LoRA target modules ({both[:3]}"
                         f"{' …' if len(both) > 3 else ''}): adapt them or train them in full, not both")
    return targets, extras


def apply_lora(model: torch.nn.Module, section) -> list[str]:
    """Inject the run's adapters (after the pretrained weights are in) and leave trainable exactly the adapters and
    `train_in_full`; returns the trainable parameter names. Under ZeRO-3 call it outside `zero.Init`: PEFT's B = 0
    initialisation would act on an empty partition there; deepspeed.initialize partitions the new parameters."""
    targets, extras = select(model, section)
    inject_lora(model, targets, section.rank, alpha_of(section), section.dropout)
    for name, param in model.named_parameters():
        param.requires_grad_(ADAPTER in name or name in extras)
    return sorted(name for name, param in model.named_parameters() if param.requires_grad)


def split_adapter_state(state: dict) -> tuple[dict, dict, dict]:
    """A LoRA run's trained tensors → ({module: A}, {module: B}, {parameter: tensor trained in full})."""
    a, b, full = {}, {}, {}
    for key, value in state.items():
        if m := re.match(r"^(?P<module>.+)\.lora_(?P<which>[AB])\.default\.weight$", key):
            (a if m["which"] == "A" else b)[m["module"]] = value
        else:
            full[key] = value
    if a.keys() != b.keys():
        raise ValueError(f"adapter state: lora_A and lora_B name different modules ({sorted(a.keys() ^ b.keys())})")
    return a, b, full


class Merged:
    """A lazily merged weight (W + scaling · B A), computed when the export writes it; shape/dtype for planning."""

    def __init__(self, base, a: torch.Tensor, b: torch.Tensor, scaling: float, shape: tuple[int, ...]):
        self.base, self.a, self.b, self.scaling = base, a, b, scaling
        self.shape, self.dtype = torch.Size(shape), torch.float32

    def contiguous(self) -> torch.Tensor:
        base = self.base().float()
        return base + self.scaling * (_materialize(self.b).float() @ _materialize(self.a).float())


class Lazy:
    """A checkpoint tensor read when it is written (by default as fp32, like a full fine-tune's export)."""

    def __init__(self, read, shape: tuple[int, ...], dtype: torch.dtype = torch.float32):
        self.read, self.shape, self.dtype = read, torch.Size(shape), dtype

    def contiguous(self) -> torch.Tensor:
        return self.read().to(self.dtype).contiguous()


def _materialize(tensor) -> torch.Tensor:
    return tensor if isinstance(tensor, torch.Tensor) else tensor.contiguous()


def merged_state(pretrained, trained: dict, scaling: float) -> dict:
    """Port-layout full weights: the pretrained checkpoint's tensors (streamed, one at a time when written), each
    LoRA target merged with its adapter, the parameters trained in full replaced by their trained values."""
    from .weights import read_tensor, weight_plan

    a, b, full = split_adapter_state(trained)
    plan = weight_plan(pretrained)
    unknown = sorted((full.keys() | {f"{m}.weight" for m in a}) - plan.keys())
    if unknown:
        raise ValueError(f"adapter checkpoint names tensors the pretrained checkpoint {pretrained} lacks: {unknown}")
    state = {}
    for name, (sources, shape, _) in plan.items():
        module = name.removesuffix(".weight")
        read = (lambda sources=sources: read_tensor(sources))
        if name in full:
            state[name] = full[name]
        elif name.endswith(".weight") and module in a:
            state[name] = Merged(read, a[module], b[module], scaling, shape)
        else:
            state[name] = Lazy(read, shape)
    return state


def save_peft_adapter(trained: dict, out, section, base_model: str) -> None:
    """PEFT's format (adapter_config.json + adapter_model.safetensors) for transformers'
    HiggsAudioV2ForConditionalGeneration: our module names are the port's, so keys map one to one; the parameters
    trained in full go in as PEFT `modules_to_save`."""
    from pathlib import Path

    from peft import LoraConfig
    from safetensors.torch import save_file

    a, b, full = split_adapter_state(trained)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {f"base_model.model.{m}.lora_A.weight": _materialize(a[m]) for m in a}
    tensors.update({f"base_model.model.{m}.lora_B.weight": _materialize(b[m]) for m in b})
    tensors.update({f"base_model.model.{name}": _materialize(value) for name, value in full.items()})
    save_file({k: v.detach().float().contiguous().cpu() for k, v in tensors.items()},
              str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = LoraConfig(r=section.rank, lora_alpha=alpha_of(section), lora_dropout=section.dropout,
                        target_modules=sorted(a), modules_to_save=sorted({n.rsplit(".", 1)[0] for n in full}) or None,
                        base_model_name_or_path=base_model)
    config.save_pretrained(str(out))
