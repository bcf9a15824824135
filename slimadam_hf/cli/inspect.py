"""``slimadam inspect``: build a model on the meta device and print its SlimAdam plan."""

from __future__ import annotations

import argparse
from typing import Any, Optional

import torch
import yaml

from ..rules.planner import plan_compression
from .tasks import TASKS



def parse_config_overrides(text: Optional[str]) -> dict[str, Any]:
    """``"hidden_size=2048,num_hidden_layers=16"`` -> ``{"hidden_size": 2048, ...}`` (YAML scalars)."""
    result: dict[str, Any] = {}
    for item in filter(None, (text or "").split(",")):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise SystemExit(f"--config-overrides: expected key=value pairs separated by ',', got {item!r}")
        result[key.strip()] = yaml.safe_load(value)
    return result


def _load_config(args: argparse.Namespace):
    from transformers import AutoConfig

    overrides = parse_config_overrides(args.config_overrides)
    if args.config:
        return AutoConfig.from_pretrained(args.config, local_files_only=True, **overrides)
    return AutoConfig.for_model(args.model_type, **overrides)


def build_meta_model(config: Any, task: Optional[str] = None) -> torch.nn.Module:
    """The model for ``config`` on the meta device (shapes only, no memory)."""
    import transformers

    candidates = [TASKS[task]] if task else list(TASKS.values())
    for auto_name in candidates:
        auto_class = getattr(transformers, auto_name)
        if type(config) in auto_class._model_mapping:
            with torch.device("meta"):
                return auto_class.from_config(config)
    raise SystemExit(
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
    print(plan.render(width=args.width, collapse_layers=not args.all_layers), end="")
    if args.json:
        print(f"plan written to {plan.save_json(args.json)}")
    return 0
