"""The ``slimadam`` command line: ``inspect`` a plan, derive ``rules`` from SNR data, ``plot`` SNR."""

from __future__ import annotations

import argparse
import sys
from typing import Any, Optional, Sequence

import torch
import yaml

from .plan import plan_compression
from .presets import PresetError
from .roles import RuleError

TASKS = {
    "causal-lm": "AutoModelForCausalLM",
    "masked-lm": "AutoModelForMaskedLM",
    "image-classification": "AutoModelForImageClassification",
    "sequence-classification": "AutoModelForSequenceClassification",
    "base": "AutoModel",
}


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


def _add_inspect(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "inspect",
        help="show what SlimAdam compresses for a model config and how much memory it saves",
        description="Build the model on the meta device (no weights, no memory) and print its SlimAdam plan.",
    )
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--model-type", help="a transformers model_type, e.g. gpt2, llama, vit, bert")
    source.add_argument("--config", help="a local config.json or model directory")
    p.add_argument("--config-overrides", help="comma-separated key=value config fields, e.g. hidden_size=2048")
    p.add_argument("--task", choices=sorted(TASKS), help="which model head to build (default: first that fits)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="parameter dtype (default: config's)")
    p.add_argument("--preset", default="auto", help="preset name or YAML path (default: auto)")
    p.add_argument("--overrides", help="YAML override or authors' JSON rules file")
    p.add_argument("--all-layers", action="store_true", help="one row per tensor instead of collapsing layers")
    p.add_argument("--width", type=int, default=150, help="table width in characters")
    p.add_argument("--json", help="also write the per-parameter plan as JSON to this path")
    p.set_defaults(func=run_inspect)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="slimadam", description="SlimAdam for Hugging Face models")
    subparsers = parser.add_subparsers(dest="command", required=True)
    _add_inspect(subparsers)
    from .cli_snr import add_subcommands

    add_subcommands(subparsers)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (PresetError, RuleError, ValueError) as err:
        print(f"slimadam {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
