"""Generation (higgs_ds.generate) against transformers' own generate, the no-cache loop, one-at-a-time decoding,
upstream's delay/eos rules and the training data's own layout."""
from unittest import mock

import numpy as np
import pytest
import torch
from transformers import HiggsAudioV2ForConditionalGeneration

from higgs_ds.data.chatml import sample_from_chatml
from higgs_ds.data.collator import Collator
from higgs_ds.generate import STOPS, SamplingConfig, build_prompt, generate, revert_delay
from higgs_ds.generate import decode as decode_module
from higgs_ds.model import HiggsAudioForTraining
from higgs_ds.testing.port import port_generate
from higgs_ds.vocabulary import Vocabulary
from helpers import randomize, tiny_config, tiny_tokenizer, tiny_tokens

K = 8


def vocabulary_of(model) -> Vocabulary:
    return Vocabulary(tiny_tokenizer(), model.model_config, tiny_tokens())


def tiny_model(codes: int, seed: int = 1) -> HiggsAudioForTraining:
    model = HiggsAudioForTraining(tiny_config(num_codebooks=K, codes=codes))
    randomize(model, seed)
    return model.eval()


def messages(kind: str, i: int = 0) -> dict:
    """TTS, voice cloning (a reference clip in an earlier assistant turn), multi-turn, audio in the user turn."""
    words = " ".join(["hello", "there", "general", "audio", "model"][: 2 + i % 4])
    clip = {"type": "audio", "audio_url": f"clip{i}.npy"}
    return {"messages": {
        "tts": [{"role": "system", "content": "Generate audio following instruction."},
                {"role": "user", "content": words}],
        "clone": [{"role": "user", "content": "say it"}, {"role": "assistant", "content": clip},
                  {"role": "user", "content": words}],
        "multi": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                  {"role": "user", "content": [clip, words]}],
    }[kind]}


def prompts_for(model, kinds=("tts", "clone", "multi"), seed: int = 0, text_first: bool = False):
    vocabulary = vocabulary_of(model)
    stream_bos = model.model_config.audio.stream_bos_id
    g = torch.Generator().manual_seed(seed)
    load = lambda ref: torch.randint(0, stream_bos, (K, 3 + 2 * ref.index + seed % 3), generator=g).numpy()
    return [build_prompt(messages(kind, i), vocabulary, load, f"{kind}{i}", force_audio=not (text_first and i % 2))
            for i, kind in enumerate(kinds)]


def assert_same(a, b):
    assert [x.id for x in a] == [y.id for y in b]
    for x, y in zip(a, b):
        assert x.text_ids == y.text_ids, x.id
        assert x.stop == y.stop and x.columns == y.columns, x.id
        assert len(x.segments) == len(y.segments) and all(torch.equal(s, t) for s, t in zip(x.segments, y.segments))
        np.testing.assert_array_equal(x.codes, y.codes)


# ------------------------------------------------------------------------------------------------ prompts, delay


def test_a_prompt_is_the_training_samples_prefix():
    """The prompt's positions equal the training Batch of the full sample (answer included) up to the answer's
    first audio column: same ids, audio positions and codes."""
    model = tiny_model(1024)
    vocabulary = vocabulary_of(model)
    g = torch.Generator().manual_seed(0)
    clips = {f"clip{i}.npy": torch.randint(0, 1024, (K, 4 + i), generator=g).numpy() for i in range(3)}
    load = lambda ref: clips[ref.item["audio_url"]]
    prompt_messages = messages("clone", 1)
    full = {"messages": prompt_messages["messages"] + [
        {"role": "assistant", "content": {"type": "audio", "audio_url": "clip2.npy"}}]}
    prompt = build_prompt(prompt_messages, vocabulary, load, "p")
    sample = sample_from_chatml(full, vocabulary.tokenizer, vocabulary.tokens, model.model_config.audio, load, "p")
    batch = Collator(vocabulary.tokens, model.model_config.audio)([sample])
    n = len(prompt)
    assert torch.equal(batch.input_ids[0, :n], prompt.input_ids)
    audio = batch.audio_in_mask[0] | batch.audio_out_mask[0]
    assert torch.equal(audio[:n], prompt.audio_mask)
    assert not audio[n - 1] and audio[n]  # the prompt ends with <|audio_out_bos|>, the answer's frames follow
    assert int(prompt.input_ids[-1]) == vocabulary.tokens.audio_out_bos
    codes = torch.cat([batch.audio_in_ids, batch.audio_out_ids], dim=1)[:, : prompt.audio_codes.shape[1]]
    # audio-in frames come first in the Batch's streams; in this prompt every clip is audio-out (assistant turns)
    assert torch.equal(batch.audio_out_ids[:, : prompt.audio_codes.shape[1]], prompt.audio_codes)
    assert codes.shape == prompt.audio_codes.shape


@pytest.mark.parametrize("frames", [1, 2, 7, 30])
def test_revert_delay_undoes_the_collators_delay_pattern(frames):
    tokens, audio = tiny_tokens(), tiny_model(1024).model_config.audio
    codes = np.random.default_rng(frames).integers(0, 1024, (K, frames))
    sample = sample_from_chatml({"messages": [{"role": "assistant", "content": {"type": "audio",
                                                                                "audio_url": "a"}}]},
                                tiny_tokenizer(), tokens, audio, lambda ref: codes, "s")
    delayed = Collator(tokens, audio)([sample]).audio_out_ids
    assert delayed.shape[1] == frames + K + 1
    np.testing.assert_array_equal(revert_delay(delayed, ended=True).numpy(), codes)
    # cut off before the ramp: the frames every codebook has reached
    cut = min(3, frames - 1)
    np.testing.assert_array_equal(revert_delay(delayed[:, : K + cut], ended=False).numpy(), codes[:, :cut])


# ------------------------------------------------------------------------------------------------ references


@pytest.fixture(scope="module")
def release_like():
    """8 codebooks of 1024 codes (the release's audio vocabulary) and the same weights in transformers' port."""
    model = tiny_model(1024)
    port = HiggsAudioV2ForConditionalGeneration(model.config, use_text_head=True).eval()
    port.load_state_dict(model.state_dict())
    return model, port


def test_greedy_audio_equals_transformers_generate(release_like):
    """TTS, voice-cloning and multi-turn prompts: the port's greedy columns, code for code, up to the first column
    holding a stream eos. These random weights first emit eos in a codebook c > 0 (a trained model ends codebook
    0 first): there upstream's rule, which we follow, sets codebooks 0..c to eos at once, while the port forces
    codebook 0 only from the next column on. That column differs in exactly those codebooks and nowhere else."""
    model, port = release_like
    eos = model.config.audio_stream_eos_id
    prompts = prompts_for(model, ("tts", "clone", "multi", "tts", "clone"))
    ours = generate(model, prompts, vocabulary_of(model).tokens, SamplingConfig(max_frames=40), batch_size=2)
    compared = parted = 0
    for prompt, mine in zip(prompts, ours):
        segment = mine.segments[0]  # 40 frames: 48 columns
        theirs = port_generate(port, prompt, segment.shape[1], do_sample=False)
        ends = (segment == eos).any(0).nonzero()
        first = int(ends[0]) if ends.numel() else segment.shape[1]
        assert torch.equal(segment[:, :first], theirs[:, :first]), prompt.id
        compared += first
        if first < segment.shape[1]:
            c = int((theirs[:, first] == eos).nonzero()[0])
            assert c > 0 and (segment[: c + 1, first] == eos).all(), prompt.id
            assert torch.equal(segment[c + 1:, first], theirs[c + 1:, first]), prompt.id
            parted += 1
    assert compared >= 150 and parted >= 1  # what these weights give: 3 full 40-column segments, 2 that part


def test_an_eos_in_codebook_0_ends_the_segment_as_the_port_does(release_like):
    """Codebook 0's stream-eos row made 1.01 × the row of the code it picks at column 12: from that column on it
    emits eos, and both ramps (ours, upstream's; the port's agrees when codebook 0 ends first) close the segment
    the same way: identical columns, then the port's one extra all-eos column; de-delayed, the same frames."""
    model, port = release_like
    prompt = prompts_for(model, ("clone",))[0]
    tokens = vocabulary_of(model).tokens
    before = generate(model, [prompt], tokens, SamplingConfig(max_frames=40))[0].segments[0]
    v, eos = model.config.codebook_size, model.config.audio_stream_eos_id
    state = {k: t.clone() for k, t in model.state_dict().items()}
    state["audio_lm_head.weight"][eos] = 1.01 * state["audio_lm_head.weight"][int(before[0, 12])]
    biased = tiny_model(1024)
    biased.load_state_dict(state)
    port_biased = HiggsAudioV2ForConditionalGeneration(model.config, use_text_head=True).eval()
    port_biased.load_state_dict(state)
    mine = generate(biased, [prompt], tokens, SamplingConfig(max_frames=60, max_text_tokens=3))[0]
    theirs = port_generate(port_biased, prompt, 60 + K, do_sample=False)
    segment = mine.segments[0]
    first = int((segment[0] == eos).nonzero()[0])
    assert first <= 12 and not (segment[1:, : first + 1] == eos).any()  # codebook 0 ended first
    assert segment.shape[1] == first + K and mine.text_ids[:2] == [tokens.audio_out, tokens.audio_eos]
    assert torch.equal(segment, theirs[:, : segment.shape[1]])
    assert (theirs[:, segment.shape[1]] == eos).all() and theirs.shape[1] == segment.shape[1] + 1
    assert mine.frames == first - 1 and mine.codes.shape == (K, first - 1)
    np.testing.assert_array_equal(mine.codes, revert_delay(theirs[:, :-1], ended=True).numpy())


def scripted(columns: list[list[int]]):
    """A `choose` that returns scripted audio columns (and the model's own argmax for text)."""
    script = iter(columns)

    def choose(self, logits, rows):
        if logits.dim() == 3:  # the audio head's [rows, K, V]
            return torch.tensor([next(script) for _ in rows], dtype=torch.long).view(len(rows), K)
        return logits.argmax(dim=-1)
    return mock.patch.object(decode_module._Decoder, "choose", choose)


@pytest.mark.parametrize("first_eos_codebook", [0, 3])
def test_the_eos_ramp_is_upstreams(first_eos_codebook):
    """Upstream (boson-multimodal `_sample_audio_tokens`): the bos ramp forces codebooks after the step count; at
    the first column with an eos (first codebook c) codebooks 0..c become eos, each later column forces codebooks
    [:K - r] with r = K - c - 1 counting down; the column where r reaches 0 is the segment's last, followed by
    <|audio_eos|>. Scripted head: every column samples code 5 except one eos at codebook c of column 10."""
    model = tiny_model(1024)
    tokens = vocabulary_of(model).tokens
    bos, eos, c = 1024, 1025, first_eos_codebook
    columns = [[5] * K for _ in range(40)]
    columns[9][c] = eos  # the 10th sampled column is column 10 of the segment (column 0 is the all-bos one)
    with scripted(columns):
        out = generate(model, prompts_for(model, ("tts",)), tokens, SamplingConfig(max_frames=40, max_text_tokens=1))
    segment = out[0].segments[0]
    expected = torch.full((K, 10 + K - c), 5)
    for j in range(expected.shape[1]):
        expected[j:, j] = bos  # column j: codebooks >= j still in the bos ramp (column 0 all bos)
    expected[: c + 1, 10] = eos
    for step, r in enumerate(range(K - c - 1, 0, -1), start=1):
        expected[: K - r, 10 + step] = eos
    assert torch.equal(segment, expected)
    assert out[0].text_ids[:2] == [tokens.audio_out, tokens.audio_eos]


# ------------------------------------------------------------------------------------------------ the loop itself


@pytest.mark.parametrize("sampling", [SamplingConfig(max_frames=24, max_text_tokens=6),
                                      SamplingConfig(do_sample=True, temperature=0.8, top_k=20, top_p=0.9, seed=7,
                                                     max_frames=24, max_text_tokens=6)], ids=["greedy", "sampled"])
def test_the_kv_cache_equals_the_no_cache_loop_and_batches_equal_one_at_a_time(sampling):
    """Prompts of different lengths, some writing text before audio (force_audio off), 32-code codebooks so that
    segments end by eos and turns continue in text: cached batched == uncached == one prompt at a time."""
    model = tiny_model(32, seed=3)
    prompts = prompts_for(model, ("tts", "clone", "multi", "clone", "tts"), text_first=True)
    tokens = vocabulary_of(model).tokens
    batched = generate(model, prompts, tokens, sampling, batch_size=5)
    assert_same(batched, generate(model, prompts, tokens, sampling, batch_size=5, use_cache=False))
    assert_same(batched, generate(model, prompts, tokens, sampling, batch_size=1))
    assert_same(batched, generate(model, prompts[::-1], tokens, sampling, batch_size=2)[::-1])
    assert any(len(g.segments) for g in batched) and any(tokens.audio_eos in g.text_ids for g in batched)


def test_sampling_with_a_seed_is_reproducible_and_the_seed_matters():
    model = tiny_model(32, seed=3)
    prompts, tokens = prompts_for(model), vocabulary_of(model).tokens
    config = lambda seed: SamplingConfig(do_sample=True, seed=seed, max_frames=20, max_text_tokens=4)
    first = generate(model, prompts, tokens, config(1))
    assert_same(first, generate(model, prompts, tokens, config(1)))
    other = generate(model, prompts, tokens, config(2))
    assert any(not torch.equal(a.segments[0], b.segments[0]) for a, b in zip(first, other) if a.segments and
               b.segments and a.segments[0].shape == b.segments[0].shape)


def test_every_stop_is_what_its_name_says():
    """Across seeds and prompts each stop reason comes up, and each is consistent with the outputs."""
    model = tiny_model(32, seed=5)
    tokens = vocabulary_of(model).tokens
    with torch.no_grad():  # a random model rarely ends its turn: make <|eot_id|> likely where its logit is positive
        model.text_lm_head.weight[tokens.eot] *= 8
    seen = set()
    for seed in range(4):
        prompts = prompts_for(model, ("tts", "clone", "multi", "tts"), seed=seed, text_first=True)
        sampling = SamplingConfig(do_sample=True, seed=seed, max_frames=5, max_text_tokens=5)
        for g in generate(model, prompts, tokens, sampling, batch_size=4):
            assert g.stop in STOPS
            seen.add(g.stop)
            closed = [True] * len(g.segments)
            if g.stop == "max_frames":
                closed[-1] = False
            # written by generation, not chosen: <|AUDIO_OUT|> per segment, <|audio_eos|> per closed one
            text = len(g.text_ids) - len(g.segments) - sum(closed)
            assert text <= 5 and g.frames <= 5
            assert g.columns == sum(s.shape[1] for s in g.segments)
            if g.stop == "eos":
                assert g.text_ids[-1] in (tokens.eot, tokens.end_of_text)
            elif g.stop == "max_text_tokens":
                assert text == 5 and g.text_ids[-1] not in (tokens.eot, tokens.end_of_text)
            else:
                assert g.frames == 5 and g.text_ids[-1] == tokens.audio_out
            expected = [revert_delay(s, e) for s, e in zip(g.segments, closed)]
            np.testing.assert_array_equal(g.codes, torch.cat(expected, 1).numpy() if expected else
                                          np.zeros((K, 0), dtype=np.int64))
    assert seen == set(STOPS)


def test_bad_arguments_are_one_line_errors():
    model = tiny_model(32)
    tokens = vocabulary_of(model).tokens
    prompts = prompts_for(model, ("tts", "tts"))
    prompts[1].id = prompts[0].id
    with pytest.raises(ValueError, match="unique"):
        generate(model, prompts, tokens)
    with pytest.raises(ValueError, match="lockstep"):
        generate(model, prompts[:1], tokens, lockstep=True)
    for bad in (dict(temperature=0.0), dict(top_p=0.0), dict(top_k=-1), dict(max_frames=0), dict(seed=1.5)):
        with pytest.raises(ValueError, match="sampling: "):
            SamplingConfig(**bad)


def test_generation_leaves_the_model_as_it_found_it():
    """Training mode, attention implementation and gradients are restored (probes run inside training)."""
    model = tiny_model(32)
    model.train()
    model.config._attn_implementation = "flash_attention_2"  # the dispatch only: generation must use SDPA
    before = {k: v.clone() for k, v in model.state_dict().items()}
    seen = []
    real = decode_module._Decoder.forward

    def spy(self, inputs, cache=None):
        seen.append((self.model.config._attn_implementation, self.model.training, torch.is_grad_enabled()))
        return real(self, inputs, cache)

    with mock.patch.object(decode_module._Decoder, "forward", spy):
        generate(model, prompts_for(model, ("tts",)), vocabulary_of(model).tokens, SamplingConfig(max_frames=3))
    assert seen and set(seen) == {("sdpa", False, False)}
    assert model.training and model.config._attn_implementation == "flash_attention_2"
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
