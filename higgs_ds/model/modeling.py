"""Higgs Audio v2 (DualFFN) for training, built on transformers' `higgs_audio_v2` port modules.

Parameter names equal the port's state dict (`model.embed_tokens`, `model.embed_audio_tokens.embed_audio_tokens`,
`model.layers.N.…`, `model.norm`, `audio_lm_head.weight`, `text_lm_head.weight`), so the port layout is native.
What differs from the port's forward:
  * DualFFN routing by index: the residual stream is kept grouped (text rows, then audio rows = audio-in | audio-out
    frames), so each norm/MLP runs on a contiguous [n, H] slice; attention alone sees sequence order (one gather in,
    one out, per layer) instead of repeated boolean masked_scatter.
  * ZeRO-3 lockstep: every module runs on every call; an absent modality is a zero-row input, never a skipped call.
  * Packed rows: attention stays inside each segment (SDPA with a block mask, or varlen flash attention on CUDA);
    RoPE uses the batch's position_ids.
  * Losses are computed inside forward (losses.py) with fused linear+cross-entropy heads that never hold all logits;
    the text head runs only where a shifted text label exists, the audio head only at labelled audio-out frames.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint
from transformers import HiggsAudioV2Config
from transformers.models.higgs_audio_v2.modeling_higgs_audio_v2 import (
    HiggsAudioV2Attention,
    HiggsAudioV2Embeddings,
    HiggsAudioV2MLP,
    HiggsAudioV2RMSNorm,
    HiggsAudioV2RotaryEmbedding,
)
from transformers.utils import is_flash_attn_2_available

from ..model_config import HiggsModelConfig, as_model_config
from . import heads
from .heads import HeadLoss, LinearCrossEntropyHead
from ..data.batch import IGNORE, BatchIndex, index_batch
from .losses import LossConfig, LossNorm, LossSums, loss_means, next_token_targets, objective

try:  # CUDA-only fused kernels; the torch path is the reference.
    from liger_kernel.ops.rms_norm import LigerRMSNormFunction
    from liger_kernel.ops.swiglu import LigerSiLUMulFunction
except ImportError:
    LigerRMSNormFunction = LigerSiLUMulFunction = None

ATTENTION_IMPLEMENTATIONS = ("sdpa", "flash_attention_2")


# ---------------------------------------------------------------------------------------------------- outputs


class HiggsAudioOutput(NamedTuple):
    """A NamedTuple, not a dataclass: DeepSpeed ZeRO-3 hooks the tensors of a module's output only in tuples,
    lists and dicts."""

    loss: torch.Tensor  # the objective to backpropagate (already multiplied by LossNorm.grad_scale)
    text_loss_sum: torch.Tensor  # detached fp32 scalar
    text_tokens: torch.Tensor  # long scalar: learnable text tokens in this batch
    audio_loss_sum: torch.Tensor  # detached fp32 [K]
    audio_tokens: torch.Tensor  # long [K]
    metrics: dict[str, torch.Tensor]  # this batch's means: loss/text, loss/audio, loss/audio_cb{k}, loss/total
    # Top-1 predictions next to their labels at every learnable target row (with return_predictions=True), for the
    # slices and the copy guard.
    text_predictions: torch.Tensor | None = None  # [n]
    text_labels: torch.Tensor | None = None  # [n]
    audio_predictions: torch.Tensor | None = None  # [n, K]
    audio_labels: torch.Tensor | None = None  # [n, K]
    text_positions: torch.Tensor | None = None  # [n] flat positions (row * L + column) the text rows predict from
    audio_frames: torch.Tensor | None = None  # [n] audio-out frame j (a column of audio_out_ids) predicting j + 1
    audio_inputs: torch.Tensor | None = None  # [n, K] the input codes at frame j (copy detection compares them)

    def sums(self) -> LossSums:
        """This batch's loss sums and counts (on the model's device: adding them up costs no host sync)."""
        return LossSums.of(self.text_loss_sum, self.text_tokens, self.audio_loss_sum, self.audio_tokens)


@dataclass
class HiggsAudioLogits:
    text: torch.Tensor  # [B, L, vocab] at every position
    audio: torch.Tensor  # [N_out, K, codebook_size] at audio-out frames (row-major, == columns of audio_out_ids)


# ---------------------------------------------------------------------------------------------------- routing


@dataclass
class Routing:
    """DualFFN routing by index (BatchIndex's grouped order): norms and MLPs run on contiguous text and audio slices
    of the grouped residual stream; only attention sees the sequence order, one gather in and one out per layer."""

    order: torch.Tensor  # long [B*L]: flat sequence position of each grouped row
    inverse: torch.Tensor  # long [B*L]: grouped row of each flat sequence position
    num_text: int
    shape: tuple[int, int]  # (B, L)

    @classmethod
    def from_index(cls, index: BatchIndex, shape: tuple[int, int]) -> "Routing":
        return cls(index.grouped_order, index.grouped_inverse, index.num_text_rows, shape)

    def to_grouped(self, sequence: torch.Tensor) -> torch.Tensor:
        return sequence.flatten(0, 1).index_select(0, self.order)

    def to_sequence(self, grouped: torch.Tensor) -> torch.Tensor:
        return grouped.index_select(0, self.inverse).view(*self.shape, -1)


@dataclass
class AttentionInputs:
    """What every layer's attention needs: RoPE cos/sin and either a block mask (SDPA) or varlen flash kwargs;
    in generation also the KV cache (transformers' Cache, one layer per decoder layer)."""

    position_embeddings: tuple[torch.Tensor, torch.Tensor]
    mask: torch.Tensor | None = None  # bool [B, 1, L, L] (with a cache: [B, 1, L, cached + L])
    flash_kwargs: dict = field(default_factory=dict)
    cache: Any = None


def block_causal_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """causal ∧ same segment. Padding is segment 0: real queries never see it, and each padding query sees only
    padding (itself included), so no row is fully masked and SDPA yields no NaN."""
    seq_len = segment_ids.shape[1]
    causal = torch.ones(seq_len, seq_len, dtype=torch.bool, device=segment_ids.device).tril()
    return (causal & (segment_ids[:, :, None] == segment_ids[:, None, :]))[:, None]


def varlen_flash_kwargs(index: BatchIndex) -> dict:
    """The kwargs that make transformers' flash-attention path run varlen over the flattened rows."""
    return dict(cu_seq_lens_q=index.cu_seqlens, cu_seq_lens_k=index.cu_seqlens, max_length_q=index.max_seqlen,
                max_length_k=index.max_seqlen)


# ---------------------------------------------------------------------------------------------------- modules


class RotaryEmbedding(HiggsAudioV2RotaryEmbedding):
    """The port's RoPE with inv_freq pinned to fp32: a whole-model bf16 cast (DeepSpeed's `.bfloat16()`) would
    otherwise round it and shift every angle at long positions."""

    def __init__(self, config: HiggsAudioV2Config):
        super().__init__(config)
        self.inv_freq_fp32 = self.inv_freq.float().clone()

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        self.inv_freq_fp32 = self.inv_freq_fp32.to(self.inv_freq.device)
        self.inv_freq = self.inv_freq_fp32.clone()
        return self


def _liger_rms_norm_forward(self: HiggsAudioV2RMSNorm, x: torch.Tensor) -> torch.Tensor:
    if not heads.fused_kernels_apply(x.device) or x.numel() == 0:  # zero-row slices: torch path, no empty launch
        return HiggsAudioV2RMSNorm.forward(self, x)
    return LigerRMSNormFunction.apply(x, self.weight, self.variance_epsilon, 0.0, "llama", False)


def _liger_swiglu_forward(self: HiggsAudioV2MLP, x: torch.Tensor) -> torch.Tensor:
    if not heads.fused_kernels_apply(x.device) or x.numel() == 0:
        return HiggsAudioV2MLP.forward(self, x)
    return self.down_proj(LigerSiLUMulFunction.apply(self.gate_proj(x), self.up_proj(x)))


class DualFFNDecoderLayer(nn.Module):
    """Shared attention; separate pre-attention norms, post-attention norms and MLPs for text and audio rows."""

    def __init__(self, config: HiggsAudioV2Config, layer_idx: int):
        super().__init__()
        self.self_attn = HiggsAudioV2Attention(config, layer_idx)
        self.mlp = HiggsAudioV2MLP(config)
        self.input_layernorm = HiggsAudioV2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = HiggsAudioV2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.audio_mlp = HiggsAudioV2MLP(config)
        self.audio_input_layernorm = HiggsAudioV2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.audio_post_attention_layernorm = HiggsAudioV2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, grouped: torch.Tensor, routing: Routing, attention: AttentionInputs) -> torch.Tensor:
        """grouped [B*L, H] in Routing's grouped order -> the same, one layer on."""
        text, audio = grouped[: routing.num_text], grouped[routing.num_text:]
        normed = torch.cat([self.input_layernorm(text), self.audio_input_layernorm(audio)])
        attended, _ = self.self_attn(routing.to_sequence(normed), attention.position_embeddings, attention.mask,
                                     cache=attention.cache, **attention.flash_kwargs)
        grouped = grouped + routing.to_grouped(attended)
        text, audio = grouped[: routing.num_text], grouped[routing.num_text:]
        return grouped + torch.cat([self.mlp(self.post_attention_layernorm(text)),
                                    self.audio_mlp(self.audio_post_attention_layernorm(audio))])


class HiggsAudioBackbone(nn.Module):
    """Embeddings, DualFFN layers and the final norm; forward returns final-normed hidden states [B, L, H]."""

    def __init__(self, config: HiggsAudioV2Config):
        super().__init__()
        self.config = config
        self.gradient_checkpointing = False
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.embed_audio_tokens = HiggsAudioV2Embeddings(config)
        self.layers = nn.ModuleList(DualFFNDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = HiggsAudioV2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config)

    def forward(self, input_ids, position_ids, segment_ids, audio_in_ids, audio_out_ids,
                index: BatchIndex) -> torch.Tensor:
        embeds = self.embed_tokens(input_ids)
        # One audio-embedding call for audio-in and audio-out frames together: sum over codebooks of row k*V + code.
        audio_embeds = self.embed_audio_tokens(torch.cat([audio_in_ids, audio_out_ids], dim=1).T)
        hidden = embeds.flatten(0, 1).index_copy(0, index.audio_positions, audio_embeds.to(embeds.dtype))
        hidden = hidden.view_as(embeds)

        routing = Routing.from_index(index, tuple(input_ids.shape))
        attention = AttentionInputs(position_embeddings=self.rotary_emb(hidden, position_ids))
        if self.config._attn_implementation == "flash_attention_2":
            attention.flash_kwargs = varlen_flash_kwargs(index)
        elif index.needs_block_mask:  # one unpadded sample per row needs no mask: SDPA's causal path
            attention.mask = block_causal_mask(segment_ids)
        return self.layers_and_norm(hidden, routing, attention)

    def layers_and_norm(self, hidden: torch.Tensor, routing: Routing, attention: AttentionInputs) -> torch.Tensor:
        grouped = routing.to_grouped(hidden)
        for layer in self.layers:
            if self.gradient_checkpointing and torch.is_grad_enabled():
                grouped = checkpoint(layer, grouped, routing, attention, use_reentrant=False)
            else:
                grouped = layer(grouped, routing, attention)
        return routing.to_sequence(self.norm(grouped))

    def decode(self, input_ids: torch.Tensor, audio_mask: torch.Tensor, audio_codes: torch.Tensor,
               position_ids: torch.Tensor, mask: torch.Tensor, cache=None) -> torch.Tensor:
        """Generation's forward: input_ids [B, S] (any id at audio positions), audio_mask bool [B, S], audio_codes
        [K, n] the codes of the n audio positions in row-major order, position_ids [B, S], mask bool
        [B, 1, S, cached + S] (True = attend), cache: transformers' Cache or None. Every module runs on every call
        (zero-row slices for an absent modality), as ZeRO-3 needs. Returns final-normed hidden states [B, S, H]."""
        embeds = self.embed_tokens(input_ids)
        audio_positions = audio_mask.flatten().nonzero().squeeze(1)
        hidden = embeds.flatten(0, 1).index_copy(0, audio_positions,
                                                 self.embed_audio_tokens(audio_codes.T).to(embeds.dtype))
        hidden = hidden.view_as(embeds)
        text_positions = (~audio_mask).flatten().nonzero().squeeze(1)
        order = torch.cat([text_positions, audio_positions])
        routing = Routing(order, torch.argsort(order), text_positions.shape[0], tuple(input_ids.shape))
        attention = AttentionInputs(self.rotary_emb(hidden, position_ids), mask=mask, cache=cache)
        return self.layers_and_norm(hidden, routing, attention)


class HiggsAudioForTraining(nn.Module):
    """forward(**batch.model_inputs(), loss_norm=None, return_predictions=False) -> HiggsAudioOutput;
    logits(**batch.model_inputs()) -> HiggsAudioLogits (parity tests, inference)."""

    def __init__(self, config: HiggsModelConfig | HiggsAudioV2Config, loss_config: LossConfig = LossConfig(),
                 attn_implementation: str = "auto", head_impl: str = "auto"):
        """`config`: read by `higgs_ds.model_config.read_model_config` (a transformers HiggsAudioV2Config is read as a
        port-layout config). `self.model_config` keeps it; `self.config` is the HiggsAudioV2Config the port modules
        are built from (its `codebook_size` = ids per codebook, incl. stream bos/eos)."""
        super().__init__()
        self.model_config = as_model_config(config)
        config = self.model_config.transformers_config()
        if attn_implementation == "auto":
            use_flash = is_flash_attn_2_available() and torch.cuda.is_available()
            attn_implementation = "flash_attention_2" if use_flash else "sdpa"
        if attn_implementation not in ATTENTION_IMPLEMENTATIONS:
            raise ValueError(f"attn_implementation must be one of {ATTENTION_IMPLEMENTATIONS} or 'auto', "
                             f"got {attn_implementation!r}")
        self.config = config
        self.config._attn_implementation = attn_implementation
        self.loss_config = loss_config
        self.model = HiggsAudioBackbone(self.config)
        self.audio_lm_head = LinearCrossEntropyHead(config.hidden_size, config.codebook_size,
                                                    num_heads=config.num_codebooks, impl=head_impl)
        self.text_lm_head = LinearCrossEntropyHead(config.hidden_size, config.vocab_size, impl=head_impl)
        if LigerRMSNormFunction is not None and config.hidden_act == "silu":
            self._bind_liger_kernels()

    def _bind_liger_kernels(self) -> None:
        # Instance-level forwards: modules are still called as modules, so ZeRO-3 gathers their weights as usual.
        for module in self.modules():
            if isinstance(module, HiggsAudioV2RMSNorm):
                module.forward = _liger_rms_norm_forward.__get__(module)
            elif isinstance(module, HiggsAudioV2MLP):
                module.forward = _liger_swiglu_forward.__get__(module)

    def gradient_checkpointing_enable(self) -> None:
        """Recompute each decoder layer in backward (non-reentrant torch.utils.checkpoint)."""
        self.model.gradient_checkpointing = True

    def gradient_checkpointing_disable(self) -> None:
        self.model.gradient_checkpointing = False

    # ------------------------------------------------------------------------------------------------ forward

    def forward(self, input_ids, attention_mask, position_ids, segment_ids, label_ids, audio_in_mask,
                audio_out_mask, audio_in_ids, audio_out_ids, audio_out_labels, index: BatchIndex | None = None,
                loss_norm: LossNorm | None = None, return_predictions: bool = False) -> HiggsAudioOutput:
        """With the Batch's `index` (batch.model_inputs() passes it) forward+backward need no host sync; without
        one it is computed here, from the tensors, with syncs."""
        index = self._index(index, label_ids, segment_ids, audio_in_mask, audio_out_mask, audio_out_labels)
        check_shapes(self.config, input_ids, attention_mask, position_ids, segment_ids, label_ids, audio_in_mask,
                     audio_out_mask, audio_in_ids, audio_out_ids, audio_out_labels, index)
        hidden = self.model(input_ids, position_ids, segment_ids, audio_in_ids, audio_out_ids, index).flatten(0, 1)
        targets = next_token_targets(label_ids, audio_out_labels, index)
        text: HeadLoss = self.text_lm_head(hidden[index.text_target_positions], targets.text, return_predictions)
        audio: HeadLoss = self.audio_lm_head(hidden[index.audio_target_positions], targets.audio,
                                             return_predictions)
        text_sum, text_tokens = text.loss_sum[0], text.count[0]
        loss = objective(text_sum, text_tokens, audio.loss_sum, audio.count, self.loss_config, loss_norm)
        logged = {}
        if return_predictions:
            frames = index.audio_target_frames
            logged = dict(text_predictions=text.predictions[:, 0], text_labels=targets.text,
                          audio_predictions=audio.predictions, audio_labels=targets.audio,
                          text_positions=index.text_target_positions, audio_frames=frames,
                          audio_inputs=audio_out_ids[:, frames].T)
        return HiggsAudioOutput(
            loss=loss, text_loss_sum=text_sum.detach(), text_tokens=text_tokens,
            audio_loss_sum=audio.loss_sum.detach(), audio_tokens=audio.count,
            metrics=loss_means(text_sum, text_tokens, audio.loss_sum, audio.count, self.loss_config), **logged)

    @staticmethod
    def _index(index, label_ids, segment_ids, audio_in_mask, audio_out_mask, audio_out_labels) -> BatchIndex:
        if index is not None:
            return index
        return index_batch(label_ids, segment_ids, audio_in_mask, audio_out_mask, audio_out_labels)

    @torch.no_grad()
    def logits(self, input_ids, attention_mask, position_ids, segment_ids, audio_in_mask, audio_out_mask,
               audio_in_ids, audio_out_ids, label_ids=None, audio_out_labels=None,
               index: BatchIndex | None = None) -> HiggsAudioLogits:
        """Full text logits at every position and audio logits at every audio-out frame (materialized)."""
        if index is None:  # labels only choose loss targets, which logits do not use
            label_ids = torch.full_like(input_ids, IGNORE) if label_ids is None else label_ids
            audio_out_labels = torch.full_like(audio_out_ids, IGNORE) if audio_out_labels is None else audio_out_labels
        index = self._index(index, label_ids, segment_ids, audio_in_mask, audio_out_mask, audio_out_labels)
        hidden = self.model(input_ids, position_ids, segment_ids, audio_in_ids, audio_out_ids, index)
        audio = self.audio_lm_head(hidden.flatten(0, 1)[index.audio_positions[audio_in_ids.shape[1]:]])
        return HiggsAudioLogits(text=self.text_lm_head(hidden.flatten(0, 1)).view(*hidden.shape[:2], -1),
                                audio=audio.view(-1, self.config.num_codebooks, self.config.codebook_size))


def check_shapes(config: HiggsAudioV2Config, input_ids, attention_mask, position_ids, segment_ids, label_ids,
                 audio_in_mask, audio_out_mask, audio_in_ids, audio_out_ids, audio_out_labels,
                 index: BatchIndex) -> None:
    """What costs nothing to check (shapes and dtypes, no data): a wrong batch fails here with the field's name
    rather than deep in a kernel. Values and ranges: `Batch.validate` on the CPU."""
    shape = tuple(input_ids.shape)
    for name, value in dict(attention_mask=attention_mask, position_ids=position_ids, segment_ids=segment_ids,
                            label_ids=label_ids, audio_in_mask=audio_in_mask, audio_out_mask=audio_out_mask).items():
        if tuple(value.shape) != shape:
            raise ValueError(f"batch.{name} has shape {tuple(value.shape)}, expected {shape} like input_ids")
    for name, mask in dict(audio_in_mask=audio_in_mask, audio_out_mask=audio_out_mask).items():
        if mask.dtype != torch.bool:
            raise ValueError(f"batch.{name} must be bool, got {mask.dtype}")
    frames = index.audio_positions.shape[0]
    if audio_out_ids.shape != audio_out_labels.shape or audio_in_ids.shape[0] != config.num_codebooks \
            or audio_out_ids.shape[0] != config.num_codebooks or audio_in_ids.shape[1] + audio_out_ids.shape[1] != frames:
        raise ValueError(f"batch.audio_in_ids {tuple(audio_in_ids.shape)}, audio_out_ids {tuple(audio_out_ids.shape)} "
                         f"and audio_out_labels {tuple(audio_out_labels.shape)} must be [{config.num_codebooks}, "
                         f"frames] with {frames} frames in all (batch.index)")
    if index.grouped_order.shape[0] != input_ids.numel():
        raise ValueError(f"batch.index is for {index.grouped_order.shape[0]} positions, the batch has "
                         f"{input_ids.numel()}")
