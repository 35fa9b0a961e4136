"""Model FLOPs (higgs_ds/train/flops.py): a count by hand for the tiny model, torch's FLOP counter on a real forward
+ backward for full, frozen and LoRA training, the GPU peak table's dispatch, the CPU's measured peak, and the
throughput metrics built from them."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from helpers import TESTS, mixed_packed_batch, randomize, tiny_config
from higgs_ds.model import HiggsAudioForTraining, LossConfig
from higgs_ds.model.losses import LossSums
from higgs_ds.train.components import apply_freeze
from higgs_ds.train.config import LoraSection, RunConfig, RunConfigError, check, fingerprint
from higgs_ds.train.flops import ModelFlops, Work, gpu_peak_tflops, peak_tflops
from higgs_ds.train.lora import apply_lora
from higgs_ds.train.metrics import StepTotals, step_line, step_metrics

CONFIG = tiny_config()  # hidden 32, intermediate 64, 2 layers, 4 heads / 2 KV heads of 8, text 416, audio 4 × 34


@pytest.fixture(scope="module")
def batch():
    """Two packed rows of 48 positions: text, audio-in, audio-out (trained and not), right padding."""
    return mixed_packed_batch(CONFIG, seed=0, pad_to=48)


def test_the_step_work_is_read_from_the_batch_index(batch):
    # Row 0: samples of 29 and 12 positions, then 7 of padding; row 1: 14 and 12, then 22 of padding (padding
    # attends to the padding of its row: one more span). Pairs the mask allows: Σ s(s+1)/2 over the spans.
    assert batch.index.cu_seqlens.tolist() == [0, 29, 41, 48, 62, 74, 96]
    spans = [29, 12, 7, 14, 12, 22]
    assert Work.of(batch) == Work(positions=2 * 48, text_rows=53, audio_rows=43, text_head_rows=12,
                                  audio_head_rows=17, attention_pairs=sum(s * (s + 1) // 2 for s in spans))
    assert Work.of(batch).attention_pairs == 435 + 78 + 28 + 105 + 78 + 253 == 977
    assert Work.of(batch) + Work.of(batch) == Work(192, 106, 86, 24, 34, 1954)
    # The counts agree with what the model's heads see: text rows = learnable next-token labels.
    assert int((batch.audio_in_mask | batch.audio_out_mask).sum()) == 43


def test_model_flops_of_a_full_fine_tune_match_a_count_by_hand(batch):
    """Every matmul of the tiny model, counted by hand: 2·rows·weights per pass, 3 passes (forward, input
    gradient, weight gradient) when everything trains; attention 4·heads·head_dim per allowed pair forward, 8 back."""
    model = HiggsAudioForTraining(CONFIG, attn_implementation="sdpa", head_impl="chunked")
    hidden, inter, heads, kv_heads, head_dim, layers = 32, 64, 4, 2, 8, 2
    text_vocab, audio_ids = 416, 4 * 34
    positions, text_rows, audio_rows, text_targets, audio_targets, pairs = 96, 53, 43, 12, 17, 977
    q = hidden * heads * head_dim  # 1024
    k = v = hidden * kv_heads * head_dim  # 512 each (grouped-query attention)
    o = heads * head_dim * hidden  # 1024
    ffn = 3 * hidden * inter  # gate, up, down: 6144, the same for `mlp` and `audio_mlp`
    per_layer = (2 * positions * (q + k + v + o) * 3  # 1,769,472: projections on every position, padding included
                 + 2 * text_rows * ffn * 3  # 1,953,792: `mlp` on the text rows
                 + 2 * audio_rows * ffn * 3  # 1,585,152: `audio_mlp` on the audio rows
                 + (2 + 2) * heads * head_dim * pairs * 3)  # 375,168: QKᵀ and AV on the allowed pairs, fwd + 2× bwd
    assert per_layer == 5_683_584
    text_head = 2 * text_targets * hidden * text_vocab * 3  # 958,464: only on the learnable text rows
    audio_head = 2 * audio_targets * hidden * audio_ids * 3  # 443,904: only on the labelled audio-out frames
    expected = layers * per_layer + text_head + audio_head
    assert expected == 12_769_536
    assert ModelFlops.of(model)(Work.of(batch)) == expected
    # Linear in the work: two micro-batches cost twice one.
    assert ModelFlops.of(model)(Work.of(batch) + Work.of(batch)) == 2 * expected


TRAINED = {
    "full": lambda model: apply_freeze(model, "none"),
    "audio_only": lambda model: apply_freeze(model, "audio_only"),  # frozen text path: its weight grads drop
    "text_head_only": lambda model: apply_freeze(model, "text_head_only"),  # no backward below the text head at all
    # Only layer 1's audio FFN: no backward through layer 0 or layer 1's attention; the text FFN beside it gets no
    # input gradient (the DualFFN paths are separate); the heads above do.
    "layer1_audio_mlp": lambda model: apply_freeze(model, "none", [r"^model\.layers\.1\.audio_mlp\."]),
    "lora": lambda model: apply_lora(model, LoraSection(rank=4, alpha=8.0)),  # adapters + audio embedding/head
}
COUNTED = {"full": 15_558_144, "audio_only": 12_756_480, "text_head_only": 5_505_536, "layer1_audio_mlp": 6_358_016,
           "lora": 14_059_008}


@pytest.mark.parametrize("trained", sorted(TRAINED))
def test_model_flops_equal_torch_flop_counter_on_a_real_forward_and_backward(trained, batch):
    """torch's FlopCounterMode (every aten mm / bmm) over one forward + backward of the tiny model. Two settings make
    it see exactly the model's matmuls: the `materialized` head (its three matmuls are autograd's: the chunked head
    does the same three, but its weight gradient is an in-place addmm_ the counter does not count, and the audio head
    recomputes its logits in backward), and SDPA's math kernel, whose QKᵀ and AV are plain bmm (the CPU's flash
    kernel is not counted at all). The math kernel computes every (query, key) pair of a row and masks after, so it
    is the formula with B·L² pairs instead of the mask's 977; what the counter leaves out is element-wise (norms,
    SwiGLU, softmax, RoPE, the loss) and the embedding lookups, which model FLOPs do not count either."""
    model = HiggsAudioForTraining(CONFIG, attn_implementation="sdpa", head_impl="materialized")
    randomize(model)
    TRAINED[trained](model)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(**batch.model_inputs()).loss.backward()
    flops = ModelFlops.of(model)
    work = Work.of(batch)
    assert counter.get_total_flops() == flops(replace(work, attention_pairs=2 * 48 * 48)) == COUNTED[trained]
    # The model FLOPs themselves: the mask's pairs, not the row's square.
    dense_minus_mask = flops.attention_flops(replace(work, attention_pairs=2 * 48 * 48 - 977))
    assert flops(work) == COUNTED[trained] - dense_minus_mask
    if trained == "full":
        assert flops(work) == 12_769_536  # the count by hand above


@pytest.mark.parametrize("name, tflops", [
    ("NVIDIA A100-SXM4-80GB", 312.0), ("NVIDIA A100 80GB PCIe", 312.0), ("NVIDIA A100-SXM4-40GB", 312.0),
    ("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0), ("NVIDIA H100 NVL", 835.0),
    ("NVIDIA H200", 989.0), ("NVIDIA H200 NVL", 835.0), ("NVIDIA B200", 2250.0),
    ("NVIDIA L40S", 362.0), ("NVIDIA L40", 181.0), ("NVIDIA L4", 121.0), ("NVIDIA A40", 150.0),
    ("NVIDIA A10G", 125.0), ("NVIDIA A10", 125.0), ("NVIDIA GeForce RTX 4090", 165.0),
    ("NVIDIA GeForce RTX 3090", 71.0), ("NVIDIA RTX A6000", 155.0), ("NVIDIA RTX 6000 Ada Generation", 364.0),
    ("Tesla V100-SXM2-32GB", None), ("NVIDIA GeForce RTX 2080 Ti", None), ("NVIDIA GeForce RTX 40900", None),
])
def test_gpu_peak_is_looked_up_by_device_name(name, tflops):
    assert gpu_peak_tflops(name) == tflops


def test_the_peak_comes_from_the_override_the_gpu_table_or_a_measurement(monkeypatch):
    assert peak_tflops(torch.device("cpu"), 123.5) == (123.5, "train.peak_tflops")
    assert peak_tflops(torch.device("cuda", 0), 2.0) == (2.0, "train.peak_tflops")
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 PCIe")
    assert peak_tflops(torch.device("cuda", 0), None) == (756.0, "bf16 dense peak of NVIDIA H100 PCIe")
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla V100-SXM2-32GB")
    assert peak_tflops(torch.device("cuda", 0), None) == (None, "unknown GPU 'Tesla V100-SXM2-32GB'")
    measured, source = peak_tflops(torch.device("cpu"), None)
    assert 1e-4 < measured < 100, "fp32 TFLOPS of a share of a CPU"
    assert source == f"measured: fp32 1024² matmul, {torch.get_num_threads()} thread(s)"


def test_throughput_metrics_and_mfu_from_an_all_reduced_step():
    sums = LossSums(torch.tensor([6.0, 3.0, *[4.0] * 4, *[2.0] * 4], dtype=torch.float64))
    totals = StepTotals(sums, tokens=4000.0, samples=10.0, flops=6e12)
    m = step_metrics(totals, LossConfig(), seconds=2.0, world=2, peak_tflops=0.5)
    assert m["throughput/tokens_per_s"] == 2000.0
    assert m["throughput/tokens_per_s_per_rank"] == 1000.0
    assert m["throughput/samples_per_s"] == 5.0
    assert m["throughput/model_tflops_per_rank"] == 1.5  # 6e12 FLOPs / 2 s / 2 ranks
    assert m["throughput/mfu"] == 3.0  # 1.5 TFLOP/s per rank against 0.5 TFLOPS: a wrong peak shows as > 1
    assert "throughput/tps" not in m
    assert "throughput/mfu" not in step_metrics(totals, LossConfig(), seconds=2.0, world=2, peak_tflops=None)
    m.update({"lr": 1e-3, "grad_norm": 1.0, "time/data_wait_share": 0.01, "time/eta_s": 61.0})
    assert "tok/s 2000 mfu 300.0% data 1% eta 0:01:01" in step_line(3, 7, m)
    del m["throughput/mfu"]
    assert "tok/s 2000 data 1%" in step_line(3, 7, m)


def test_peak_tflops_is_checked_and_a_resumed_run_may_change_it():
    config = RunConfig()
    config.model.config = config.model.tokenizer = config.data.train = config.train.deepspeed = str(TESTS)
    config.train.out_dir = "out"
    before = fingerprint(config)
    config.train.peak_tflops = 312.0
    check(config)
    assert fingerprint(config) == before
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        config.train.peak_tflops = bad
        with pytest.raises(RunConfigError, match=r"train\.peak_tflops: must be > 0"):
            check(config)
