"""ChatML → tokens: one test per masking rule of docs/design.md §3; every rejection names the sample and field."""
from __future__ import annotations

import copy

import numpy as np
import pytest

from higgs_ds.data.chatml import AudioRef, SampleError, tokenize_chatml

from higgs_ds.data.batch import IGNORE


def audio(name: str) -> dict:
    return {"type": "audio", "audio_url": f"{name}.npy"}


def expected(tokenizer, pieces: list[tuple[str, bool]]) -> tuple[np.ndarray, np.ndarray]:
    """Tokens and labels of (text, learnable) pieces, each encoded on its own like upstream."""
    ids, labels = [], []
    for text, learnable in pieces:
        piece = tokenizer.encode(text, add_special_tokens=False)
        ids += piece
        labels += piece if learnable else [IGNORE] * len(piece)
    return np.array(ids), np.array(labels)


def check(tokenizer, tokens, sample: dict, pieces: list[tuple[str, bool]]):
    out = tokenize_chatml(sample, tokenizer, tokens, key="k")
    ids, labels = expected(tokenizer, pieces)
    assert out.input_ids.dtype == np.int32 and out.label_ids.dtype == np.int32
    np.testing.assert_array_equal(out.input_ids, ids)
    np.testing.assert_array_equal(out.label_ids, labels)
    return out


def header(role: str, first: bool = False) -> tuple[str, bool]:
    return (("<|begin_of_text|>" if first else "") + f"<|start_header_id|>{role}<|end_header_id|>\n\n", False)


def test_role_headers_and_prompt_text_are_unlabelled(tokenizer, tokens):
    sample = {"messages": [{"role": "system", "content": "Speak in a calm voice."},
                           {"role": "user", "content": "Hello world."},
                           {"role": "assistant", "content": "Hi."}]}
    out = check(tokenizer, tokens, sample, [
        header("system", first=True), ("Speak in a calm voice.", False), ("<|eot_id|>", False),
        header("user"), ("Hello world.", False), ("<|eot_id|>", False),
        header("assistant"), ("Hi.", True), ("<|eot_id|>", True)])
    # Only turn 0 carries <|begin_of_text|>.
    assert (out.input_ids == tokens.begin_of_text).sum() == 1 and out.input_ids[0] == tokens.begin_of_text
    assert (out.input_ids == tokens.start_header).sum() == 3


def test_assistant_text_labelled_only_from_start_index(tokenizer, tokens):
    sample = {"start_index": 3, "messages": [
        {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Count."}, {"role": "assistant", "content": "0123"}]}
    check(tokenizer, tokens, sample, [
        header("user", first=True), ("Hi", False), ("<|eot_id|>", False),
        header("assistant"), ("Hello!", False), ("<|eot_id|>", False),
        header("user"), ("Count.", False), ("<|eot_id|>", False),
        header("assistant"), ("0123", True), ("<|eot_id|>", True)])


def test_audio_in_placeholders_unlabelled_in_user_and_system(tokenizer, tokens):
    sample = {"messages": [{"role": "system", "content": [audio("ref"), "Use this voice."]},
                           {"role": "user", "content": ["Transcribe:", audio("a"), audio("b")]},
                           {"role": "assistant", "content": "ok"}]}
    out = check(tokenizer, tokens, sample, [
        header("system", first=True), ("<|audio_bos|><|AUDIO|><|audio_eos|>", False), ("Use this voice.", False),
        ("<|eot_id|>", False), header("user"), ("Transcribe:", False),
        ("<|audio_bos|><|AUDIO|><|audio_eos|>", False), ("<|audio_bos|><|AUDIO|><|audio_eos|>", False),
        ("<|eot_id|>", False), header("assistant"), ("ok", True), ("<|eot_id|>", True)])
    assert out.audio == [AudioRef(0, "system", False, audio("ref")), AudioRef(1, "user", False, audio("a")),
                         AudioRef(2, "user", False, audio("b"))]


def test_audio_out_tokens_labelled_by_start_index(tokenizer, tokens):
    """Voice cloning: the reference answer (turn 1) is trained on unless start_index excludes it."""
    messages = [{"role": "user", "content": "Hello."}, {"role": "assistant", "content": audio("ref")},
                {"role": "user", "content": "Again."}, {"role": "assistant", "content": audio("out")}]
    out_piece = "<|audio_out_bos|><|AUDIO_OUT|><|audio_eos|>"
    for start_index, ref_trained in ((None, True), (3, False), (1, True)):
        sample = {"messages": messages, "start_index": start_index}
        out = check(tokenizer, tokens, sample, [
            header("user", first=True), ("Hello.", False), ("<|eot_id|>", False),
            header("assistant"), (out_piece, ref_trained), ("<|eot_id|>", ref_trained),
            header("user"), ("Again.", False), ("<|eot_id|>", False),
            header("assistant"), (out_piece, True), ("<|eot_id|>", True)])
        assert [(a.index, a.role, a.is_out) for a in out.audio] == [(0, "assistant", True), (1, "assistant", True)]


def test_eom_between_consecutive_assistant_turns_else_eot(tokenizer, tokens):
    sample = {"start_index": 2, "messages": [
        {"role": "user", "content": "Go."}, {"role": "assistant", "content": "a"},
        {"role": "assistant", "content": "b"}, {"role": "assistant", "content": "c"},
        {"role": "user", "content": "x"}, {"role": "assistant", "content": "d"}]}
    check(tokenizer, tokens, sample, [
        header("user", first=True), ("Go.", False), ("<|eot_id|>", False),
        header("assistant"), ("a", False), ("<|eom_id|>", False),
        header("assistant"), ("b", True), ("<|eom_id|>", True),
        header("assistant"), ("c", True), ("<|eot_id|>", True),
        header("user"), ("x", False), ("<|eot_id|>", False),
        header("assistant"), ("d", True), ("<|eot_id|>", True)])


def test_recipient_tokens_always_labelled(tokenizer, tokens):
    """Upstream quirk kept for parity: `{recipient}<|recipient|>` is labelled even before start_index."""
    sample = {"start_index": 3, "messages": [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "recipient": "search", "content": "today"},
        {"role": "user", "content": "sunny"}, {"role": "assistant", "recipient": "", "content": "Sunny."}]}
    out = check(tokenizer, tokens, sample, [
        header("user", first=True), ("Weather?", False), ("<|eot_id|>", False),
        header("assistant"), ("search<|recipient|>", True), ("today", False), ("<|eot_id|>", False),
        header("user"), ("sunny", False), ("<|eot_id|>", False),
        header("assistant"), ("Sunny.", True), ("<|eot_id|>", True)])
    assert (out.input_ids == tokens.recipient).sum() == 1  # "" means no recipient


def test_content_forms_and_empty_text(tokenizer, tokens):
    sample = {"messages": [
        {"role": "user", "content": ["Hello ", {"type": "text", "text": "world"}, {"text": ""}, " !"]},
        {"role": "assistant", "content": {"text": ""}},
        {"role": "assistant", "content": {"audio_url": "x.npy", "duration": 1.0}}]}
    out = check(tokenizer, tokens, sample, [
        header("user", first=True), ("Hello ", False), ("world", False), (" !", False), ("<|eot_id|>", False),
        header("assistant"), ("<|eom_id|>", True),
        header("assistant"), ("<|audio_out_bos|><|AUDIO_OUT|><|audio_eos|>", True), ("<|eot_id|>", True)])
    assert out.audio[0].item == {"audio_url": "x.npy", "duration": 1.0}


def test_speaker_from_field_or_misc(tokenizer, tokens):
    messages = [{"role": "user", "content": "Hi"}]
    assert tokenize_chatml({"messages": messages}, tokenizer, tokens).speaker is None
    assert tokenize_chatml({"messages": messages, "speaker": "a", "misc": {"speaker": "b"}},
                           tokenizer, tokens).speaker == "a"
    assert tokenize_chatml({"messages": messages, "misc": {"speaker": "b"}}, tokenizer, tokens).speaker == "b"


def test_input_sample_not_modified(tokenizer, tokens):
    sample = {"start_index": 1, "messages": [{"role": "user", "content": [{"audio_url": "a.npy"}, "hi"]},
                                             {"role": "assistant", "content": audio("b")}]}
    before = copy.deepcopy(sample)
    out = tokenize_chatml(sample, tokenizer, tokens)
    out.audio[0].item["audio_url"] = "changed"
    assert sample == before


USER = {"role": "user", "content": "Hi"}


@pytest.mark.parametrize("sample, field, why", [
    ({"messages": [USER, {"role": "scene", "content": [audio("a")]}]}, "messages[1].content[0]", "audio in a 'scene'"),
    ({"messages": [{"role": "user", "content": "say <|AUDIO|> now"}, {"role": "assistant", "content": audio("a")}]},
     "messages[0].content", "literal"),
    ({"messages": [USER, {"role": "assistant", "content": ["x", "<|AUDIO_OUT|>"]}]}, "messages[1].content[1]",
     "literal"),
    ({"messages": [{"role": "user<|AUDIO|>", "content": "Hi"}]}, "messages", "placeholders"),
    ({"messages": [{"role": "user", "content": {"type": "image", "url": "x"}}]}, "messages[0].content",
     "unknown content type 'image'"),
    ({"messages": [{"role": "user", "content": [{"type": "video"}]}]}, "messages[0].content[0]", "unknown"),
    ({"conversation": []}, "messages", "non-empty list"),
    ({"messages": []}, "messages", "non-empty list"),
    ({"messages": [{"role": "user", "content": {"type": "text", "text": 3}}]}, "messages[0].content", "string 'text'"),
    ({"messages": [{"role": "user", "content": [None]}]}, "messages[0].content[0]", "NoneType"),
    ({"messages": [{"role": "user", "content": 7}]}, "messages[0].content", "int"),
    ({"messages": [{"role": "user"}]}, "messages[0].content", "missing"),
    ({"messages": [{"content": "x"}]}, "messages[0].role", "non-empty string"),
    ({"messages": ["hi"]}, "messages[0]", "expected an object"),
    ({"messages": [{"role": "user", "recipient": "tool", "content": "x"}]}, "messages[0].recipient", "assistant"),
    ({"messages": [{"role": "assistant", "recipient": 3, "content": "x"}]}, "messages[0].recipient", "string"),
    ({"messages": [{"role": "assistant", "content": {"type": "audio"}}]}, "messages[0].content", "audio_url"),
    ({"messages": [USER], "start_index": "2"}, "start_index", "non-negative int"),
    ({"messages": [USER], "start_index": 1.0}, "start_index", "non-negative int"),
    ({"messages": [USER], "start_index": True}, "start_index", "non-negative int"),
    ({"messages": [USER], "start_index": -1}, "start_index", "non-negative int"),
    ({"messages": [USER], "misc": "spk"}, "misc", "object"),
    ({"messages": [USER], "speaker": 5}, "speaker", "string"),
])
def test_rejections_name_sample_and_field(tokenizer, tokens, sample, field, why):
    with pytest.raises(SampleError) as err:
        tokenize_chatml(sample, tokenizer, tokens, key="bad_sample_7")
    assert str(err.value).startswith(f"sample 'bad_sample_7': {field}: ")
    assert why in str(err.value)
