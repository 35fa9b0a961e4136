"""The model `launch/generate.py SOURCE` generates with: a training run's newest complete checkpoint, one checkpoint
tag (both loaded as `launch/evaluate.py` loads them: consolidated from the ZeRO shards, a LoRA run's adapters merged
in), or an export of either layout with its tokenizer (`launch/export.py --layout both`'s folder: its port/)."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import torch

from ..model import HiggsAudioForTraining, load_model
from ..train import checkpointing
from ..train.evaluate import load_checkpoint
from ..train.export import TOKENIZER_FILES, is_model_dir
from ..vocabulary import Vocabulary, first_line, load_vocabulary

EXPECTED = ("expected a training run's out_dir, a checkpoint tag directory, or an export (config.json, safetensors "
            "and the tokenizer files)")


@dataclass(frozen=True)
class Loaded:
    model: HiggsAudioForTraining  # fp32, eval mode, no PEFT layers
    vocabulary: Vocabulary
    description: str  # what was loaded, in a few words


def load_source(source: Path) -> Loaded:
    """Raises ValueError, one line naming the path, for a SOURCE that is none of these or cannot be loaded."""
    source = Path(source)
    if not source.is_dir():
        raise ValueError(f"SOURCE {source}: {'not a directory' if source.exists() else 'not found'} ({EXPECTED})")
    export = next((p for p in (source, source / "port", source / "boson") if is_model_dir(p)), None)
    with _one_line(export or source):
        return _from_export(export) if export is not None else _from_checkpoint(source, _tag(source))


def _tag(source: Path) -> Path:
    """The complete, undamaged tag SOURCE names (itself, or its run's newest)."""
    if checkpointing.TAG.fullmatch(source.name) and not (source / checkpointing.COMPLETE).is_file():
        raise ValueError(f"SOURCE {source}: an incomplete checkpoint (no {checkpointing.COMPLETE}: its save never "
                         "finished)")
    try:
        tag = checkpointing.resolve(source)
    except ValueError:
        runs = (source / "checkpoints").is_dir() or source.name == "checkpoints"
        what = "in this run" if runs else f"or exported model here ({EXPECTED})"
        raise ValueError(f"SOURCE {source}: no complete checkpoint {what}") from None
    if problems := checkpointing.damage(tag):
        raise ValueError(f"SOURCE {source}: checkpoint {tag.name} is damaged: {'; '.join(problems)}")
    return tag


def _from_checkpoint(source: Path, tag: Path) -> Loaded:
    model, vocabulary, run = load_checkpoint(tag)
    lora = f", LoRA rank {run.lora.rank} merged into {run.model.pretrained}" if run.lora.rank else ""
    return Loaded(model, vocabulary, f"checkpoint {tag.name} of run {checkpointing.run_dir(tag)}{lora}")


def _from_export(path: Path) -> Loaded:
    if not any((path / name).is_file() for name in TOKENIZER_FILES[:2]):
        raise ValueError(f"SOURCE {path}: no tokenizer files ({' / '.join(TOKENIZER_FILES[:2])}) beside the weights "
                         "(launch/export.py copies them there)")
    vocabulary = load_vocabulary(path, path, "SOURCE", "SOURCE")
    model = load_model(path, dtype=torch.float32, tokenizer=vocabulary.tokenizer).eval()
    return Loaded(model, vocabulary, f"export {path} ({vocabulary.model_config.layout} layout)")


@contextlib.contextmanager
def _one_line(path: Path):
    """Whatever a load raises becomes one ValueError line naming `path` (ValueErrors name their file already)."""
    try:
        yield
    except ValueError:
        raise
    except Exception as exc:  # noqa: BLE001 - zero_to_fp32's, safetensors' ... errors: still one line
        raise ValueError(f"SOURCE {path}: cannot load it ({first_line(exc)})") from None
