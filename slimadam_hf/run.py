"""``python -m slimadam_hf.run SCRIPT.py ARGS...``: see :mod:`slimadam_hf.hf.run`."""

from .hf.run import main

if __name__ == "__main__":
    main()
