"""Shared helpers for the test suite: tiny Hugging Face models built from configs (no hub)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
logging.getLogger("transformers").setLevel(logging.ERROR)

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _seeded_rng():
    """Every test starts from the same random state, whatever ran before it: no order-dependent data."""
    torch.manual_seed(0)
