"""PEFT LoRA/DoRA models with --optim slimadam: frozen bases skipped, adapters 'adapter', copies keep roles."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import Trainer

import slimadam_hf
from slimadam_hf.rules.presets import canonical_name

sys.path.insert(0, str(Path(__file__).parent / "scripts"))
from tiny_assets import RandomTokens, params_of, tiny_gpt2, tiny_llama, training_args  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _registered():
    slimadam_hf.register()


def _gpt2_lora(use_dora: bool):
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True,
                        use_dora=use_dora, modules_to_save=["c_fc"])
    return get_peft_model(tiny_gpt2(), config)


def _llama_lora(use_dora: bool):
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], use_dora=use_dora,
                        modules_to_save=["lm_head"])
    return get_peft_model(tiny_llama(), config)


def test_canonical_names_of_peft_wrappers():
    assert canonical_name("base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight") == \
        "model.layers.0.self_attn.q_proj.weight"
    assert canonical_name("base_model.model.score.modules_to_save.default.weight") == "score.weight"
    assert canonical_name("base_model.model.score.modules_to_save.my_adapter.bias") == "score.bias"
    assert canonical_name("base_model.model.score.original_module.weight") == "score.weight"
    assert canonical_name("base_model.model.h.0.attn.c_attn.lora_A.default.weight") == \
        "h.0.attn.c_attn.lora_A.default.weight"


@pytest.mark.parametrize("use_dora", [False, True])
def test_gpt2_fan_in_fan_out_plan(use_dora):
    model = _gpt2_lora(use_dora)
    plan = slimadam_hf.plan_compression(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {e.name for e in plan.entries} == trainable  # frozen base weights are not planned
    assert not plan.warnings
    for entry in plan.entries:
        if ".lora_" in entry.name:
            assert entry.role == "adapter" and entry.rule == "none" and entry.dims is None, entry
        elif entry.name.endswith("c_fc.modules_to_save.default.weight"):
            # the trainable copy of a Conv1D (in, out) mlp_up: fan_out is dim 1
            assert (entry.role, entry.rule, entry.dims, entry.owner) == ("mlp_up", "fan_out", (1,), "Conv1D")
    assert any("lora_magnitude_vector" in e.name for e in plan.entries) == use_dora


def test_llama_plan_and_adapter_rule_override(tmp_path):
    model = _llama_lora(use_dora=True)
    plan = slimadam_hf.plan_compression(model)
    assert plan["base_model.model.lm_head.modules_to_save.default.weight"].dims == (1,)  # lm_head: fan_in
    override = tmp_path / "adapters.yaml"
    override.write_text("rules: {adapter: fan_in}\n")
    plan = slimadam_hf.plan_compression(model, overrides=override)
    lora_a = plan["base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight"]
    assert (lora_a.role, lora_a.dims) == ("adapter", (1,))  # nn.Linear (r, in): fan_in is dim 1
    magnitude = plan["base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector.default.weight"]
    assert (magnitude.role, magnitude.rule, magnitude.dims) == ("adapter", "none", None)  # 1-D


@pytest.mark.parametrize("family,use_dora", [("gpt2", False), ("llama", True)])
def test_trainer_trains_adapters_only(tmp_path, family, use_dora):
    model = _gpt2_lora(use_dora) if family == "gpt2" else _llama_lora(use_dora)
    before = params_of(model)
    trainer = Trainer(model=model, args=training_args(tmp_path, max_steps=3), train_dataset=RandomTokens())
    trainer.train()
    after = params_of(model)
    optimizer = trainer.optimizer.optimizer
    planned = {n: p for g in optimizer.param_groups for n, p in zip(g["param_names"], g["params"])}
    for name, param in model.named_parameters():
        if param.requires_grad:
            assert name in planned and not torch.equal(before[name], after[name]), name
        else:
            assert name not in planned and torch.equal(before[name], after[name]), name
    copy = next(n for n in planned if ".modules_to_save." in n and n.endswith("weight"))
    entry = optimizer.plan[copy]
    assert entry.dims is not None
    v = optimizer.state[planned[copy]]["exp_avg_sq"]
    assert all(v.shape[d] == 1 for d in entry.dims)
    summary = trainer.state.log_history[0]
    assert 0 < summary["slimadam/second_moment_savings"] < 1
