"""Our model against transformers' port (same weights) and upstream's goldens; ZeRO-3 lockstep; checkpointing."""
from collections import Counter

import numpy as np
import pytest
import torch
from transformers import HiggsAudioV2ForConditionalGeneration

from higgs_ds.data.batch import Batch
from higgs_ds.model import HiggsAudioForTraining, LossConfig, load_model
from higgs_ds.testing.port import port_inputs
from helpers import (MODEL_GOLDENS, audio_in, audio_out, make_batch, random_codes, random_text, randomize, text,
                     tiny_config, tts_sample)


def two_row_batch(config, seed=0) -> Batch:
    """One sample per row (the port knows no packing), different lengths, audio-in and audio-out, right padding."""
    g = torch.Generator().manual_seed(seed)
    return make_batch([[tts_sample(g, config, prompt=7, frames=6, reference_frames=4, answer_text=3)],
                       [[text(random_text(g, 5)), text(random_text(g, 4), labelled=True),
                         audio_out(random_codes(g, config, 4)), text(random_text(g, 2), labelled=True)]]], config)


@pytest.fixture(scope="module")
def port_pair():
    config = tiny_config(num_codebooks=8, codes=1024)  # the release's 8 x 1026 audio vocabulary
    ours = HiggsAudioForTraining(config)
    randomize(ours)
    port = HiggsAudioV2ForConditionalGeneration(config, use_text_head=True)
    port.load_state_dict(ours.state_dict())  # identical names: the port layout is our native one
    return config, ours, port


def test_logits_match_the_port(port_pair):
    config, ours, port = port_pair
    batch = two_row_batch(config)
    theirs = port_inputs(batch, config)
    mine = ours.logits(**batch.model_inputs())
    with torch.no_grad():
        hidden = port.model(**{k: v for k, v in theirs.items() if k not in ("labels", "audio_labels")})
        hidden = hidden.last_hidden_state
    real = batch.attention_mask
    torch.testing.assert_close(mine.text[real], port.text_lm_head(hidden)[real])
    port_audio = port.audio_lm_head(hidden[batch.audio_out_mask]).view(-1, 8, 1026)
    torch.testing.assert_close(mine.audio, port_audio)
    assert mine.audio.shape == (batch.audio_out_ids.shape[1], 8, 1026)


def test_loss_and_gradients_match_the_port(port_pair):
    """Theirs: text CE mean + sum over codebooks of CE means, each shifted by ForCausalLMLoss."""
    config, ours, port = port_pair
    batch = two_row_batch(config, seed=1)
    ours.zero_grad(), port.zero_grad()
    mine = ours(**batch.model_inputs())
    theirs = port(**port_inputs(batch, config))
    torch.testing.assert_close(mine.loss, theirs.loss)
    mine.loss.backward()
    theirs.loss.backward()
    port_grads = dict(port.named_parameters())
    for name, param in ours.named_parameters():
        torch.testing.assert_close(param.grad, port_grads[name].grad, rtol=1e-4, atol=1e-6, msg=name)
    assert mine.text_tokens == 3 + 4 + 2  # each labelled token is predicted from the position before it


def golden_batch(npz, index: int) -> Batch:
    prefix = f"b{index}_batch_"
    return Batch(**{k[len(prefix):]: torch.from_numpy(npz[k]) for k in npz.files if k.startswith(prefix)})


@pytest.mark.parametrize("checkpoint", ["boson_tiny", "boson_tiny_split"])
def test_logits_match_upstream_goldens(checkpoint):
    """reference/make_model_goldens.py: upstream HiggsAudioModel on upstream-collated batches (left- and right-
    padded, audio-in, untrained reference audio, text-only rows). The split variant is sharded."""
    model = load_model(MODEL_GOLDENS / checkpoint).eval()
    npz = np.load(MODEL_GOLDENS / "batches.npz")
    for index in range(3):
        batch = golden_batch(npz, index)
        logits = model.logits(**batch.model_inputs())
        real = batch.attention_mask
        expected_text = torch.from_numpy(npz[f"b{index}_text_logits"])
        torch.testing.assert_close(logits.text[real], expected_text[real], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(logits.audio, torch.from_numpy(npz[f"b{index}_audio_logits"]), rtol=1e-4,
                                   atol=1e-4)


def lockstep_batches(config):
    g = torch.Generator().manual_seed(3)
    mixed = make_batch([[tts_sample(g, config, reference_frames=3)], [tts_sample(g, config)]], config)
    text_only = make_batch([[[text(random_text(g, 9)), text(random_text(g, 4), labelled=True)]]], config)
    audio_only = make_batch([[[audio_out(random_codes(g, config, 5))]], [[audio_in(random_codes(g, config, 2)),
                                                                          audio_out(random_codes(g, config, 3))]]],
                            config)
    assert text_only.audio_in_ids.shape[1] == text_only.audio_out_ids.shape[1] == 0
    assert not (~(audio_only.audio_in_mask | audio_only.audio_out_mask) & audio_only.attention_mask).any()
    return {"mixed": mixed, "text_only": text_only, "audio_only": audio_only}


def test_every_module_runs_on_every_batch():
    """ZeRO-3 lockstep (docs/design.md §6): the same modules, equally often, whatever the modalities; and every
    parameter takes part in backward (zero-row inputs give zero gradients, not missing ones)."""
    config = tiny_config()
    model = HiggsAudioForTraining(config)
    tracked = [name for name, module in model.named_modules() if not isinstance(module, torch.nn.ModuleList)]
    calls = Counter()
    for name in tracked:
        model.get_submodule(name).register_forward_hook(lambda *_, name=name: calls.update([name]))
    counts = {}
    for kind, batch in lockstep_batches(config).items():
        calls.clear()
        model.zero_grad(set_to_none=True)
        model(**batch.model_inputs()).loss.backward()
        counts[kind] = {name: calls[name] for name in tracked}
        missing = [name for name, param in model.named_parameters() if param.grad is None]
        assert not missing, f"{kind}: parameters outside the backward graph: {missing}"
    assert min(counts["mixed"].values()) >= 1, [n for n, c in counts["mixed"].items() if c == 0]
    assert counts["text_only"] == counts["mixed"] == counts["audio_only"]
    audio_grad = model.model.layers[0].audio_mlp.up_proj.weight.grad
    assert audio_grad is not None  # the audio-only batch was last: its audio path must carry a real gradient
    assert audio_grad.abs().sum() > 0


def test_gradient_checkpointing_gives_the_same_gradients():
    config = tiny_config()
    model = HiggsAudioForTraining(config)
    randomize(model)
    batch = lockstep_batches(config)["mixed"]
    grads = []
    for enabled in (False, True):
        model.gradient_checkpointing_enable() if enabled else model.gradient_checkpointing_disable()
        model.zero_grad()
        model(**batch.model_inputs()).loss.backward()
        grads.append({name: p.grad.clone() for name, p in model.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=0, atol=0, msg=name)


def test_misshapen_batches_are_refused_with_the_field_named():
    """The forward checks what costs nothing (shapes); values are Batch.validate's (tests/test_batch.py)."""
    config = tiny_config()
    model = HiggsAudioForTraining(config, loss_config=LossConfig())
    batch = lockstep_batches(config)["mixed"]
    too_few = dict(batch.model_inputs(), audio_out_ids=batch.audio_out_ids[:, :-1])
    with pytest.raises(ValueError, match=r"batch.audio_in_ids \(4, \d+\), audio_out_ids \(4, \d+\) and "
                                         r"audio_out_labels \(4, \d+\) must be \[4, frames\]"):
        model(**too_few)
    with pytest.raises(ValueError, match=r"batch.segment_ids has shape"):
        model(**dict(batch.model_inputs(), segment_ids=batch.segment_ids[:, :-1]))
    with pytest.raises(ValueError, match=r"batch.audio_in_mask must be bool"):
        model(**dict(batch.model_inputs(), audio_in_mask=batch.audio_in_mask.long()))
