"""Goldens for tests/test_model_parity.py from the upstream model (boson-multimodal 0.1.1). Run in the reference venv:

    .venv-ref/bin/python reference/make_model_goldens.py

Writes tests/goldens/model/:
  boson_tiny/        a tiny random upstream HiggsAudioModel saved by upstream's save_pretrained (boson layout)
  boson_tiny_split/  the same weights with upstream's "partially frozen" split modules (embed_tokens, text_lm_head
                     via freeze_llm/freeze_text_head; audio_lm_head via PartiallyFrozenLinear), sharded + index
  batches.npz        per batch b{i}: upstream's collated inputs (`up_*`), the expanded tensors upstream's merge
                     produced, rewritten as our Batch fields (`batch_*`), and upstream's fp32 logits (`text_logits`
                     [B, L, V] at every position, `audio_logits` [N_out, K, V] at audio-out frames)
  meta.json          versions, the attention implementation upstream used and how its mask behaved
Batches are built from ChatML with upstream's prepare_chatml_sample + HiggsAudioSampleCollator and run through
HiggsAudioModel.forward, whose merge_input_ids_with_audio_features expands the placeholders.

Takes no options (only --help); tests/goldens/model/ is replaced as a whole.
"""
import argparse
import json
import shutil
from pathlib import Path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    return parser.parse_args(argv)


if __name__ == "__main__":
    parse_args()  # --help answers here, without the reference venv's packages

# Imported after the argument check on purpose: these need the reference venv.
import numpy as np
import torch
import transformers
from boson_multimodal.data_collator.higgs_audio_collator import HiggsAudioSampleCollator
from boson_multimodal.dataset.chatml_dataset import ChatMLDatasetSample, prepare_chatml_sample
from boson_multimodal.model.higgs_audio import HiggsAudioConfig, HiggsAudioModel
from boson_multimodal.model.higgs_audio.custom_modules import PartiallyFrozenLinear
from transformers import AutoTokenizer

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "tests" / "goldens" / "model"
NUM_CODEBOOKS, CODES = 4, 30  # per codebook: 30 codes + stream bos (30) + eos (31)


def tiny_config(tok) -> HiggsAudioConfig:
    ids = tok.convert_tokens_to_ids
    text_config = dict(
        model_type="llama", vocab_size=416, hidden_size=32, intermediate_size=80, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, rms_norm_eps=1e-5, max_position_embeddings=131072,
        rope_theta=500000.0, rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                           "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
        tie_word_embeddings=False, pad_token_id=ids("<|end_of_text|>"), bos_token_id=ids("<|begin_of_text|>"),
        eos_token_id=ids("<|eot_id|>"))
    return HiggsAudioConfig(
        text_config=text_config, audio_adapter_type="dual_ffn_fast_forward", audio_dual_ffn_layers=[0, 1],
        encode_whisper_embed=False, encode_audio_in_tokens=True, use_delay_pattern=True, skip_audio_tower=True,
        audio_num_codebooks=NUM_CODEBOOKS, audio_codebook_size=CODES, audio_stream_bos_id=CODES,
        audio_stream_eos_id=CODES + 1, audio_in_token_idx=ids("<|AUDIO|>"), audio_out_token_idx=ids("<|AUDIO_OUT|>"),
        pad_token_id=ids("<|end_of_text|>"), audio_out_bos_token_id=ids("<|audio_out_bos|>"),
        audio_eos_token_id=ids("<|audio_eos|>"))


def randomize(model: torch.nn.Module, generator: torch.Generator) -> None:
    """Non-trivial weights everywhere: text and audio norms/MLPs must differ for routing bugs to show."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            param.copy_(1.0 + 0.3 * noise if name.endswith("layernorm.weight") or name == "norm.weight"
                        else 0.15 * noise)


CHATS = [
    # batch 0 (one row: upstream left-pads inside its merge): user audio in, assistant audio out
    [{"messages": [
        {"role": "system", "content": "Generate audio following instruction."},
        {"role": "user", "content": [{"type": "text", "text": "Transcribe this clip."},
                                     {"type": "audio", "audio_url": "in0.wav"}]},
        {"role": "assistant", "content": [{"type": "audio", "audio_url": "out0.wav"}]}]}],
    # batch 1: voice cloning with the reference in an earlier assistant turn (not trained: start_index), plain TTS
    [{"messages": [
        {"role": "system", "content": "Generate audio following instruction."},
        {"role": "user", "content": "Hello world"},
        {"role": "assistant", "content": [{"type": "audio", "audio_url": "ref.wav"}]},
        {"role": "user", "content": "The quick brown fox jumps over the lazy dog."},
        {"role": "assistant", "content": [{"type": "audio", "audio_url": "out1.wav"}]}], "start_index": 4},
     {"messages": [
         {"role": "user", "content": "Please read the text aloud."},
         {"role": "assistant", "content": [{"type": "audio", "audio_url": "out2.wav"}]}]}],
    # batch 2: a text-only chat next to two consecutive assistant audio turns
    [{"messages": [
        {"role": "user", "content": "Hello world, this is a tiny tokenizer for tests."},
        {"role": "assistant", "content": "Speak in a calm voice."}]},
     {"messages": [
         {"role": "user", "content": "Speak in a calm voice."},
         {"role": "assistant", "content": [{"type": "audio", "audio_url": "a.wav"}]},
         {"role": "assistant", "content": [{"type": "text", "text": "Hello"},
                                           {"type": "audio", "audio_url": "b.wav"}]}]}],
]


def make_sample(chat: dict, tok, generator: torch.Generator) -> ChatMLDatasetSample:
    input_tokens, label_tokens, audio_contents, _ = prepare_chatml_sample(chat, tok)
    codes = [torch.randint(0, CODES, (NUM_CODEBOOKS, int(torch.randint(2, 7, (1,), generator=generator))),
                           generator=generator) for _ in audio_contents]
    starts = np.cumsum([0] + [c.shape[1] for c in codes[:-1]]) if codes else np.zeros(0)
    return ChatMLDatasetSample(
        input_ids=torch.tensor(input_tokens, dtype=torch.long), label_ids=torch.tensor(label_tokens, dtype=torch.long),
        audio_ids_concat=torch.cat(codes, dim=1) if codes else torch.zeros(NUM_CODEBOOKS, 0, dtype=torch.long),
        audio_ids_start=torch.tensor(starts, dtype=torch.long), audio_waveforms_concat=torch.zeros(0),
        audio_waveforms_start=torch.zeros(0, dtype=torch.long), audio_sample_rate=torch.zeros(0),
        audio_speaker_indices=torch.zeros(0, dtype=torch.long))


def to_numpy(value):
    return value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)


def upstream_inputs(collated) -> dict:
    """What upstream's HiggsAudioModel.forward takes from its collator's batch (also reference/check_boson_export.py)."""
    return dict(input_ids=collated.input_ids, attention_mask=collated.attention_mask, label_ids=collated.label_ids,
                audio_in_ids=collated.audio_in_ids, audio_in_ids_start=collated.audio_in_ids_start,
                audio_out_ids=collated.audio_out_ids, audio_out_ids_start=collated.audio_out_ids_start,
                label_audio_ids=collated.label_audio_ids)


def main() -> None:
    parse_args()
    tok = AutoTokenizer.from_pretrained(str(ROOT / "tests" / "assets" / "tiny_tokenizer"))
    generator = torch.Generator().manual_seed(20251125)
    torch.manual_seed(0)
    config = tiny_config(tok)
    model = HiggsAudioModel(config).eval()
    randomize(model, generator)
    collator = HiggsAudioSampleCollator(
        whisper_processor=None, audio_in_token_id=config.audio_in_token_idx,
        audio_out_token_id=config.audio_out_token_idx, pad_token_id=config.pad_token_id,
        audio_stream_bos_id=CODES, audio_stream_eos_id=CODES + 1, round_to=8, pad_left=False,
        encode_whisper_embed=False, return_audio_in_tokens=True, audio_num_codebooks=NUM_CODEBOOKS,
        use_delay_pattern=True)

    arrays, batch_notes = {}, []
    for index, chats in enumerate(CHATS):
        collated = collator([make_sample(chat, tok, generator) for chat in chats])
        with torch.no_grad():
            out = model(**upstream_inputs(collated))
        real = out.attention_mask.bool()
        # The equivalent Batch: one sample per row, so segment = 1 on real positions; positions restart per row.
        batch = dict(
            input_ids=out.expanded_input_ids, attention_mask=real,
            position_ids=((real.long().cumsum(-1) - 1).clamp_min(0) * real), segment_ids=real.int(),
            label_ids=out.expanded_labels, audio_in_mask=out.audio_in_discrete_codes_mask,
            audio_out_mask=out.audio_out_mask,
            audio_in_ids=collated.audio_in_ids.reshape(NUM_CODEBOOKS, -1), audio_out_ids=collated.audio_out_ids,
            audio_out_labels=collated.label_audio_ids)
        for name, value in upstream_inputs(collated).items():
            arrays[f"b{index}_up_{name}"] = to_numpy(value)
        for name, value in batch.items():
            arrays[f"b{index}_batch_{name}"] = to_numpy(value)
        arrays[f"b{index}_text_logits"] = to_numpy(out.logits.float())
        arrays[f"b{index}_audio_logits"] = to_numpy(out.audio_logits.float())
        batch_notes.append(dict(rows=len(chats), expanded_shape=list(real.shape), padded_positions=int((~real).sum()),
                                upstream_padding="left (one row)" if len(chats) == 1 else "right"))

    if OUT.exists():
        shutil.rmtree(OUT)
    OUT.mkdir(parents=True)
    np.savez_compressed(OUT / "batches.npz", **arrays)
    model.save_pretrained(OUT / "boson_tiny", safe_serialization=True)

    # Split variant: upstream's own partially-frozen wrappers, then a sharded save.
    model.freeze_llm(freeze_embed=True, freeze_embed_until_idx=400)
    model.freeze_text_head(freeze_text_head_until_idx=400)
    model.audio_decoder_proj.audio_lm_head = PartiallyFrozenLinear(
        model.audio_decoder_proj.audio_lm_head, freeze_until_idx=NUM_CODEBOOKS * (CODES + 2) // 2)
    with torch.no_grad():  # the split model must still give the goldens
        check = model(**upstream_inputs(collated))  # the last batch
    assert torch.equal(check.logits, out.logits) and torch.equal(check.audio_logits, out.audio_logits)
    model.save_pretrained(OUT / "boson_tiny_split", safe_serialization=True, max_shard_size="60KB")

    meta = dict(
        transformers=transformers.__version__, torch=torch.__version__, boson_multimodal="0.1.1",
        attn_implementation=model.config._attn_implementation,
        causal_mask=("eval mode, fp32, CPU: _update_causal_mask returns None for an unpadded batch (SDPA is_causal) "
                     "and otherwise a 4D additive min-float mask; padded query rows are not unmasked on CPU, so "
                     "they attend uniformly and only real positions are comparable"),
        position_ids="upstream: cumsum(attention_mask) - 1 (1 on padding); ours: the same on real positions, 0 on pad",
        split_variant="embed_tokens/text_lm_head split at 400; audio_lm_head split at half its rows",
        batches=batch_notes)
    (OUT / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    total = sum(f.stat().st_size for f in OUT.rglob("*") if f.is_file())
    print(f"wrote {OUT} ({total / 1e6:.2f} MB), attn={meta['attn_implementation']}")


if __name__ == "__main__":
    main()
