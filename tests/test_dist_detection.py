"""Flat-shard detection without a process group: real flat tensors, as FSDP1 and DeepSpeed build them."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from slimadam_hf import SlimAdamW
from slimadam_hf.core.compress_spec import CompressSpecError
from slimadam_hf.distributed.guards import UnsupportedShardingError, flat_backend


def _groups():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    named = list(model.named_parameters())
    return model, [{"params": named, "compress": [(1,), None, (0,), None]}]


def test_zero3_partitioned_parameter_is_checked_against_its_ds_shape():
    # DeepSpeed ZeRO-3 (zero.Init) leaves an empty local tensor and records the real shape in ds_* attributes.
    p = nn.Parameter(torch.empty(0))
    p.ds_shape, p.ds_id, p.ds_numel = torch.Size([3, 4]), 0, 12
    assert flat_backend(p, "w") is None
    SlimAdamW([{"params": [("w", p)], "compress": [(1,)]}])  # accepted: ZeRO-3 is supported
    with pytest.raises(CompressSpecError, match=r"dims \[2\] out of range for shape \[3, 4\]"):
        SlimAdamW([{"params": [("w", p)], "compress": [(2,)]}])
    q = nn.Parameter(torch.empty(0))
    q.ds_shape, q.ds_id, q.ds_numel = torch.Size([12]), 1, 12
    with pytest.raises(CompressSpecError, match="'b' is 1-D"):
        SlimAdamW([{"params": [("b", q)], "compress": [(0,)]}])


def test_fsdp1_names_are_refused_at_creation():
    p = nn.Parameter(torch.zeros(6))
    with pytest.raises(UnsupportedShardingError, match="FSDP1"):
        SlimAdamW([("_fsdp_wrapped_module.layer.weight", p)])
    flat = nn.Parameter(torch.zeros(6))
    flat._is_flat_param = True
    assert flat_backend(flat) == "FSDP1 (FullyShardedDataParallel)"


def test_flat_partition_swapped_in_after_creation_is_refused_at_step():
    # What DeepSpeed ZeRO 1/2 do: replace a group's params with one flat fp32 partition.
    model, groups = _groups()
    opt = SlimAdamW(groups, lr=0.1)
    flat = nn.Parameter(torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
    flat.grad = torch.ones_like(flat)
    before = flat.detach().clone()
    opt.param_groups[0]["params"] = [flat]
    with pytest.raises(UnsupportedShardingError) as info:
        opt.step()
    message = str(info.value)
    assert message.startswith(
        "SlimAdamW cannot run under a wrapper that flattens parameters (FSDP1, or DeepSpeed ZeRO with step() "
        "called outside engine.step()): param group 0 was built with 4 per-tensor parameters, but now holds 1 "
        "flat tensor(s) of shape(s) [[23]]"
    )
    assert torch.equal(flat, before)  # nothing was updated


def test_single_param_group_flattened_to_1d_is_refused():
    w = nn.Parameter(torch.randn(3, 4))
    opt = SlimAdamW([{"params": [("w", w)], "compress": [(1,)]}])
    flat = nn.Parameter(w.detach().reshape(-1).clone())
    flat.grad = torch.ones_like(flat)
    opt.param_groups[0]["params"] = [flat]
    with pytest.raises(UnsupportedShardingError, match=r"parameter 'w' of group 0 is now a flat shard of shape \[12\]"):
        opt.step()


def test_plain_training_is_unaffected():
    model, groups = _groups()
    opt = SlimAdamW(groups, lr=0.1)
    model(torch.randn(5, 4)).sum().backward()
    opt.step()
    assert not hasattr(opt, "comm_stats")
    assert opt.state[model[0].weight]["exp_avg_sq"].shape == (3, 1)
