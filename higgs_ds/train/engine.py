"""The model under DeepSpeed ZeRO: built partitioned (ZeRO-3) or whole (ZeRO-2), pretrained weights streamed in,
LoRA adapters or a freeze recipe applied, the optimizer's decay groups, the warmup-cosine schedule, and
`deepspeed.initialize`. At another world size than the checkpoint's, DeepSpeed loads the universal checkpoint."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch

from ..model import HiggsAudioForTraining, LossConfig
from .components import apply_freeze, make_optimizer, param_groups, warmup_cosine
from .lora import apply_lora
from .preflight import Setup
from .weights import load_pretrained


@dataclass
class Engine:
    engine: Any  # deepspeed.DeepSpeedEngine: forward, backward, step, save/load_checkpoint
    optimizer: Any  # DeepSpeed's ZeRO optimizer around ours
    schedule: torch.optim.lr_scheduler.LambdaLR  # stepped by DeepSpeed after each applied optimizer step
    lr_factor: "WarmupCosine"  # the schedule's multiplier after n applied steps
    device: torch.device
    trainable: list[str]  # names of the trained parameters


def device_of_this_rank() -> torch.device:
    import deepspeed

    return torch.device(deepspeed.get_accelerator().device_name(), int(os.environ.get("LOCAL_RANK", 0)))


def build_model(setup: Setup, rank: int) -> tuple[HiggsAudioForTraining, list[str]]:
    """The model with its starting weights and what trains: the same random initialisation on every rank
    (model.init_seed), pretrained weights streamed in, then LoRA (outside zero.Init, after the weights) or a freeze
    recipe."""
    import deepspeed

    m, t = setup.config.model, setup.config.train
    torch.manual_seed(m.init_seed)
    kwargs = dict(loss_config=LossConfig(m.text_weight, m.audio_weight, m.audio_reduction),
                  attn_implementation=m.attn_implementation, head_impl=m.head_impl)
    if setup.zero3:
        with deepspeed.zero.Init(config_dict_or_path=setup.ds):
            model = HiggsAudioForTraining(setup.model_config, **kwargs)
    else:
        model = HiggsAudioForTraining(setup.model_config, **kwargs)
    if m.pretrained is not None:
        load_pretrained(model, m.pretrained, setup.model_config, rank, setup.zero3)
    lora = setup.config.lora
    trainable = apply_lora(model, lora) if lora.rank else apply_freeze(model, t.freeze, t.trainable)
    if m.activation_checkpointing:
        model.gradient_checkpointing_enable()
    return model, trainable


def build_engine(setup: Setup, model: HiggsAudioForTraining, trainable: list[str], total_steps: int,
                 saved_world: int) -> Engine:
    """`deepspeed.initialize` with our optimizer and schedule; `saved_world`: the world size of the checkpoint the
    run resumes from (another than this one: DeepSpeed's universal checkpoint re-partitions model and optimizer)."""
    import deepspeed
    import torch.distributed as dist

    o, ds = setup.config.optim, dict(setup.ds)
    device = device_of_this_rank()
    if saved_world != dist.get_world_size():
        ds["checkpoint"] = {**ds.get("checkpoint", {}), "load_universal": True}
    optimizer, extra = make_optimizer(param_groups(model, o.weight_decay), o, ds, device.type)
    ds.update(extra)

    lr_factor = WarmupCosine(o.warmup_steps, total_steps, o.min_lr_ratio)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    engine, optimizer, _, schedule = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=schedule,
                                                          config=ds)
    return Engine(engine, optimizer, schedule, lr_factor, device, trainable)


class WarmupCosine:
    """The schedule's multiplier (components.warmup_cosine) over `total_steps`, which a resume at another world
    size may change (the rest of the data makes another number of steps)."""

    def __init__(self, warmup_steps: int, total_steps: int, min_ratio: float):
        self.warmup_steps, self.total_steps, self.min_ratio = warmup_steps, total_steps, min_ratio

    def __call__(self, step: int) -> float:
        return warmup_cosine(step, self.warmup_steps, self.total_steps, self.min_ratio)


def set_schedule(engine: Engine, applied_steps: int, total_steps: int) -> None:
    """Put the schedule where `applied_steps` optimizer steps leave it (a skipped step does not advance it), over a
    run of `total_steps`."""
    engine.lr_factor.total_steps = total_steps
    lrs = [base * engine.lr_factor(applied_steps) for base in engine.schedule.base_lrs]
    for group, lr in zip(engine.optimizer.param_groups, lrs):
        group["lr"] = lr
    engine.schedule.last_epoch, engine.schedule._last_lr = applied_steps, lrs
