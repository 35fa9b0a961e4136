"""LoRA presets (higgs_ds/train/lora.py): the exact set of wrapped modules per preset, both DualFFN paths in the
default, refusals before training, and PEFT injecting exactly those modules."""
from __future__ import annotations

import pytest
import torch

from higgs_ds.model import HiggsAudioForTraining
from higgs_ds.train.lora import inject_lora, lora_targets
from model_helpers import make_batch, random_text, text, tiny_config, tts_sample

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
