"""int8 first moments (``momentum_dtype="int8"``) of DTensor parameters (FSDP2), with the codes one process stores.

* A weight of two or more dims is sharded on dim 0, in whole rows, and its quantization blocks lie inside
  rows (:mod:`slimadam_hf.core.quant`), so every rank holds whole blocks. Its codes are a DTensor
  ``(rows, blocks_per_row * BLOCK)`` and its scales ``(rows, blocks_per_row)``, sharded like the weight; the
  local update is the single-process one, on any path.
* A sharded 1-D weight (a bias, a norm) is cut inside its one row. Its codes are a DTensor of its shape (one
  per element) and its scales ``(blocks,)`` are replicated. Before the update every rank advances the moment
  of its elements, and one all-reduce (max) per mesh dim that shards such weights gives every block its
  largest magnitude over all ranks (:func:`share_block_maxima`), so the codes are those of one process.

Both layouts hold the single-process one (``(blocks, BLOCK)`` codes, ``(blocks, 1)`` scales) in another shape:
:func:`slimadam_hf.core.quant.row_blocks` reads any of them, so checkpoints move between one process and FSDP2.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Sequence, Union

import torch
from torch import Tensor

from ..core import quant
from ..core.quant import STATE_KEY as ABSMAX_KEY
from ..core.quant import QuantizedMomentum, RangeQuantizedMomentum
from .dtensor_state import distribute, localize
from .guards import UnsupportedShardingError



@dataclass
class SharedBlocks:
    """A cut 1-D weight's local moment and what its block scales are exchanged over."""

    momentum: RangeQuantizedMomentum
    grad: Tensor
    mesh: Any
    mesh_dims: tuple[int, ...]


def _is_cut(param: Tensor) -> bool:
    return param.dim() < 2 and any(pl.is_shard() for pl in param.placements)


def _layout(param: Tensor, name: str) -> tuple[tuple[int, ...], tuple[int, ...], tuple, tuple]:
    """Global shapes and placements of the codes and the scales of ``param``'s int8 moment."""
    from torch.distributed.tensor import Replicate

    placements = tuple(param.placements)
    if any(pl.is_shard() and pl.dim != 0 for pl in placements):
        raise UnsupportedShardingError(
            f"SlimAdamW: momentum_dtype='int8' on parameter {name!r} sharded on a dim other than 0 (placements "
            f"{placements}) would cut quantization blocks across ranks; shard dim 0 (FSDP2's default) or use "
            "momentum_dtype='bfloat16'"
        )
    shape = tuple(param.shape)
    blocks = quant.num_blocks(shape)
    replicate = tuple(Replicate() for _ in placements)
    if _is_cut(param):
        return shape, (blocks,), placements, replicate
    rows = max(1, quant.rows_and_cols(shape)[0])
    per_row = quant.blocks_per_row(shape)
    kept = placements if param.dim() >= 2 else replicate
    return (rows, per_row * quant.BLOCK), (rows, per_row), kept, kept


def init_state(state: dict[str, Any], param: Tensor, name: str) -> None:
    """Create the int8 moment of ``param`` (zeros), or lay a loaded one (any layout) out for this rank."""
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    codes_shape, absmax_shape, codes_pl, absmax_pl = _layout(param, name)
    mesh = param.device_mesh
    if "exp_avg" not in state:
        device = param.to_local().device
        local_codes, _ = compute_local_shape_and_global_offset(codes_shape, mesh, codes_pl)
        local_absmax, _ = compute_local_shape_and_global_offset(absmax_shape, mesh, absmax_pl)
        state["exp_avg"] = distribute(torch.zeros(local_codes, dtype=torch.int8, device=device), mesh, codes_pl,
                                       codes_shape)
        state[ABSMAX_KEY] = distribute(torch.zeros(local_absmax, dtype=torch.float32, device=device), mesh,
                                        absmax_pl, absmax_shape)
        return
    codes, absmax = state["exp_avg"], state[ABSMAX_KEY]
    if not isinstance(codes, DTensor):  # a plain state (checkpoint.load_into gives the single-process layout)
        if _is_cut(param):
            codes = codes.reshape(-1)[: param.numel()]
        codes, absmax = codes.reshape(codes_shape), absmax.reshape(absmax_shape)
    state["exp_avg"] = localize(codes, mesh, codes_pl, codes_shape, name)
    state[ABSMAX_KEY] = localize(absmax, mesh, absmax_pl, absmax_shape, name)


def local_momentum(state: dict[str, Any], param: Tensor) -> Union[QuantizedMomentum, RangeQuantizedMomentum]:
    """The update's view of this rank's part of ``param``'s int8 moment."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    codes, absmax = state["exp_avg"].to_local(), state[ABSMAX_KEY].to_local()
    local_shape = param.to_local().shape
    if not _is_cut(param):
        return QuantizedMomentum(codes.view(-1, quant.BLOCK), absmax.view(-1, 1), local_shape)
    shape = tuple(param.shape)
    numel, (start,) = compute_local_shape_and_global_offset(shape, param.device_mesh, tuple(param.placements))
    span = quant.Range(offset=0, numel=math.prod(numel), shape=shape, start=start, slot=0, first_block=0)
    return RangeQuantizedMomentum(codes, absmax, local_shape, (span,))


def shared_blocks(momentum: Any, grad: Tensor, param: Tensor) -> list[SharedBlocks]:
    """``[SharedBlocks]`` when ``momentum`` is a cut weight's (its scales need the exchange), else ``[]``."""
    if not isinstance(momentum, RangeQuantizedMomentum):
        return []
    dims = tuple(i for i, pl in enumerate(param.placements) if pl.is_shard())
    return [SharedBlocks(momentum, grad, param.device_mesh, dims)]


def share_block_maxima(items: Sequence[SharedBlocks], beta1: float) -> int:
    """Give every cut weight's block scales their largest magnitude over all ranks (as ``floor``): each rank
    advances its elements' moment, then one all-reduce (max) per (mesh, mesh dim). Returns the calls made."""
    import torch.distributed as dist

    buckets: dict[tuple, list[tuple[SharedBlocks, Tensor]]] = defaultdict(list)
    for item in items:
        local = item.momentum.propose_floor(item.grad, 1 - beta1)
        for mesh_dim in item.mesh_dims:
            buckets[(item.mesh, mesh_dim, local.device)].append((item, local))
    for (mesh, mesh_dim, _), entries in buckets.items():
        flat = torch.cat([local for _, local in entries])
        if flat.device.type != mesh.device_type:
            flat = flat.to(mesh.device_type)
        dist.all_reduce(flat, op=dist.ReduceOp.MAX, group=mesh.get_group(mesh_dim))
        offset = 0
        for item, local in entries:
            local.copy_(flat[offset : offset + local.numel()])
            offset += local.numel()
    return len(buckets)
