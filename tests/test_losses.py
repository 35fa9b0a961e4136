"""Shift, learnable-position selection and normalisation of the per-modality losses (higgs_ds/model/losses.py)."""
import math

import pytest
import torch
import torch.nn.functional as F

from higgs_ds.model import HiggsAudioForTraining, LossConfig, LossNorm, learnable_counts
from higgs_ds.data.batch import index_batch
from higgs_ds.model.losses import next_token_targets
from helpers import audio_in, audio_out, make_batch, random_codes, random_text, randomize, text, tiny_config, \
    tts_sample

CONFIG = tiny_config()


def reference_targets(batch):
    """Loop version of the shift: (flat position, next text label) and (frame j, labels of frame j+1)."""
    rows, length = batch.input_ids.shape
    seg, labels = batch.segment_ids.tolist(), batch.label_ids.tolist()
    text_pairs = [(b * length + t, labels[b][t + 1]) for b in range(rows) for t in range(length - 1)
                  if seg[b][t] > 0 and seg[b][t] == seg[b][t + 1] and labels[b][t + 1] != -100]
    frames = [(b, t) for b in range(rows) for t in range(length) if batch.audio_out_mask[b, t]]
    audio_pairs = []
    for j, (b, t) in enumerate(frames):
        if t + 1 < length and batch.audio_out_mask[b, t + 1] and seg[b][t] == seg[b][t + 1]:
            assert frames[j + 1] == (b, t + 1)
            target = batch.audio_out_labels[:, j + 1]
            if (target != -100).any():
                audio_pairs.append((j, target.tolist()))
    return text_pairs, audio_pairs


def boundary_batch(armed: bool = False):
    """Packed rows whose boundaries are traps: labelled text right after a sample ends, audio-out frames of one
    sample directly followed by audio-out frames of the next, row 0's last frame followed (in flat order) by row 1's
    first frame of the same segment id, and padding. `armed` puts labels where the contract has none (the first
    frame of each audio segment, padding), so that only the segment/row/padding checks keep them out of reach."""
    g = torch.Generator().manual_seed(5)
    a = [text(random_text(g, 30)), audio_out(random_codes(g, CONFIG, 6))]
    b = [audio_out(random_codes(g, CONFIG, 2)), text(random_text(g, 3)), audio_out(random_codes(g, CONFIG, 2))]
    c = [audio_out(random_codes(g, CONFIG, 2)), text(random_text(g, 3), labelled=True)]
    d = [text(random_text(g, 3), labelled=True), audio_in(random_codes(g, CONFIG, 2))]
    batch = make_batch([[a], [b, c, d]], CONFIG)
    assert batch.audio_out_mask[0, -1] and batch.audio_out_mask[1, 0] and (batch.segment_ids[1] == 0).any()
    if armed:
        first_frames = (batch.audio_out_labels == -100).all(dim=0)  # the all-bos frame starting each segment
        batch.audio_out_labels[:, first_frames] = batch.audio_out_ids[:, first_frames]
        batch.label_ids[batch.segment_ids == 0] = 7
        batch = batch.reindexed()
    return batch


def test_targets_are_the_next_label_within_each_sample():
    batch = boundary_batch(armed=True)
    index = index_batch(batch.label_ids, batch.segment_ids, batch.audio_in_mask, batch.audio_out_mask,
                        batch.audio_out_labels)
    targets = next_token_targets(batch.label_ids, batch.audio_out_labels, index)
    text_pairs, audio_pairs = reference_targets(batch)
    assert list(zip(index.text_target_positions.tolist(), targets.text.tolist())) == text_pairs
    assert list(zip(index.audio_target_frames.tolist(), targets.audio.tolist())) == audio_pairs
    # The traps: no target at any sample's last position (text or audio frame), nor from or into padding.
    seg, length = batch.segment_ids.flatten(), batch.input_ids.shape[1]
    last_positions = {p for p in range(seg.numel()) if p % length == length - 1 or seg[p] != seg[p + 1]}
    assert not last_positions & set(index.text_target_positions.tolist())
    frame_positions = batch.audio_out_mask.flatten().nonzero().squeeze(1)
    assert torch.equal(index.audio_target_positions, frame_positions[index.audio_target_frames])
    assert not last_positions & set(frame_positions[index.audio_target_frames].tolist())
    assert len(last_positions & set(frame_positions.tolist())) == 2  # samples a and b end with audio-out
    # Unarmed, every labelled audio code is some frame's target (the all-bos first frame carries no label).
    plain = boundary_batch()
    targets = next_token_targets(plain.label_ids, plain.audio_out_labels, plain.index)
    assert (targets.audio != -100).sum() == (plain.audio_out_labels != -100).sum()


def test_packed_loss_is_the_sum_of_the_samples_alone():
    """Nothing leaks across a packing boundary: sums and counts of a packed row add up sample by sample."""
    model = HiggsAudioForTraining(CONFIG)
    randomize(model)
    g = torch.Generator().manual_seed(6)
    samples = [tts_sample(g, CONFIG, reference_frames=2), [text(random_text(g, 3), labelled=True),
                                                            audio_out(random_codes(g, CONFIG, 4))],
               [audio_out(random_codes(g, CONFIG, 3)), text(random_text(g, 4), labelled=True)]]
    packed = model(**make_batch([samples], CONFIG).model_inputs())
    alone = [model(**make_batch([[s]], CONFIG).model_inputs()) for s in samples]
    torch.testing.assert_close(packed.text_loss_sum, sum(o.text_loss_sum for o in alone))
    torch.testing.assert_close(packed.audio_loss_sum, sum(o.audio_loss_sum for o in alone))
    assert packed.text_tokens == sum(o.text_tokens for o in alone)
    assert torch.equal(packed.audio_tokens, sum(o.audio_tokens for o in alone))


def reference_loss(model, batch, config: LossConfig):
    """Materialized logits + plain cross-entropy over the loop-built targets."""
    hidden = model.model(batch.input_ids, batch.position_ids, batch.segment_ids, batch.audio_in_ids,
                         batch.audio_out_ids, batch.index)
    text_pairs, audio_pairs = reference_targets(batch)
    flat = hidden.flatten(0, 1)
    positions, labels = map(torch.tensor, zip(*text_pairs))
    text_loss = F.cross_entropy(model.text_lm_head(flat[positions]), labels)
    frames = flat[batch.audio_out_mask.flatten()]
    rows, audio_labels = torch.tensor([j for j, _ in audio_pairs]), torch.tensor([t for _, t in audio_pairs])
    audio_logits = model.audio_lm_head(frames[rows]).view(len(rows), CONFIG.num_codebooks, -1)
    per_codebook = torch.stack([F.cross_entropy(audio_logits[:, k], audio_labels[:, k])
                                for k in range(CONFIG.num_codebooks)])
    audio = per_codebook.sum() if config.audio_reduction == "sum" else per_codebook.mean()
    return config.text_weight * text_loss + config.audio_weight * audio, per_codebook


@pytest.mark.parametrize("loss_config", [LossConfig(), LossConfig(0.5, 2.0, "mean")])
def test_loss_and_gradients_match_a_reference(loss_config):
    model = HiggsAudioForTraining(CONFIG, loss_config=loss_config)
    randomize(model)
    batch = boundary_batch()
    out = model(**batch.model_inputs())
    grads = torch.autograd.grad(out.loss, list(model.parameters()))
    expected, per_codebook = reference_loss(model, batch, loss_config)
    expected_grads = torch.autograd.grad(expected, list(model.parameters()))
    torch.testing.assert_close(out.loss, expected)
    for (name, _), grad, reference in zip(model.named_parameters(), grads, expected_grads):
        torch.testing.assert_close(grad, reference, rtol=1e-5, atol=1e-6, msg=name)
    # The logged audio term is exactly the one in the objective, next to its per-codebook parts.
    for k in range(CONFIG.num_codebooks):
        torch.testing.assert_close(out.metrics[f"loss/audio_cb{k}"], per_codebook[k].detach())
    reduce = torch.sum if loss_config.audio_reduction == "sum" else torch.mean
    torch.testing.assert_close(out.metrics["loss/audio"], reduce(per_codebook.detach()))
    torch.testing.assert_close(out.metrics["loss/total"], expected.detach())


def copy_batch(g, copyable: bool):
    """Labels equal the inputs at the same position (the Batch contract: unshifted). With `copyable` the labels
    are moved one step right instead, so the shifted target at t is the input at t: a model can copy it."""
    rows = [[[text(torch.randint(0, 32, (12,), generator=g), labelled=True), audio_out(random_codes(g, CONFIG, 10)),
              text(torch.randint(0, 32, (4,), generator=g), labelled=True)]] for _ in range(2)]
    batch = make_batch(rows, CONFIG)
    if copyable:
        learnable = batch.label_ids[:, 1:] != -100
        batch.label_ids[:, 1:][learnable] = batch.input_ids[:, :-1][learnable]
        learnable = batch.audio_out_labels[:, 1:] != -100
        batch.audio_out_labels[:, 1:][learnable] = batch.audio_out_ids[:, :-1][learnable]
        batch = batch.reindexed()
    return batch


def train_on_copy_data(copyable: bool, steps: int = 30) -> tuple[float, float]:
    torch.manual_seed(0)
    model = HiggsAudioForTraining(CONFIG)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-2)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        out = model(**copy_batch(g, copyable).model_inputs())
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
    return out.metrics["loss/text"].item(), out.metrics["loss/audio"].item() / CONFIG.num_codebooks


def test_shift_is_real_copying_does_not_pay():
    """Fresh random tokens every step: with the shift, the target at t is the unseen token at t+1, so the loss stays
    near log(32); the control, where copying the current input is right, goes to ~0 with the same training."""
    text_loss, audio_loss = train_on_copy_data(copyable=False)
    assert text_loss > 0.75 * math.log(32) and audio_loss > 0.75 * math.log(32), (text_loss, audio_loss)
    control_text, control_audio = train_on_copy_data(copyable=True)
    assert control_text < 0.3 and control_audio < 1.5, (control_text, control_audio)


def micro_batches():
    """Four rows, one per micro-batch: mixed, packed, text-only (no audio at all), audio-only (no learnable text)."""
    g = torch.Generator().manual_seed(9)
    return [
        [tts_sample(g, CONFIG, reference_frames=3, frames=6)],
        [tts_sample(g, CONFIG, frames=3), [text(random_text(g, 4)), text(random_text(g, 6), labelled=True)]],
        [[text(random_text(g, 5)), text(random_text(g, 7), labelled=True)]],
        [[text(random_text(g, 6)), audio_in(random_codes(g, CONFIG, 2)), audio_out(random_codes(g, CONFIG, 8))]],
    ]


@pytest.mark.parametrize("loss_config", [LossConfig(), LossConfig(0.3, 1.5, "mean")])
def test_micro_batches_with_global_counts_reproduce_the_full_batch_gradient(loss_config):
    """2 ranks x 2 accumulation steps, emulated in one process: each micro-batch normalises by the global counts
    and scales by world*GAS; DeepSpeed then divides by GAS and averages over ranks (here: / 4)."""
    model = HiggsAudioForTraining(CONFIG, loss_config=loss_config)
    randomize(model)
    rows = micro_batches()
    full = make_batch(rows, CONFIG)
    reference = torch.autograd.grad(model(**full.model_inputs()).loss, list(model.parameters()))

    micro = [make_batch([row], CONFIG) for row in rows]
    counts = [learnable_counts(b) for b in micro]
    assert counts[2].audio.sum() == 0 and counts[3].text == 0  # a text-only and an audio-only micro-batch
    norm = LossNorm(text_tokens=float(sum(c.text for c in counts)), audio_tokens=sum(c.audio for c in counts),
                    grad_scale=4.0)
    accumulated = [torch.zeros_like(p) for p in model.parameters()]
    for batch in micro:
        grads = torch.autograd.grad(model(**batch.model_inputs(), loss_norm=norm).loss, list(model.parameters()))
        accumulated = [a + g for a, g in zip(accumulated, grads)]
    for (name, _), got, expected in zip(model.named_parameters(), accumulated, reference):
        error = (got / 4 - expected).norm() / expected.norm().clamp_min(1e-30)
        assert expected.norm() == 0 and got.norm() == 0 or error <= 1e-5, (name, error.item())


def test_a_single_audio_count_applies_to_every_codebook():
    model = HiggsAudioForTraining(CONFIG)
    batch = make_batch(micro_batches()[:1], CONFIG)
    counts = learnable_counts(batch)
    assert len(set(counts.audio.tolist())) == 1  # delay pattern: every codebook has T+1 labels
    as_tensor = model(**batch.model_inputs(), loss_norm=LossNorm(10.0, counts.audio.float() * 3, 2.0)).loss
    as_float = model(**batch.model_inputs(), loss_norm=LossNorm(10.0, float(counts.audio[0]) * 3, 2.0)).loss
    torch.testing.assert_close(as_tensor, as_float)


def test_logged_predictions_are_the_heads_top1_at_every_learnable_row():
    model = HiggsAudioForTraining(CONFIG)
    randomize(model)
    batch = boundary_batch()
    everything = model(**batch.model_inputs(), return_predictions=True)
    text_pairs, audio_pairs = reference_targets(batch)
    logits = model.logits(**batch.model_inputs())
    positions = torch.tensor([p for p, _ in text_pairs])
    assert everything.text_labels.tolist() == [label for _, label in text_pairs]
    assert torch.equal(everything.text_predictions, logits.text.flatten(0, 1)[positions].argmax(-1))
    frames = torch.tensor([j for j, _ in audio_pairs])
    assert everything.audio_labels.tolist() == [labels for _, labels in audio_pairs]
    assert torch.equal(everything.audio_predictions, logits.audio[frames].argmax(-1))
    assert torch.equal(everything.text_positions, positions) and torch.equal(everything.audio_frames, frames)
    assert torch.equal(everything.audio_inputs, batch.audio_out_ids[:, frames].T)


def test_a_batch_without_a_modality_logs_zero_not_nan():
    model = HiggsAudioForTraining(CONFIG)
    g = torch.Generator().manual_seed(2)
    out = model(**make_batch([[[text(random_text(g, 5)), text(random_text(g, 3), labelled=True)]]],
                             CONFIG).model_inputs())
    assert out.audio_tokens.tolist() == [0] * CONFIG.num_codebooks and out.metrics["loss/audio"] == 0
    assert torch.isfinite(out.loss) and out.text_tokens == 3


@pytest.mark.parametrize("checkpointing", [False, True])
def test_forward_and_backward_leave_every_batch_tensor_untouched(checkpointing):
    """docs/design.md §10 "in-place label mutation": the model reads the batch and never writes to it."""
    import dataclasses

    from helpers import mixed_packed_batch

    torch.manual_seed(0)
    model = HiggsAudioForTraining(CONFIG)
    randomize(model)
    if checkpointing:
        model.gradient_checkpointing_enable()
    batch = mixed_packed_batch(CONFIG, seed=3, pad_to=64)
    before = {f.name: getattr(batch, f.name).clone() for f in dataclasses.fields(batch)
              if isinstance(getattr(batch, f.name), torch.Tensor)}
    assert before["label_ids"].ne(-100).any() and before["audio_out_labels"].ne(-100).any()
    out = model(**batch.model_inputs(), return_predictions=True)
    out.loss.backward()
    for name, value in before.items():
        assert torch.equal(getattr(batch, name), value), f"{name} changed in the forward/backward"
