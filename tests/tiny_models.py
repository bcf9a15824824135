"""Tiny random-init Hugging Face models for tests, built from configs (no hub access), without dropout."""

from __future__ import annotations

from typing import Any

import torch
import transformers
from transformers import AutoConfig

_DECODER = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4, vocab_size=64)
_NO_DROPOUT = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)

# model_type -> (auto class, config kwargs)
TINY_CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {
    "gpt2": (
        "AutoModelForCausalLM",
        dict(n_embd=16, n_layer=2, n_head=4, vocab_size=64, n_positions=32, resid_pdrop=0.0, embd_pdrop=0.0,
             attn_pdrop=0.0),
    ),
    "llama": ("AutoModelForCausalLM", dict(_DECODER, num_key_value_heads=2)),
    "mistral": ("AutoModelForCausalLM", dict(_DECODER, num_key_value_heads=2)),
    "qwen2": ("AutoModelForCausalLM", dict(_DECODER, num_key_value_heads=2)),
    "qwen3": ("AutoModelForCausalLM", dict(_DECODER, num_key_value_heads=2, head_dim=4)),
    "gemma": ("AutoModelForCausalLM", dict(_DECODER, num_key_value_heads=2, head_dim=4)),
    "gemma2": ("AutoModelForCausalLM", dict(_DECODER, num_key_value_heads=2, head_dim=4)),
    "gemma3_text": ("AutoModelForCausalLM", dict(_DECODER, num_key_value_heads=2, head_dim=4)),
    "phi3": ("AutoModelForCausalLM", dict(_DECODER, num_key_value_heads=2, pad_token_id=0)),
    "mixtral": ("AutoModelForCausalLM", dict(_DECODER, num_key_value_heads=2, num_local_experts=2, num_experts_per_tok=1)),
    "qwen2_moe": (
        "AutoModelForCausalLM",
        dict(_DECODER, num_key_value_heads=2, num_experts=2, num_experts_per_tok=1, moe_intermediate_size=8,
             shared_expert_intermediate_size=8),
    ),
    "qwen3_moe": (
        "AutoModelForCausalLM",
        dict(_DECODER, num_key_value_heads=2, head_dim=4, num_experts=2, num_experts_per_tok=1, moe_intermediate_size=8),
    ),
    "vit": ("AutoModelForImageClassification", dict(_DECODER, **_NO_DROPOUT, image_size=8, patch_size=4, num_labels=3)),
    "bert": ("AutoModelForMaskedLM", dict(_DECODER, **_NO_DROPOUT)),
    "roberta": ("AutoModelForSequenceClassification", dict(_DECODER, **_NO_DROPOUT, num_labels=2)),
    "xlm-roberta": ("AutoModelForMaskedLM", dict(_DECODER, **_NO_DROPOUT)),
}


def tiny_config(model_type: str, **overrides: Any):
    _, kwargs = TINY_CONFIGS[model_type]
    return AutoConfig.for_model(model_type, **{**kwargs, **overrides})


def tiny_model(model_type: str, dtype: torch.dtype = torch.float32, **overrides: Any) -> torch.nn.Module:
    auto_class, _ = TINY_CONFIGS[model_type]
    torch.manual_seed(0)
    model = getattr(transformers, auto_class).from_config(tiny_config(model_type, **overrides))
    return model.to(dtype)
