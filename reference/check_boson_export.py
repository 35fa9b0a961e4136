"""Does a boson-layout export (launch/export.py --layout boson|both) load in upstream boson-multimodal 0.1.1 and give
the logits our model gives? Two steps, one per venv (higgs_ds needs transformers 5, upstream pins transformers<4.47):

    # 1. ours, in the project venv: samples -> our Collator -> Batch -> load_model(EXPORT/port) logits -> NPZ
    .venv/bin/python reference/check_boson_export.py --step ours --export EXPORT --npz NPZ \
        [--samples examples/tiny/samples.jsonl --tokenizer examples/tiny/tokenizer --batch-size 4]
    # 2. upstream, in the reference venv (reference/setup_ref_venv.sh): HiggsAudioModel.from_pretrained(EXPORT/boson)
    #    on the same samples through upstream's own HiggsAudioSampleCollator, compared with the NPZ
    .venv-ref/bin/python reference/check_boson_export.py --step upstream --export EXPORT --npz NPZ

EXPORT is the output of `launch/export.py RUN_OUT --out EXPORT --layout both` (EXPORT/port and EXPORT/boson).
Step 1 also checks that EXPORT/boson, read by our own loader, gives bit-identical logits to EXPORT/port.

Step 2 follows reference/make_model_goldens.py: each sample becomes upstream's ChatMLDatasetSample (our tokenized
ids with one placeholder per audio segment, the raw codes concatenated), HiggsAudioSampleCollator (round_to=8,
right padding, delay pattern, stream bos/eos) collates them and HiggsAudioModel.forward expands the placeholders
(merge_input_ids_with_audio_features). The comparison is made where the two are comparable (goldens' meta.json):
real positions only (upstream pads expanded rows to a multiple of 8, and its padded query rows are not masked on
CPU). Before any logit is compared, upstream's expansion is checked against our Batch (expanded ids, text labels,
audio-in/out masks, audio streams and labels), so a mismatch can only come from the weights or the model.
Loading is strict: any missing, unexpected or mismatched key, or a non-fp32 tensor, fails the check.
Exit code 0 = pass; the result line starts with PASS or FAIL.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RTOL = ATOL = 1e-4


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def weight_files(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.safetensors"))


# ------------------------------------------------------------------------------------------ step 1: ours (.venv)


def step_ours(export: Path, npz: Path, samples_jsonl: Path, tokenizer_dir: Path, batch_size: int) -> int:
    import torch
    from transformers import AutoTokenizer

    from higgs_ds.data.batch import TENSORS
    from higgs_ds.data.chatml import sample_from_chatml
    from higgs_ds.data.collator import Collator
    from higgs_ds.data.tokens import SpecialTokens
    from higgs_ds.model import load_model, read_model_config

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    config = read_model_config(export / "port", tokenizer)
    tokens = SpecialTokens.from_tokenizer(tokenizer, config.pad_token_id)
    samples = []
    for line in samples_jsonl.read_text().splitlines():
        row = json.loads(line)
        samples.append(sample_from_chatml(
            row, tokenizer, tokens, config.audio, key=row["id"],
            load_codes=lambda ref: np.load(samples_jsonl.parent / ref.item["audio_url"], allow_pickle=False)))
    # One sample per row (upstream knows no packing); at least two rows a batch, so upstream's merge right-pads
    # (it left-pads a one-row batch) like our collator.
    groups = [samples[i:i + batch_size] for i in range(0, len(samples), batch_size)]
    if len(groups) > 1 and len(groups[-1]) < 2:
        groups[-2] += groups.pop()
    collator = Collator(tokens, config.audio, layout="padded", round_to=1)

    model = load_model(export / "port", tokenizer=tokenizer).eval()
    model_from_boson = load_model(export / "boson", tokenizer=tokenizer).eval()
    arrays, notes = {}, []
    for b, group in enumerate(groups):
        batch = collator(group)
        batch.validate(len(tokenizer), config.ids_per_codebook, config.num_codebooks)
        with torch.no_grad():
            logits = model.logits(**batch.model_inputs())
            again = model_from_boson.logits(**batch.model_inputs())
        if not (torch.equal(logits.text, again.text) and torch.equal(logits.audio, again.audio)):
            print(f"FAIL: batch {b}: our model gives different logits from EXPORT/port and EXPORT/boson")
            return 1
        arrays[f"b{b}_rows"] = np.array(len(group))
        for j, sample in enumerate(group):
            codes = sample.audio_codes
            arrays[f"b{b}_s{j}_input_ids"] = np.asarray(sample.input_ids, dtype=np.int64)
            arrays[f"b{b}_s{j}_label_ids"] = np.asarray(sample.label_ids, dtype=np.int64)
            arrays[f"b{b}_s{j}_codes"] = (np.concatenate(codes, axis=1).astype(np.int64) if codes
                                          else np.zeros((config.num_codebooks, 0), dtype=np.int64))
            arrays[f"b{b}_s{j}_codes_start"] = np.cumsum([0] + [c.shape[1] for c in codes[:-1]]).astype(np.int64) \
                if codes else np.zeros(0, dtype=np.int64)
        for name in TENSORS:
            arrays[f"b{b}_batch_{name}"] = getattr(batch, name).numpy()
        arrays[f"b{b}_text_logits"] = logits.text.float().numpy()
        arrays[f"b{b}_audio_logits"] = logits.audio.float().numpy()
        notes.append(dict(keys=batch.sample_keys, shape=list(batch.input_ids.shape),
                          audio_in_frames=int(batch.audio_in_ids.shape[1]),
                          audio_out_frames=int(batch.audio_out_ids.shape[1])))
    import transformers

    meta = dict(export=str(export), samples=str(samples_jsonl), torch=torch.__version__,
                transformers=transformers.__version__, batches=notes,
                weights={f"{layout}/{f.name}": sha256(f) for layout in ("port", "boson")
                         for f in weight_files(export / layout)})
    arrays["meta"] = np.array(json.dumps(meta))
    npz.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(npz, **arrays)
    frames = sum(n["audio_out_frames"] for n in notes)
    print(f"wrote {npz}: {len(groups)} batches, {len(samples)} samples, {frames} audio-out frames; "
          f"EXPORT/port and EXPORT/boson give identical logits in our model")
    return 0


# ------------------------------------------------------------------------------------ step 2: upstream (.venv-ref)


def load_upstream(boson: Path):
    """Strict: HiggsAudioModel.from_pretrained only warns about missing / unexpected keys, so they are checked."""
    import torch
    from boson_multimodal.model.higgs_audio import HiggsAudioConfig, HiggsAudioModel
    from safetensors import safe_open

    config = HiggsAudioConfig.from_pretrained(str(boson))
    model, info = HiggsAudioModel.from_pretrained(str(boson), output_loading_info=True)
    problems = {k: v for k, v in info.items() if v}  # missing, unexpected, mismatched keys, errors
    saved = {}
    for path in weight_files(boson):
        with safe_open(str(path), framework="pt") as f:
            saved.update({key: f.get_slice(key).get_dtype() for key in f.keys()})
    expected = set(model.state_dict())
    if set(saved) != expected:
        problems["file_vs_model_keys"] = dict(only_in_file=sorted(set(saved) - expected),
                                              only_in_model=sorted(expected - set(saved)))
    dtypes = set(saved.values())
    if dtypes != {"F32"}:
        problems["file_dtypes"] = sorted(dtypes)
    if any(p.dtype != torch.float32 for p in model.parameters()):
        problems["model_dtypes"] = sorted({str(p.dtype) for p in model.parameters()})
    return config, model.eval(), problems, len(saved)


def upstream_sample(npz, b: int, j: int):
    import torch
    from boson_multimodal.dataset.chatml_dataset import ChatMLDatasetSample

    def get(name):
        return torch.from_numpy(npz[f"b{b}_s{j}_{name}"])

    # as reference/make_model_goldens.py's make_sample: codes only, no waveforms (encode_whisper_embed=False)
    return ChatMLDatasetSample(
        input_ids=get("input_ids"), label_ids=get("label_ids"), audio_ids_concat=get("codes"),
        audio_ids_start=get("codes_start"), audio_waveforms_concat=torch.zeros(0),
        audio_waveforms_start=torch.zeros(0, dtype=torch.long), audio_sample_rate=torch.zeros(0),
        audio_speaker_indices=torch.zeros(0, dtype=torch.long))


def same_codes(theirs, mine) -> bool:
    """Upstream's collator gives an absent modality as [0, 0] (ours: [K, 0]); codes otherwise [K, frames]."""
    import torch

    if theirs is None or theirs.numel() == 0:
        return mine.numel() == 0
    return torch.equal(theirs, mine)


def differences(mine, theirs) -> dict:
    """max |ours - upstream|, max of it relative to |upstream| (over |upstream| >= 1e-3), and allclose."""
    import torch

    diff = (mine - theirs).abs()
    big = theirs.abs() >= 1e-3
    return dict(max_abs=float(diff.max()) if diff.numel() else 0.0,
                max_rel=float((diff[big] / theirs.abs()[big]).max()) if big.any() else 0.0,
                max_logit=float(theirs.abs().max()) if diff.numel() else 0.0,
                allclose=bool(torch.allclose(mine, theirs, rtol=RTOL, atol=ATOL)), count=int(theirs.numel()))


def step_upstream(export: Path, npz_path: Path) -> int:
    import boson_multimodal  # noqa: F401 - fail early outside the reference venv
    import torch
    import transformers
    from boson_multimodal.data_collator.higgs_audio_collator import HiggsAudioSampleCollator
    from make_model_goldens import upstream_inputs  # beside this script

    torch.manual_seed(0)
    npz = np.load(npz_path)
    meta = json.loads(str(npz["meta"]))
    for name, digest in meta["weights"].items():
        if sha256(export / name) != digest:
            print(f"FAIL: {export / name} is not the export step 1 ran on (sha256 differs); rerun step 1")
            return 1
    boson = export / "boson"
    config, model, problems, num_tensors = load_upstream(boson)
    print(f"upstream boson-multimodal HiggsAudioModel.from_pretrained({boson}): {num_tensors} tensors, "
          f"transformers {transformers.__version__}, torch {torch.__version__}, "
          f"attn={model.config._attn_implementation}")
    if problems:
        print(f"FAIL: upstream does not load the export cleanly: {json.dumps(problems, indent=1)}")
        return 1
    k_count = config.audio_num_codebooks
    collator = HiggsAudioSampleCollator(
        whisper_processor=None, audio_in_token_id=config.audio_in_token_idx,
        audio_out_token_id=config.audio_out_token_idx, pad_token_id=config.pad_token_id,
        audio_stream_bos_id=config.audio_stream_bos_id, audio_stream_eos_id=config.audio_stream_eos_id,
        round_to=8, pad_left=False, encode_whisper_embed=False, return_audio_in_tokens=True,
        audio_num_codebooks=k_count, use_delay_pattern=config.use_delay_pattern)

    texts, audios, failures = [], [], []
    b = 0
    while f"b{b}_rows" in npz.files:
        rows = int(npz[f"b{b}_rows"])
        ours = {k[len(f"b{b}_batch_"):]: torch.from_numpy(npz[k]) for k in npz.files
                if k.startswith(f"b{b}_batch_")}
        collated = collator([upstream_sample(npz, b, j) for j in range(rows)])
        with torch.no_grad():  # exactly the inputs reference/make_model_goldens.py gives upstream's forward
            out = model(**upstream_inputs(collated))

        # Same expanded sequence? Real positions in row-major order on both sides (either padding side).
        real, up_real = ours["attention_mask"], out.attention_mask.bool()
        checks = {
            "real positions per row": torch.equal(real.sum(1), up_real.sum(1)),
            "expanded input_ids": torch.equal(out.expanded_input_ids[up_real], ours["input_ids"][real]),
            "expanded text labels": torch.equal(out.expanded_labels[up_real], ours["label_ids"][real]),
            "audio_out_mask": torch.equal(out.audio_out_mask[up_real], ours["audio_out_mask"][real]),
            "audio_in_mask": torch.equal(out.audio_in_discrete_codes_mask[up_real], ours["audio_in_mask"][real]),
            "audio_out_ids": same_codes(collated.audio_out_ids, ours["audio_out_ids"]),
            "audio_in_ids": same_codes(collated.audio_in_ids, ours["audio_in_ids"]),
            "audio_out_labels": same_codes(collated.label_audio_ids, ours["audio_out_labels"]),
        } if torch.equal(real.sum(1), up_real.sum(1)) else {"real positions per row": False}
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            failures.append(f"batch {b}: upstream's expansion differs from our Batch in {bad}")
            b += 1
            continue
        mine_text = torch.from_numpy(npz[f"b{b}_text_logits"])[real]
        mine_audio = torch.from_numpy(npz[f"b{b}_audio_logits"])
        theirs_text, theirs_audio = out.logits.float()[up_real], out.audio_logits.float()
        if mine_text.shape != theirs_text.shape or mine_audio.shape != theirs_audio.shape:
            failures.append(f"batch {b}: logit shapes differ: text {list(mine_text.shape)} vs "
                            f"{list(theirs_text.shape)}, audio {list(mine_audio.shape)} vs {list(theirs_audio.shape)}")
            b += 1
            continue
        text, audio = differences(mine_text, theirs_text), differences(mine_audio, theirs_audio)
        print(f"batch {b}: {rows} rows {list(real.shape)} (upstream {list(up_real.shape)}), "
              f"{text['count'] // theirs_text.shape[-1]} real positions, {theirs_audio.shape[0]} audio-out frames | "
              f"text max_abs {text['max_abs']:.3e} max_rel {text['max_rel']:.3e} | "
              f"audio max_abs {audio['max_abs']:.3e} max_rel {audio['max_rel']:.3e}")
        for name, d in (("text", text), ("audio", audio)):
            if not d["allclose"]:
                failures.append(f"batch {b}: {name} logits not allclose (rtol={RTOL}, atol={ATOL}): {d}")
        texts.append(text), audios.append(audio)
        b += 1
    if b == 0:
        print(f"FAIL: {npz_path} holds no batch")
        return 1

    def overall(ds):
        return {key: max(d[key] for d in ds) for key in ("max_abs", "max_rel", "max_logit")} if ds else {}

    text, audio = overall(texts), overall(audios)
    summary = (f"{b} batches | text logits: max_abs {text.get('max_abs', float('nan')):.3e}, "
               f"max_rel {text.get('max_rel', float('nan')):.3e} (max |logit| {text.get('max_logit', 0):.2f}) | "
               f"audio logits: max_abs {audio.get('max_abs', float('nan')):.3e}, "
               f"max_rel {audio.get('max_rel', float('nan')):.3e} (max |logit| {audio.get('max_logit', 0):.2f}) | "
               f"rtol=atol={RTOL:g}, fp32")
    if failures:
        print("\n".join(failures))
        print(f"FAIL: {summary}")
        return 1
    print(f"PASS: {summary}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--step", choices=("ours", "upstream"), required=True,
                        help="ours: in the project venv, writes NPZ; upstream: in the reference venv, checks it")
    parser.add_argument("--export", type=Path, required=True, help="launch/export.py --layout both output")
    parser.add_argument("--npz", type=Path, required=True, help="written by --step ours, read by --step upstream")
    parser.add_argument("--samples", type=Path, default=ROOT / "examples" / "tiny" / "samples.jsonl",
                        help="ChatML JSONL with an id per line and audio_url = .npy codes (step ours)")
    parser.add_argument("--tokenizer", type=Path, default=ROOT / "examples" / "tiny" / "tokenizer",
                        help="the samples' tokenizer (step ours)")
    parser.add_argument("--batch-size", type=int, default=4, help="samples per batch, one per row (step ours)")
    args = parser.parse_args(argv)
    if args.step == "ours":
        return step_ours(args.export, args.npz, args.samples, args.tokenizer, args.batch_size)
    return step_upstream(args.export, args.npz)


if __name__ == "__main__":
    sys.exit(main())
