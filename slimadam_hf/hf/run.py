"""Run an unmodified Hugging Face training script with ``--optim slimadam`` available.

Usage::

    python -m slimadam_hf.run SCRIPT.py [SCRIPT ARGS...]
    python -m slimadam_hf.run -m package.module [ARGS...]
    slimadam-run SCRIPT.py [SCRIPT ARGS...]
    accelerate launch [LAUNCH ARGS] -m slimadam_hf.run SCRIPT.py [SCRIPT ARGS...]

It calls :func:`slimadam_hf.register` and then runs the script as ``__main__`` (like ``python
SCRIPT.py``), so ``--optim slimadam --optim_args "preset=llama"`` work in any script that builds its
``TrainingArguments`` with ``HfArgumentParser`` or from a JSON/YAML file.
"""

from __future__ import annotations

import os
import runpy
import sys
from typing import Any, Optional, Sequence

USAGE = (
    "usage: python -m slimadam_hf.run SCRIPT.py [ARGS...]\n"
    "       python -m slimadam_hf.run -m MODULE [ARGS...]\n"
    "Registers --optim slimadam with transformers, then runs SCRIPT.py (or MODULE) as __main__ with ARGS.\n"
    "--optim_args of --optim slimadam are checked first; SCRIPT.py --help lists them."
)


DEBUG_ENV = "SLIMADAM_DEBUG"
"""Set ``SLIMADAM_DEBUG=1`` to get the traceback of an ``--optim_args`` mistake instead of one line."""


def _flag(args: Sequence[str], name: str) -> Optional[str]:
    """The value of ``--name VALUE`` or ``--name=VALUE`` in ``args`` (the last one wins, as in argparse)."""
    value = None
    for i, arg in enumerate(args):
        if arg == name and i + 1 < len(args):
            value = args[i + 1]
        elif arg.startswith(name + "="):
            value = arg[len(name) + 1 :]
    return value


def _training_options(script_args: Sequence[str]) -> tuple[Optional[str], Any]:
    """``(optim, optim_args)`` as the script will read them: from its flags, or from the one JSON/YAML
    config file HF scripts accept in their place."""
    if len(script_args) == 1 and script_args[0].endswith((".json", ".yaml", ".yml")) and os.path.isfile(script_args[0]):
        import yaml  # a JSON file is YAML too

        with open(script_args[0]) as fh:
            config = yaml.safe_load(fh) or {}
        return config.get("optim"), config.get("optim_args")
    return _flag(script_args, "--optim"), _flag(script_args, "--optim_args")


def check_optim_args(script_args: Sequence[str]) -> None:
    """Refuse bad ``--optim_args`` for ``--optim slimadam`` before the script runs: one line, exit code 2."""
    from .optim_args import OptimArgsError, parse_optim_args
    from .register import OPTIM_NAME

    optim, optim_args = _training_options(script_args)
    if optim != OPTIM_NAME:
        return
    try:
        parse_optim_args(optim_args)
    except OptimArgsError as err:
        if os.environ.get(DEBUG_ENV):
            raise
        print(f"slimadam-run: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Entry point of ``python -m slimadam_hf.run`` and the ``slimadam-run`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        raise SystemExit(0 if argv else 2)

    from ..distributed.ranks import shut_down_process_groups
    from .register import register

    check_optim_args(argv[2:] if argv[0] == "-m" else argv[1:])
    register()
    if argv[0] == "-m":
        if len(argv) < 2:
            print(USAGE, file=sys.stderr)
            raise SystemExit(2)
        module = argv[1]
        sys.argv = [module, *argv[2:]]
        try:
            runpy.run_module(module, run_name="__main__", alter_sys=True)
        finally:
            shut_down_process_groups()
        return

    script = argv[0]
    if not os.path.isfile(script):
        print(f"slimadam_hf.run: script {script!r} not found\n{USAGE}", file=sys.stderr)
        raise SystemExit(2)
    sys.argv = [script, *argv[1:]]
    # As `python SCRIPT.py` does: the script's folder comes first on sys.path.
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    try:
        runpy.run_path(script, run_name="__main__")
    finally:
        shut_down_process_groups()


if __name__ == "__main__":
    main()
