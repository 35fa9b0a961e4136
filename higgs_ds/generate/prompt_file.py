"""The prompts file of `launch/generate.py`: JSONL, one prompt per line,

    {"id": "greeting", "messages": [...], "force_audio": true}

`messages` as in a training sample (data_tools/build_shards.py), up to before the assistant turn to generate; audio
items' `audio_url` relative to the file's folder (or absolute): codes (.npy, integer [K, T]) or, with --codec, an
audio file encoded as the shard builder encodes it. `force_audio` (default true) opens the turn with audio. The id
names the outputs (codes/<id>.npy), so it must be a plain file name. Every line is read and checked before anything
is generated; the first bad one is a ValueError of one line naming the file, the line and the prompt."""
from __future__ import annotations

import json
import re
from pathlib import Path

from data_tools.build.codec import CodecEncoder
from data_tools.build.samples import BadSample, read_codes

from ..data.sample import SampleError
from ..vocabulary import Vocabulary, first_line
from .prompts import Prompt, build_prompt

SAFE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def read_prompts(path: Path, vocabulary: Vocabulary, codec_dir: str | None = None) -> list[Prompt]:
    encoder = None

    def codec() -> CodecEncoder:  # loaded on the first audio file
        nonlocal encoder
        if encoder is None:
            encoder = CodecEncoder(codec_dir)
        return encoder

    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeError) as exc:
        raise ValueError(f"--prompts {path}: cannot read it ({first_line(exc)})") from None
    prompts, lines_of = [], {}
    for number, text in enumerate(lines, start=1):
        if not text.strip():
            continue
        where = f"{path} line {number}"
        try:
            line = json.loads(text)
        except (ValueError, RecursionError) as exc:
            raise ValueError(f"{where}: malformed JSON ({first_line(exc)})") from None
        if not isinstance(line, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(line).__name__}")
        key = line.get("id")
        if not isinstance(key, str) or not SAFE_ID.fullmatch(key):
            raise ValueError(f"{where}: id {key!r}: expected a plain file name (letters, digits, '.', '_', '-', "
                             "not starting with '.' or '-', at most 128): it names the outputs")
        where = f"{path} line {number} (prompt {key!r})"
        if key in lines_of:
            raise ValueError(f"{where}: duplicate id (line {lines_of[key]} has it too)")
        lines_of[key] = number
        force_audio = line.get("force_audio", True)
        if not isinstance(force_audio, bool):
            raise ValueError(f"{where}: force_audio: expected true or false, got {force_audio!r}")
        try:
            prompts.append(build_prompt(
                line, vocabulary, lambda ref: read_codes(ref, where, Path(path).parent, codec if codec_dir else None),
                key, force_audio))
        except SampleError as exc:
            raise ValueError(f"{where}: {exc.field}: {exc.why}") from None
        except BadSample as exc:  # names the line and the audio item already
            raise ValueError(str(exc)) from None
    if not prompts:
        raise ValueError(f"--prompts {path}: no prompt in it")
    return prompts
