"""Overrides (YAML and the authors' JSON rules) and the errors users see for bad input."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from conftest import REPO_ROOT
from slimadam_hf import PresetError, RuleError, available_presets, plan_compression
from slimadam_hf.core.compress_spec import CompressSpecError
from tiny_models import tiny_model


class NanoGPT(nn.Module):
    """The authors' nanoGPT naming (separate q/k/v, tied embeddings, no biases), tiny widths."""

    def __init__(self, n_layer: int = 12, d: int = 8, vocab: int = 32, block: int = 16) -> None:
        super().__init__()
        layers = []
        for _ in range(n_layer):
            attn = nn.Module()
            for proj in ("q_proj", "k_proj", "v_proj", "output_proj"):
                setattr(attn, proj, nn.Linear(d, d, bias=False))
            mlp = nn.Module()
            mlp.mlp_up, mlp.mlp_proj = nn.Linear(d, 4 * d, bias=False), nn.Linear(4 * d, d, bias=False)
            block_ = nn.Module()
            block_.ln_1, block_.attn, block_.ln_2, block_.mlp = nn.LayerNorm(d, bias=False), attn, nn.LayerNorm(d, bias=False), mlp
            layers.append(block_)
        self.transformer = nn.ModuleDict(
            dict(wte=nn.Embedding(vocab, d), wpe=nn.Embedding(block, d), h=nn.ModuleList(layers), ln_f=nn.LayerNorm(d, bias=False))
        )
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.lm_head.weight = self.transformer.wte.weight


def test_authors_json_rules_apply_exactly():
    rules_file = REPO_ROOT / "tests" / "data" / "paper_data" / "slimadam_C1.0_rules.json"
    rules = json.loads(rules_file.read_text())
    plan = plan_compression(NanoGPT(), preset="generic", overrides=rules_file)
    assert {e.name for e in plan.entries} == set(rules)
    for entry in plan.entries:
        expected = rules[entry.name]
        assert entry.dims == (None if expected is None else tuple(expected)), entry.name
        assert entry.decided_by == "params"
    # the tied lm_head alias is covered by the wte rule
    assert plan["lm_head.weight"].dims == (1,)


def test_yaml_override_changes_a_role_rule_and_adds_a_pattern(tmp_path):
    override = tmp_path / "override.yaml"
    override.write_text(
        "rules:\n  mlp_up: fan_in\nroles:\n  - {pattern: 'layers\\.0\\.self_attn\\.o_proj\\.weight', role: other}\n"
    )
    plan = plan_compression(tiny_model("llama"), overrides=override)
    assert plan["model.layers.1.mlp.up_proj.weight"].dims == (1,)
    assert plan["model.layers.0.self_attn.o_proj.weight"].dims is None
    assert plan["model.layers.1.self_attn.o_proj.weight"].dims == (0,)


def test_explicit_params_in_yaml_and_explicit_dims_rule():
    plan = plan_compression(
        tiny_model("llama"),
        overrides={"params": {"lm_head.weight": None}, "rules": {"value": "both", "key": [0]}},
    )
    assert plan["lm_head.weight"].dims is None
    assert plan["model.layers.0.self_attn.v_proj.weight"].dims == (0, 1)
    assert plan["model.layers.0.self_attn.k_proj.weight"].dims == (0,)


def test_explicit_params_for_one_part_of_a_split_weight():
    name = "transformer.h.1.attn.c_attn.weight"
    plan = plan_compression(tiny_model("gpt2"), overrides={"params": {f"{name}[value]": None, f"{name}[key]": [0, 1]}})
    parts = {p.role: p.dims for p in plan[name].parts}
    assert parts == {"query": (0,), "key": (0, 1), "value": None}
    assert plan["transformer.h.0.attn.c_attn.weight"].parts[2].dims == (1,)
    with pytest.raises(PresetError, match=r"c_attn\.weight\[valu\]'.*did you mean.*c_attn\.weight\[value\]'"):
        plan_compression(tiny_model("gpt2"), overrides={"params": {f"{name}[valu]": None}})


def test_unmatched_matrix_keeps_full_second_moment_and_is_listed():
    model = tiny_model("llama")
    model.extra_proj = nn.Linear(16, 16)
    plan = plan_compression(model)
    assert plan["extra_proj.weight"].dims is None
    assert len(plan.warnings) == 1 and "extra_proj.weight" in plan.warnings[0]
    assert "warning: extra_proj.weight" in str(plan)


@pytest.mark.parametrize(
    "overrides,error,match",
    [
        ({"params": {"model.layers.0.self_attn.q_prj.weight": [1]}}, PresetError,
         r"parameter 'model\.layers\.0\.self_attn\.q_prj\.weight'.*does not have; did you mean 'model\.layers\.0\.self_attn\.q_proj\.weight'"),
        ({"params": {"lm_head.weight": [2]}}, CompressSpecError, r"'lm_head\.weight'.*\[2\].*out of range.*\[64, 16\]"),
        ({"params": {"model.norm.weight": [0]}}, RuleError, r"'model\.norm\.weight' is 1-D.*set it to null"),
        ({"rules": {"querry": "fan_in"}}, RuleError, r"unknown role 'querry'; valid roles are token_embedding"),
        ({"rules": {"query": "fan_up"}}, RuleError, r"rules\['query'\].*unknown rule 'fan_up'.*fan_in, fan_out, both, none"),
        ({"rules": {"norm": "fan_in"}}, RuleError, r"role 'norm' is never compressed"),
        ({"roles": [{"pattern": "no_such_layer\\.weight", "role": "query"}]}, PresetError,
         r"pattern 'no_such_layer\\\\.weight'.*matches no trainable parameter"),
        ({"roles": [{"pattern": "q_proj\\.weight", "split": [{"role": "query", "size": 10}, {"role": "key", "size": 10}]}]},
         CompressSpecError, r"'model\.layers\.0\.self_attn\.q_proj\.weight': split sizes \[10, 10\] add up to 20.*has 16"),
        ({"roles": [{"pattern": "q_proj\\.weight", "role": "query", "colour": "red"}]}, PresetError, r"unknown keys \['colour'\]"),
    ],
)
def test_bad_overrides_raise_clear_errors(overrides, error, match):
    with pytest.raises(error, match=match):
        plan_compression(tiny_model("llama"), overrides=overrides)


def test_unknown_preset_lists_the_available_ones():
    with pytest.raises(PresetError, match=r"unknown preset 'lama'; available presets: bert, generic, gpt2, llama, vit"):
        plan_compression(tiny_model("llama"), preset="lama")
    assert available_presets() == ["bert", "generic", "gpt2", "llama", "vit"]


def test_unknown_model_type_explains_generic_and_yaml():
    model = NanoGPT(n_layer=1)
    with pytest.raises(PresetError, match=r"no preset knows model_type None.*preset='generic'.*YAML"):
        plan_compression(model)


def test_a_preset_that_does_not_fit_the_model_is_refused():
    with pytest.raises(PresetError, match=r"preset 'gpt2' \(for model types \['gpt2'\]\) matched only 1 of the 16 trainable matrices of LlamaForCausalLM \(model_type 'llama'\)"):
        plan_compression(tiny_model("llama"), preset="gpt2")


def test_missing_override_file():
    with pytest.raises(PresetError, match="does not exist"):
        plan_compression(tiny_model("llama"), overrides="nope.yaml")


def test_yaml_preset_file_can_be_the_preset(tmp_path):
    preset = tmp_path / "mine.yaml"
    preset.write_text("name: mine\nroles:\n  - {pattern: 'q_proj\\.weight', role: query}\n")
    plan = plan_compression(tiny_model("llama"), preset=str(preset))
    assert plan.preset == "mine"
    assert plan["model.layers.0.self_attn.q_proj.weight"].dims == (1,)
    assert any("k_proj" in w for w in plan.warnings)
