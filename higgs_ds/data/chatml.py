"""ChatML sample (upstream JSON) → text tokens + labels, one placeholder per audio item (docs/design.md §3).

Token for token the same as upstream `prepare_chatml_sample` (boson_multimodal dataset/chatml_dataset.py:307-452):
every piece is encoded on its own with `add_special_tokens=False`, exactly as upstream spells it. Samples that
upstream silently misaligns (audio in other roles, literal placeholder strings in text) raise `SampleError`.
Two upstream quirks are kept for parity: the first turn's prefix starts with <|begin_of_text|>, and the
`{recipient}<|recipient|>` tokens are always labelled, even in turns before `start_index`.
"""
from __future__ import annotations

import re
import reprlib  # bounded reprs: a value in an error message may be nested arbitrarily deep
from dataclasses import dataclass
from typing import Any, Callable, Mapping, NoReturn

import numpy as np

from .batch import IGNORE
from .sample import SampleError, TokenizedSample
from .tokens import AudioSettings, SpecialTokens

AUDIO_ROLES = ("user", "system", "assistant")  # also the roles of upstream's templates; others are kept, reported


@dataclass
class AudioRef:
    index: int  # 0.. over the sample (audio-in and audio-out numbered together)
    role: str  # "user" | "system" | "assistant"
    is_out: bool  # assistant audio (audio-out)
    item: dict  # the original content item (audio_url, raw_audio, offset, duration, ...)


@dataclass
class ChatMLTokens:
    input_ids: np.ndarray  # int32 [L], one <|AUDIO|>/<|AUDIO_OUT|> placeholder per audio item
    label_ids: np.ndarray  # int32 [L]
    audio: list[AudioRef]
    speaker: str | None
    unknown_roles: list[str]  # roles outside AUDIO_ROLES (text-only turns; upstream keeps them as spelled)


def _content_items(content: Any, where: str, fail: Callable[[str, str], NoReturn]) -> list[tuple[str, str, dict]]:
    """Normalise a message's content to [(field path, "text" | "audio", item)]."""
    if isinstance(content, (str, Mapping)):
        listed, paths = [content], [where]
    elif isinstance(content, list):
        listed, paths = content, [f"{where}[{i}]" for i in range(len(content))]
    else:
        fail(where, f"expected a string, a text/audio item or a list of them, got {type(content).__name__}")
    items = []
    for item, path in zip(listed, paths):
        if isinstance(item, str):
            items.append((path, "text", {"type": "text", "text": item}))
            continue
        if not isinstance(item, Mapping):
            fail(path, f"expected a string or a text/audio item, got {type(item).__name__}")
        # Upstream parses items with dacite, so a missing "type" means whichever dataclass the keys fit.
        kind = item.get("type", "audio" if "audio_url" in item else "text")
        if kind == "text":
            if not isinstance(item.get("text"), str):
                fail(path, f"text item needs a string 'text', got {type(item.get('text')).__name__}")
        elif kind == "audio":
            if not isinstance(item.get("audio_url"), str) and not isinstance(item.get("raw_audio"), str):
                fail(path, "audio item needs a string 'audio_url' or 'raw_audio'")
        else:
            fail(path, f"unknown content type {reprlib.repr(kind)} (expected 'text' or 'audio')")
        items.append((path, kind, dict(item)))
    return items


def tokenize_chatml(sample: Mapping, tokenizer, tokens: SpecialTokens, key: str = "?") -> ChatMLTokens:
    """Tokens and labels of one upstream ChatML sample; `key` names the sample in errors."""

    def fail(where: str, why: str) -> NoReturn:
        raise SampleError(key, where, why)

    def encode(text: str, where: str) -> list[int]:
        try:
            return tokenizer.encode(text, add_special_tokens=False)
        except (TypeError, UnicodeError) as exc:  # e.g. a lone surrogate ("\ud800") the Rust tokenizer refuses
            fail(where, f"text the tokenizer cannot encode ({type(exc).__name__}: {exc})")

    if not isinstance(sample, Mapping):
        fail("<sample>", f"expected a JSON object, got {type(sample).__name__}")
    messages = sample.get("messages")
    if not isinstance(messages, list) or not messages:
        fail("messages", "expected a non-empty list of messages")
    start_index = sample.get("start_index")
    if start_index is not None and (type(start_index) is not int or start_index < 0):
        fail("start_index", f"expected a non-negative int or null, got {reprlib.repr(start_index)}")
    speaker = sample.get("speaker")
    misc = sample.get("misc")
    if misc is not None and not isinstance(misc, Mapping):
        fail("misc", f"expected an object or null, got {type(misc).__name__}")
    speaker_field = "speaker"
    if speaker is None and misc is not None:
        speaker, speaker_field = misc.get("speaker"), "misc.speaker"
    if speaker is not None and not isinstance(speaker, str):
        fail(speaker_field, f"expected a string or null, got {type(speaker).__name__}")

    for turn, message in enumerate(messages):
        if not isinstance(message, Mapping):
            fail(f"messages[{turn}]", f"expected an object, got {type(message).__name__}")

    placeholders = {tokens.audio_in, tokens.audio_out}
    input_ids: list[int] = []
    label_ids: list[int] = []
    audio: list[AudioRef] = []

    def emit(ids: list[int], learnable: bool):
        input_ids.extend(ids)
        label_ids.extend(ids if learnable else [IGNORE] * len(ids))

    for turn, message in enumerate(messages):
        where = f"messages[{turn}]"
        role, recipient = message.get("role"), message.get("recipient")
        if not isinstance(role, str) or not role:
            fail(f"{where}.role", f"expected a non-empty string, got {reprlib.repr(role)}")
        if recipient is not None and not isinstance(recipient, str):
            fail(f"{where}.recipient", f"expected a string, got {type(recipient).__name__}")
        if recipient and role != "assistant":  # upstream tests truthiness: "" means no recipient
            fail(f"{where}.recipient", f"only an assistant turn may have a recipient, not {role!r}")
        if "content" not in message:
            fail(f"{where}.content", "missing")
        items = _content_items(message["content"], f"{where}.content", fail)
        trained = role == "assistant" and (start_index is None or turn >= start_index)

        bos = "<|begin_of_text|>" if turn == 0 else ""
        emit(encode(f"{bos}<|start_header_id|>{role}<|end_header_id|>\n\n", f"{where}.role"), False)
        if recipient:
            # upstream: labelled even before start_index
            emit(encode(f"{recipient}<|recipient|>", f"{where}.recipient"), True)

        for path, kind, item in items:
            if kind == "text":
                ids = encode(item["text"], path)
                if placeholders.intersection(ids):
                    fail(path, "text contains a literal <|AUDIO|>/<|AUDIO_OUT|> placeholder; it would shift "
                               "every later audio segment")
                emit(ids, trained)
                continue
            if role not in AUDIO_ROLES:
                fail(path, f"audio in a {role!r} turn (upstream drops it from the text but keeps the audio, "
                           f"misaligning every later segment); audio may only appear in {AUDIO_ROLES}")
            is_out = role == "assistant"
            if is_out:
                ids = encode("<|audio_out_bos|><|AUDIO_OUT|><|audio_eos|>", path)
            else:
                ids = encode("<|audio_bos|><|AUDIO|><|audio_eos|>", path)
            emit(ids, trained)
            audio.append(AudioRef(index=len(audio), role=role, is_out=is_out, item=item))

        next_is_assistant = turn + 1 < len(messages) and messages[turn + 1].get("role") == "assistant"
        emit(encode("<|eom_id|>" if role == "assistant" and next_is_assistant else "<|eot_id|>", where), trained)

    ids = np.asarray(input_ids, dtype=np.int32)
    found = int(tokens.is_placeholder(ids).sum())
    if found != len(audio):  # e.g. a role or recipient spelling a placeholder, or a tokenizer without them
        fail("messages", f"{found} <|AUDIO|>/<|AUDIO_OUT|> placeholders in the tokens but {len(audio)} audio items")
    unknown = sorted({m["role"] for m in messages} - set(AUDIO_ROLES))
    return ChatMLTokens(input_ids=ids, label_ids=np.asarray(label_ids, dtype=np.int32), audio=audio,
                        speaker=speaker, unknown_roles=unknown)


def sample_from_chatml(sample: Mapping, tokenizer, tokens: SpecialTokens, audio: AudioSettings,
                       load_codes: Callable[[AudioRef], np.ndarray], key: str,
                       meta: Mapping[str, Any] | None = None) -> TokenizedSample:
    """The one way from an upstream ChatML sample to a validated TokenizedSample (builder and tests alike):
    tokenize, load each audio item's codes [K, T] with `load_codes`, validate. Raises SampleError."""
    chat = tokenize_chatml(sample, tokenizer, tokens, key)
    codes = [load_codes(ref) for ref in chat.audio]
    out = TokenizedSample(key, chat.input_ids, chat.label_ids, codes, {**(meta or {}), "speaker": chat.speaker})
    if chat.unknown_roles:
        out.meta["unknown_roles"] = chat.unknown_roles
    try:
        out.validate(tokens, audio, vocab_size=len(tokenizer))
    except SampleError as exc:
        segment = re.fullmatch(r"audio_codes\[(\d+)\]", exc.field)
        if segment is None:
            raise
        ref = chat.audio[int(segment.group(1))]
        raise SampleError(key, f"audio[{ref.index}].audio_url={ref.item.get('audio_url')!r}", exc.why) from None
    return out
