"""The ``slimadam`` argument parser (argparse only: building it imports neither torch nor transformers)."""

from __future__ import annotations

import argparse
from typing import Any

from .snr import add_subcommands as add_snr_subcommands
from .tasks import TASKS



def parse_config_overrides(text: str) -> dict[str, Any]:
    """``"hidden_size=2048,num_hidden_layers=16"`` -> ``{"hidden_size": 2048, ...}`` (YAML scalars)."""
    import yaml

    result: dict[str, Any] = {}
    for item in filter(None, text.split(",")):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise argparse.ArgumentTypeError(f"expected key=value pairs separated by ',', got {item!r}")
        result[key.strip()] = yaml.safe_load(value)
    return result


def _run_inspect(args: argparse.Namespace) -> int:
    from .inspect import run_inspect

    return run_inspect(args)


def _add_inspect(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "inspect",
        help="show what SlimAdam compresses for a model config and how much memory it saves",
        description="Build the model on the meta device (no weights, no memory) and print its SlimAdam plan.",
    )
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--model-type", help="a transformers model_type, e.g. gpt2, llama, vit, bert")
    source.add_argument("--config", help="a local config.json or model directory")
    p.add_argument("--config-overrides", type=parse_config_overrides, metavar="KEY=VALUE,...",
                   help="config fields to change, e.g. hidden_size=2048,num_hidden_layers=16 (checked against the config class)")
    p.add_argument("--task", choices=sorted(TASKS), help="which model head to build (default: first that fits)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="parameter dtype (default: config's)")
    p.add_argument("--preset", default="auto", help="preset name or YAML path (default: auto)")
    p.add_argument("--overrides", help="YAML override or authors' JSON rules file")
    p.add_argument("--momentum-dtype", choices=["float32", "bfloat16", "int8"],
                   help="storage of the first moment, for the memory totals (default: the parameters' dtype)")
    p.add_argument("--robust", action=argparse.BooleanOptionalAction, default=None,
                   help="count (or not) the factored second moment of robust=True in the memory totals "
                        "(default: the preset's choice, on for bert)")
    p.add_argument("--all-layers", action="store_true", help="one row per tensor instead of collapsing layers")
    p.add_argument("--width", type=int, default=None, help="table width in characters (default: the terminal's)")
    p.add_argument("--json", help="also write the per-parameter plan as JSON to this path")
    p.set_defaults(func=_run_inspect)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="slimadam", description="SlimAdam for Hugging Face models")
    subparsers = parser.add_subparsers(dest="command", required=True)
    _add_inspect(subparsers)
    add_snr_subcommands(subparsers)
    return parser
