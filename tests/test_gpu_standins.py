"""The CUDA-only code paths, wired on the CPU: transformers' flash_attention_2 path (varlen over packed rows) and the
Liger kernels (fused linear CE, RMSNorm, SwiGLU), each run with a pure-PyTorch stand-in of the kernel's own
signature, against the SDPA / torch model with the same weights on the same packed batch.

The stand-ins take explicit parameters (no **kwargs catch-all): transformers inspects the flash functions'
signatures to decide which kwargs to pass, and a call with an argument the real kernel lacks fails here too.
What this cannot test: the kernels' own numerics, dtypes (bf16) and launch constraints; only what our code hands
them and what it does with the result."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import transformers.modeling_flash_attention_utils as flash_utils
from transformers.models.higgs_audio_v2.modeling_higgs_audio_v2 import HiggsAudioV2MLP, HiggsAudioV2RMSNorm

from higgs_ds.model import HiggsAudioForTraining, LossNorm, learnable_counts
from higgs_ds.model import heads, modeling
from higgs_ds.model.losses import next_token_targets
from helpers import make_batch, mixed_packed_batch, random_text, randomize, text, tiny_config

CONFIG = tiny_config()


def packed_batch(config=CONFIG):
    return mixed_packed_batch(config, seed=5, pad_to=64)


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected.double()).abs().max() / expected.double().abs().max().clamp_min(1e-30)).item()


def step(model, batch):
    """forward + backward with a LossNorm whose per-codebook normalisers differ; returns (output, grads by name)."""
    counts = learnable_counts(batch)
    audio_norm = counts.audio.float() + torch.arange(float(counts.audio.numel()))
    norm = LossNorm(text_tokens=float(counts.text), audio_tokens=audio_norm, grad_scale=2.0)
    model.zero_grad(set_to_none=True)
    out = model(**batch.model_inputs(), loss_norm=norm)
    out.loss.backward()
    return out, {name: None if p.grad is None else p.grad.clone() for name, p in model.named_parameters()}


def assert_same_step(actual, expected, tol=1e-5):
    (out, grads), (ref_out, ref_grads) = actual, expected
    torch.testing.assert_close(out.loss, ref_out.loss, rtol=tol, atol=0)
    torch.testing.assert_close(out.text_loss_sum, ref_out.text_loss_sum, rtol=tol, atol=0)
    torch.testing.assert_close(out.audio_loss_sum, ref_out.audio_loss_sum, rtol=tol, atol=0)  # per codebook
    assert torch.equal(out.text_tokens, ref_out.text_tokens) and torch.equal(out.audio_tokens, ref_out.audio_tokens)
    assert grads.keys() == ref_grads.keys()
    missing = [name for name in grads if grads[name] is None or ref_grads[name] is None]
    assert not missing, f"no gradient reached {missing}"
    errors = {name: rel_err(grads[name], ref_grads[name]) for name in grads}
    bad = {name: error for name, error in errors.items() if error > tol}
    assert not bad, bad


def twin(model: HiggsAudioForTraining, **kwargs) -> HiggsAudioForTraining:
    other = HiggsAudioForTraining(model.model_config, **kwargs)
    other.load_state_dict(model.state_dict())
    return other.train(model.training)


# ---------------------------------------------------------------------------------------------------- flash attention


def _attend(q, k, v, softmax_scale, causal):
    """One sequence: q [n_q, H, d], k/v [n_k, H_kv, d] -> [n_q, H, d]. GQA as flash_attn: q head h uses kv head
    h // (H / H_kv). Causal is bottom-right aligned (flash_attn >= 2.1); here n_q == n_k."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    scores = torch.einsum("qhd,khd->hqk", q, k) * scale
    if causal:
        allowed = torch.ones(q.shape[0], k.shape[0], dtype=torch.bool).tril(k.shape[0] - q.shape[0])
        scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(dim=-1), v)


class FlashStandIns:
    """flash_attn 2.x's flash_attn_func / flash_attn_varlen_func (same parameters, plain torch, autograd through
    torch ops) and bert_padding's pad_input / unpad_input; records every call."""

    def __init__(self):
        self.varlen_calls: list[dict] = []
        self.dense_calls: list[dict] = []
        self.padding_calls = 0
        self.loaded: list[str | None] = []

    @staticmethod
    def _unsupported(dropout_p, window_size, softcap, alibi_slopes, return_attn_probs):
        assert dropout_p == 0.0, f"stand-in has no dropout, got dropout_p={dropout_p}"
        assert tuple(window_size) == (-1, -1), window_size
        assert softcap == 0.0 and alibi_slopes is None and not return_attn_probs

    def flash_attn_func(self, q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                        softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False):
        self._unsupported(dropout_p, window_size, softcap, alibi_slopes, return_attn_probs)
        assert q.dim() == 4 and k.shape[2] and q.shape[2] % k.shape[2] == 0  # [B, L, H, d]
        self.dense_calls.append(dict(shape=tuple(q.shape), causal=causal))
        return torch.stack([_attend(q[b], k[b], v[b], softmax_scale, causal) for b in range(q.shape[0])])

    def flash_attn_varlen_func(self, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                               softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                               alibi_slopes=None, deterministic=False, return_attn_probs=False, block_table=None):
        self._unsupported(dropout_p, window_size, softcap, alibi_slopes, return_attn_probs)
        assert block_table is None
        assert q.dim() == k.dim() == v.dim() == 3 and q.shape[1] % k.shape[1] == 0  # [total, H, d]
        for cu, total, max_len in ((cu_seqlens_q, q.shape[0], max_seqlen_q), (cu_seqlens_k, k.shape[0], max_seqlen_k)):
            # The kernel's contract: int32 cumulative lengths from 0 to the total, a Python int max length.
            assert cu.dtype == torch.int32 and cu[0] == 0 and cu[-1] == total and (cu.diff() > 0).all()
            assert isinstance(max_len, int) and max_len == int(cu.diff().max())
        self.varlen_calls.append(dict(cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, max_seqlen_q=max_seqlen_q,
                                      max_seqlen_k=max_seqlen_k, causal=causal, softmax_scale=softmax_scale,
                                      q_shape=tuple(q.shape), k_shape=tuple(k.shape)))
        bounds = cu_seqlens_q.tolist()
        return torch.cat([_attend(q[s:e], k[s:e], v[s:e], softmax_scale, causal)
                          for s, e in zip(bounds[:-1], bounds[1:])])

    # flash_attn.bert_padding's contract, which transformers' own fallbacks share: pad_input(hidden, indices, batch,
    # seqlen) -> [batch, seqlen, ...]; unpad_input(hidden, mask, unused_mask=None) -> (hidden, indices, cu_seqlens,
    # max_seqlen, seqused). Only the padded-mask route uses them; our model must never take it.
    def pad_input(self, hidden_states, indices, batch, seqlen):
        self.padding_calls += 1
        return flash_utils._pad_input(hidden_states, indices, batch, seqlen)

    def unpad_input(self, hidden_states, attention_mask, unused_mask=None):
        self.padding_calls += 1
        return flash_utils._unpad_input(hidden_states, attention_mask, unused_mask)

    def lazy_imports(self, implementation, attention_wrapper=None, allow_all_kernels=False):
        """Replaces flash_utils._lazy_imports, which without flash_attn would fetch a kernel from the hub."""
        self.loaded.append(implementation)
        return self.flash_attn_func, self.flash_attn_varlen_func, None, self.pad_input, self.unpad_input


@pytest.fixture
def flash(monkeypatch):
    """transformers caches the loaded functions in module globals keyed by `_loaded_implementation`: reset them so
    the stand-ins load (and restore them afterwards, so no stand-in outlives the test)."""
    for name in ("_loaded_implementation", "_flash_fn", "_flash_varlen_fn", "_flash_with_kvcache_fn", "_pad_fn",
                 "_unpad_fn", "_process_flash_kwargs_fn", "_process_with_kvcache_kwargs_fn"):
        monkeypatch.setattr(flash_utils, name, None)
    standins = FlashStandIns()
    monkeypatch.setattr(flash_utils, "_lazy_imports", standins.lazy_imports)
    return standins


@pytest.fixture(scope="module")
def sdpa_model():
    m = HiggsAudioForTraining(CONFIG, attn_implementation="sdpa", head_impl="materialized")
    randomize(m, seed=1)
    return m.train()


def test_flash_attention_2_matches_sdpa_on_packed_rows(flash, sdpa_model):
    flash_model = twin(sdpa_model, attn_implementation="flash_attention_2", head_impl="materialized")
    assert all(layer.self_attn.config._attn_implementation == "flash_attention_2"
               for layer in flash_model.model.layers)
    batch = packed_batch()
    index = batch.index
    total = batch.input_ids.numel()

    logits, ref_logits = flash_model.logits(**batch.model_inputs()), sdpa_model.logits(**batch.model_inputs())
    torch.testing.assert_close(logits.text, ref_logits.text, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits.audio, ref_logits.audio, rtol=1e-5, atol=1e-5)
    assert flash.loaded == ["flash_attention_2"]
    assert len(flash.varlen_calls) == CONFIG.num_hidden_layers  # one per layer

    assert_same_step(step(flash_model, batch), step(sdpa_model, batch))
    assert len(flash.varlen_calls) == 2 * CONFIG.num_hidden_layers  # backward runs through torch ops, no new call

    # Every call was varlen over the flattened rows with the batch's own boundaries (each row start and each
    # segment change, padding its own sequence) -- never the dense kernel, never transformers' unpad route.
    assert not flash.dense_calls and flash.padding_calls == 0
    assert index.cu_seqlens.numel() - 1 > batch.input_ids.shape[0]  # more sequences than rows: packing is exercised
    heads_, kv_heads, head_dim = CONFIG.num_attention_heads, CONFIG.num_key_value_heads, CONFIG.head_dim
    for call in flash.varlen_calls:
        assert torch.equal(call["cu_seqlens_q"], index.cu_seqlens)
        assert torch.equal(call["cu_seqlens_k"], index.cu_seqlens)
        assert call["max_seqlen_q"] == call["max_seqlen_k"] == index.max_seqlen
        assert call["causal"] is True and call["softmax_scale"] == head_dim ** -0.5
        assert call["q_shape"] == (total, heads_, head_dim) and call["k_shape"] == (total, kv_heads, head_dim)


def test_without_the_varlen_kwargs_transformers_attends_across_samples(flash, sdpa_model, monkeypatch):
    """What the varlen kwargs guard against: the model passes no attention mask and no position_ids to attention,
    so without them transformers takes its dense path (plain causal over each whole row, across samples) --
    silently. (Its position_ids fallback would not help either: it only detects packing for batch size 1.)
    Also shows this file's batch is one where cross-sample attention changes the logits."""
    monkeypatch.setattr(modeling, "varlen_flash_kwargs", lambda index: {})
    flash_model = twin(sdpa_model, attn_implementation="flash_attention_2", head_impl="materialized")
    batch = packed_batch()
    logits, ref_logits = flash_model.logits(**batch.model_inputs()), sdpa_model.logits(**batch.model_inputs())
    assert not flash.varlen_calls and len(flash.dense_calls) == CONFIG.num_hidden_layers
    assert all(call["causal"] and call["shape"][:2] == tuple(batch.input_ids.shape) for call in flash.dense_calls)
    in_second_samples = batch.segment_ids == 2
    assert (logits.text - ref_logits.text)[in_second_samples].abs().max() > 1e-2
    first = batch.segment_ids[0] == 1  # the first sample of a row sees nothing before it: unchanged
    torch.testing.assert_close(logits.text[0, first], ref_logits.text[0, first], rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------- Liger kernels


class LigerStandIns:
    """liger_kernel's functional fused linear CE, LigerRMSNormFunction and LigerSiLUMulFunction in plain torch
    (autograd through torch ops); records every call."""

    def __init__(self):
        self.ce_calls: list[dict] = []
        self.rms_calls: list[dict] = []
        self.swiglu_calls = 0
        standins = self

        class RMSNorm:
            @staticmethod
            def apply(X, W, eps, offset=0.0, casting_mode="llama", in_place=True):
                """y = x / rms(x) * (offset + w); "llama" casting: rms in fp32, the product in x's dtype."""
                assert casting_mode == "llama", casting_mode
                standins.rms_calls.append(dict(weight=W, eps=eps, offset=offset, in_place=in_place,
                                               rows=X.shape[0]))
                x = X.float()
                normed = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
                return normed.to(X.dtype) * (offset + W)

        class SiLUMul:
            @staticmethod
            def apply(a, b):
                standins.swiglu_calls += 1
                return F.silu(a) * b

        self.RMSNorm, self.SiLUMul = RMSNorm, SiLUMul

    def fused_linear_cross_entropy(self, input, weight, target, bias=None, ce_weight=None, ignore_index=-100,
                                   lse_square_scale=0.0, label_smoothing=0.0, reduction="mean", softcap=None,
                                   return_z_loss=False):
        assert ce_weight is None and lse_square_scale == 0.0 and softcap is None and not return_z_loss
        assert input.dim() == 2 and weight.dim() == 2 and target.shape == input.shape[:1] and target.is_contiguous()
        self.ce_calls.append(dict(weight=weight, target=target.clone(), ignore_index=ignore_index,
                                  reduction=reduction))
        logits = F.linear(input, weight, bias).float()
        return F.cross_entropy(logits, target, ignore_index=ignore_index, reduction=reduction,
                               label_smoothing=label_smoothing)


def test_liger_kernels_match_the_torch_model(monkeypatch):
    config = tiny_config()
    config.rms_norm_eps = 1e-2  # comparable to the hidden states' mean square: a wrong eps changes the numbers
    monkeypatch.setattr(modeling, "LigerRMSNormFunction", None)
    monkeypatch.setattr(modeling, "LigerSiLUMulFunction", None)
    reference = HiggsAudioForTraining(config, head_impl="materialized")
    randomize(reference, seed=2)
    reference.train()

    liger = LigerStandIns()
    monkeypatch.setattr(modeling, "LigerRMSNormFunction", liger.RMSNorm)
    monkeypatch.setattr(modeling, "LigerSiLUMulFunction", liger.SiLUMul)
    monkeypatch.setattr(heads, "liger_fused_linear_cross_entropy", liger.fused_linear_cross_entropy)
    monkeypatch.setattr(heads, "fused_kernels_apply", lambda device: True)
    model = twin(reference, head_impl="auto")  # the kernels bind in __init__
    assert heads.resolve_impl("auto", torch.device("cpu")) == "liger"
    norms = [m for m in model.modules() if isinstance(m, HiggsAudioV2RMSNorm)]
    mlps = [m for m in model.modules() if isinstance(m, HiggsAudioV2MLP)]
    assert all(m.forward.__func__ is modeling._liger_rms_norm_forward for m in norms)
    assert all(m.forward.__func__ is modeling._liger_swiglu_forward for m in mlps)

    batch = packed_batch(config)
    assert_same_step(step(model, batch), step(reference, batch))

    # RMSNorm: every norm (text and audio, per layer, final) once, with its own weight and eps, Llama casting.
    assert len(liger.rms_calls) == len(norms) == 4 * config.num_hidden_layers + 1
    assert {id(call["weight"]) for call in liger.rms_calls} == {id(m.weight) for m in norms}
    assert all(call["eps"] == config.rms_norm_eps and call["offset"] == 0.0 for call in liger.rms_calls)
    assert liger.swiglu_calls == len(mlps) == 2 * config.num_hidden_layers

    # Fused CE: the text head once, then one call per codebook with that codebook's weight block and targets.
    targets = next_token_targets(batch.label_ids, batch.audio_out_labels, batch.index)
    text_call, *audio_calls = liger.ce_calls
    assert len(audio_calls) == config.num_codebooks
    assert all(call["reduction"] == "sum" and call["ignore_index"] == -100 for call in liger.ce_calls)
    assert text_call["weight"].data_ptr() == model.text_lm_head.weight.data_ptr()
    assert torch.equal(text_call["target"], targets.text)
    head = model.audio_lm_head
    for k, call in enumerate(audio_calls):
        assert call["weight"].shape == (head.vocab_size, head.hidden_size)
        assert torch.equal(call["weight"], head.weight[k * head.vocab_size:(k + 1) * head.vocab_size])
        assert torch.equal(call["target"], targets.audio[:, k]), f"codebook {k} got other targets"


def test_liger_paths_fall_back_to_torch_for_zero_rows_and_predictions(monkeypatch):
    """Zero-row slices (a text-only batch's audio norms/MLPs) and calls asking for predictions take the torch path,
    not the kernels: a text-only batch still matches the reference, the kernels see no empty input."""
    config = tiny_config()
    monkeypatch.setattr(modeling, "LigerRMSNormFunction", None)
    monkeypatch.setattr(modeling, "LigerSiLUMulFunction", None)
    reference = HiggsAudioForTraining(config, head_impl="materialized")
    randomize(reference, seed=3)
    liger = LigerStandIns()
    monkeypatch.setattr(modeling, "LigerRMSNormFunction", liger.RMSNorm)
    monkeypatch.setattr(modeling, "LigerSiLUMulFunction", liger.SiLUMul)
    monkeypatch.setattr(heads, "liger_fused_linear_cross_entropy", liger.fused_linear_cross_entropy)
    monkeypatch.setattr(heads, "fused_kernels_apply", lambda device: True)
    model = twin(reference.train(), head_impl="liger")
    g = torch.Generator().manual_seed(9)
    batch = make_batch([[[text(random_text(g, 7)), text(random_text(g, 5), labelled=True)]]], config)
    assert_same_step(step(model, batch), step(reference, batch))
    assert all(call["rows"] > 0 for call in liger.rms_calls)
    assert len(liger.ce_calls) == 1  # the text head; the zero-row audio head ran "chunked"
    calls = len(liger.ce_calls)
    out = model(**batch.model_inputs(), return_predictions=True)
    assert len(liger.ce_calls) == calls and out.text_predictions is not None


def test_each_rank_pins_its_accelerator_before_any_collective(monkeypatch):
    """On a GPU the stream's first all-reduce (the epoch's batch count) runs on the current device before
    deepspeed.initialize sets it: runtime.pin_device makes it LOCAL_RANK's (stood in: no GPU here); the CPU is left
    alone."""
    import deepspeed

    from higgs_ds.train import runtime

    calls = []

    class StandIn:
        def __init__(self, name):
            self.name = name

        def device_name(self):
            return self.name

        def set_device(self, index):
            calls.append(index)

    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.setattr(deepspeed, "get_accelerator", lambda: StandIn("cuda"))
    runtime.pin_device()
    monkeypatch.setattr(deepspeed, "get_accelerator", lambda: StandIn("cpu"))
    runtime.pin_device()
    assert calls == [3]
