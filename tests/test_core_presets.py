"""Every preset on a tiny model of every model_type it claims: role and dims of every parameter.

The expectations below are written out by hand from Table 1 and each owner's weight layout
(Linear (out, in), Conv1D (in, out), Embedding (num, dim), Conv2d (out, in, kh, kw)); they do not
read the YAML presets.
"""

from __future__ import annotations

import re

import pytest
import torch

from slimadam_hf import load_preset, plan_compression
from tiny_models import TINY_CONFIGS, tiny_config, tiny_model

NORM = ("norm", None)
BIAS = ("bias", None)

LLAMA_FAMILY = [
    (r"model\.embed_tokens\.weight", ("token_embedding", (1,))),
    (r".*self_attn\.q_proj\.weight", ("query", (1,))),
    (r".*self_attn\.k_proj\.weight", ("key", (1,))),
    (r".*self_attn\.v_proj\.weight", ("value", (0,))),
    (r".*self_attn\.o_proj\.weight", ("attention_output", (0,))),
    (r".*self_attn\.qkv_proj\.weight", [("query", "q", (1,)), ("key", "kv", (1,)), ("value", "kv", (0,))]),
    (r".*mlp\.(shared_expert\.)?gate_proj\.weight", ("mlp_gate", (0,))),
    (r".*mlp\.(shared_expert\.)?up_proj\.weight", ("mlp_up", (0,))),
    (r".*mlp\.(shared_expert\.)?down_proj\.weight", ("mlp_down", (0,))),
    (r".*mlp\.gate_up_proj\.weight", [("mlp_gate", "ffn", (0,)), ("mlp_up", "ffn", (0,))]),
    (r".*mlp\.experts\.gate_up_proj", [("mlp_gate", "moe", (1,)), ("mlp_up", "moe", (1,))]),
    (r".*mlp\.experts\.down_proj", ("mlp_down", (1,))),
    (r".*mlp\.gate\.weight", ("router", None)),
    (r".*mlp\.shared_expert_gate\.weight", ("router", None)),
    (r"lm_head\.weight", ("lm_head", (1,))),
    (r".*norm\.weight", NORM),
    (r".*\.bias", BIAS),
]

EXPECTED = {
    "gpt2": [
        (r"transformer\.wte\.weight", ("token_embedding", (1,))),
        (r"transformer\.wpe\.weight", ("position_embedding", (1,))),
        (r".*attn\.c_attn\.weight", [("query", "d", (0,)), ("key", "d", (0,)), ("value", "d", (1,))]),
        (r".*attn\.c_proj\.weight", ("attention_output", (1,))),
        (r".*mlp\.c_fc\.weight", ("mlp_up", (1,))),
        (r".*mlp\.c_proj\.weight", ("mlp_down", (1,))),
        (r".*ln_(1|2|f)\.(weight|bias)", NORM),
        (r".*\.bias", BIAS),
    ],
    "vit": [
        (r"vit\.embeddings\.cls_token", ("token_embedding", None)),
        (r"vit\.embeddings\.position_embeddings", ("position_embedding", None)),
        (r".*patch_embeddings\.projection\.weight", ("patch_embedding", (1, 2, 3))),
        (r".*attention\.q_proj\.weight", ("query", (1,))),
        (r".*attention\.k_proj\.weight", ("key", None)),
        (r".*attention\.v_proj\.weight", ("value", (0,))),
        (r".*attention\.o_proj\.weight", ("attention_output", (0,))),
        (r".*mlp\.fc1\.weight", ("mlp_up", (0,))),
        (r".*mlp\.fc2\.weight", ("mlp_down", (0,))),
        (r"classifier\.weight", ("classifier", (1,))),
        (r".*layernorm.*", NORM),
        (r".*\.bias", BIAS),
    ],
    "bert": [
        (r".*embeddings\.(word|token_type)_embeddings\.weight", ("token_embedding", (1,))),
        (r".*embeddings\.position_embeddings\.weight", ("position_embedding", (1,))),
        (r".*attention\.self\.query\.weight", ("query", (1,))),
        (r".*attention\.self\.key\.weight", ("key", (1,))),
        (r".*attention\.self\.value\.weight", ("value", (0,))),
        (r".*attention\.output\.dense\.weight", ("attention_output", (0,))),
        (r".*intermediate\.dense\.weight", ("mlp_up", (0,))),
        (r".*layer\.\d+\.output\.dense\.weight", ("mlp_down", (0,))),
        (r"(cls\.predictions|lm_head)\.decoder\.weight", ("lm_head", (1,))),
        (r"(cls\.predictions\.transform|lm_head)\.dense\.weight", ("classifier", (1,))),
        (r"classifier\.(dense|out_proj)\.weight", ("classifier", (1,))),
        (r".*LayerNorm\.(weight|bias)", NORM),
        (r".*layer_norm\.(weight|bias)", NORM),
        (r".*bias", BIAS),
    ],
}
for model_type in TINY_CONFIGS:
    if model_type not in EXPECTED:
        family = "bert" if "bert" in model_type else "llama"
        EXPECTED[model_type] = EXPECTED["bert"] if family == "bert" else LLAMA_FAMILY


def _sizes(config) -> dict[str, int]:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return {
        "d": config.hidden_size,
        "q": config.num_attention_heads * head_dim,
        "kv": (getattr(config, "num_key_value_heads", None) or config.num_attention_heads) * head_dim,
        "ffn": getattr(config, "intermediate_size", 0),
        "moe": getattr(config, "moe_intermediate_size", None) or getattr(config, "intermediate_size", 0),
    }


def test_every_preset_model_type_is_covered():
    claimed = {mt for name in ("gpt2", "llama", "vit", "bert") for mt in load_preset(name).model_types}
    assert claimed == set(TINY_CONFIGS)


@pytest.mark.parametrize("model_type", sorted(TINY_CONFIGS))
def test_preset_assigns_role_and_dims_to_every_parameter(model_type):
    model = tiny_model(model_type)
    plan = plan_compression(model)  # preset="auto"
    assert plan.warnings == []
    sizes = _sizes(tiny_config(model_type))
    table = EXPECTED[model_type]
    assert {e.name for e in plan.entries} == {n for n, p in model.named_parameters() if p.requires_grad}
    for entry in plan.entries:
        expected = next((exp for pattern, exp in table if re.fullmatch(pattern, entry.name)), "missing")
        assert expected != "missing", f"{model_type}: no expectation for {entry.name}"
        if isinstance(expected, list):
            got = [(p.role, p.size, p.dims) for p in entry.parts]
            assert got == [(role, sizes[size], dims) for role, size, dims in expected], entry.name
            assert entry.spec["sizes"] == [sizes[size] for _, size, _ in expected]
        else:
            role, dims = expected
            assert (entry.role, entry.dims) == (role, dims), entry.name


def test_tied_embedding_is_planned_once_with_its_alias():
    model = tiny_model("gpt2")
    plan = plan_compression(model)
    wte = plan["transformer.wte.weight"]
    assert wte.aliases == ("lm_head.weight",)
    assert plan["lm_head.weight"] is wte
    assert sum(1 for e in plan.entries if e.name == "transformer.wte.weight") == 1


def test_frozen_parameters_are_skipped():
    model = tiny_model("llama")
    model.model.embed_tokens.weight.requires_grad_(False)
    names = {e.name for e in plan_compression(model).entries}
    assert "model.embed_tokens.weight" not in names and "lm_head.weight" in names


def test_wrapper_prefixes_are_stripped_before_matching():
    model = tiny_model("llama")
    wrapped = torch.nn.Module()
    wrapped.module = torch.nn.Module()
    wrapped.module._orig_mod = model
    wrapped.config = model.config
    plan = plan_compression(wrapped)
    entry = plan["module._orig_mod.model.layers.0.self_attn.q_proj.weight"]
    assert (entry.role, entry.dims) == ("query", (1,))
    assert plan.warnings == []


def test_meta_device_model_is_planned_without_memory():
    config = tiny_config("llama", hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, vocab_size=128256)
    with torch.device("meta"):
        model = __import__("transformers").AutoModelForCausalLM.from_config(config)
    plan = plan_compression(model)
    assert plan.num_parameters > 1_000_000_000
    assert plan.second_moment_savings > 0.99
    # fp32 params: AdamW state 8 B/param, SlimAdamW ~4 B/param.
    assert 0.50 <= plan.state_bytes_ratio < 0.51


def test_mixed_precision_state_bytes_keep_float32_second_moment():
    plan = plan_compression(tiny_model("llama", dtype=torch.bfloat16))
    assert plan.adamw_state_bytes == sum(2 * 2 * e.numel for e in plan.entries)
    assert plan.slimadam_state_bytes == sum(2 * e.numel + 4 * e.second_moment_numel for e in plan.entries)


def test_gpt2_cross_attention_is_compressed_per_part():
    """GPT-2 with cross-attention: q_attn is the query, the cross c_attn is K|V, nothing is left unmatched."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=64, n_positions=32, add_cross_attention=True)
    plan = plan_compression(GPT2LMHeadModel(config))
    assert plan.warnings == []
    q = plan["transformer.h.0.crossattention.q_attn.weight"]
    assert (q.role, q.dims) == ("query", (0,))  # Conv1D (in, out): fan_in is dim 0
    kv = plan["transformer.h.0.crossattention.c_attn.weight"]
    assert [(p.role, p.size, p.dims) for p in kv.parts] == [("key", 16, (0,)), ("value", 16, (1,))]
    out = plan["transformer.h.0.crossattention.c_proj.weight"]
    assert (out.role, out.dims) == ("attention_output", (1,))
