"""``slimadam inspect``: build a model on the meta device and print its SlimAdam plan."""

from __future__ import annotations

import argparse
import difflib
from typing import Any, Optional

import torch

from ..core.options import SlimAdamConfig
from ..rules.planner import plan_compression
from .tasks import TASKS


def _check_overrides(config: Any, overrides: dict[str, Any]) -> None:
    """Each key must be a field of the config class, and each value of its type (as the default's)."""
    known = set(config.to_dict()) | set(getattr(config, "attribute_map", {}))
    for key, value in overrides.items():
        if key not in known and not hasattr(config, key):
            close = difflib.get_close_matches(key, sorted(known), n=3)
            hint = f"did you mean {', '.join(map(repr, close))}?" if close else f"valid keys include {', '.join(sorted(known)[:8])}, ..."
            raise ValueError(f"--config-overrides: {type(config).__name__} has no field {key!r}; {hint}")
        default = getattr(config, key, None)
        if isinstance(default, bool) or default is None:
            continue
        if isinstance(default, int) and not (isinstance(value, int) and not isinstance(value, bool)):
            raise ValueError(f"--config-overrides: {key}={value!r}: {type(config).__name__}.{key} is an int (default {default})")
        if isinstance(default, float) and not isinstance(value, (int, float)):
            raise ValueError(f"--config-overrides: {key}={value!r}: {type(config).__name__}.{key} is a float (default {default})")


def _load_config(args: argparse.Namespace) -> Any:
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    overrides = args.config_overrides or {}
    if args.config:
        base = AutoConfig.from_pretrained(args.config, local_files_only=True)
    else:
        if args.model_type not in CONFIG_MAPPING:
            close = difflib.get_close_matches(args.model_type, list(CONFIG_MAPPING.keys()), n=4)
            raise ValueError(
                f"unknown --model-type {args.model_type!r}"
                + (f"; did you mean {', '.join(map(repr, close))}?" if close else "")
                + " (a transformers model_type such as gpt2, llama, mistral, qwen2, vit, bert)"
            )
        base = AutoConfig.for_model(args.model_type)
    _check_overrides(base, overrides)
    try:
        if args.config:
            return AutoConfig.from_pretrained(args.config, local_files_only=True, **overrides)
        return AutoConfig.for_model(args.model_type, **overrides)
    except Exception as err:  # noqa: BLE001 - the config's own validation, said in one line
        message = " ".join(str(err).split())
        raise ValueError(f"--config-overrides: {type(base).__name__} rejects them: {message}") from None


def build_meta_model(config: Any, task: Optional[str] = None) -> torch.nn.Module:
    """The model for ``config`` on the meta device (shapes only, no memory)."""
    import transformers

    candidates = [TASKS[task]] if task else list(TASKS.values())
    for auto_name in candidates:
        auto_class = getattr(transformers, auto_name)
        if type(config) in auto_class._model_mapping:
            with torch.device("meta"):
                return auto_class.from_config(config)
    raise ValueError(
        f"no {' or '.join(candidates)} class knows {type(config).__name__}; choose --task from {', '.join(TASKS)}"
    )


def run_inspect(args: argparse.Namespace) -> int:
    config = _load_config(args)
    model = build_meta_model(config, args.task)
    dtype = getattr(torch, args.dtype) if args.dtype else getattr(config, "dtype", None) or torch.float32
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    model.to(dtype)
    plan = plan_compression(model, args.preset, args.overrides)
    options = SlimAdamConfig(momentum_dtype=args.momentum_dtype, robust=args.robust).with_preset_options(
        plan.preset_options
    )
    plan = plan.with_options(options.momentum_dtype, options.robust)
    print(plan.render(width=args.width, collapse_layers=not args.all_layers), end="")
    if args.json:
        print(f"plan written to {plan.save_json(args.json)}")
    return 0
