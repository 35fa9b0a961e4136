"""LinearCrossEntropyHead: chunked/materialized losses and gradients against a plain F.linear + F.cross_entropy."""
import os
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import processes
from higgs_ds.model import heads
from higgs_ds.model.heads import HeadLoss, LinearCrossEntropyHead, resolve_impl

HIDDEN = 32
TEXT = dict(vocab_size=1000, num_heads=1)
AUDIO = dict(vocab_size=1026, num_heads=8)


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected.double()).abs().max() / expected.double().abs().max().clamp_min(1e-30)).item()


def make_case(num_rows: int, vocab_size: int, num_heads: int, seed: int = 0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(num_heads * vocab_size, HIDDEN, generator=gen) * 0.2
    hidden = torch.randn(num_rows, HIDDEN, generator=gen)
    targets = torch.randint(0, vocab_size, (num_rows, num_heads), generator=gen)
    targets[torch.rand(num_rows, num_heads, generator=gen) < 0.25] = -100
    if num_rows > 3:
        targets[3] = -100  # a fully ignored row
    head_weights = torch.rand(num_heads, generator=gen) + 0.5  # a non-unit grad_output per head
    return weight.to(dtype), hidden.to(dtype), targets, head_weights


def reference(weight, hidden, targets, head_weights):
    """Plain fp32 logits + F.cross_entropy per head; returns loss_sum, count, predictions, grads."""
    weight = weight.detach().float().requires_grad_()
    hidden = hidden.detach().float().requires_grad_()
    num_heads = targets.shape[1]
    logits = F.linear(hidden, weight).view(hidden.shape[0], num_heads, -1)
    loss_sum = torch.stack(
        [F.cross_entropy(logits[:, k], targets[:, k], ignore_index=-100, reduction="sum") for k in range(num_heads)]
    )
    (loss_sum * head_weights).sum().backward()
    return loss_sum.detach(), (targets != -100).sum(0), logits.argmax(-1), hidden.grad, weight.grad


def run_head(impl, weight, hidden, targets, head_weights, chunk_tokens=512, squeeze_targets=False):
    num_heads = targets.shape[1]
    head = LinearCrossEntropyHead(HIDDEN, weight.shape[0] // num_heads, num_heads, chunk_tokens, impl=impl)
    head = head.to(weight.dtype)
    with torch.no_grad():
        head.weight.copy_(weight)
    hidden = hidden.clone().requires_grad_()
    out = head(hidden, targets[:, 0] if squeeze_targets else targets, return_predictions=True)
    assert isinstance(out, HeadLoss) and out.loss_sum.dtype == torch.float32 and out.count.dtype == torch.long
    (out.loss_sum * head_weights).sum().backward()
    return out, hidden.grad, head.weight.grad


@pytest.mark.parametrize("impl", ["chunked", "materialized"])
@pytest.mark.parametrize("shape", [TEXT, AUDIO], ids=["text", "audio8"])
@pytest.mark.parametrize("same_scale", [True, False], ids=["one_scale", "per_head_scales"])
def test_matches_reference_fp32(impl, shape, same_scale):
    weight, hidden, targets, head_weights = make_case(37, **shape)
    if same_scale:  # forward-time grad_hidden is scaled; per-head scales make the 8-head backward recompute it
        head_weights = torch.full_like(head_weights, 0.7)
    ref_loss, ref_count, ref_pred, ref_grad_hidden, ref_grad_weight = reference(weight, hidden, targets, head_weights)
    # 37 rows in chunks of 8: the last chunk is partial.
    out, grad_hidden, grad_weight = run_head(
        impl, weight, hidden, targets, head_weights, chunk_tokens=8, squeeze_targets=shape["num_heads"] == 1
    )
    assert rel_err(out.loss_sum.detach(), ref_loss) <= 1e-5
    assert torch.equal(out.count, ref_count)
    assert torch.equal(out.predictions, ref_pred)
    assert rel_err(grad_hidden, ref_grad_hidden) <= 1e-5
    assert rel_err(grad_weight, ref_grad_weight) <= 1e-5


@pytest.mark.parametrize("chunk_tokens", [1, 5, 64])
def test_chunk_size_does_not_change_results(chunk_tokens):
    weight, hidden, targets, head_weights = make_case(21, **AUDIO, seed=1)
    ref_loss, _, ref_pred, ref_grad_hidden, ref_grad_weight = reference(weight, hidden, targets, head_weights)
    out, grad_hidden, grad_weight = run_head("chunked", weight, hidden, targets, head_weights, chunk_tokens)
    assert rel_err(out.loss_sum.detach(), ref_loss) <= 1e-5
    assert torch.equal(out.predictions, ref_pred)
    assert rel_err(grad_hidden, ref_grad_hidden) <= 1e-5
    assert rel_err(grad_weight, ref_grad_weight) <= 1e-5


@pytest.mark.parametrize("impl", ["chunked", "materialized"])
@pytest.mark.parametrize("shape", [TEXT, AUDIO], ids=["text", "audio8"])
def test_zero_rows_still_give_zero_weight_grad(impl, shape):
    weight, hidden, targets, head_weights = make_case(0, **shape)
    out, grad_hidden, grad_weight = run_head(impl, weight, hidden, targets, head_weights)
    assert torch.equal(out.loss_sum.detach(), torch.zeros(shape["num_heads"]))
    assert torch.equal(out.count, torch.zeros(shape["num_heads"], dtype=torch.long))
    assert out.predictions.shape == (0, shape["num_heads"])
    assert grad_hidden.shape == (0, HIDDEN)
    assert grad_weight is not None and torch.equal(grad_weight, torch.zeros_like(weight))


@pytest.mark.parametrize("shape", [TEXT, AUDIO], ids=["text", "audio8"])
def test_bf16_against_fp32_reference(shape):
    weight, hidden, targets, head_weights = make_case(29, **shape, seed=2, dtype=torch.bfloat16)
    ref_loss, ref_count, _, ref_grad_hidden, ref_grad_weight = reference(weight, hidden, targets, head_weights)
    out, grad_hidden, grad_weight = run_head("chunked", weight, hidden, targets, head_weights, chunk_tokens=8)
    assert grad_hidden.dtype == grad_weight.dtype == torch.bfloat16
    assert torch.equal(out.count, ref_count)
    # bf16 logits and bf16 gradient matmuls: ~2^-8 relative per element.
    assert rel_err(out.loss_sum.detach(), ref_loss) <= 1e-2
    assert rel_err(grad_hidden, ref_grad_hidden) <= 2e-2
    assert rel_err(grad_weight, ref_grad_weight) <= 2e-2


@pytest.mark.parametrize("shape", [TEXT, AUDIO], ids=["text", "audio8"])
def test_frozen_weight_and_no_grad(shape):
    weight, hidden, targets, head_weights = make_case(19, **shape, seed=3)
    ref_loss, _, _, ref_grad_hidden, _ = reference(weight, hidden, targets, head_weights)
    head = LinearCrossEntropyHead(HIDDEN, shape["vocab_size"], shape["num_heads"], chunk_tokens=4, impl="chunked")
    head.weight.data.copy_(weight)
    head.weight.requires_grad_(False)
    hidden_leaf = hidden.clone().requires_grad_()
    (head(hidden_leaf, targets).loss_sum * head_weights).sum().backward()
    assert rel_err(hidden_leaf.grad, ref_grad_hidden) <= 1e-5
    with torch.no_grad():
        out = head(hidden, targets)
    assert not out.loss_sum.requires_grad and rel_err(out.loss_sum, ref_loss) <= 1e-5


def test_single_head_backward_twice_is_refused():
    weight, hidden, targets, _ = make_case(9, **TEXT)
    head = LinearCrossEntropyHead(HIDDEN, TEXT["vocab_size"], impl="chunked")
    loss = head(hidden.requires_grad_(), targets).loss_sum.sum()
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="twice"):
        loss.backward()


def test_logits_path_equals_linear_and_state_dict_key():
    head = LinearCrossEntropyHead(HIDDEN, 100, num_heads=3)
    linear = torch.nn.Linear(HIDDEN, 300, bias=False)
    linear.load_state_dict(head.state_dict())  # same key, same shape as an nn.Linear head
    assert list(head.state_dict()) == ["weight"]
    hidden = torch.randn(2, 5, HIDDEN)
    assert torch.equal(head(hidden), linear(hidden))


def test_bad_input_is_named():
    head = LinearCrossEntropyHead(HIDDEN, 10, num_heads=2, impl="chunked")
    hidden = torch.randn(4, HIDDEN)
    targets = torch.zeros(4, 2, dtype=torch.long)  # (ranges: Batch.validate, tests/test_batch.py)
    with pytest.raises(ValueError, match=r"targets must be torch.long of shape \(4, 2\)"):
        head(hidden, torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"hidden must be \[N, 32\]"):
        head(torch.randn(4, 8), targets)
    with pytest.raises(ValueError, match="hidden dtype torch.bfloat16"):
        head(hidden.bfloat16(), targets)
    with pytest.raises(ValueError, match="impl must be one of"):
        LinearCrossEntropyHead(HIDDEN, 10, impl="fast")


def test_dispatch_without_liger(monkeypatch):
    monkeypatch.setattr(heads, "liger_fused_linear_cross_entropy", None)
    for device in ("cpu", "cuda"):
        assert resolve_impl("auto", torch.device(device)) == "chunked"
        assert resolve_impl("liger", torch.device(device)) == "chunked"
        assert resolve_impl("materialized", torch.device(device)) == "materialized"
    # And the module runs: "liger" on CPU without Liger gives the chunked numbers.
    weight, hidden, targets, head_weights = make_case(11, **AUDIO, seed=4)
    liger_out, liger_grad_hidden, _ = run_head("liger", weight, hidden, targets, head_weights)
    chunked_out, chunked_grad_hidden, _ = run_head("chunked", weight, hidden, targets, head_weights)
    assert torch.equal(liger_out.loss_sum, chunked_out.loss_sum)
    assert torch.equal(liger_grad_hidden, chunked_grad_hidden)


def test_dispatch_with_liger_importable(monkeypatch):
    monkeypatch.setattr(heads, "liger_fused_linear_cross_entropy", lambda *a, **k: None)
    assert resolve_impl("auto", torch.device("cuda")) == "liger"
    assert resolve_impl("liger", torch.device("cuda")) == "liger"
    assert resolve_impl("auto", torch.device("cpu")) == "chunked"
    assert resolve_impl("chunked", torch.device("cuda")) == "chunked"


ZERO3_SCRIPT = textwrap.dedent(
    """
    import os, torch, deepspeed
    from deepspeed.utils import safe_get_full_grad
    from higgs_ds.model.heads import LinearCrossEntropyHead

    class TwoHeads(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.body = torch.nn.Linear(16, 16)
            self.text = LinearCrossEntropyHead(16, 50, impl="chunked")
            self.audio = LinearCrossEntropyHead(16, 9, num_heads=8, chunk_tokens=3, impl="chunked")

        def forward(self, x, text_targets, audio_targets):
            hidden = self.body(x)
            audio_rows = audio_targets.shape[0]
            text, audio = self.text(hidden, text_targets), self.audio(hidden[:audio_rows], audio_targets)
            return text.loss_sum.sum() + (audio.loss_sum * torch.arange(1.0, 9.0)).sum()

    deepspeed.init_distributed(dist_backend="gloo")
    torch.manual_seed(0)
    reference = TwoHeads()
    model = TwoHeads()
    model.load_state_dict(reference.state_dict())
    config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 2,
              "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
              "optimizer": {"type": "SGD", "params": {"lr": 0.0}}, "zero_allow_untested_optimizer": True}
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    # Micro-step 2 has no audio rows: the audio head still runs and contributes a zero grad.
    for audio_rows in (7, 0):
        batch = (torch.randn(7, 16), torch.randint(0, 50, (7,)), torch.randint(0, 9, (audio_rows, 8)))
        engine.backward(engine(*batch))
        (reference(*batch) / 2).backward()  # DeepSpeed divides by gradient_accumulation_steps
    for name, param in engine.module.named_parameters():
        expected = dict(reference.named_parameters())[name].grad
        error = (safe_get_full_grad(param) - expected).abs().max().item()
        assert error <= 1e-5 * expected.abs().max().item(), (name, error)
    print("ZERO3_OK")
    """
)


def test_zero3_gathers_weight_for_recompute_backward(tmp_path):
    """ZeRO-3 releases the weight after forward; the multi-head backward needs it again, which DeepSpeed only
    re-gathers if it can see HeadLoss's tensors (a NamedTuple; a dataclass fails here with an empty weight)."""
    pytest.importorskip("deepspeed")
    script = tmp_path / "zero3.py"
    script.write_text(ZERO3_SCRIPT)
    repo = Path(__file__).resolve().parents[1]
    port = str(processes.free_port())
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=port, RANK="0", LOCAL_RANK="0", WORLD_SIZE="1",
               PYTHONPATH=str(repo))
    result = processes.run([sys.executable, str(script)], env=env, timeout=600)
    assert "ZERO3_OK" in result.stdout, result.stdout[-2000:] + result.stderr[-4000:]
