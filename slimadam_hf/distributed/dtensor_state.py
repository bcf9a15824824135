"""Optimizer state as DTensors laid out like their parameters: made from a local tensor, or placed from a loaded
state (redistributed, or sliced from a full plain tensor)."""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor


def contiguous_stride(shape: Sequence[int]) -> tuple[int, ...]:
    """The strides of a contiguous tensor of ``shape``."""
    stride, acc = [], 1
    for size in reversed(shape):
        stride.append(acc)
        acc *= max(size, 1)
    return tuple(reversed(stride))


def localize(tensor: Tensor, like_mesh: Any, placements: tuple, global_shape: tuple[int, ...], name: str) -> Tensor:
    """``tensor`` as a DTensor with ``placements``: redistributed, or sliced from a full plain tensor."""
    from torch.distributed.tensor import DTensor, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    if isinstance(tensor, DTensor):
        if tuple(tensor.placements) != tuple(placements):
            tensor = tensor.redistribute(like_mesh, placements)
        return tensor
    if tuple(tensor.shape) != tuple(global_shape):
        raise ValueError(
            f"SlimAdamW: optimizer state of parameter {name!r} has shape {list(tensor.shape)}, expected the "
            f"global shape {list(global_shape)}; load sharded checkpoints with torch.distributed.checkpoint"
        )
    if any(isinstance(pl, Shard) and type(pl) is not Shard for pl in placements):
        raise ValueError(
            f"SlimAdamW: cannot slice a full optimizer state for {name!r} onto strided shards {placements}; "
            "load it through torch.distributed.checkpoint.state_dict.set_optimizer_state_dict"
        )
    local_shape, offset = compute_local_shape_and_global_offset(global_shape, like_mesh, placements)
    local = tensor
    for d, (size, start) in enumerate(zip(local_shape, offset)):
        if size != global_shape[d]:
            local = local.narrow(d, start, size)
    return distribute(local.contiguous(), like_mesh, placements, global_shape)


def distribute(local: Tensor, mesh: Any, placements: tuple, shape: tuple[int, ...]) -> Tensor:
    """``local``, this rank's part, as a DTensor of global ``shape`` with ``placements``."""
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(local, mesh, placements, run_check=False, shape=torch.Size(shape),
                              stride=contiguous_stride(shape))
