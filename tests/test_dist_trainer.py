"""Trainer + FSDP2 + ``--optim slimadam`` end to end on two gloo CPU processes, with a resume."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent))

from dist_workers import harness, trainer_fsdp2  # noqa: E402

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")


def test_trainer_fsdp2_slimadam_matches_single_process_and_resumes(tmp_path):
    r = harness.spawn(trainer_fsdp2.trainer_fsdp2, 2, tmp_path)
    assert r["optimizer"] == "SlimAdamW" and r["dtensor_params"]
    # GPT-2 c_attn (Conv1D, split q|k|v along dim 1): one flat replicated second moment of 16+16+16
    assert r["c_attn_v"] == ["(Replicate(),)", [48]]
    assert r["comm"]["all_reduce_calls"] == 1
    assert r["checkpoints"] == ["checkpoint-2", "checkpoint-4"]
    assert r["resume_max_diff"] == 0.0

    single = trainer_fsdp2.single_process_params(tmp_path / "single")
    sharded = torch.load(tmp_path / "fsdp2_params.pt")
    initial = trainer_fsdp2.tiny_gpt2().state_dict()
    assert max((single[k] - initial[k]).abs().max().item() for k in sharded) > 1e-2
    # float32, different reduction order: agreement to rounding
    assert max((single[k] - sharded[k]).abs().max().item() for k in sharded) < 1e-4


@pytest.mark.parametrize("options", ["momentum_dtype=int8", "robust=true"])
def test_trainer_fsdp2_resumes_exactly_with(tmp_path, options):
    # int8: codes and scales are DTensors laid out like the weights (1-D weights: scales replicated);
    # robust: the replicated complement; both saved as sharded state dicts and resumed bitwise
    r = harness.spawn(trainer_fsdp2.trainer_fsdp2, 2, tmp_path, optim_args=f"preset=gpt2,{options}")
    assert r["optimizer"] == "SlimAdamW" and r["dtensor_params"]
    assert r["checkpoints"] == ["checkpoint-2", "checkpoint-4"]
    assert r["resume_max_diff"] == 0.0
