"""Packed rows: attention and positions stay inside each sample (SDPA block mask on CPU; varlen flash kwargs)."""
import torch

from higgs_ds.data.batch import index_batch
from higgs_ds.model import HiggsAudioForTraining
from higgs_ds.model.modeling import block_causal_mask, varlen_flash_kwargs
from helpers import audio_in, audio_out, make_batch, random_codes, random_text, randomize, text, tiny_config, \
    tts_sample

CONFIG = tiny_config()


def model() -> HiggsAudioForTraining:
    m = HiggsAudioForTraining(CONFIG).eval()
    randomize(m)
    return m


def samples():
    g = torch.Generator().manual_seed(11)
    return [tts_sample(g, CONFIG, reference_frames=3, frames=5),
            [audio_out(random_codes(g, CONFIG, 4)), text(random_text(g, 3), labelled=True)],
            [text(random_text(g, 6), labelled=True), audio_in(random_codes(g, CONFIG, 2)), text(random_text(g, 2))]]


def test_block_mask_is_causal_within_segments_and_never_empty():
    segments = torch.tensor([[1, 1, 2, 2, 2, 0, 0]])
    expected = torch.tensor([[1, 0, 0, 0, 0, 0, 0],
                             [1, 1, 0, 0, 0, 0, 0],
                             [0, 0, 1, 0, 0, 0, 0],
                             [0, 0, 1, 1, 0, 0, 0],
                             [0, 0, 1, 1, 1, 0, 0],
                             [0, 0, 0, 0, 0, 1, 0],   # padding sees only padding: no fully masked row, no NaN
                             [0, 0, 0, 0, 0, 1, 1]], dtype=torch.bool)
    assert torch.equal(block_causal_mask(segments), expected[None, None])


def test_a_packed_row_gives_each_sample_its_own_logits():
    m, parts = model(), samples()
    packed_batch = make_batch([parts, parts[:1]], CONFIG, pad_to=80)  # row 1: the first sample + padding
    packed = m.logits(**packed_batch.model_inputs())
    frame_offset = 0
    for index, sample in enumerate(parts):
        alone_batch = make_batch([[sample]], CONFIG)
        alone = m.logits(**alone_batch.model_inputs())
        in_packed = packed_batch.segment_ids[0] == index + 1
        torch.testing.assert_close(packed.text[0, in_packed], alone.text[0])
        frames = alone.audio.shape[0]
        torch.testing.assert_close(packed.audio[frame_offset:frame_offset + frames], alone.audio)
        frame_offset += frames
    first = make_batch([parts[:1]], CONFIG)
    length = first.input_ids.shape[1]
    torch.testing.assert_close(packed.text[1, :length], m.logits(**first.model_inputs()).text[0])
    assert torch.isfinite(packed.text).all()  # padding rows included


def test_padding_keeps_forward_and_backward_finite():
    m = model().train()
    batch = make_batch([samples()[:1], samples()[1:2]], CONFIG, pad_to=64)
    assert (batch.segment_ids == 0).sum() > 20
    out = m(**batch.model_inputs())
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert all(torch.isfinite(p.grad).all() for p in m.parameters())


def test_rope_uses_the_batch_position_ids():
    """RoPE is relative: shifting every position of a sample by a constant changes nothing; stretching them does.
    (So a model that ignored position_ids would fail the second check.)"""
    m = model()
    batch = make_batch([samples()[:1]], CONFIG)
    base = m.logits(**batch.model_inputs()).text
    shifted = m.logits(**dict(batch.model_inputs(), position_ids=batch.position_ids + 7)).text
    stretched = m.logits(**dict(batch.model_inputs(), position_ids=batch.position_ids * 3)).text
    torch.testing.assert_close(shifted, base, rtol=1e-4, atol=1e-4)
    assert (stretched - base).abs().max() > 1e-2


def test_varlen_flash_kwargs_split_rows_and_segments():
    segments = torch.tensor([[1, 1, 1, 2, 2, 0, 0], [1, 1, 1, 1, 1, 1, 1], [1, 2, 2, 2, 3, 3, 0]])
    no_audio = torch.zeros_like(segments, dtype=torch.bool)
    kwargs = varlen_flash_kwargs(index_batch(torch.full_like(segments, -100), segments, no_audio, no_audio,
                                             torch.zeros(4, 0, dtype=torch.long)))
    assert kwargs["cu_seq_lens_q"].tolist() == [0, 3, 5, 7, 14, 15, 18, 20, 21]
    assert kwargs["cu_seq_lens_q"].dtype == torch.int32 and kwargs["cu_seq_lens_k"] is kwargs["cu_seq_lens_q"]
    assert kwargs["max_length_q"] == kwargs["max_length_k"] == 7


def test_rope_frequencies_survive_a_bf16_cast():
    """DeepSpeed's bf16 engine casts the whole module; rounded inv_freq would shift angles at long positions."""
    m = model()
    expected = m.model.rotary_emb.inv_freq.clone()
    m.to(torch.bfloat16)
    assert m.model.embed_tokens.weight.dtype == torch.bfloat16
    assert m.model.rotary_emb.inv_freq.dtype == torch.float32
    assert torch.equal(m.model.rotary_emb.inv_freq, expected)
