"""Does our generation (higgs_ds.generate) produce, token for token and code for code, what upstream boson-multimodal
0.1.1's `HiggsAudioModel.generate` produces on the same weights and prompts? Two steps, one per venv (higgs_ds needs
transformers 5, upstream pins transformers<4.47), like reference/check_boson_export.py:

    # 1. ours, in the project venv: a tiny random export (--make-tiny DIR), or --export DIR from
    #    `launch/export.py --layout both`; the prompt set below; our generate() greedy + two seeded sampled runs -> NPZ
    .venv/bin/python reference/check_boson_generate.py --step ours --make-tiny /tmp/gen_tiny --npz /tmp/gen.npz
    .venv/bin/python reference/check_boson_generate.py --step ours --export EXPORT --npz /tmp/gen.npz \
        [--tokenizer DIR] [--max-frames 40 --max-text-tokens 24]
    # 2. upstream, in the reference venv: HiggsAudioModel.from_pretrained(EXPORT/boson) generates from the same
    #    prompts, rebuilt by upstream's own prepare_chatml_sample + HiggsAudioSampleCollator; compared with the NPZ
    .venv-ref/bin/python reference/check_boson_generate.py --step upstream --export /tmp/gen_tiny --npz /tmp/gen.npz

Per prompt step 2 prints the path upstream took and, per run, same/DIFFERENT (at the first differing step: both
sides' outputs and the top-2 margin of upstream's logits there, so a near-tie shows as numerics); then a final line
starting with PASS or FAIL (exit 0 = pass). Only the greedy run decides; the sampled runs are reported (SAMPLING ...).
With --prompts-only, step 1 writes the prompts and no generation of ours; step 2 then checks the prompts and prints
what upstream generates (64 greedy steps).

Prompts: TTS (system + user text), voice cloning (user text, an assistant turn with reference codes, user text) and
multi-turn (user text + audio-in, assistant text, assistant text + audio, user text), each ending with
`<|audio_out_bos|>` ("+aob": audio forced) and without (the model may write text first). Our prompts come from
higgs_ds.generate.prompts.build_prompt; the NPZ also holds each prompt's unexpanded ids (one placeholder per audio
item) and the raw codes of its items: what upstream's ChatMLDatasetSample takes. Step 2 checks, before generating,
that upstream's own prepare_chatml_sample + the serve engine's header gives the same unexpanded ids and that
upstream's expansion (collator + forward's merge) gives build_prompt's expanded ids, audio mask and delayed codes.

--make-tiny DIR writes DIR/port and DIR/boson (higgs_ds.model.save_checkpoint, as launch/export.py --layout both
does) of a random HiggsAudioForTraining with the release's audio side (8 codebooks x 1024 codes + stream bos 1024 /
eos 1025, delay pattern; a 2-layer, 32-wide backbone) and the tiny tokenizer (tests/assets/tiny_tokenizer) beside
each. Weights are drawn like reference/make_model_goldens.py (0.15·N(0,1), norms 1 + 0.3·N(0,1): well separated
logits, so fp32 differences between the implementations do not flip an argmax), then a few head rows are scaled up
so that greedy decoding of a random model visits every path: the text head rows of <|audio_out_bos|> (x AOB_BOOST)
and <|eot_id|> (x EOT_BOOST), and every codebook's stream-eos row of the audio head (x EOS_BOOST). With these the
greedy run has: text then audio, audio then text then more segments, turns ended by <|eot_id|>, cuts by max_frames
(mid-segment and right after a bos column; max_text_tokens cuts occur in the sampled runs), eos ramps starting in
codebooks 0, 1, 3, 4, 5, 6 (7 in a sampled run), some while the bos ramp still rises; the clone and multi prompts
carry audio-out and audio-in.

Upstream facts relied on (boson_multimodal 0.1.1 in .venv-ref; M = model/higgs_audio/modeling_higgs_audio.py,
S = serve/serve_engine.py, C = data_collator/higgs_audio_collator.py):
 * Prompt (S:280-335): prepare_chatml_sample(messages) + "<|start_header_id|>assistant<|end_header_id|>\\n\\n"
   and, with force_audio_gen, "<|audio_out_bos|>" (S:286-290, encoded with add_special_tokens=False); one
   placeholder per audio item, the items' codes concatenated; collated by HiggsAudioSampleCollator(round_to=1, ...)
   (S:261-273): stream bos + codes + stream eos per item, then the delay pattern (C:360-430). round_to=1 matters: a
   right-padded prompt would not end with <|audio_out_bos|>. The serve engine collates with
   return_audio_in_tokens=False (S:269; it would need whisper for user audio); here True, as the release's config
   has encode_audio_in_tokens=true and encode_whisper_embed=false.
 * generate (M:1933-2023) asserts batch size 1 (M:1957); audio_out_bos / audio_eos ids default to the config's;
   ras_win_len is popped with default None (M:1980: no repetition-aware resampling); `seed` seeds ONE
   torch.Generator used by every draw of the call (M:1679-1681). The serve engine passes stop_strings
   ["<|end_of_text|>", "<|eot_id|>"] and tokenizer= (S:371-396); the generation config adds its eos_token_id
   (text_config's: <|end_of_text|> in the release's generation_config.json, <|eot_id|> in the tiny model).
   Passing tokenizer= also makes upstream raise when a text id >= len(tokenizer) (M:1896-1901), which the tiny
   model (416 rows, 413 tokens) hits when sampling; this check therefore gives the two stop strings, single special
   tokens, as eos_token_id instead (same stops; a stop string spelled by several ordinary tokens would also stop
   upstream's serve engine, not ours).
 * Mode of a step = last token of the compact input_ids (M:1737-1743): <|audio_out_bos|> -> AUDIO_INIT,
   <|AUDIO_OUT|> -> AUDIO_IN_PROGRESS, else TEXT. With the KV cache the step feeds input_ids[:, -1:] and, in
   AUDIO_IN_PROGRESS, the last column of audio_out_ids; in the other modes audio_out_ids are not fed (M:1749-1757).
 * AUDIO_INIT (M:1596-1609, 1847-1868): that step's text logits are ignored and nothing is drawn; it emits
   <|AUDIO_OUT|> (appended to input_ids: ONE placeholder per segment) and an all-stream-bos column, which opens a
   new entry of audio_sequences and of audio_out_ids.
 * AUDIO_IN_PROGRESS (M:1510-1521, 1539-1544, 1826-1830): the previous column is fed; all K codebooks are picked from
   audio_logits[-1] ([K, V], V = 1026): argmax, or ONE torch.multinomial on the [K, V] probabilities (forced
   codebooks drawn too). The step's text token is <|AUDIO_OUT|>, NOT appended to input_ids (M:1904-1906) while the
   segment goes on; the column is appended to audio_out_ids and audio_sequences.
 * Bos ramp (M:1548-1550): num_delay = 0 when a segment opens; each in-progress column: if num_delay + 1 < K,
   codebooks [num_delay + 1:] := bos and num_delay += 1. Column j (1-based) keeps codebooks 0..j-1 as picked.
 * Eos ramp (M:1551-1566), after the bos forcing of the same column: while no ramp runs, c = the FIRST codebook
   holding eos (`nonzero()[0][-1]` is the first, despite the name last_eos_idx); codebooks [:c] := eos (0..c are
   then eos; codebooks > c keep what was picked, eos or bos included) and r = K - c - 1. Each later column:
   codebooks [:K - r] := eos, then r -= 1. The column after which r <= 0 is the segment's last (with c = K - 1 the
   first-eos column itself): its step's text token is <|audio_eos|>, num_delay and r reset. Example, K = 8, first
   eos in codebook 3 at column 8: columns 8, 9 have eos in 0..3, column 10 in 0..4, 11 in 0..5, 12 in 0..6 and is
   the last; codebook 7 of the last column is what was picked (not eos) -- the forcing lags the delay pattern of
   training data by one codebook, and an ended segment's last column is not all-eos. A closed segment of 1 + F
   columns whose ramp began at column t has c = t + K - 1 - F.
 * The last column is never fed back: the next step feeds the <|audio_eos|> text token (mode TEXT).
 * TEXT (M:1611-1618): argmax, or one torch.multinomial on the [1, vocab] probabilities after temperature / top_k /
   top_p (transformers' order; its GenerationConfig defaults top_k to 50 unless passed, as ours documents).
   <|audio_out_bos|> from the text head starts AUDIO_INIT next step. Nothing stops the text head from emitting
   <|AUDIO_OUT|> or <|AUDIO|>: upstream would then run AUDIO_IN_PROGRESS without an AUDIO_INIT (feeding the last
   existing audio-out column, or failing without one); ours feeds it as a text token (no prompt here takes it).
 * Stopping (M:1904-1910): each step appends one token to input_ids_full (the text token, or <|AUDIO_OUT|> /
   <|audio_eos|> for an audio step) and the criteria look at it: stop when it is an eos id, or when
   len(input_ids_full) = unexpanded prompt + max_new_tokens. So max_new_tokens counts STEPS = text-mode tokens
   (<|audio_out_bos|> and the stop token included) + audio columns (bos columns included; the last column and its
   <|audio_eos|> are one step).
 * Returned (M:1919-1930): sequences = prompt + text ids (one <|AUDIO_OUT|> per segment, <|audio_eos|> after each
   closed one), audio_sequences = one [K, columns] delayed tensor per segment, column 0 all bos. The serve engine
   decodes revert_delay_pattern(segment).clip(0, 1023)[:, 1:-1] (S:401): bos/eos picked inside the frames clipped.

Budgets: ours stops on max_frames (audio columns of the turn, bos columns included) or max_text_tokens (text-mode
tokens), upstream on one step count = text-mode tokens + columns. No single max_new_tokens equals the pair, so the
check counts the steps S our output took: if ours ended with a stop token, upstream runs with S + K + 8 and must stop
at the same step; if ours stopped on a budget, upstream runs with exactly S, i.e. the common prefix is compared.
Comparison: generated text ids equal; every delayed segment equal column for column. Sampled runs: ours draws from
one generator per prompt seeded by prompt_seed(seed, id), written to the NPZ and given to upstream's `seed`.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
TINY_TOKENIZER = ROOT / "tests" / "assets" / "tiny_tokenizer"
STOP_STRINGS = ["<|end_of_text|>", "<|eot_id|>"]  # upstream serve engine's defaults (S:371-372)
ASSISTANT_HEADER = "<|start_header_id|>assistant<|end_header_id|>\n\n"
AOB_BOOST, EOT_BOOST, EOS_BOOST = 3.0, 2.0, 2.0  # see make_tiny
SAMPLE_SEED = 1234
# Our runs: greedy decides the result; the sampled ones are reported (can upstream's RNG stream be matched?).
# top_k 0 = off (upstream: top_k=None; transformers' GenerationConfig would otherwise apply its default 50).
RUNS = {"greedy": dict(do_sample=False),
        "sampled": dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0),
        "sampled_warped": dict(do_sample=True, temperature=0.7, top_k=50, top_p=0.95)}

# The tiny model: the release's audio side (examples/tiny/config.json, tests/helpers.py TINY_MODEL), llama3 RoPE.
TINY_CONFIG = {
    "architectures": ["HiggsAudioModel"], "model_type": "higgs_audio", "audio_num_codebooks": 8,
    "audio_codebook_size": 1024, "use_delay_pattern": True, "audio_stream_bos_id": 1024, "audio_stream_eos_id": 1025,
    "audio_adapter_type": "dual_ffn_fast_forward", "audio_dual_ffn_layers": [0, 1], "skip_audio_tower": True,
    "encode_whisper_embed": False, "encode_audio_in_tokens": True,
    "text_config": {"model_type": "llama", "vocab_size": 416, "hidden_size": 32, "intermediate_size": 80,
                    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8,
                    "max_position_embeddings": 131072, "rms_norm_eps": 1e-05, "rope_theta": 500000.0,
                    "bos_token_id": 400, "eos_token_id": 404,
                    "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                     "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}},
}

# The prompt set (ChatML messages, upstream's format); audio_url names a codes item of CODE_FRAMES.
SYSTEM = "Generate audio following instruction."
CHATS = {
    "tts": {"messages": [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": "The quick brown fox jumps over the lazy dog."}]},
    "clone": {"messages": [  # voice cloning: the reference is an earlier assistant turn (audio-out)
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": "Hello world"},
        {"role": "assistant", "content": {"type": "audio", "audio_url": "ref"}},
        {"role": "user", "content": "Please read the text aloud."}]},
    "multi": {"messages": [  # multi-turn: user audio (audio-in), a text answer, text + audio answer, a new request
        {"role": "user", "content": [{"type": "text", "text": "Transcribe this clip."},
                                     {"type": "audio", "audio_url": "asr"}]},
        {"role": "assistant", "content": "Hello world."},
        {"role": "user", "content": "Speak in a calm voice."},
        {"role": "assistant", "content": [{"type": "text", "text": "Sure."}, {"type": "audio", "audio_url": "said"}]},
        {"role": "user", "content": "Again, slower."}]},
}
CODE_FRAMES = {"ref": 6, "asr": 4, "said": 5}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def weight_files(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.safetensors"))


def prompt_keys() -> list[tuple[str, str, bool]]:
    """(prompt id, chat name, force_audio) in order: every chat with and without <|audio_out_bos|>."""
    return [(f"{name}{'+aob' if force else ''}", name, force) for name in CHATS for force in (True, False)]


# --------------------------------------------------------------------- steps as both sides see them (pure python)


def events(text_ids: list[int], segments: list[np.ndarray], audio_out: int, audio_eos: int) -> list[tuple]:
    """A generation as upstream's steps: ("text", id) | ("init", bos column) | ("frame", column, last?). An
    <|audio_eos|> right after a segment is its last frame's step, not a step of its own."""
    out, seg, i = [], 0, 0
    while i < len(text_ids):
        tok = text_ids[i]
        if tok == audio_out and seg < len(segments):
            columns = segments[seg]
            ended = i + 1 < len(text_ids) and text_ids[i + 1] == audio_eos
            out.append(("init", tuple(columns[:, 0].tolist())))
            for c in range(1, columns.shape[1]):
                out.append(("frame", tuple(columns[:, c].tolist()), ended and c == columns.shape[1] - 1))
            seg += 1
            i += 2 if ended else 1
        else:
            out.append(("text", tok))
            i += 1
    return out


def describe(text_ids: list[int], segments: list[np.ndarray], names: dict[int, str], audio_eos: int, eos: int,
             k: int) -> str:
    """e.g. `text×3 <|audio_out_bos|> audio[1+12, eos cb3@8] <|audio_eos|> text×2 <|eot_id|>`: a segment of a bos
    column + 12 frames whose eos ramp began at frame 8 with codebook 3 (c = t + K - 1 - F for a closed segment)."""
    parts, run, seg = [], 0, 0
    for i, tok in enumerate(text_ids):
        if tok not in names:
            run += 1
            continue
        if run:
            parts.append(f"text×{run}")
            run = 0
        if names[tok] == "<|AUDIO_OUT|>" and seg < len(segments):
            columns, frames = segments[seg], segments[seg].shape[1] - 1
            hits = [c for c in range(1, columns.shape[1]) if (columns[:, c] == eos).any()]
            closed = i + 1 < len(text_ids) and text_ids[i + 1] == audio_eos
            where = ""
            if hits and closed:
                where = f", eos cb{hits[0] + k - 1 - frames}@{hits[0]}"
            elif hits:
                where = f", eos@{hits[0]}, cut"
            elif not closed:
                where = ", cut"
            parts.append(f"audio[1+{frames}{where}]")
            seg += 1
        else:
            parts.append(names[tok])
    if run:
        parts.append(f"text×{run}")
    return " ".join(parts) or "(nothing)"


# ------------------------------------------------------------------------------------------ step 1: ours (.venv)


def make_tiny(out: Path) -> Path:
    """DIR/port and DIR/boson of a random tiny model (see the module docstring), the tiny tokenizer beside each."""
    import torch
    from transformers import AutoTokenizer

    from higgs_ds.model import HiggsAudioForTraining, read_model_config, save_checkpoint

    tokenizer = AutoTokenizer.from_pretrained(str(TINY_TOKENIZER))
    config = read_model_config(TINY_CONFIG, tokenizer)
    torch.manual_seed(0)
    model = HiggsAudioForTraining(config)
    generator = torch.Generator().manual_seed(20251207)
    state = {}
    for name, value in model.state_dict().items():
        noise = torch.randn(value.shape, generator=generator)
        state[name] = (1.0 + 0.3 * noise if name.endswith("layernorm.weight") or name.endswith("norm.weight")
                       else 0.15 * noise).to(value.dtype)
    ids = tokenizer.convert_tokens_to_ids
    state["text_lm_head.weight"][ids("<|audio_out_bos|>")] *= AOB_BOOST
    state["text_lm_head.weight"][ids("<|eot_id|>")] *= EOT_BOOST
    per_codebook = config.ids_per_codebook
    for k in range(config.num_codebooks):
        state["audio_lm_head.weight"][k * per_codebook + config.stream_eos_id] *= EOS_BOOST
    if out.exists():
        shutil.rmtree(out)
    for layout in ("port", "boson"):
        save_checkpoint(state, config, out / layout, layout=layout)
        for file in TINY_TOKENIZER.iterdir():
            shutil.copy2(file, out / layout / file.name)
    return out


def random_codes(num_codebooks: int, codes: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    return {name: rng.integers(0, codes, (num_codebooks, frames)).astype(np.int64)
            for name, frames in sorted(CODE_FRAMES.items())}


def step_ours(export: Path, npz: Path, tokenizer_dir: Path, max_frames: int, max_text_tokens: int,
              prompts_only: bool) -> int:
    import torch

    from higgs_ds.data.chatml import sample_from_chatml
    from higgs_ds.generate.prompts import build_prompt
    from higgs_ds.model import load_model
    from higgs_ds.vocabulary import load_vocabulary

    vocabulary = load_vocabulary(tokenizer_dir, export / "port")
    tokenizer, tokens, config = vocabulary.tokenizer, vocabulary.tokens, vocabulary.model_config
    codes = random_codes(config.num_codebooks, config.codes_per_codebook)

    def load_codes(ref):
        return codes[ref.item["audio_url"]]

    arrays, prompts = {}, []
    for index, (key, name, force) in enumerate(prompt_keys()):
        chat = CHATS[name]
        sample = sample_from_chatml(chat, tokenizer, tokens, config.audio, load_codes, key)
        header = tokenizer.encode(ASSISTANT_HEADER + ("<|audio_out_bos|>" if force else ""), add_special_tokens=False)
        prompt = build_prompt(chat, vocabulary, load_codes, key, force_audio=force)
        prompts.append(prompt)
        items = sample.audio_codes
        p = f"p{index}_"
        arrays[p + "id"] = np.array(key)
        arrays[p + "chat"] = np.array(json.dumps(chat))
        arrays[p + "force_audio"] = np.array(force)
        # upstream's ChatMLDatasetSample: unexpanded ids (one placeholder per audio item) + raw codes concatenated
        arrays[p + "input_ids"] = np.concatenate([sample.input_ids.astype(np.int64), np.asarray(header, np.int64)])
        arrays[p + "codes"] = (np.concatenate(items, axis=1).astype(np.int64) if items
                               else np.zeros((config.num_codebooks, 0), dtype=np.int64))
        arrays[p + "codes_start"] = np.cumsum([0] + [c.shape[1] for c in items[:-1]]).astype(np.int64) \
            if items else np.zeros(0, dtype=np.int64)
        # our expanded prompt (checked against upstream's own expansion in step 2)
        arrays[p + "prompt_input_ids"] = prompt.input_ids.numpy().astype(np.int64)
        arrays[p + "prompt_audio_mask"] = prompt.audio_mask.numpy()
        arrays[p + "prompt_audio_codes"] = prompt.audio_codes.numpy().astype(np.int64)
    arrays["prompts"] = np.array(len(prompts))

    runs = {}
    if not prompts_only:
        from higgs_ds.generate.decode import SamplingConfig, generate, prompt_seed

        model = load_model(export / "port", tokenizer=tokenizer).eval()
        for run, params in RUNS.items():
            sampling = SamplingConfig(**params, seed=SAMPLE_SEED, max_frames=max_frames,
                                      max_text_tokens=max_text_tokens)
            with torch.no_grad():
                runs[run] = generate(model, prompts, tokens, sampling, batch_size=1)
        for run, generations in runs.items():
            if len(generations) != len(prompts):
                print(f"FAIL: our generate returned {len(generations)} generations for {len(prompts)} prompts")
                return 1
            for index, generation in enumerate(generations):
                p = f"{run}_p{index}_"
                arrays[p + "text_ids"] = np.asarray(list(generation.text_ids), dtype=np.int64)
                arrays[p + "stop"] = np.array(str(generation.stop))
                # ours seeds one generator per prompt (prompt_seed); upstream's one generator gets the same seed
                arrays[p + "seed"] = np.array(prompt_seed(SAMPLE_SEED, prompts[index].id), dtype=np.int64)
                arrays[p + "segments"] = np.array(len(generation.segments))
                for s, segment in enumerate(generation.segments):
                    arrays[p + f"seg{s}"] = segment.cpu().numpy().astype(np.int64)
    import transformers

    meta = dict(export=str(export), tokenizer=str(tokenizer_dir), max_frames=max_frames,
                max_text_tokens=max_text_tokens, runs={run: RUNS[run] for run in runs}, sample_seed=SAMPLE_SEED,
                torch=torch.__version__, transformers=transformers.__version__,
                weights={f"{layout}/{f.name}": sha256(f) for layout in ("port", "boson")
                         for f in weight_files(export / layout)})
    arrays["meta"] = np.array(json.dumps(meta))
    npz.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(npz, **arrays)
    print(f"wrote {npz}: {len(prompts)} prompts, our runs: {', '.join(runs) or 'none (--prompts-only)'}")
    return 0


# ------------------------------------------------------------------------------------ step 2: upstream (.venv-ref)


def load_upstream(boson: Path):
    """Strict, as reference/check_boson_export.py: any missing/unexpected key or non-fp32 tensor is a problem."""
    import torch
    from boson_multimodal.model.higgs_audio import HiggsAudioConfig, HiggsAudioModel
    from safetensors import safe_open

    config = HiggsAudioConfig.from_pretrained(str(boson))
    model, info = HiggsAudioModel.from_pretrained(str(boson), output_loading_info=True)
    problems = {k: v for k, v in info.items() if v}
    saved = {}
    for path in weight_files(boson):
        with safe_open(str(path), framework="pt") as f:
            saved.update({key: f.get_slice(key).get_dtype() for key in f.keys()})
    expected = set(model.state_dict())
    if set(saved) != expected:
        problems["file_vs_model_keys"] = dict(only_in_file=sorted(set(saved) - expected),
                                              only_in_model=sorted(expected - set(saved)))
    if set(saved.values()) != {"F32"}:
        problems["file_dtypes"] = sorted(set(saved.values()))
    if any(p.dtype != torch.float32 for p in model.parameters()):
        problems["model_dtypes"] = sorted({str(p.dtype) for p in model.parameters()})
    return config, model.eval(), problems


class Upstream:
    """Upstream's model, collator and tokenizer, and one prompt at a time through them."""

    def __init__(self, export: Path, tokenizer_dir: Path):
        from boson_multimodal.data_collator.higgs_audio_collator import HiggsAudioSampleCollator
        from transformers import AutoTokenizer

        self.config, self.model, self.problems = load_upstream(export / "boson")
        self.tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
        c = self.config
        self.k = c.audio_num_codebooks
        # the serve engine's collator (S:261-273) with audio-in tokens returned (no whisper: the release's config)
        self.collator = HiggsAudioSampleCollator(
            whisper_processor=None, audio_in_token_id=c.audio_in_token_idx, audio_out_token_id=c.audio_out_token_idx,
            pad_token_id=c.pad_token_id, audio_stream_bos_id=c.audio_stream_bos_id,
            audio_stream_eos_id=c.audio_stream_eos_id, round_to=1, pad_left=False, encode_whisper_embed=False,
            return_audio_in_tokens=True, audio_num_codebooks=self.k, use_delay_pattern=c.use_delay_pattern)
        ids = self.tokenizer.convert_tokens_to_ids
        self.audio_out, self.audio_eos, self.aob = c.audio_out_token_idx, c.audio_eos_token_id, c.audio_out_bos_token_id
        self.stop_ids = {ids(s) for s in STOP_STRINGS}
        self.names = {ids(t): t for t in ("<|audio_out_bos|>", "<|AUDIO_OUT|>", "<|audio_eos|>", "<|eot_id|>",
                                          "<|end_of_text|>", "<|AUDIO|>")}

    def describe(self, text_ids: list[int], segments: list[np.ndarray]) -> str:
        return describe(text_ids, segments, self.names, self.audio_eos, self.config.audio_stream_eos_id, self.k)

    def prompt_ids(self, chat: dict, force: bool) -> list[int]:
        """The serve engine's _prepare_inputs (S:280-291): prepare_chatml_sample + assistant header (+ aob)."""
        from boson_multimodal.dataset.chatml_dataset import prepare_chatml_sample

        input_tokens, _, _, _ = prepare_chatml_sample(json.loads(json.dumps(chat)), self.tokenizer)
        postfix = ASSISTANT_HEADER + ("<|audio_out_bos|>" if force else "")
        return list(input_tokens) + self.tokenizer.encode(postfix, add_special_tokens=False)

    def collate(self, input_ids, codes, codes_start):
        import torch
        from boson_multimodal.dataset.chatml_dataset import ChatMLDatasetSample

        sample = ChatMLDatasetSample(
            input_ids=torch.from_numpy(input_ids), label_ids=None, audio_ids_concat=torch.from_numpy(codes),
            audio_ids_start=torch.from_numpy(codes_start), audio_waveforms_concat=torch.zeros(0),
            audio_waveforms_start=torch.zeros(0, dtype=torch.long), audio_sample_rate=torch.zeros(0),
            audio_speaker_indices=torch.zeros(0, dtype=torch.long))
        return self.collator([sample])

    def expansion(self, collated):
        """Upstream's expanded prompt (one forward): ids, audio mask, codes at audio positions in order."""
        import torch

        with torch.no_grad():
            out = self.model(input_ids=collated.input_ids, attention_mask=collated.attention_mask,
                             audio_in_ids=collated.audio_in_ids, audio_in_ids_start=collated.audio_in_ids_start,
                             audio_out_ids=collated.audio_out_ids, audio_out_ids_start=collated.audio_out_ids_start)
        real = out.attention_mask.bool()[0]
        in_mask, out_mask = out.audio_in_discrete_codes_mask[0][real], out.audio_out_mask[0][real]
        audio = in_mask | out_mask
        codes = torch.zeros(self.k, int(audio.sum()), dtype=torch.long)
        if in_mask.any():
            codes[:, in_mask[audio]] = collated.audio_in_ids
        if out_mask.any():
            codes[:, out_mask[audio]] = collated.audio_out_ids
        return out.expanded_input_ids[0][real], audio, codes

    def generate(self, collated, max_new_tokens: int, params: dict, seed: int):
        """model.generate as the serve engine calls it (S:382-396: the collated inputs, use_cache=True, a seed), ras
        off, the stop strings given as eos ids (see the module docstring) -> text ids, segments, per-step logits.
        `params`: do_sample and, when sampling, temperature / top_k (0 = off) / top_p."""
        sampling = {}
        if params.get("do_sample"):
            sampling = dict(temperature=params["temperature"], top_k=params["top_k"] or None, top_p=params["top_p"])
        out = self.model.generate(
            input_ids=collated.input_ids, attention_mask=collated.attention_mask,
            audio_in_ids=collated.audio_in_ids, audio_in_ids_start=collated.audio_in_ids_start,
            audio_out_ids=collated.audio_out_ids, audio_out_ids_start=collated.audio_out_ids_start,
            do_sample=bool(params.get("do_sample")), **sampling, max_new_tokens=max_new_tokens,
            audio_out_bos_token_id=self.aob, audio_eos_token_id=self.audio_eos, eos_token_id=sorted(self.stop_ids),
            use_cache=True, seed=seed, return_dict_in_generate=True, output_logits=True)
        prompt_len = collated.input_ids.shape[1]
        text = out.sequences[0, prompt_len:].tolist()
        segments = [s.cpu().numpy().astype(np.int64) for s in out.audio_sequences]
        logits = [t.float() for t in out.logits]
        return text, segments, logits


def margin(logits, step: int, mine: tuple | None, theirs: tuple | None) -> str:
    """Top-2 gap of upstream's logits at a step (text: [1, V]; audio: [K, V], over the codebooks that differ)."""
    if step >= len(logits):
        return "no upstream logits at that step"
    top = logits[step].topk(2, dim=-1).values
    gaps = top[..., 0] - top[..., 1]
    rows = []
    if mine and theirs and mine[0] == theirs[0] == "frame":
        rows = [k for k, (a, b) in enumerate(zip(mine[1], theirs[1])) if a != b]
    gap = gaps[rows].min() if rows and gaps.shape[0] > max(rows) else gaps.min()
    where = f"codebooks {rows}" if rows else f"{list(logits[step].shape)}"
    return f"upstream's top-2 logit margin there {float(gap):.3e} ({where})"


def first_difference(mine: list, theirs: list) -> int | None:
    for s, (a, b) in enumerate(zip(mine, theirs)):
        if a != b:
            return s
    return None if len(mine) == len(theirs) else min(len(mine), len(theirs))


def step_upstream(export: Path, npz_path: Path) -> int:
    import boson_multimodal  # noqa: F401 - fail early outside the reference venv
    import torch
    import transformers

    npz = np.load(npz_path)
    meta = json.loads(str(npz["meta"]))
    for name, digest in meta["weights"].items():
        if sha256(export / name) != digest:
            print(f"FAIL: {export / name} is not the export step 1 ran on (sha256 differs); rerun step 1")
            return 1
    tokenizer_dir = export / "boson" if (export / "boson" / "tokenizer_config.json").exists() \
        else Path(meta["tokenizer"])
    up = Upstream(export, tokenizer_dir)
    print(f"upstream boson-multimodal HiggsAudioModel.from_pretrained({export / 'boson'}): transformers "
          f"{transformers.__version__}, torch {torch.__version__}, attn={up.model.config._attn_implementation}, "
          f"K={up.k}, delay={up.config.use_delay_pattern}, stop ids {sorted(up.stop_ids)} + generation_config "
          f"eos {up.model.generation_config.eos_token_id}")
    if up.problems:
        print(f"FAIL: upstream does not load the export cleanly: {json.dumps(up.problems, indent=1)}")
        return 1
    if not up.config.use_delay_pattern or up.k != 8:
        print(f"note: the export has K={up.k}, use_delay_pattern={up.config.use_delay_pattern} (the release: 8, true)")
    runs = meta["runs"]  # run name -> sampling parameters ({} with --prompts-only)
    failures, reports = [], {run: [] for run, params in runs.items() if params.get("do_sample")}
    for index in range(int(npz["prompts"])):
        p = f"p{index}_"
        key, chat, force = str(npz[p + "id"]), json.loads(str(npz[p + "chat"])), bool(npz[p + "force_audio"])
        input_ids = npz[p + "input_ids"]
        # 1. the prompt: upstream's own tokens and expansion equal ours
        theirs = up.prompt_ids(chat, force)
        if theirs != input_ids.tolist():
            failures.append(f"{key}: upstream's prepare_chatml_sample + header differs from our unexpanded prompt")
            print(f"{key}: FAIL prompt tokens differ\n  ours     {input_ids.tolist()}\n  upstream {theirs}")
            continue
        collated = up.collate(input_ids, npz[p + "codes"], npz[p + "codes_start"])
        ids, audio, codes = up.expansion(collated)
        same_prompt = (torch.equal(ids, torch.from_numpy(npz[p + "prompt_input_ids"]))
                       and torch.equal(audio, torch.from_numpy(npz[p + "prompt_audio_mask"]))
                       and torch.equal(codes, torch.from_numpy(npz[p + "prompt_audio_codes"])))
        if not same_prompt:
            failures.append(f"{key}: upstream's expanded prompt (ids / audio mask / delayed codes) differs from "
                            "build_prompt's")
            print(f"{key}: FAIL expanded prompt differs (len ours {len(npz[p + 'prompt_input_ids'])}, "
                  f"upstream {len(ids)})")
            continue
        head = f"{key}: prompt {len(input_ids)} tokens / {len(ids)} expanded, {int(audio.sum())} audio positions"
        if not runs:  # --prompts-only: show upstream's greedy path
            try:
                text, segs, _ = up.generate(collated, 64, dict(do_sample=False), seed=SAMPLE_SEED)
                print(f"{head} | upstream greedy, 64 steps: {up.describe(text, segs)}")
            except Exception as exc:  # noqa: BLE001
                print(f"{head} | upstream raised {type(exc).__name__}: {exc}")
            continue
        print(head)
        for run, params in runs.items():
            q = f"{run}_p{index}_"
            mine_text = npz[q + "text_ids"].tolist()
            mine_segs = [npz[q + f"seg{s}"] for s in range(int(npz[q + "segments"]))]
            mine_events = events(mine_text, mine_segs, up.audio_out, up.audio_eos)
            steps, stop = len(mine_events), str(npz[q + "stop"])
            stopped = bool(mine_text) and mine_text[-1] in up.stop_ids
            budget = steps + up.k + 8 if stopped else steps
            how = (f"ours: stop {stop} after {steps} steps, upstream given {budget}" if stopped else
                   f"ours: stop {stop} after {steps} steps, upstream given exactly {steps}")
            greedy = not params.get("do_sample")
            try:
                text, segs, logits = up.generate(collated, budget, params, seed=int(npz[q + "seed"]))
            except Exception as exc:  # noqa: BLE001 - e.g. an undefined path (<|AUDIO_OUT|> from the text head)
                line = f"  {run}: upstream raised {type(exc).__name__}: {exc} ({how})"
                (failures if greedy else reports[run]).append(f"{key} {line.strip()}")
                print(line)
                continue
            their_events = events(text, segs, up.audio_out, up.audio_eos)
            if not (text and text[-1] in up.stop_ids) and len(their_events) != budget:
                failures.append(f"{key} {run}: upstream took {len(their_events)} steps without a stop token, "
                                f"budget {budget}: this script's step accounting is wrong")
            same = text == mine_text and len(segs) == len(mine_segs) and all(
                a.shape == b.shape and np.array_equal(a, b) for a, b in zip(segs, mine_segs))
            line = f"  {run}: {'same' if same else 'DIFFERENT'} ({how}) | {up.describe(text, segs)}"
            if not same:
                s = first_difference(mine_events, their_events)
                mine_s = mine_events[s] if s is not None and s < len(mine_events) else None
                theirs_s = their_events[s] if s is not None and s < len(their_events) else None
                detail = (f"first different step {s}: ours {mine_s or 'END'} vs upstream {theirs_s or 'END'}; "
                          f"{margin(logits, s, mine_s, theirs_s)}"
                          if s is not None else "same steps, different text ids / segment shapes")
                line += f"\n    ours: {up.describe(mine_text, mine_segs)}\n    {detail}"
                (failures if greedy else reports[run]).append(f"{key} {run}: {detail}")
            elif not greedy:
                reports[run].append(f"{key}: same")
            print(line)
    if not runs:
        print("NO COMPARISON: the NPZ holds no generation of ours (--prompts-only); prompts "
              + ("differ: " + "; ".join(failures) if failures else "agree with upstream's"))
        return 1
    count = int(npz["prompts"])
    for run, lines in reports.items():
        same = sum(r.endswith(": same") for r in lines)
        print(f"SAMPLING {run} (reported only; {runs[run]}, seed per prompt from {SAMPLE_SEED}): {same}/{count} "
              f"prompts give upstream's exact output")
    if failures:
        print("\n".join(failures))
        print(f"FAIL: {len(failures)} differences from upstream's greedy generation over {count} prompts")
        return 1
    print(f"PASS: {count} prompts, greedy generation identical to upstream's (text ids and every delayed segment)")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--step", choices=("ours", "upstream"), required=True,
                        help="ours: in the project venv, writes NPZ; upstream: in the reference venv, checks it")
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--export", type=Path, help="launch/export.py --layout both output (DIR/port, DIR/boson)")
    where.add_argument("--make-tiny", type=Path, metavar="DIR",
                       help="step ours: write a tiny random export to DIR and use it (step upstream: --export DIR)")
    parser.add_argument("--npz", type=Path, required=True, help="written by --step ours, read by --step upstream")
    parser.add_argument("--tokenizer", type=Path, default=None,
                        help="step ours: tokenizer dir (default: EXPORT/port if it holds one, else the tiny tokenizer)")
    parser.add_argument("--max-frames", type=int, default=40, help="step ours: SamplingConfig.max_frames")
    parser.add_argument("--max-text-tokens", type=int, default=24, help="step ours: SamplingConfig.max_text_tokens")
    parser.add_argument("--prompts-only", action="store_true",
                        help="step ours: write the prompts only (no generation of ours); step upstream then prints "
                             "upstream's generations")
    args = parser.parse_args(argv)
    if args.step == "upstream":
        if args.export is None:
            parser.error("--step upstream takes --export DIR (the DIR given to --make-tiny)")
        return step_upstream(args.export, args.npz)
    export = make_tiny(args.make_tiny) if args.make_tiny else args.export
    tokenizer = args.tokenizer or (export / "port" if (export / "port" / "tokenizer_config.json").exists()
                                   else TINY_TOKENIZER)
    return step_ours(export, args.npz, tokenizer, args.max_frames, args.max_text_tokens, args.prompts_only)


if __name__ == "__main__":
    sys.exit(main())
