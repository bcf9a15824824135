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
from typing import Optional, Sequence

USAGE = (
    "usage: python -m slimadam_hf.run SCRIPT.py [ARGS...]\n"
    "       python -m slimadam_hf.run -m MODULE [ARGS...]\n"
    "Registers --optim slimadam with transformers, then runs SCRIPT.py (or MODULE) as __main__ with ARGS."
)


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Entry point of ``python -m slimadam_hf.run`` and the ``slimadam-run`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        raise SystemExit(0 if argv else 2)

    from .register import register

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
            _destroy_process_group()
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
        _destroy_process_group()


def _destroy_process_group() -> None:
    """Tear down a process group the script left open (HF example scripts do).

    Left to interpreter exit, a gloo group can abort the process ("terminate called without an active
    exception") after training has finished, which fails the whole ``accelerate launch``.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
