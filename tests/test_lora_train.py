"""LoRA under the engine (real 2-rank `deepspeed` launches, gloo, CPU): the run trains and changes only the adapters
and the parameters trained in full; checkpoints hold only those; kill -9 and resume continue exactly; the export
merges into both layouts and writes a PEFT adapter that transformers' port loads to the same logits; bad LoRA
settings stop before any process group."""
from __future__ import annotations

import json
import math
import re
import warnings
from pathlib import Path

import pytest
import torch
from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
from safetensors.torch import load_file

from helpers import (EXTRAS, LORA, ds_json, kill_after_save, launch, lora_config, losses, make_samples,
                     resumes_exactly, write_yaml)
from higgs_ds.data.collator import Collator
from higgs_ds.model import HiggsAudioForTraining, load_model
from higgs_ds.model.checkpoint import read_port_state_dict
from higgs_ds.train import main as train_main
from higgs_ds.train.config import LoraSection
from higgs_ds.train.export import main as export_main
from higgs_ds.train.lora import apply_lora


@pytest.fixture(scope="module")
def lora_run(corpus, pretrained, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora")
    config = write_yaml(out.parent / f"{out.name}.yaml", **lora_config(corpus, pretrained, out))
    code, output = launch(config, faults={"dump_weights": str(out / "final.safetensors")})
    assert code == 0, output[-3000:]
    return config, out, output


@pytest.mark.slow
def test_a_two_rank_zero3_lora_run_trains_only_the_adapters_and_extras(lora_run, pretrained):
    _, out, _ = lora_run
    steps = losses(out)
    assert sorted(steps) == list(range(1, 8)) and steps[7] < steps[1] - 1.0, f"the loss must fall: {steps}"
    base, final = read_port_state_dict(pretrained), load_file(str(out / "final.safetensors"))
    adapters = {n for n in final if ".lora_" in n}
    assert len(adapters) == 2 * 2 * 10, "A and B on 10 linear layers of each of the 2 decoder layers"
    assert all(final[n].abs().sum() > 0 for n in adapters if ".lora_B." in n), "B has trained away from 0"
    for name, value in base.items():
        stored = name if name in final else name.replace(".weight", ".base_layer.weight")
        if name in EXTRAS:
            assert not torch.equal(final[stored], value), f"{name} is trained in full"
        else:
            assert torch.equal(final[stored], value), f"{name} is frozen and must stay bit-identical"


@pytest.mark.slow
def test_the_lora_checkpoint_holds_only_the_trained_parameters(lora_run, pretrained):
    _, out, _ = lora_run
    tag = out / "checkpoints" / "step00000007"
    state = get_fp32_state_dict_from_zero_checkpoint(str(tag.parent), tag=tag.name)
    params = {n for n in state if ".lora_" in n or n in EXTRAS}
    assert params == {n for n in state if not n.endswith("inv_freq")} and EXTRAS <= params
    trained_bytes = sum(v.numel() * 4 for n, v in state.items() if n in params)
    for rank in range(2):
        states = torch.load(tag / f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt", weights_only=True)
        assert set(states["module"]) == params and states["frozen_param_shapes"] is None
    stored = sum(f.stat().st_size for f in tag.rglob("*") if f.is_file())
    # fp32 weights + 2 AdamW moments of the trained parameters, partitioned, + small headers and stream state
    assert 3 * trained_bytes < stored < 3 * trained_bytes + 150_000, (stored, trained_bytes)


@pytest.mark.slow
def test_kill_9_then_resume_of_a_lora_run_continues_exactly(corpus, pretrained, lora_run, tmp_path):
    """With lora.dropout > 0: the masks after the resume repeat only if every rank's RNG is restored."""
    _, ref_out, _ = lora_run
    out = tmp_path / "run"
    config = write_yaml(tmp_path / "run.yaml", **lora_config(corpus, pretrained, out))
    kill_after_save(config, out, 4)
    resumes_exactly(config, out, ref_out, 4)


@pytest.mark.slow
def test_a_lora_run_resumes_on_another_world_size(corpus, pretrained, lora_run, tmp_path):
    """The 2-rank run's step-6 checkpoint resumed on 1 rank (DeepSpeed's universal checkpoint of an adapter-only
    checkpoint): the trained parameters come back exactly, the base from model.pretrained, and the run goes on."""
    config, ref_out, _ = lora_run
    tag = ref_out / "checkpoints" / "step00000006"
    saved = get_fp32_state_dict_from_zero_checkpoint(str(tag.parent), tag=tag.name)
    overrides = (f"train.resume={tag}", f"train.out_dir={tmp_path / 'one'}")
    code, output = launch(config, *overrides, "train.max_steps=6", gpus=1,
                          faults={"dump_weights": str(tmp_path / "loaded.safetensors")})
    assert code == 0, output[-3000:]
    assert "saved on 2 ranks, running on 1: universal checkpoint" in output
    weights, base = load_file(str(tmp_path / "loaded.safetensors")), read_port_state_dict(pretrained)
    assert set(saved) < set(weights)
    for name, value in weights.items():
        want = saved[name] if name in saved else base[name.replace(".base_layer.", ".")]
        assert torch.equal(value, want), name
    code, output = launch(config, *overrides, gpus=1)
    assert code == 0, output[-3000:]
    steps = losses(tmp_path / "one")
    assert min(steps) == 7 and all(math.isfinite(v) for v in steps.values()), steps


@pytest.mark.slow
def test_evaluate_on_a_lora_checkpoint_gives_the_runs_own_eval(lora_run, corpus, capsys):
    """launch/evaluate.py rebuilds the base from model.pretrained and adds the checkpoint's adapters and extras."""
    from higgs_ds.train.evaluate import main as evaluate_main

    _, out, output = lora_run
    logged = dict(re.findall(r"(eval/\w+) ([\d.]+)", output.split("eval step 7:")[1].splitlines()[0]))
    assert evaluate_main([str(out), "--split", str(corpus / "val"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    for name in ("text", "audio", "total"):
        assert result[f"loss/{name}"] == pytest.approx(float(logged[f"eval/{name}"]), abs=1e-4)


def unmerged(pretrained, trained: dict) -> HiggsAudioForTraining:
    """The trained LoRA model in one process: pretrained weights, the run's adapters, the trained tensors."""
    model = load_model(pretrained)
    apply_lora(model, LoraSection(**LORA))
    missing, unexpected = model.load_state_dict(trained, strict=False)
    assert not unexpected and all(".lora_" not in n and n not in EXTRAS for n in missing)
    return model.eval()


def merged_exports_give_the_unmerged_logits(out: Path, tag: str, pretrained: Path, export: Path, tokenizer,
                                             tokens) -> tuple[Collator, object]:
    """Both merged layouts of `export` (launch/export.py) against the unmerged model rebuilt from the run's
    checkpoint `tag` in one process; returns the batch and the unmerged logits."""
    state = get_fp32_state_dict_from_zero_checkpoint(str(out / "checkpoints"), tag=tag)
    reference = unmerged(pretrained, {n: v for n, v in state.items() if ".lora_" in n or n in EXTRAS})
    batch = Collator(tokens, reference.model_config.audio)(make_samples(6, tokenizer, tokens, seed=11))
    with torch.no_grad():
        want = reference.logits(**batch.model_inputs())
    base = read_port_state_dict(pretrained)
    for layout in ("port", "boson"):
        merged = load_model(export / layout)
        with torch.no_grad():
            got = merged.logits(**batch.model_inputs())
        torch.testing.assert_close(got.text, want.text, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got.audio, want.audio, rtol=1e-5, atol=1e-5)
        weights = dict(merged.named_parameters())
        for name in ("model.layers.0.audio_mlp.up_proj.weight", "model.layers.1.self_attn.q_proj.weight"):
            assert not torch.equal(weights[name], base[name]), f"{name}: the adapter is merged in"
        assert torch.equal(weights["model.norm.weight"], base["model.norm.weight"])
    return batch, want


@pytest.mark.slow
def test_export_merges_into_both_layouts_and_writes_a_peft_adapter_for_the_port(lora_run, pretrained, tmp_path,
                                                                                 tokenizer, tokens):
    from peft import PeftModel
    from transformers import HiggsAudioV2ForConditionalGeneration

    from higgs_ds.testing.port import port_inputs

    _, out, _ = lora_run
    assert export_main([str(out), "--out", str(tmp_path / "export"), "--layout", "all"]) == 0
    batch, want = merged_exports_give_the_unmerged_logits(out, "step00000007", pretrained, tmp_path / "export",
                                                          tokenizer, tokens)
    # The adapter alone onto transformers' port of the *pretrained* weights, found from the adapter's own config:
    # the run's base is boson-layout (as the release is), so the export converted it beside the adapter
    # (missing keys are errors, not warnings).
    adapter_config = json.loads((tmp_path / "export" / "peft" / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str((tmp_path / "export" / "peft" / "base").resolve())
    port = HiggsAudioV2ForConditionalGeneration.from_pretrained(adapter_config["base_model_name_or_path"],
                                                                use_text_head=True)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=r"(?is).*(missing|unexpected).*key")  # PEFT only warns
        peft_model = PeftModel.from_pretrained(port, str(tmp_path / "export" / "peft")).eval()
    assert adapter_config["r"] == 4 and adapter_config["lora_alpha"] == 3.0
    assert len(adapter_config["target_modules"]) == 20
    inputs = {k: v for k, v in port_inputs(batch, port.config).items() if k not in ("labels", "audio_labels")}
    with torch.no_grad():
        hidden = peft_model.base_model.model.model(**inputs).last_hidden_state
        text_logits = peft_model.base_model.model.text_lm_head(hidden)
        audio_logits = peft_model.base_model.model.audio_lm_head(hidden[batch.audio_out_mask])
    real = batch.attention_mask
    torch.testing.assert_close(text_logits[real], want.text[real], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(audio_logits.view(want.audio.shape), want.audio, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_a_zero2_lora_run_trains_keeps_the_base_resumes_exactly_and_exports(corpus, pretrained, tmp_path, tokenizer,
                                                                            tokens):
    """ZeRO-2 (the 24 GB recipe's stage) with activation checkpointing and dropout: only adapters and extras
    change; kill -9 after step 2 and resume gives the uninterrupted run's losses; the export merges exactly."""
    zero2 = ds_json(tmp_path, zero_optimization={"stage": 2})
    configs = {}
    for name in ("ref", "killed"):
        configs[name] = write_yaml(tmp_path / f"{name}.yaml", **lora_config(
            corpus, pretrained, tmp_path / name, max_steps=4, deepspeed=zero2))
    code, output = launch(configs["ref"], faults={"dump_weights": str(tmp_path / "final.safetensors")})
    assert code == 0, output[-3000:]
    steps = losses(tmp_path / "ref")
    assert steps[4] < steps[1], steps
    base, final = read_port_state_dict(pretrained), load_file(str(tmp_path / "final.safetensors"))
    for name, value in base.items():
        stored = name if name in final else name.replace(".weight", ".base_layer.weight")
        assert torch.equal(final[stored], value) != (name in EXTRAS), name
    assert all(final[n].abs().sum() > 0 for n in final if ".lora_B." in n)

    kill_after_save(configs["killed"], tmp_path / "killed", 2)
    resumes_exactly(configs["killed"], tmp_path / "killed", tmp_path / "ref", 2)

    assert export_main([str(tmp_path / "ref"), "--out", str(tmp_path / "export"), "--layout", "both"]) == 0
    merged_exports_give_the_unmerged_logits(tmp_path / "ref", "step00000004", pretrained, tmp_path / "export",
                                            tokenizer, tokens)


BAD_LORA = {
    "no module": (["lora.targets=[^model\\.nothing$]"], r"no module of the model matches"),
    "rank too wide": (["lora.rank=17"], r"lora rank 17 is larger than model\.layers\.0\.self_attn\.k_proj's width"),
    "preset": (["lora.preset=everything"], r"lora.preset: expected one of"),
    "extras match nothing": (["lora.train_in_full=[^nope$]"], r"lora.train_in_full '\^nope\$': no parameter"),
    "with freeze": (["train.freeze=audio_only"], r"what trains beside the adapters is lora.train_in_full"),
    "random init": (["model.pretrained=null", "model.config={corpus}/model"], r"set model.pretrained"),
    "one target names nothing": (["lora.targets=[^model\\.layers\\.\\d+\\.self_attn\\.q_proj$,^model\\.nothing$]"],
                                 r"lora targets \['\^model\\\\.nothing\$'\]: no module of the model matches"),
    "target trained in full": (["lora.train_in_full=[\\.audio_mlp\\.up_proj\\.weight$]"],
                               r"lora.train_in_full names parameters of LoRA target modules"),
    "alpha zero": (["lora.alpha=0"], r"lora.alpha: must be > 0"),
}


@pytest.mark.parametrize("case", list(BAD_LORA))
def test_bad_lora_settings_fail_before_any_process_group(corpus, pretrained, tmp_path, capsys, case):
    overrides, message = BAD_LORA[case]
    config = write_yaml(tmp_path / "run.yaml", **lora_config(corpus, pretrained, tmp_path / "out"))
    assert train_main(["--config", str(config), *(o.format(corpus=corpus) for o in overrides)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert re.search(message, err[0]), err[0]
    assert not torch.distributed.is_initialized()


def test_the_dry_run_counts_adapters_and_extras_as_trainable_and_the_rest_as_frozen(corpus, pretrained, tmp_path,
                                                                                    capsys, tokenizer):
    from higgs_ds.train.memory import model_states_estimate

    config = write_yaml(tmp_path / "run.yaml", **lora_config(corpus, pretrained, tmp_path / "out"))
    assert train_main(["--config", str(config), "--dry-run", "--world-size", "4"]) == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    model = load_model(pretrained)
    apply_lora(model, LoraSection(**LORA))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    assert (report["model"]["trainable_parameters"], report["model"]["parameters"]) == (trainable, total)
    estimate = report["memory_estimate"]
    want = model_states_estimate(total, trainable, report["model"]["largest_layer_parameters"], 4, stage=3,
                                 precision="fp32")
    assert estimate["device_bytes"] == want["device_bytes"] and estimate["gpus_per_node"] == 4
    full = model_states_estimate(total, total, report["model"]["largest_layer_parameters"], 4, precision="fp32")
    assert estimate["device_bytes"] < full["device_bytes"]
    assert "memory: ZeRO-3 fp32 4 GPU(s)" in captured.err
    assert not torch.distributed.is_initialized()
