"""All 2-rank gloo checks in one spawn (process start-up dominates their cost)."""

from __future__ import annotations

import functools
import traceback
from pathlib import Path

import torch

from . import ddp, fsdp2, refusals

CHECKS = {
    "ddp": ddp.ddp_vs_single,
    "fsdp2_exact": fsdp2.exact_steps,
    "hsdp_replicate2_shard1": functools.partial(fsdp2.exact_steps, hsdp=(2, 1)),
    "hsdp_replicate1_shard2": functools.partial(fsdp2.exact_steps, hsdp=(1, 2)),
    "fsdp2_momentum_bf16": functools.partial(fsdp2.exact_steps, momentum_dtype=torch.bfloat16),
    "fsdp2_momentum_bf16_stochastic": functools.partial(fsdp2.exact_steps, momentum_dtype=torch.bfloat16,
                                                        momentum_rounding="stochastic"),
    "fsdp2_momentum_int8": functools.partial(fsdp2.exact_steps, momentum_dtype="int8", dtype=torch.float32),
    "fsdp2_checkpoints_int8": functools.partial(fsdp2.checkpoints, momentum_dtype="int8", dtype=torch.float32),
    "fsdp2_hf_int8": functools.partial(fsdp2.hf_models, momentum_dtype="int8", eps=1e-3),
    "fsdp2_hf_stochastic": functools.partial(fsdp2.hf_models, momentum_dtype="bfloat16", rounding="stochastic",
                                             eps=1e-3),
    "fsdp2_robust": functools.partial(fsdp2.exact_steps, robust=True),
    "hsdp_robust": functools.partial(fsdp2.exact_steps, hsdp=(1, 2), robust=True),
    "fsdp2_accelerate_order": fsdp2.training_accelerate_order,
    "fsdp2_checkpoints": fsdp2.checkpoints,
    "fsdp2_checkpoints_robust": functools.partial(fsdp2.checkpoints, robust=True),
    "tensor_parallel_dim1": fsdp2.tensor_parallel_dim1,
    "fsdp1": refusals.fsdp1,
    "fsdp2_refusals": refusals.fsdp2_options,
}


def run_all(rank: int, world_size: int, out_dir: Path) -> dict:
    """Each check's result, or its traceback (so one failure does not hide the others)."""
    results = {}
    for name, check in CHECKS.items():
        sub = out_dir / name
        sub.mkdir(exist_ok=True)
        try:
            results[name] = check(rank=rank, world_size=world_size, out_dir=sub)
        except Exception:  # reported per test by tests/test_dist_multiprocess.py
            results[name] = {"traceback": traceback.format_exc()}
    return results
