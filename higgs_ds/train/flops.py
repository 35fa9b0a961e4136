"""Model FLOPs of a training step and the device's peak: `throughput/mfu` = the step's model FLOPs on every rank /
(step time × the ranks' summed peak).

**Model FLOPs** count the matmuls the model needs for the step's batches, as this model computes them: not the
recomputation of activation checkpointing or of the audio head's backward (heads.py), not element-wise work (norms,
SwiGLU, softmax, RoPE, the loss), not embedding lookups. A matmul with a weight W [out, in] over r rows costs

    2·r·|W|  forward
  + 2·r·|W|  backward to its input, only when something trainable lies before it in the forward
  + 2·r·|W|  backward to W, only when W trains

so a full fine-tune is the usual 6·N per row, and frozen weights (a freeze recipe, LoRA's base) do no weight-gradient
matmul; with nothing trainable before them (train.freeze=text_head_only) not even the input's. The rows r are what
the model runs each weight on:
  * attention projections q, k, v, o: every position of the collated batch, padding included (the backbone
    computes every position; the packed layout keeps padding below data.round_to per row);
  * `mlp` on the text rows (padding included), `audio_mlp` on the audio rows (audio-in and audio-out frames): the
    two FFNs have the same shape, so a position costs the same either way, but a frozen path does no weight gradient;
  * the text head only on the text rows with a learnable next-token label, the audio head (K × ids per codebook)
    only on the labelled audio-out frames (losses.py: the heads run only there);
  * LoRA's A and B as the matmuls they are (rank r_lora: 2·r_lora·(in + out) per row and pass).
Attention's own matmuls, per layer and query head with head_dim d: QKᵀ and AV cost 2·d each per (query, key) pair
the mask allows, 4·d·pairs forward, and backward twice that (dQ, dK, dV, dP: 4 matmuls) when something trainable
lies before it. The pairs are causal within each segment (packed sample), and padding attends to the padding of its
row, as the mask says: Σ s(s+1)/2 over the spans of `BatchIndex.cu_seqlens` — what flash-attention's varlen kernel
computes. (PaLM's 12·L·d·seq per token would count every key of the row for every query: SDPA with a block mask on
the CPU does compute all L² pairs and masks after; model FLOPs do not count that waste.)

**Peak** (`peak_tflops`): `train.peak_tflops` when set; on a GPU the bf16 dense tensor-core peak of the table below,
looked up by `torch.cuda.get_device_name()` (an unknown name: no peak, no mfu, one info line); on the CPU a peak
measured once at start-up: the best rate of a 1024² fp32 matmul over ~0.25 s with this process's torch threads,
every rank at the same time (so ranks sharing the cores measure their share)."""
from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Iterable

import torch

# ---------------------------------------------------------------------------------------------------- the step's work


@dataclass(frozen=True)
class Work:
    """What one micro-batch sends through the model (from its BatchIndex, on the CPU: no device sync)."""

    positions: int = 0  # B·L, padding included: every position runs through every layer
    text_rows: int = 0  # through `mlp` (text and padding)
    audio_rows: int = 0  # through `audio_mlp` (audio-in and audio-out frames)
    text_head_rows: int = 0  # positions with a learnable next text label
    audio_head_rows: int = 0  # audio-out frames with a labelled next frame
    attention_pairs: int = 0  # (query, key) pairs the attention mask allows, per head and layer

    @classmethod
    def of(cls, batch) -> "Work":
        index = batch.index
        positions = int(index.grouped_order.numel())
        lengths = index.cu_seqlens.diff().long()
        return cls(positions=positions, text_rows=int(index.num_text_rows),
                   audio_rows=positions - int(index.num_text_rows),
                   text_head_rows=int(index.text_target_positions.numel()),
                   audio_head_rows=int(index.audio_target_positions.numel()),
                   attention_pairs=int((lengths * (lengths + 1) // 2).sum()))

    def __add__(self, other: "Work") -> "Work":
        return Work(*(a + b for a, b in zip(self.__dict__.values(), other.__dict__.values())))


# ---------------------------------------------------------------------------------------------------- the model's matmuls

_LAYER = re.compile(r"^model\.layers\.(\d+)\.(\w+)\.(?:(\w+)\.)?(base_layer\.weight|weight|lora_[AB]\.\w+\.weight)$")
# Within a decoder layer, the order of the forward (a matmul's input depends on every earlier stage): input norms,
# q/k/v, attention, o, post-attention norms, gate/up, down. LoRA's B comes after its A (and the base beside A).
_SUB = {"input_layernorm": 0, "audio_input_layernorm": 0, "q_proj": 1, "k_proj": 1, "v_proj": 1, "o_proj": 3,
        "post_attention_layernorm": 4, "audio_post_attention_layernorm": 4, "gate_proj": 5, "up_proj": 5,
        "down_proj": 6}
ATTENTION_SUB = 2


@dataclass(frozen=True)
class Op:
    name: str
    weights: int  # elements of the weight (0: a norm or an embedding, no matmul; attention has its own term)
    rows: str  # which Work count it runs over: positions, text_rows, audio_rows, text_head_rows, audio_head_rows
    stage: tuple[int, float]  # (layer, order within the layer); embeddings (-1, 0), final norm and heads (layers, ·)
    path: str  # "text" / "audio" for a DualFFN path's own module, else "shared"
    trainable: bool

    def after(self, other: "Op") -> bool:
        """This op's input depends on `other`'s output (or parameter)."""
        if other.stage >= self.stage:
            return False
        # Inside the FFN block the two paths are separate: text rows' MLP does not see the audio norm or MLP.
        in_ffn = self.stage[0] == other.stage[0] and other.stage[1] >= _SUB["post_attention_layernorm"]
        return not (in_ffn and "shared" not in (self.path, other.path) and self.path != other.path)


def classify(name: str, numel: int, trainable: bool, num_layers: int) -> Op:
    """One parameter of HiggsAudioForTraining (PEFT's names too) as the op that uses it."""
    if name.startswith("model.embed_"):
        return Op(name, 0, "positions", (-1, 0.0), "shared", trainable)
    if name == "model.norm.weight":
        return Op(name, 0, "positions", (num_layers, 0.0), "shared", trainable)
    if name.startswith(("text_lm_head.", "audio_lm_head.")):
        rows = "text_head_rows" if name.startswith("text") else "audio_head_rows"
        return Op(name, numel, rows, (num_layers, 1.0), "shared", trainable)
    match = _LAYER.match(name)
    if match is None:
        raise ValueError(f"model FLOPs: no rule for parameter {name!r}")
    layer, block, proj, kind = int(match[1]), match[2], match[3], match[4]
    module = proj or block
    if module not in _SUB:
        raise ValueError(f"model FLOPs: no rule for parameter {name!r}")
    sub = _SUB[module] + (0.5 if kind.startswith("lora_B") else 0.0)
    path = "audio" if block.startswith("audio_") else "text" if block in ("mlp", "input_layernorm",
                                                                          "post_attention_layernorm") else "shared"
    rows = {"mlp": "text_rows", "audio_mlp": "audio_rows"}.get(block, "positions")
    weights = numel if proj is not None else 0  # norms: element-wise
    return Op(name, weights, rows, (layer, float(sub)), path, trainable)


class ModelFlops:
    """Model FLOPs of a step from the model's parameters (shape, trainable) and its attention shape."""

    def __init__(self, params: Iterable[tuple[str, int, bool]], num_layers: int, num_heads: int, head_dim: int):
        self.ops = [classify(name, numel, trainable, num_layers) for name, numel, trainable in params]
        self.num_layers, self.num_heads, self.head_dim = num_layers, num_heads, head_dim
        trained = [op for op in self.ops if op.trainable]
        # Per op: 1 (forward) + 1 (input gradient, if something trainable comes before) + 1 (weight gradient).
        self.passes = {op.name: 1 + any(op.after(t) for t in trained) + op.trainable for op in self.ops}
        self.attention_passes = [
            1 + 2 * any(t.stage < (layer, ATTENTION_SUB) for t in trained) for layer in range(num_layers)]

    @classmethod
    def of(cls, model: torch.nn.Module) -> "ModelFlops":
        """From a HiggsAudioForTraining (under ZeRO-3 a parameter's full size is its `ds_numel`)."""
        params = [(name, int(getattr(p, "ds_numel", p.numel())), p.requires_grad)
                  for name, p in model.named_parameters()]
        config = model.config
        return cls(params, config.num_hidden_layers, config.num_attention_heads,
                   getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)

    def matmul_flops(self, work: Work) -> int:
        return sum(2 * getattr(work, op.rows) * op.weights * self.passes[op.name] for op in self.ops)

    def attention_flops(self, work: Work) -> int:
        return sum(4 * self.num_heads * self.head_dim * work.attention_pairs * p for p in self.attention_passes)

    def __call__(self, work: Work) -> int:
        """The step's model FLOPs for `work` (one micro-batch's, or a sum of them)."""
        return self.matmul_flops(work) + self.attention_flops(work)


# ---------------------------------------------------------------------------------------------------- the peak

# bf16 dense tensor-core peak (TFLOPS, no 2:4 sparsity) per GPU, matched in order against torch.cuda.get_device_name()
# (case-insensitive): the more specific names first. From NVIDIA's datasheets (the "BF16 Tensor Core" row, halved
# where the sheet quotes sparsity): A100 (SXM and PCIe) 312; H100 SXM 989, PCIe 756, NVL 835; H200 (SXM) 989, H200
# NVL 835; B200 (HGX B200) 2250; L40S 362; L40 181; L4 121; A40 150; A10 125; RTX 6000 Ada 364; RTX A6000 155;
# GeForce RTX 4090 165 and RTX 3090 71 (Ada / GA102 whitepapers: bf16 with fp32 accumulate, what torch uses). AWS's
# A10G has no NVIDIA datasheet and AWS quotes no bf16 figure: it gets the A10's 125 (the same GA102 tensor cores; its
# clocks differ), an approximation — train.peak_tflops overrides any entry.
GPU_PEAK_TFLOPS: tuple[tuple[str, float], ...] = (
    (r"\bH100\b.*\bPCIe\b", 756.0),
    (r"\bH100\b.*\bNVL\b", 835.0),
    (r"\bH100\b", 989.0),  # SXM ("NVIDIA H100 80GB HBM3")
    (r"\bH200\b.*\bNVL\b", 835.0),
    (r"\bH200\b", 989.0),
    (r"\bB200\b", 2250.0),
    (r"\bA100\b", 312.0),
    (r"\bL40S\b", 362.0),
    (r"\bL40\b", 181.0),
    (r"\bL4\b", 121.0),
    (r"\bA40\b", 150.0),
    (r"\bA10G?\b", 125.0),
    (r"\bRTX 6000 Ada\b", 364.0),
    (r"\bRTX A6000\b", 155.0),
    (r"\bRTX 4090\b", 165.0),
    (r"\bRTX 3090\b", 71.0),
)


def gpu_peak_tflops(device_name: str) -> float | None:
    """The table's bf16 dense peak for a `torch.cuda.get_device_name()`, or None for a GPU it does not know."""
    for pattern, tflops in GPU_PEAK_TFLOPS:
        if re.search(pattern, device_name, re.IGNORECASE):
            return tflops
    return None


def measure_cpu_peak_tflops(size: int = 1024, seconds: float = 0.25) -> float:
    """The best rate (TFLOPS) of a size² × size² fp32 matmul with this process's torch threads, repeated for about
    `seconds` after one warm-up: what this rank's share of the CPU reaches on the model's kind of work."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    best, started = float("inf"), time.perf_counter()
    while True:
        begin = time.perf_counter()
        a @ b
        end = time.perf_counter()
        best = min(best, end - begin)
        if end - started >= seconds:
            break
    return 2 * size ** 3 / best / 1e12


def peak_tflops(device: torch.device, override: float | None) -> tuple[float | None, str]:
    """This rank's device peak in TFLOPS and where it comes from (None: unknown GPU without train.peak_tflops)."""
    if override is not None:
        return float(override), "train.peak_tflops"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        tflops = gpu_peak_tflops(name)
        return tflops, f"bf16 dense peak of {name}" if tflops is not None else f"unknown GPU {name!r}"
    if device.type == "cpu":
        return measure_cpu_peak_tflops(), f"measured: fp32 1024² matmul, {torch.get_num_threads()} thread(s)"
    return None, f"no peak known for device type {device.type!r}"
