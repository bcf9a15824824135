"""The ``slimadam`` command line: ``inspect`` a plan, derive ``rules`` from SNR data, ``plot`` SNR.

Only ``argparse`` is imported up front, so ``slimadam --help`` answers at once; each subcommand imports
torch and transformers when it runs.
"""

from __future__ import annotations

import sys
from typing import Optional, Sequence

from .parser import build_parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``slimadam`` console script; returns the exit code (2 on bad input)."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, OSError) as err:  # PresetError, RuleError, ... are ValueErrors
        print(f"slimadam {args.command}: error: {err}", file=sys.stderr)
        return 2


__all__ = ["build_parser", "main"]
