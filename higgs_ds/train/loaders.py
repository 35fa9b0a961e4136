"""The run's data from its config: the collator, the train and val loaders, and the optimizer steps they make."""
from __future__ import annotations

from ..data.collator import Collator
from ..data.packing import ceil_div
from ..data.stream import ShardLoader
from ..data.tokens import AudioSettings, SpecialTokens
from .config import RunConfig


def make_collator(config: RunConfig, tokens: SpecialTokens, audio: AudioSettings) -> Collator:
    d = config.data
    return Collator(tokens, audio, layout=d.layout, round_to=d.round_to, pack_length=d.pack_length)


def make_loader(config: RunConfig, collator: Collator, split: str, rank: int, world_size: int,
                train: bool) -> ShardLoader:
    """Train: shuffled, `data.num_workers` workers, `train.epochs` epochs; val: in order, in this process, one."""
    d, t = config.data, config.train
    return ShardLoader(split, collator, rank=rank, world_size=world_size, num_workers=d.num_workers if train else 0,
                       seed=d.seed, max_tokens=d.max_tokens, batch_size=d.batch_size, shuffle=train and d.shuffle,
                       shuffle_buffer=d.shuffle_buffer, num_epochs=t.epochs if train else 1)


def steps_left(config: RunConfig, loader: ShardLoader, step: int = 0) -> int:
    """The run's last step: `step` plus the optimizer steps the loader's remaining micro-batches make (the last may
    be partial: no micro-batch is left out), capped by train.max_steps."""
    steps = step + ceil_div(loader.batches_left(config.train.epochs), config.train.grad_accum)
    return min(steps, config.train.max_steps) if config.train.max_steps is not None else steps
