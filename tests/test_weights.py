"""Pretrained weights into the model tensor by tensor (higgs_ds.train.weights): the same weights as load_model for
every layout (boson with upstream's split tensors, port, sharded), one tensor held at a time, and a checkpoint that
does not fit the config refused before any tensor is read."""
from __future__ import annotations

import gc
import json
import weakref

import pytest
import torch

from helpers import BOSON, SPLIT
from higgs_ds.model import HiggsAudioForTraining, load_model, read_model_config, save_checkpoint
from higgs_ds.train.weights import load_pretrained, read_tensor, weight_plan


def tracking_reader(live: list, peaks: list):
    """read_tensor that records how many tensors it returned are still alive when the next is read."""
    def read(sources):
        gc.collect()
        peaks.append(sum(ref() is not None for ref in live))
        tensor = read_tensor(sources)
        live.append(weakref.ref(tensor))
        return tensor
    return read


@pytest.mark.parametrize("layout", ["boson split", "boson", "port", "port sharded"])
def test_streamed_weights_equal_load_model_one_tensor_at_a_time(tmp_path, tokenizer, layout):
    if layout == "boson split":
        path = SPLIT
    else:
        model = load_model(BOSON, tokenizer=tokenizer)
        path = save_checkpoint(model.state_dict(), model.model_config, tmp_path / "ckpt",
                               layout=layout.split()[0], max_shard_bytes=20_000 if "sharded" in layout else 2**30)
        if "sharded" in layout:
            assert len(json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]) > 0
            assert len(list(path.glob("*.safetensors"))) > 2
    expected = load_model(path, tokenizer=tokenizer)
    config = read_model_config(path, tokenizer)
    model = HiggsAudioForTraining(config)
    live, peaks = [], []
    count = load_pretrained(model, path, config, read=tracking_reader(live, peaks))
    assert count == len(dict(model.named_parameters())) == len(peaks)
    assert max(peaks) == 0, "each tensor is released before the next one is read"
    for name, value in expected.state_dict().items():
        assert torch.equal(model.state_dict()[name], value), name


def test_without_zero3_every_rank_reads_the_weights_itself(tokenizer):
    """ZeRO-2 holds the whole model on every rank: rank 1 must load them too (it once got None)."""
    expected = load_model(SPLIT, tokenizer=tokenizer)
    config = read_model_config(SPLIT, tokenizer)
    model = HiggsAudioForTraining(config)
    load_pretrained(model, SPLIT, config, rank=1, zero3=False)
    for name, value in expected.state_dict().items():
        assert torch.equal(model.state_dict()[name], value), name


def test_a_checkpoint_that_does_not_fit_is_refused_before_reading(tmp_path, tokenizer):
    model = load_model(BOSON, tokenizer=tokenizer)
    state = model.state_dict()
    state["text_lm_head.weight"] = state["text_lm_head.weight"][:-1]
    del state["model.norm.weight"]
    raw = json.loads((BOSON / "config.json").read_text())
    path = tmp_path / "bad"
    path.mkdir()
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in state.items()}, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(raw))
    reads = []
    with pytest.raises(ValueError, match=r"text_lm_head\.weight: expected \(416, 32\), checkpoint has \(415, 32\); "
                                         r"missing keys: \['model\.norm\.weight'\]"):
        load_pretrained(HiggsAudioForTraining(model.model_config), path, model.model_config,
                        read=lambda sources: reads.append(sources))
    assert reads == [] and "model.norm.weight" not in weight_plan(path)
