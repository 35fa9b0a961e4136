"""What tokens mean for a run: tokenizer → model config → special tokens → the data fingerprint the shards carry.

The trainer's preflight, evaluation, export and the shard builder load it the same way, here. Every failure is one
`VocabularyError` line that names the option the user gave (`--tokenizer`, `model.tokenizer`, ...) and the path."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .data.shards import data_fingerprint
from .data.tokens import SpecialTokens
from .model_config import ConfigError, HiggsModelConfig, read_model_config


class VocabularyError(ValueError):
    """A tokenizer or model config that cannot be used; the message is one line naming the option and path."""


@dataclass(frozen=True)
class Vocabulary:
    tokenizer: Any
    model_config: HiggsModelConfig
    tokens: SpecialTokens

    def fingerprint(self) -> dict[str, Any]:
        """What shards built with this vocabulary record in their manifest (checked by `check_fingerprint`)."""
        return data_fingerprint(self.tokenizer, self.tokens, self.model_config.audio)


def exception_name(exc: BaseException) -> str:
    """The first public class name (numpy's _ArrayMemoryError → MemoryError)."""
    return next(c.__name__ for c in type(exc).__mro__ if not c.__name__.startswith("_"))


def first_line(exc: BaseException) -> str:
    """An exception as one line: its public class name and its message's first line."""
    lines = str(exc).strip().splitlines()
    return f"{exception_name(exc)}: {lines[0].strip() if lines else ''}"


def load_tokenizer(directory: str | Path, option: str = "--tokenizer"):
    """A tokenizer directory (save_pretrained) → the tokenizer."""
    path = Path(directory)
    if not path.is_dir():
        why = "not a directory" if path.exists() else "not found"
        raise VocabularyError(f"{option} {directory}: {why} (expected a tokenizer directory, as written by "
                              "save_pretrained)")
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path))
    except Exception as exc:  # noqa: BLE001 - transformers raises OSError, ValueError, tokenizers' Exception ...
        raise VocabularyError(f"{option} {directory}: cannot load a tokenizer ({first_line(exc)})") from None


def load_vocabulary(tokenizer: str | Path, model: str | Path, tokenizer_option: str = "--tokenizer",
                    model_option: str = "--model-config") -> Vocabulary:
    """`tokenizer`: a tokenizer directory; `model`: a checkpoint directory or config.json (either layout). A
    tokenizer without Higgs's special tokens is named as such before the model config is read."""
    loaded = load_tokenizer(tokenizer, tokenizer_option)
    try:
        SpecialTokens.from_tokenizer(loaded)
    except ValueError as exc:
        raise VocabularyError(f"{tokenizer_option} {tokenizer}: {exc}") from None
    try:
        config = read_model_config(model, loaded)
    except ConfigError as exc:  # names the file and the field
        raise VocabularyError(f"{model_option}: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - still one line
        raise VocabularyError(f"{model_option} {model}: cannot read the model config ({first_line(exc)})") from None
    try:
        tokens = SpecialTokens.from_tokenizer(loaded, pad_token_id=config.pad_token_id)
    except ValueError as exc:
        raise VocabularyError(f"{tokenizer_option} {tokenizer}: {exc}") from None
    return Vocabulary(loaded, config, tokens)
