"""LoRA presets (higgs_ds/train/lora.py): the exact set of wrapped modules per preset, both DualFFN paths in the
default, refusals before training, and PEFT injecting exactly those modules."""
from __future__ import annotations

import pytest
import torch

from higgs_ds.model import HiggsAudioForTraining
from higgs_ds.train.lora import inject_lora, lora_targets
from helpers import make_batch, random_text, text, tiny_config, tts_sample

CONFIG = tiny_config()  # 2 layers, hidden 32


def model():
    torch.manual_seed(0)
    return HiggsAudioForTraining(CONFIG)


def expected(*parts: str) -> list[str]:
    names = {"attention": [f"self_attn.{p}_proj" for p in "qkvo"],
             "text_mlp": [f"mlp.{p}_proj" for p in ("gate", "up", "down")],
             "audio_mlp": [f"audio_mlp.{p}_proj" for p in ("gate", "up", "down")]}
    return sorted(f"model.layers.{i}.{n}" for i in range(2) for part in parts for n in names[part])


@pytest.mark.parametrize("preset, parts", [("attention", ("attention",)),
                                           ("attention_text_mlp", ("attention", "text_mlp")),
                                           ("all_linear", ("attention", "text_mlp", "audio_mlp"))])
def test_each_preset_selects_exactly_its_modules(preset, parts):
    assert sorted(lora_targets(model(), preset)) == expected(*parts)


def test_refusals_name_the_problem():
    with pytest.raises(ValueError, match="no module of the model matches"):
        lora_targets(model(), patterns=[r"^no_such\.module$"])
    with pytest.raises(ValueError, match=r"lora rank 17 is larger than model\.layers\.0\.self_attn\.k_proj's width "
                                         r"\(32 → 16\)"):
        lora_targets(model(), "attention", rank=17)
    with pytest.raises(ValueError, match="is a HiggsAudioV2RMSNorm, not a Linear"):
        lora_targets(model(), patterns=[r"input_layernorm$"])
    with pytest.raises(ValueError, match="expected one of"):
        lora_targets(model(), "everything")
    # One pattern with a typo beside a good one: refused, not quietly adapting less than asked.
    with pytest.raises(ValueError, match=r"^lora targets \['self_atn\\\\.v_proj\$'\]: no module"):
        lora_targets(model(), patterns=[r"self_attn\.q_proj$", r"self_atn\.v_proj$"])


def test_a_target_trained_in_full_too_is_refused():
    """PEFT renames a target's weight to <module>.base_layer.weight and freezes it: an extra naming the old name
    would silently stay frozen."""
    from higgs_ds.train.config import LoraSection
    from higgs_ds.train.lora import select

    section = LoraSection(rank=4, train_in_full=[r"^audio_lm_head\.", r"\.audio_mlp\.up_proj\.weight$"])
    with pytest.raises(ValueError, match=r"lora.train_in_full names parameters of LoRA target modules "
                                         r"\(\['model\.layers\.0\.audio_mlp\.up_proj\.weight'"):
        select(model(), section)
    section.preset = "attention_text_mlp"  # the audio MLP is no target now: training it in full is fine
    assert select(model(), section)[1] == ["audio_lm_head.weight", "model.layers.0.audio_mlp.up_proj.weight",
                                           "model.layers.1.audio_mlp.up_proj.weight"]


def test_lora_dropout_and_alpha_reach_every_adapter():
    from higgs_ds.train.config import LoraSection
    from higgs_ds.train.lora import apply_lora

    m = model()
    apply_lora(m, LoraSection(rank=4, alpha=3.0, dropout=0.25))
    wrapped = [module for _, module in m.named_modules() if hasattr(module, "lora_A")]
    assert len(wrapped) == len(expected("attention", "text_mlp", "audio_mlp"))
    for module in wrapped:
        assert module.lora_dropout["default"].p == 0.25 and module.scaling["default"] == 3.0 / 4
    default = model()
    apply_lora(default, LoraSection(rank=4))  # alpha unset: 2 × rank
    assert {module.scaling["default"] for _, module in default.named_modules() if hasattr(module, "lora_A")} == {2.0}


def test_peft_wraps_exactly_the_targets_and_only_adapters_train():
    m = model()
    g = torch.Generator().manual_seed(1)
    batch = make_batch([[tts_sample(g, CONFIG, reference_frames=2, frames=4)],
                        [[text(random_text(g, 5)), text(random_text(g, 4), labelled=True)]]], CONFIG)
    before = m(**batch.model_inputs()).loss.detach()
    targets = lora_targets(m, "all_linear", rank=4)
    inject_lora(m, targets, rank=4, alpha=8)
    wrapped = sorted(name for name, module in m.named_modules() if hasattr(module, "lora_A"))
    assert wrapped == sorted(targets)
    trainable = {name for name, p in m.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert any(".audio_mlp." in n for n in trainable), "the audio path gets adapters too"
    torch.testing.assert_close(m(**batch.model_inputs()).loss, before)  # B = 0: a fresh adapter changes nothing


# ------------------------------------------------------------------------------------------------ merge and export

def trained_lora(seed: int = 3):
    """A LoRA model whose adapters and audio extras are non-zero (a fresh B = 0 would make every check trivial)."""
    from higgs_ds.train.config import LoraSection
    from higgs_ds.train.lora import apply_lora

    m = model()
    section = LoraSection(rank=4, alpha=3.0)  # not the default 2 × rank: a scaling taken from the wrong place shows
    trainable = apply_lora(m, section)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in m.named_parameters():
            if param.requires_grad:
                param.add_(0.1 * torch.randn(param.shape, generator=g))
    return m, section, trainable


def test_apply_lora_trains_exactly_the_adapters_and_the_audio_extras():
    m, _, trainable = trained_lora()
    extras = {n for n in trainable if ".lora_" not in n}
    assert extras == {"model.embed_audio_tokens.embed_audio_tokens.weight", "audio_lm_head.weight"}
    assert {n for n, p in m.named_parameters() if p.requires_grad} == set(trainable)
    assert len([n for n in trainable if ".lora_" in n]) == 2 * len(expected("attention", "text_mlp", "audio_mlp"))


def test_merged_weights_give_the_unmerged_logits_and_differ_from_the_base(tmp_path):
    from higgs_ds.model import load_model
    from higgs_ds.model.checkpoint import save_checkpoint
    from higgs_ds.train.lora import merged_state

    base = model()
    save_checkpoint(base.state_dict(), CONFIG, tmp_path / "base")
    m, section, trainable = trained_lora()
    params = dict(m.named_parameters())
    merged = merged_state(tmp_path / "base", {n: params[n].detach() for n in trainable}, 3.0 / 4)
    save_checkpoint(merged, CONFIG, tmp_path / "merged")
    out = load_model(tmp_path / "merged")
    g = torch.Generator().manual_seed(1)
    batch = make_batch([[tts_sample(g, CONFIG, reference_frames=2, frames=4)],
                        [[text(random_text(g, 5)), text(random_text(g, 4), labelled=True)]]], CONFIG)
    m.eval()
    with torch.no_grad():
        want, got = m.logits(**batch.model_inputs()), out.logits(**batch.model_inputs())
    torch.testing.assert_close(got.text, want.text, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.audio, want.audio, rtol=1e-5, atol=1e-5)
    base_state, merged_weights = base.state_dict(), out.state_dict()
    for name in expected("attention", "text_mlp", "audio_mlp"):
        assert not torch.equal(merged_weights[f"{name}.weight"], base_state[f"{name}.weight"]), name
    for name in ("model.norm.weight", "text_lm_head.weight", "model.embed_tokens.weight"):
        assert torch.equal(merged_weights[name], base_state[name]), f"{name} is not trained: base bytes"
    assert torch.equal(merged_weights["audio_lm_head.weight"], params["audio_lm_head.weight"])


@pytest.mark.parametrize("preset, parts, in_full", [
    ("attention", ("attention",), [r"\.mlp\.", r"\.audio_mlp\."]),
    ("attention_text_mlp", ("attention", "text_mlp"), [r"\.audio_mlp\.", r"^audio_lm_head\."]),
    ("all_linear", ("attention", "text_mlp", "audio_mlp"), [r"^model\.embed_audio_tokens\."])])
def test_the_engine_wraps_exactly_each_presets_modules_and_trains_the_rest_in_full(preset, parts, in_full):
    """apply_lora (what the engine runs) for every preset, with the linear layers a preset leaves alone trained in
    full: PEFT must wrap the preset's modules and no other (given bare names, `gate_proj` would also wrap
    `audio_mlp.gate_proj` and freeze it), and exactly the adapters and the extras train."""
    import re

    from higgs_ds.train.config import LoraSection
    from higgs_ds.train.lora import apply_lora

    m = model()
    trainable = apply_lora(m, LoraSection(rank=4, preset=preset, train_in_full=in_full))
    wrapped = sorted(name for name, module in m.named_modules() if hasattr(module, "lora_A"))
    assert wrapped == expected(*parts)
    extras = {name for name, _ in m.named_parameters() if any(re.search(p, name) for p in in_full)}
    adapters = {f"{t}.lora_{ab}.default.weight" for t in expected(*parts) for ab in "AB"}
    assert extras and not any(".base_layer." in name for name in extras), "no extra is inside a wrapped module"
    assert set(trainable) == {n for n, p in m.named_parameters() if p.requires_grad} == adapters | extras


def test_the_adapters_base_is_a_port_layout_model_transformers_loads(tmp_path):
    """A PEFT adapter names its base: a port-layout `model.pretrained` as it is; a boson-layout one (the release)
    converted to the port layout beside the adapter (transformers loads the port layout only)."""
    from transformers import HiggsAudioV2ForConditionalGeneration

    from helpers import TINY_TOKENIZER, tiny_tokenizer
    from higgs_ds.model import save_checkpoint
    from higgs_ds.train.export import peft_base

    m = model()
    model_config = m.model_config.with_tokenizer(tiny_tokenizer())  # a port-layout config needs every token id
    port = save_checkpoint(m.state_dict(), model_config, tmp_path / "port", layout="port")
    boson = save_checkpoint(m.state_dict(), model_config, tmp_path / "boson", layout="boson")
    assert peft_base(port, tmp_path / "adapter_a", TINY_TOKENIZER) == str(port.resolve())
    assert not (tmp_path / "adapter_a").exists()
    base = peft_base(boson, tmp_path / "adapter_b", TINY_TOKENIZER)
    assert base == str((tmp_path / "adapter_b" / "base").resolve())
    loaded = HiggsAudioV2ForConditionalGeneration.from_pretrained(base, use_text_head=True)
    state = dict(loaded.named_parameters())
    for name, value in m.named_parameters():
        torch.testing.assert_close(state[name], value, rtol=0, atol=0)
