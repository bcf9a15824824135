"""Shared helpers for the test suite: tiny Hugging Face models built from configs (no hub)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# The Triton kernels run on CPU tensors under Triton's interpreter. It must be on before triton itself is
# imported (torch and transformers may import it early), since triton.language's own helpers are defined then.
os.environ["TRITON_INTERPRET"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
logging.getLogger("transformers").setLevel(logging.ERROR)

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _seeded_rng():
    """Every test starts from the same random state, whatever ran before it: no order-dependent data."""
    torch.manual_seed(0)


@pytest.fixture
def triton_interpreter():
    """The Triton path (:mod:`slimadam_hf.core.triton_step`), its kernels interpreted on CPU tensors."""
    import triton  # noqa: F401 - a missing test dependency fails here, never skips
    from slimadam_hf.core import triton_kernels, triton_step

    assert triton_step.interpreting() and "Interpreted" in type(triton_kernels.update_kernel).__name__
    return triton_step
