"""What the tests share, in one place (fixtures built from these are in conftest.py; running commands is
processes.py): paths; the tiny tokenizer; the one tiny model config and the variant derived from it; a tiny codec;
ChatML corpora, tokenized samples and shard splits; shard damage; hand-built Batches for the model tests; and the
launches of the multi-process training tests (run config, `launch`, kill -9 after a save, losses and consumed
samples read back)."""
from __future__ import annotations

import importlib.util
import io
import json
import os
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer, HiggsAudioV2Config, HiggsAudioV2TokenizerConfig

import processes
from data_tools import build_shards
from higgs_ds.data.batch import Batch
from higgs_ds.data.chatml import sample_from_chatml
from higgs_ds.data.sample import TokenizedSample
from higgs_ds.data.shards import SplitWriter, data_fingerprint
from higgs_ds.data.tokens import AudioSettings, SpecialTokens

# -------------------------------------------------------------------------------------------------------------- paths

ROOT = Path(__file__).resolve().parents[1]
TESTS = ROOT / "tests"
TINY_TOKENIZER = TESTS / "assets" / "tiny_tokenizer"  # ids differ from the real 1280xx ids on purpose
DATA_GOLDENS = TESTS / "goldens" / "data"
MODEL_GOLDENS = TESTS / "goldens" / "model"
BOSON, SPLIT = MODEL_GOLDENS / "boson_tiny", MODEL_GOLDENS / "boson_tiny_split"  # upstream-written checkpoints
DEEPSPEED = Path(sys.executable).parent / "deepspeed"
CPU_DS = ROOT / "ds_configs" / "cpu_zero3_fp32.json"
AUDIO = AudioSettings()  # 8 codebooks × 1024, delay pattern: what TINY_MODEL says


@lru_cache(maxsize=1)
def tiny_tokenizer():
    """The tiny tokenizer, loaded once (the `tokenizer` fixture is this one)."""
    return AutoTokenizer.from_pretrained(str(TINY_TOKENIZER))


def tiny_tokens() -> SpecialTokens:
    return SpecialTokens.from_tokenizer(tiny_tokenizer())


def load_script(path: Path, name: str):
    """A script that is not in a package (examples/) imported as module `name`, writing no __pycache__ beside it."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    writes, sys.dont_write_bytecode = sys.dont_write_bytecode, True
    try:
        spec.loader.exec_module(module)
    finally:
        sys.dont_write_bytecode = writes
    return module


# ------------------------------------------------------------------------------------------------------ model configs

# The one tiny model: a boson-layout config.json (the release's audio side, 8 codebooks of 1024 codes with the delay
# pattern; a 2-layer backbone). The launch tests train it (goldens/tiny_run_losses.json holds its losses: change a
# width and they change); the shard builder reads its audio settings (no pad_token_id: the pad is upstream's
# <|end_of_text|>, as the release's config says).
TINY_MODEL = {"audio_num_codebooks": 8, "audio_codebook_size": 1024, "use_delay_pattern": True,
              "skip_audio_tower": True, "audio_adapter_type": "dual_ffn_fast_forward", "audio_dual_ffn_layers": [0, 1],
              "text_config": {"vocab_size": 416, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                              "num_attention_heads": 4, "num_key_value_heads": 2}}
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def tiny_config(num_codebooks: int = 4, codes: int = 32) -> HiggsAudioV2Config:
    """TINY_MODEL's backbone as transformers' port config: what the in-process model tests build from. `codes` real
    codes per codebook; stream bos/eos come after them (the release: 1024 -> codebook_size 1026). Two differences
    from TINY_MODEL, kept from the model tests as they were written: 4 codebooks of 32 codes by default (small audio
    rows; test_memory counts on the text embedding being the largest layer, test_model_parity asks for the release's
    8 × 1024), and the release's llama3 RoPE scaling over 131072 positions (TINY_MODEL has upstream's default RoPE,
    with which the launch tests' stored losses were computed)."""
    text, tokens = TINY_MODEL["text_config"], tiny_tokens()
    hidden, heads = text["hidden_size"], text["num_attention_heads"]
    return HiggsAudioV2Config(
        vocab_size=text["vocab_size"], hidden_size=hidden, intermediate_size=text["intermediate_size"],
        num_hidden_layers=text["num_hidden_layers"], num_attention_heads=heads,
        num_key_value_heads=text["num_key_value_heads"], head_dim=hidden // heads, max_position_embeddings=131072,
        rope_parameters=dict(LLAMA3_ROPE), pad_token_id=tokens.pad, bos_token_id=tokens.begin_of_text,
        eos_token_id=tokens.eot, num_codebooks=num_codebooks, codebook_size=codes + 2,
        audio_token_id=tokens.audio_out, audio_bos_token_id=tokens.audio_out_bos,
        audio_delay_token_id=tiny_tokenizer().convert_tokens_to_ids("<|audio_delay|>"),
        audio_stream_bos_id=codes, audio_stream_eos_id=codes + 1)


CODEC_RATE = 24000  # the codec's sample rate; hop 960 → 25 frames/s as in the release


def tiny_codec_config() -> HiggsAudioV2TokenizerConfig:
    """The release's codec shape (24 kHz, hop 8·5·4·2·3 = 960, 16 kHz HuBERT semantic branch, 8 codebooks of 1024)
    with every width shrunk: 2 kbps at 25 frames/s and 10 bits per code gives exactly 8 quantizers. The decoder
    upsamples by the same 960 (transformers' default ratios give 320), so N frames decode to N × 960 samples."""
    return HiggsAudioV2TokenizerConfig(
        target_bandwidths=[2.0], sample_rate=CODEC_RATE, codebook_size=1024, codebook_dim=8,
        acoustic_model_config={"model_type": "dac", "encoder_hidden_size": 2, "downsampling_ratios": [8, 5, 4, 2, 3],
                               "upsampling_ratios": [8, 5, 4, 2, 3], "decoder_hidden_size": 32, "codebook_dim": 8},
        semantic_model_config={"model_type": "hubert", "hidden_size": 16, "num_hidden_layers": 1,
                               "num_attention_heads": 2, "intermediate_size": 32, "conv_dim": [8] * 7,
                               "num_conv_pos_embeddings": 16, "num_conv_pos_embedding_groups": 2})


def save_tiny_codec(directory: Path) -> Path:
    """A random tiny codec (tiny_codec_config) saved to `directory`: codebooks drawn at random (they init to zero),
    so codes and decoded audio vary."""
    from transformers import HiggsAudioV2TokenizerModel

    torch.manual_seed(0)
    model = HiggsAudioV2TokenizerModel(tiny_codec_config()).eval()
    for quantizer in model.quantizer.quantizers:
        quantizer.codebook.embed.normal_()
    model.save_pretrained(directory)
    return directory


# -------------------------------------------------------------------------------------------- ChatML, samples, shards

def chatml(i: int, url) -> dict:
    """Sample i of a mixed corpus: TTS, voice cloning with start_index, ASR, text chat. `url(name, T)` gives
    the audio_url of a codes file with T frames."""
    kind = i % 4
    if kind == 0:
        sample = {"messages": [{"role": "system", "content": "Generate audio following instruction."},
                               {"role": "user", "content": f"Read sentence number {i} aloud."},
                               {"role": "assistant", "content": {"type": "audio", "audio_url": url(f"tts{i}", 5 + i)}}]}
    elif kind == 1:
        sample = {"start_index": 3, "messages": [
            {"role": "user", "content": "Hello there."},
            {"role": "assistant", "content": {"type": "audio", "audio_url": url(f"ref{i}", 4 + i % 7)}},
            {"role": "user", "content": f"Now say {i}."},
            {"role": "assistant", "content": {"type": "audio", "audio_url": url(f"out{i}", 6 + i % 5)}}]}
    elif kind == 2:
        sample = {"messages": [{"role": "user", "content": [
            {"type": "text", "text": "Transcribe this clip."},
            {"type": "audio", "audio_url": url(f"asr{i}", 3 + i % 9)}]},
            {"role": "assistant", "content": f"The answer is {i}."}]}
    else:
        sample = {"messages": [{"role": "user", "content": f"What is {i} plus one?"},
                               {"role": "assistant", "content": f"It is {i + 1}."}]}
    if i % 3 == 0:
        sample["id"] = f"utt.{i}"  # ids may hold dots: tar keys are positions, not ids
    return sample


def make_corpus(root: Path, n: int, seed: int = 0) -> Path:
    """root/data.jsonl (n samples) + root/codes/*.npy + root/config.json (TINY_MODEL); returns the JSONL path."""
    rng = np.random.default_rng(seed)
    (root / "codes").mkdir(parents=True, exist_ok=True)

    def url(name: str, frames: int) -> str:
        np.save(root / "codes" / f"{name}.npy", rng.integers(0, 1024, (8, frames)).astype(np.int16))
        return f"codes/{name}.npy"

    lines = [json.dumps(chatml(i, url)) for i in range(n)]
    (root / "data.jsonl").write_text("\n".join(lines) + "\n")
    (root / "config.json").write_text(json.dumps(TINY_MODEL))
    return root / "data.jsonl"


def build(jsonl: Path, out: Path, *extra: str) -> int:
    """The shard builder (in process) on `jsonl` with the tiny tokenizer and the config.json beside it."""
    return build_shards.main([str(jsonl), "--tokenizer", str(TINY_TOKENIZER), "--model-config",
                              str(jsonl.parent / "config.json"), "--out", str(out), *extra])


def make_samples(n: int, tokenizer, tokens, seed: int = 0) -> list[TokenizedSample]:
    """The first n samples of the `chatml` corpus, tokenized, with random codes (keys s0, s1, ...)."""
    rng = np.random.default_rng(seed)
    frames = {}
    out = []
    for i in range(n):
        out.append(sample_from_chatml(
            chatml(i, lambda name, t: frames.setdefault(name, t) and name), tokenizer, tokens, AUDIO, key=f"s{i}",
            load_codes=lambda ref: rng.integers(0, 1024, (8, frames[ref.item["audio_url"]])).astype(np.int16),
            meta={"i": i}))
    return out


def write_split(directory: Path, samples: list[TokenizedSample], sizes, tokenizer, tokens) -> Path:
    """A shard split of `samples` in order, `sizes[i]` samples in shard i."""
    writer = SplitWriter(directory, "train", data_fingerprint(tokenizer, tokens, AUDIO), tokens, AUDIO,
                         shard_samples=10**6)
    it = iter(samples)
    for size in sizes:
        for _ in range(size):
            writer.add(next(it))
        writer.finish_shard()
    writer.close()
    return directory


def chat_sample(tokenizer, tokens, key: str, messages: list, frames: list[int], start_index=None,
                seed=0) -> TokenizedSample:
    """A tokenized ChatML sample whose audio items get random codes with the given frame counts."""
    rng = np.random.default_rng(seed)
    return sample_from_chatml({"messages": messages, "start_index": start_index}, tokenizer, tokens, AUDIO, key=key,
                              load_codes=lambda ref: rng.integers(0, 1024, size=(8, frames[ref.index]),
                                                                  dtype=np.int16))


def tts(tokenizer, tokens, key="tts", frames=(5, 5, 5), start_index=None, seed=0) -> TokenizedSample:
    """Voice clone: audio-in (turn 0), reference answer (turn 1), target answer (turn 3); `frames` per segment."""
    messages = [{"role": "user", "content": ["Read:", {"type": "audio", "audio_url": "in"}]},
                {"role": "assistant", "content": {"type": "audio", "audio_url": "ref"}},
                {"role": "user", "content": "Again."},
                {"role": "assistant", "content": ["ok", {"type": "audio", "audio_url": "out"}]}]
    return chat_sample(tokenizer, tokens, key, messages, list(frames), start_index, seed)


def text_only(tokenizer, tokens, key="text") -> TokenizedSample:
    return chat_sample(tokenizer, tokens, key, [{"role": "user", "content": "Hi"},
                                                {"role": "assistant", "content": "Hello."}], [])


def load_sample_set(samples_jsonl: Path, tokenizer, tokens: SpecialTokens,
                    audio: AudioSettings = AudioSettings()) -> dict[str, TokenizedSample]:
    """A sample set as reference/make_data_goldens.py describes it → TokenizedSamples by key, in file order."""
    out = {}
    for line in samples_jsonl.read_text().splitlines():
        row = json.loads(line)
        out[row["key"]] = sample_from_chatml(
            row["sample"], tokenizer, tokens, audio, key=row["key"],
            load_codes=lambda ref: np.load(samples_jsonl.parent / ref.item["audio_url"], allow_pickle=False))
    return out


def rewrite_shard(path: Path, change) -> None:
    """Rewrite a shard with `change(member name, bytes) -> bytes` applied to every member."""
    with tarfile.open(path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    path.chmod(0o644)
    with tarfile.open(path, "w") as tar:
        for member, data in members:
            data = change(member.name, data)
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))


def rewrite_members(path: Path, change) -> None:
    """Rewrite a shard's member list: `change([(name, bytes)]) -> [(name, bytes)]`."""
    with tarfile.open(path) as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]
    path.chmod(0o644)
    with tarfile.open(path, "w") as tar:
        for name, data in change(members):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def assert_accounting(stats: dict) -> None:
    """The stream's accounting is exact: every planned sample is seen, corrupt, missing, dropped or too long."""
    assert stats["planned_samples"] == (stats["seen_samples"] + stats["corrupt_samples"] + stats["missing_samples"]
                                        + stats["dropped_samples"] + stats["too_long_samples"]), stats


# ------------------------------------------------------------------------------------------------- hand-built Batches

@dataclass
class Piece:
    kind: str  # "text" | "audio_in" | "audio_out"
    values: torch.Tensor  # text ids [n] or codes [K, T]
    labelled: bool


def text(ids, labelled: bool = False) -> Piece:
    return Piece("text", torch.as_tensor(ids, dtype=torch.long), labelled)


def audio_in(codes: torch.Tensor) -> Piece:
    return Piece("audio_in", codes.long(), False)


def audio_out(codes: torch.Tensor, labelled: bool = True) -> Piece:
    return Piece("audio_out", codes.long(), labelled)


def delayed(codes: torch.Tensor, bos: int, eos: int, label: bool) -> torch.Tensor:
    """[bos|codes|eos] (labels: [-100|codes|eos]) with codebook k shifted right by k (docs/design.md §4)."""
    k_count, length = codes.shape
    first, last = (-100, eos) if label else (bos, eos)
    stream = torch.cat([torch.full((k_count, 1), first), codes, torch.full((k_count, 1), last)], dim=1)
    out = torch.full((k_count, length + 1 + k_count), -100 if label else eos, dtype=torch.long)
    for k in range(k_count):
        out[k, :k] = -100 if label else bos
        out[k, k:k + length + 2] = stream[k]
    return out


def make_batch(rows: list[list[list[Piece]]], config: HiggsAudioV2Config, pad_to: int | None = None) -> Batch:
    """rows[b] = the samples packed into row b; each sample a list of Pieces. Right-padded with segment 0."""
    tokens = tiny_tokens()
    bos, eos, k_count = config.audio_stream_bos_id, config.audio_stream_eos_id, config.num_codebooks
    per_row, audio = [], {"audio_in": ([], []), "audio_out": ([], [])}
    for row in rows:
        cols = {name: [] for name in ("input_ids", "position_ids", "segment_ids", "label_ids", "audio_in_mask",
                                      "audio_out_mask")}
        for segment, pieces in enumerate(row, start=1):
            start = len(cols["input_ids"])
            for piece in pieces:
                if piece.kind == "text":
                    n = len(piece.values)
                    cols["input_ids"] += piece.values.tolist()
                    cols["label_ids"] += piece.values.tolist() if piece.labelled else [-100] * n
                    flags = (False, False)
                else:
                    frames = delayed(piece.values, bos, eos, label=False)
                    labels = delayed(piece.values, bos, eos, label=True)
                    if not piece.labelled:
                        labels.fill_(-100)
                    audio[piece.kind][0].append(frames)
                    audio[piece.kind][1].append(labels)
                    n = frames.shape[1]
                    cols["input_ids"] += [tokens.audio_in if piece.kind == "audio_in" else tokens.audio_out] * n
                    cols["label_ids"] += [-100] * n
                    flags = (piece.kind == "audio_in", piece.kind == "audio_out")
                cols["audio_in_mask"] += [flags[0]] * n
                cols["audio_out_mask"] += [flags[1]] * n
            cols["segment_ids"] += [segment] * (len(cols["input_ids"]) - start)
            cols["position_ids"] += list(range(len(cols["input_ids"]) - start))
        per_row.append(cols)
    length = max(pad_to or 0, max(len(cols["input_ids"]) for cols in per_row))
    fill = {"input_ids": tokens.pad, "position_ids": 0, "segment_ids": 0, "label_ids": -100, "audio_in_mask": False,
            "audio_out_mask": False}
    tensors = {name: torch.tensor([cols[name] + [value] * (length - len(cols[name])) for cols in per_row])
               for name, value in fill.items()}

    def stack(parts):
        return torch.cat(parts, dim=1) if parts else torch.zeros(k_count, 0, dtype=torch.long)

    return Batch(input_ids=tensors["input_ids"], attention_mask=tensors["segment_ids"] > 0,
                 position_ids=tensors["position_ids"], segment_ids=tensors["segment_ids"].int(),
                 label_ids=tensors["label_ids"], audio_in_mask=tensors["audio_in_mask"],
                 audio_out_mask=tensors["audio_out_mask"], audio_in_ids=stack(audio["audio_in"][0]),
                 audio_out_ids=stack(audio["audio_out"][0]), audio_out_labels=stack(audio["audio_out"][1]))


def random_codes(generator: torch.Generator, config: HiggsAudioV2Config, frames: int) -> torch.Tensor:
    return torch.randint(0, config.audio_stream_bos_id, (config.num_codebooks, frames), generator=generator)


def random_text(generator: torch.Generator, n: int, high: int = 400) -> torch.Tensor:
    return torch.randint(0, high, (n,), generator=generator)


def tts_sample(generator: torch.Generator, config: HiggsAudioV2Config, prompt: int = 6, frames: int = 5,
               reference_frames: int = 0, answer_text: int = 2) -> list[Piece]:
    """System/user prompt (not learnable) [+ reference audio-in], learnable audio-out, a learnable text tail."""
    pieces = [text(random_text(generator, prompt))]
    if reference_frames:
        pieces += [audio_in(random_codes(generator, config, reference_frames)), text(random_text(generator, 2))]
    pieces += [audio_out(random_codes(generator, config, frames)), text(random_text(generator, answer_text), True)]
    return pieces


def randomize(model: torch.nn.Module, seed: int = 0) -> None:
    """Non-trivial weights everywhere: text and audio norms/MLPs must differ for routing bugs to show."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            param.copy_(1.0 + 0.3 * noise if name.endswith("norm.weight") else 0.15 * noise)


def mixed_packed_batch(config: HiggsAudioV2Config, seed: int, pad_to: int) -> Batch:
    """Two packed rows, two samples each: text, audio-in, audio-out (trained and not), right padding in both."""
    g = torch.Generator().manual_seed(seed)
    row0 = [tts_sample(g, config, reference_frames=3, frames=6),
            [text(random_text(g, 4), labelled=True), audio_out(random_codes(g, config, 3))]]
    row1 = [[audio_out(random_codes(g, config, 4), labelled=False), text(random_text(g, 5), labelled=True)],
            [text(random_text(g, 3)), audio_in(random_codes(g, config, 2)), text(random_text(g, 2), labelled=True)]]
    batch = make_batch([row0, row1], config, pad_to=pad_to)
    assert batch.audio_in_ids.shape[1] and batch.audio_out_ids.shape[1]
    assert (batch.segment_ids == 0).any(dim=1).all() and (batch.segment_ids == 2).any(dim=1).all()
    return batch


# ----------------------------------------------------------------------------------------------------------- launches

def fake_slurm(directory: Path, env: dict, gpus_per_node: int) -> dict:
    """`env` for running a SLURM script on this machine as a one-node job: scontrol and srun stand-ins (in
    directory/bin, first on PATH), the job's variables, a free MASTER_PORT."""
    bin_dir = directory / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text("#!/bin/sh\n[ \"$1 $2\" = 'show hostnames' ] && echo localhost\n")
    # srun: drop its own options, run the command once (this is one node).
    (bin_dir / "srun").write_text("#!/bin/sh\nwhile [ \"${1#--}\" != \"$1\" ]; do shift; done\nexec \"$@\"\n")
    for tool in ("scontrol", "srun"):
        (bin_dir / tool).chmod(0o755)
    return {**env, "PATH": f"{bin_dir}:{env['PATH']}", "SLURM_JOB_NODELIST": "node[1-1]", "SLURM_NNODES": "1",
            "SLURM_JOB_ID": "42", "GPUS_PER_NODE": str(gpus_per_node), "MASTER_PORT": str(processes.free_port())}


# LoRA runs: alpha is not the default 2 × rank (a scaling taken from the wrong place shows); dropout > 0 (resume must
# restore every rank's RNG for the masks to repeat). EXTRAS: what LoRA trains in full by default.
LORA = {"rank": 4, "alpha": 3.0, "dropout": 0.1}
EXTRAS = {"model.embed_audio_tokens.embed_audio_tokens.weight", "audio_lm_head.weight"}


def write_yaml(path: Path, **sections) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(sections))
    return path


def ds_json(directory: Path, **changes) -> str:
    """The CPU DeepSpeed config (ZeRO-3, fp32) with top-level `changes`, written to directory/ds.json."""
    body = json.loads(CPU_DS.read_text())
    body.update(changes)
    path = directory / "ds.json"
    path.write_text(json.dumps(body))
    return str(path)


def base_config(corpus: Path, out: Path, **train) -> dict:
    """The launch tests' run config on the `corpus` fixture (a random-init TINY_MODEL, 2 epochs of 7 steps on 2
    ranks); `train` overrides the train section."""
    return dict(
        model={"config": str(corpus / "model"), "tokenizer": str(TINY_TOKENIZER)},
        data={"train": str(corpus / "train"), "val": str(corpus / "val"), "layout": "packed", "pack_length": 256,
              "max_tokens": 512, "round_to": 8, "num_workers": 1},
        optim={"lr": 3e-3, "warmup_steps": 2},
        train={"out_dir": str(out), "deepspeed": str(CPU_DS), "precision": "fp32", "grad_accum": 2, "epochs": 2,
               "log_every": 1, "trace_samples": True, **train})


def lora_config(corpus: Path, pretrained: Path, out: Path, *, lora: dict | None = None, **train) -> dict:
    """base_config for LoRA (LORA, updated by `lora`) on the `pretrained` fixture, saving every 2 steps."""
    config = base_config(corpus, out, save_every=2, **train)
    config["model"] = {"pretrained": str(pretrained), "tokenizer": str(TINY_TOKENIZER)}
    config["optim"] = {"lr": 1e-2, "warmup_steps": 2}
    config["lora"] = {**LORA, **(lora or {})}
    config["model"]["activation_checkpointing"] = True  # frozen base + checkpointing under ZeRO (DeepSpeed #8148)
    return config


def launch_command(config: Path, *overrides: str, gpus: int = 2, port: int | None = None,
                   faults: dict | None = None) -> list[str]:
    """`deepspeed --num_gpus GPUS launch/train.py --config CONFIG OVERRIDES` on a free port (or `port`); with
    `faults`, the tests' entry point tests/launch_with_faults.py instead of launch/train.py (see `fault_env`)."""
    script = ROOT / "launch" / "train.py" if faults is None else TESTS / "launch_with_faults.py"
    return [str(DEEPSPEED), "--num_gpus", str(gpus), "--master_port", str(port or processes.free_port()),
            str(script), "--config", str(config), *overrides]


def fault_env(faults: dict | None, env: dict | None = None) -> dict[str, str]:
    """The environment of a launch: ours, `env`, and the faults tests/launch_with_faults.py plants."""
    return {**os.environ, **(env or {}), **({"HIGGS_DS_FAULTS": json.dumps(faults)} if faults is not None else {})}


def launch(config: Path, *overrides: str, env: dict | None = None, timeout: int = 300, gpus: int = 2,
           faults: dict | None = None, port: int | None = None) -> tuple[int, str]:
    """The run to its end from the repository root, `env` added to the environment: (exit code, stdout and stderr
    interleaved)."""
    done = processes.run(launch_command(config, *overrides, gpus=gpus, port=port, faults=faults), timeout=timeout,
                         cwd=ROOT, env=fault_env(faults, env), stderr=subprocess.STDOUT)
    return done.returncode, done.stdout


def start_launch(config: Path, *overrides: str, faults: dict | None = None, port: int | None = None):
    """The run started, not waited for (the caller stops it): the Popen of the launcher's process group."""
    return processes.start(launch_command(config, *overrides, port=port, faults=faults), cwd=ROOT,
                           stderr=subprocess.STDOUT, env=fault_env(faults))


def kill_after_save(config: Path, out: Path, step: int, faults: dict | None = None) -> None:
    """Launch `config` (with `faults`) and kill -9 the whole job once every rank has saved the step-`step`
    checkpoint."""
    process = start_launch(config, faults={**(faults or {}), "hang_after_save": step})
    try:
        deadline = time.time() + 300
        while not all((out / f"saved.rank{r}").exists() for r in range(2)):
            assert process.poll() is None, process.stdout.read()[-3000:]
            assert time.time() < deadline, f"no checkpoint at step {step}"
            time.sleep(0.5)
    finally:
        processes.kill_group(process)  # kill -9 of the whole job (and, on a failure, no process left behind)
        process.wait()


def resumes_exactly(config: Path, out: Path, ref_out: Path, step: int) -> str:
    """`train.resume=auto` after a kill at `step`: every later step's loss equals the uninterrupted run's."""
    code, output = launch(config, "train.resume=auto")
    assert code == 0, output[-3000:]
    assert f"step{step:08d} at step {step}" in output
    ref, got = losses(ref_out), losses(out)
    assert sorted(got) == sorted(ref) and max(ref) > step
    for s in range(step + 1, max(ref) + 1):
        assert got[s] == pytest.approx(ref[s], rel=1e-6, abs=1e-6), (s, got, ref)
    return output


def losses(out: Path) -> dict[int, float]:
    """Per-step loss/total from rank 0's metrics.jsonl (a resumed run overwrites the steps it repeats)."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {row["step"]: row["loss/total"] for row in rows}


def consumed(out: Path, steps: range) -> list[str]:
    """The sample keys every rank consumed in `steps` (train.trace_samples), sorted."""
    keys = []
    for trace in sorted((out / "trace").glob("rank*.jsonl")):
        rows = {}
        for line in trace.read_text().splitlines():
            row = json.loads(line)
            rows[row["step"], row["micro"]] = row["keys"]
        keys += [k for (step, _), ks in rows.items() if step in steps for k in ks]
    return sorted(keys)
