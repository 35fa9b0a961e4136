"""The GPU recipes (recipes/*.yaml) at the release's widths: each one's model states fit its GPUs with room left
for activations, and LoRA / offload cut what they claim. The numbers are higgs_ds.train.memory's (model states
only); docs/training.md prints them."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

import processes
from helpers import CPU_DS, DEEPSPEED, ROOT, TESTS, TINY_TOKENIZER, base_config, ds_json, write_yaml
from higgs_ds.model_config import read_model_config
from higgs_ds.train.config import deepspeed_config, load_config
from higgs_ds.train.lora import PRESETS as LORA_PRESETS
from higgs_ds.train.preflight import model_memory

GIB = 2**30
RELEASE = {"audio_num_codebooks": 8, "audio_codebook_size": 1024, "use_delay_pattern": True, "skip_audio_tower": True,
           "audio_adapter_type": "dual_ffn_fast_forward", "audio_dual_ffn_layers": list(range(28)),
           "text_config": {"vocab_size": 128256, "hidden_size": 3072, "intermediate_size": 8192,
                           "num_hidden_layers": 28, "num_attention_heads": 24, "num_key_value_heads": 8,
                           "head_dim": 128}}
# recipe: (GPUs, GiB per GPU, at most this share of a GPU for model states: the rest is for activations)
RECIPES = {"lora_1x24gb": (1, 24, 0.6), "full_offload_8x24gb": (8, 24, 0.3),
           "full_offload_optimizer_8x48gb": (8, 48, 0.2), "full_8x80gb": (8, 80, 0.3), "audio_only_8gpu": (8, 80, 0.2)}


def estimate(name: str, tmp_path: Path, gpus: int):
    config = load_config(ROOT / "recipes" / f"{name}.yaml", [
        f"model.pretrained={tmp_path}", f"model.tokenizer={tmp_path}", f"data.train={tmp_path}",
        f"train.out_dir={tmp_path / 'out'}"])
    return model_memory(read_model_config(RELEASE), config, deepspeed_config(config, gpus), gpus)


def test_every_recipe_is_checked():
    assert {p.stem for p in (ROOT / "recipes").glob("*.yaml")} == set(RECIPES)


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_each_recipe_fits_its_gpus_at_the_release_widths(name, tmp_path):
    gpus, gib, share = RECIPES[name]
    counts, memory = estimate(name, tmp_path, gpus)
    assert 5.7e9 < counts.total < 5.9e9, "the release's 5.77 B parameters"
    assert memory["device_bytes"] < share * gib * GIB, memory["summary"]
    if name.startswith("lora"):
        assert counts.trainable < 0.02 * counts.total, "adapters + audio embedding/head only"
    if name.startswith("full"):
        assert counts.trainable == counts.total


def test_lora_and_offload_cut_what_they_claim(tmp_path):
    _, lora = estimate("lora_1x24gb", tmp_path, 1)
    full_1 = dict(estimate("full_8x80gb", tmp_path, 1)[1])
    assert full_1["device_bytes"] > 80 * GIB > 4 * lora["device_bytes"], "full fine-tuning needs more than one GPU"
    _, offloaded = estimate("full_offload_8x24gb", tmp_path, 8)
    _, on_gpu = estimate("full_8x80gb", tmp_path, 8)
    assert offloaded["device_bytes"] < 0.25 * on_gpu["device_bytes"]
    assert offloaded["cpu_bytes"] > 16 * 5.7e9, "the offloaded optimizer states live in CPU memory"


# ------------------------------------------------------------------------------------------------ one step of each

TRAIN_IN_FULL = {"default": None, "adapters_only": [], "heads_only": [r"_lm_head\."]}


def recipe_cases(zero2: Path) -> dict[str, list[str]]:
    """Every freezing recipe, two train.trainable lists whose parameters all fall in one decay group, and every LoRA
    preset × train_in_full choice (the extras: both groups, none, decayed heads only), under ZeRO-3 and ZeRO-2."""
    single = {"audio_only": ["train.freeze=audio_only"], "text_head_only": ["train.freeze=text_head_only"],
              "decayed_only": [r"train.trainable=[mlp\.]"], "undecayed_only": [r"train.trainable=[norm\.weight$]"]}
    for preset in LORA_PRESETS:
        for name, extras in TRAIN_IN_FULL.items():
            chosen = [] if extras is None else [f"lora.train_in_full={json.dumps(extras)}"]
            single[f"lora_{preset}_{name}"] = ["lora.rank=4", f"lora.preset={preset}", *chosen]
    return {f"{stage}_{name}": [f"train.deepspeed={ds}", *overrides]
            for stage, ds in {"zero3": CPU_DS, "zero2": zero2}.items() for name, overrides in single.items()}


@pytest.mark.slow
def test_every_recipe_takes_an_optimizer_step_under_zero3_and_zero2(corpus, pretrained, tmp_path):
    """One launch (tests/step_each_recipe.py) runs each case for one optimizer step with weight decay on: the step
    must complete and change exactly the parameters the recipe trains (LoRA's A included: its decay moves it)."""
    config = base_config(corpus, tmp_path / "unused", max_steps=1, grad_accum=1, tensorboard=False,
                         trace_samples=False)
    config["model"] = {"pretrained": str(pretrained), "tokenizer": str(TINY_TOKENIZER)}
    config["optim"]["weight_decay"] = 0.1
    config["data"]["val"] = None
    run = write_yaml(tmp_path / "run.yaml", **config)
    cases = recipe_cases(Path(ds_json(tmp_path, zero_optimization={"stage": 2})))
    (tmp_path / "cases.json").write_text(json.dumps(cases))
    done = processes.run([str(DEEPSPEED), "--num_gpus", "2", "--master_port", str(processes.free_port()),
                          str(TESTS / "step_each_recipe.py"), str(run), str(tmp_path / "cases.json"),
                          str(tmp_path / "out" / "results.json")], cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert sorted(results) == sorted(cases)
    for name, result in results.items():
        assert result["steps"] == 1 and result["trainable"], name
        assert result["changed"] == result["trainable"], name
        if "lora" in name:
            assert any(".lora_A." in n for n in result["trainable"]), name
