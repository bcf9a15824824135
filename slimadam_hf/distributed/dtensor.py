"""SlimAdamW on DTensor parameters (FSDP2, tensor parallel): exact statistics, then the usual update.

FSDP2 (``torch.distributed.fsdp.fully_shard``) and tensor parallelism hand the optimizer ``DTensor``
parameters that keep their global shape, so per-tensor compression stays possible:

* a compressed dim that is *not* sharded is averaged locally; the second moment is sharded like the
  parameter (``Shard(d)`` on the mesh dims that shard a kept dim);
* a compressed dim that *is* sharded needs a global mean: each rank sums ``g**2`` over its shard, and
  one all-reduce per mesh dim (batched over every such parameter of every param group) adds the
  partial sums up. That second moment is ``Replicate`` on those mesh dims, identical on every rank;
* a split (fused) parameter keeps one flat second moment holding every part; under sharding it is
  replicated and refreshed by the same batched all-reduce (each rank fills in the entries it owns).
* ``robust=True``: the complement (``exp_avg_sq_complement``, the mean over the dims the rule keeps) is
  replicated the same way: each rank fills in its shard's share and the batched all-reduce, over every
  mesh dim that shards the weight, completes it.

This module only prepares the local shards: :func:`local_inputs` gives a parameter's local tensors, its
local compress segments and its partial statistics, and :func:`all_reduce_statistics` sums those over
the ranks. The update itself is :func:`slimadam_hf.core.functional.slimadamw`, the same one plain
tensors use. Second moments are DTensors with the single-process global shape, so
``torch.distributed.checkpoint`` (sharded or full state dicts) and accelerate save, load and reshard
them like any other state.
"""

from __future__ import annotations

import math
import weakref
from collections import defaultdict
from dataclasses import dataclass, field, replace
from typing import Any, Optional, Sequence

import torch
from torch import Tensor

from ..core.compress_spec import CompressSpec, Segment, second_moment_dtype, second_moment_shape, segments
from ..core.factored import STATE_KEY as COMPLEMENT_KEY
from ..core.factored import Complement, complement_segments, complement_shape
from . import dtensor_int8
from .dtensor_state import distribute, localize
from .guards import UnsupportedShardingError

# Per-optimizer layout cache, kept off the optimizer so that pickling or deep-copying it is unaffected.
_LAYOUTS: "weakref.WeakKeyDictionary[Any, dict]" = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class _Layout:
    """How one DTensor parameter's second moment is stored, reduced and updated on this rank."""

    mesh: Any
    v_placements: tuple
    v_global_shape: tuple[int, ...]
    v_local_shape: tuple[int, ...]
    reduce_mesh_dims: tuple[int, ...]  # mesh dims whose partial sums must be added up
    split: bool
    segments: tuple[Segment, ...]  # over the local shard (split parts: the rank's slice of each part)
    counts: tuple[int, ...]  # per segment: global number of gradient entries in one second-moment entry
    sharded_mesh_dims: tuple[int, ...] = ()
    # robust=True: the replicated complement's global shape, and per segment its local complement + count
    complement_shape: Optional[tuple[int, ...]] = None
    complements: tuple[Optional[Segment], ...] = ()
    complement_counts: tuple[int, ...] = ()


@dataclass
class LocalInputs:
    """One DTensor parameter's local tensors for :func:`slimadam_hf.core.functional.slimadamw`."""

    param: Tensor
    grad: Tensor
    exp_avg: Tensor
    exp_avg_sq: Tensor
    step: Tensor
    segments: tuple[Segment, ...]
    stats: Optional[list[Tensor]]  # per segment mean(g**2) (partial until all-reduced); None: use g*g
    layout: _Layout
    reduce: list[Tensor]  # buffers to all-reduce (the stats, or the flat buffer they view)
    complement: Optional[Complement] = None  # robust=True: the replicated complement and its partial stats
    complement_reduce: list[Tensor] = field(default_factory=list)  # summed over every sharded mesh dim
    shared_blocks: list[dtensor_int8.SharedBlocks] = field(default_factory=list)  # int8: scales to exchange


def _shard_dim(placement: Any) -> Optional[int]:
    from torch.distributed.tensor import Shard

    return placement.dim if isinstance(placement, Shard) else None


def _local_segment(
    seg: Segment, shape: tuple[int, ...], local_shape: Sequence[int], offset: Sequence[int]
) -> tuple[Segment, int]:
    """``seg`` of the global tensor on this rank's shard: its slice of the local tensor, with the box of its
    second moment that slice uses; and the global number of gradient entries in one moment entry."""
    sd = seg.split_dim
    dims_set = set(seg.dims or ())
    if sd is None:
        local_start, length, box_start = 0, local_shape[0] if local_shape else 1, 0
    else:
        start = max(seg.offset, offset[sd])
        stop = min(seg.offset + seg.size, offset[sd] + local_shape[sd])
        length = max(0, stop - start)
        local_start, box_start = (start - offset[sd], start - seg.offset) if length else (0, 0)
    box = []
    for d in range(len(shape)):
        if d in dims_set:
            continue
        if d == sd:
            box.append((d, box_start, length))
        elif local_shape[d] != shape[d]:
            box.append((d, offset[d], local_shape[d]))
    seg_shape = shape if sd is None else shape[:sd] + (seg.size,) + shape[sd + 1 :]
    count = math.prod(seg_shape[d] for d in dims_set) if seg.dims else 1
    return Segment(sd, local_start, length, seg.dims, seg.v_offset, seg.v_shape, tuple(box)), count


def _with_complements(layout: _Layout, segs: Sequence[Segment], shape: tuple[int, ...], local_shape: Sequence[int],
                      offset: Sequence[int], sharded_mesh_dims: tuple[int, ...]) -> _Layout:
    """``layout`` plus where each segment's replicated complement (``robust=True``) lives on this rank."""
    comps = complement_segments(segs, shape)
    local = [None if c is None else _local_segment(c, shape, local_shape, offset) for c in comps]
    return replace(
        layout, sharded_mesh_dims=sharded_mesh_dims, complement_shape=complement_shape(segs, shape),
        complements=tuple(None if x is None else x[0] for x in local),
        complement_counts=tuple(0 if x is None else x[1] for x in local),
    )


def _build_layout(param: Tensor, spec: CompressSpec, name: str) -> _Layout:
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    mesh, placements = param.device_mesh, tuple(param.placements)
    shape = tuple(param.shape)
    for placement in placements:
        if not (isinstance(placement, (Shard, Replicate))):
            raise UnsupportedShardingError(
                f"SlimAdamW: parameter {name!r} has placement {placement}; only Shard and Replicate "
                "placements are supported (strided shards, from FSDP2 over tensor parallelism on the same "
                "dim, are not yet). Shard FSDP2 and tensor parallelism on different dims, or use FSDP2 alone."
            )
    segs = segments(spec, shape, name)
    local_shape, offset = compute_local_shape_and_global_offset(shape, mesh, placements)
    sharded_mesh_dims = tuple(i for i, pl in enumerate(placements) if _shard_dim(pl) is not None)

    if segs[0].split_dim is None:
        dims = segs[0].dims
        dims_set = set(dims or ())
        v_placements = tuple(
            Replicate() if _shard_dim(pl) is not None and _shard_dim(pl) in dims_set else pl for pl in placements
        )
        reduce_dims = tuple(i for i in sharded_mesh_dims if _shard_dim(placements[i]) in dims_set)
        v_local = tuple(1 if d in dims_set else s for d, s in enumerate(local_shape))
        count = math.prod(shape[d] for d in dims_set) if dims else 1
        local_seg = Segment(None, 0, local_shape[0] if local_shape else 1, dims, 0, v_local)
        layout = _Layout(mesh, v_placements, segs[0].v_shape, v_local, reduce_dims, False, (local_seg,), (count,))
        return _with_complements(layout, segs, shape, local_shape, offset, sharded_mesh_dims)

    # Split parameter: one flat, replicated second moment; each rank fills in the box it owns.
    if any(type(placements[i]) is not Shard for i in sharded_mesh_dims):
        raise UnsupportedShardingError(
            f"SlimAdamW: split parameter {name!r} has placements {placements}; split (fused) weights "
            "need plain Shard placements (contiguous shards). Give it an unsplit compress spec instead."
        )
    local_segs, counts = zip(*(_local_segment(seg, shape, local_shape, offset) for seg in segs))
    v_shape = second_moment_shape(spec, shape, name)
    layout = _Layout(
        mesh, tuple(Replicate() for _ in placements), v_shape, v_shape, sharded_mesh_dims, True,
        tuple(local_segs), tuple(counts),
    )
    return _with_complements(layout, segs, shape, local_shape, offset, sharded_mesh_dims)


def _layout(owner: Any, param: Tensor, spec: CompressSpec, name: str) -> _Layout:
    cache = _LAYOUTS.setdefault(owner, {})
    key = (tuple(param.shape), tuple(param.placements), param.device_mesh, repr(spec))
    layout = cache.get(key)
    if layout is None:
        layout = cache[key] = _build_layout(param, spec, name)
    return layout


# -- state --------------------------------------------------------------------------------------


def _init_complement(state: dict[str, Any], param: Tensor, layout: _Layout, name: str, fresh: bool) -> None:
    """``robust=True``: the replicated ``exp_avg_sq_complement`` (created, or a loaded one replicated)."""
    from torch.distributed.tensor import Replicate, Shard

    if layout.complement_shape is None:
        return
    if any(type(param.placements[i]) is not Shard for i in layout.sharded_mesh_dims):
        raise UnsupportedShardingError(
            f"SlimAdamW: robust=True needs plain Shard placements (contiguous shards); parameter {name!r} has "
            f"{tuple(param.placements)}. Use robust=False for this model, or FSDP2 without strided sharding."
        )
    replicate = tuple(Replicate() for _ in param.placements)
    if COMPLEMENT_KEY in state:
        state[COMPLEMENT_KEY] = localize(state[COMPLEMENT_KEY], layout.mesh, replicate, layout.complement_shape, name)
        return
    if not fresh:
        raise ValueError(
            f"SlimAdamW: the optimizer state of parameter {name!r} has no {COMPLEMENT_KEY} (saved with "
            "robust=False); under FSDP2 resume it with robust=False, or convert it in one process first"
        )
    local = torch.zeros(layout.complement_shape, dtype=second_moment_dtype(param.dtype), device=param.to_local().device)
    state[COMPLEMENT_KEY] = distribute(local, layout.mesh, replicate, layout.complement_shape)


def _init_state(
    state: dict[str, Any], param: Tensor, layout: _Layout, name: str, momentum_dtype: torch.dtype
) -> dict[str, Any]:
    if momentum_dtype == torch.int8:
        dtensor_int8.init_state(state, param, name)
    if "exp_avg_sq" not in state:
        state["step"] = torch.tensor(0.0, dtype=torch.float32)
        if momentum_dtype != torch.int8:
            state["exp_avg"] = torch.zeros_like(param, dtype=momentum_dtype)
        local_v = torch.zeros(
            layout.v_local_shape, dtype=second_moment_dtype(param.dtype), device=param.to_local().device
        )
        state["exp_avg_sq"] = distribute(local_v, layout.mesh, layout.v_placements, layout.v_global_shape)
        return state
    # State loaded from a plain (single-process or gathered) state dict: shard it like the parameter.
    if momentum_dtype != torch.int8:
        state["exp_avg"] = localize(state["exp_avg"], param.device_mesh, tuple(param.placements), tuple(param.shape),
                                     name)
    state["exp_avg_sq"] = localize(
        state["exp_avg_sq"], layout.mesh, layout.v_placements, layout.v_global_shape, name
    )
    return state


# -- statistics ---------------------------------------------------------------------------------


def _local_mean(g: Tensor, dims: Optional[tuple[int, ...]], dtype: torch.dtype, count: int) -> Tensor:
    g = g.to(dtype)
    if dims is None:
        return g * g
    return (g * g).sum(dim=dims, keepdim=True).div_(count)


def noise_offset(param: Tensor, name: str) -> int:
    """The flat position of ``param``'s local shard's first element in the whole parameter, so that stochastic
    rounding draws each element's noise as one process does. Only shards of whole rows (dim 0, FSDP2's)
    are a flat range; other placements are refused with the fix."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape = tuple(param.shape)
    local_shape, offset = compute_local_shape_and_global_offset(shape, param.device_mesh, tuple(param.placements))
    if tuple(local_shape[1:]) != shape[1:]:
        raise UnsupportedShardingError(
            f"SlimAdamW: momentum_rounding='stochastic' on parameter {name!r} sharded on a dim other than 0 "
            f"(placements {tuple(param.placements)}) cannot draw the single-process noise; shard dim 0 (FSDP2's "
            "default) or use momentum_rounding='nearest'"
        )
    return offset[0] * math.prod(shape[1:]) if shape else 0


def local_inputs(
    owner: Any, state: dict[str, Any], param: Tensor, spec: CompressSpec, name: str, momentum_dtype: torch.dtype,
    robust: bool = False,
) -> LocalInputs:
    """``param``'s local shards, state (created or sharded on first use) and partial statistics.

    ``owner`` keys the layout cache (the optimizer). The statistics are this rank's share of each
    segment's ``mean(g**2)`` (with ``robust``, also of its mean over the complement dims);
    :func:`all_reduce_statistics` completes them.
    """
    layout = _layout(owner, param, spec, name)
    fresh = not state
    state = _init_state(state, param, layout, name, momentum_dtype)
    if robust:
        _init_complement(state, param, layout, name, fresh)
    grad = param.grad
    if tuple(grad.placements) != tuple(param.placements):
        grad = grad.redistribute(param.device_mesh, param.placements)
    g = grad.to_local()
    v = state["exp_avg_sq"].to_local()
    stats: Optional[list[Tensor]] = None
    reduce: list[Tensor] = []
    if layout.split:
        flat = torch.zeros_like(v)
        stats = []
        for seg, count in zip(layout.segments, layout.counts):
            stat = seg.second_moment_view(flat)
            seg.denominator_view(stat).add_(_local_mean(seg.view(g), seg.dims, v.dtype, count))
            stats.append(stat)
        reduce = [flat]
    elif layout.segments[0].dims is not None:
        seg = layout.segments[0]
        stats = [_local_mean(g, seg.dims, v.dtype, layout.counts[0])]
        reduce = stats
    exp_avg = dtensor_int8.local_momentum(state, param) if momentum_dtype == torch.int8 else state["exp_avg"].to_local()
    local = LocalInputs(
        param.to_local(), g, exp_avg, v, state["step"], layout.segments, stats, layout,
        reduce if layout.reduce_mesh_dims else [], shared_blocks=dtensor_int8.shared_blocks(exp_avg, g, param),
    )
    if robust and layout.complement_shape is not None:
        w = state[COMPLEMENT_KEY].to_local()  # replicated: every rank holds all of it
        partial = torch.zeros_like(w)
        comp_stats: list[Optional[Tensor]] = []
        for seg, comp, count in zip(layout.segments, layout.complements, layout.complement_counts):
            if comp is None:
                comp_stats.append(None)
                continue
            stat = comp.second_moment_view(partial)
            comp.denominator_view(stat).add_(_local_mean(seg.view(g), comp.dims, w.dtype, count))
            comp_stats.append(stat)
        local.complement = Complement(w, layout.complements, tuple(comp_stats))
        local.complement_reduce = [partial] if layout.sharded_mesh_dims else []
    return local


def all_reduce_statistics(items: Sequence[LocalInputs]) -> tuple[int, int]:
    """Sum partial statistics over the mesh dims that shard them: one all-reduce per (mesh, mesh dim, dtype).

    Returns the number of all-reduce calls and the bytes they carried.
    """
    import torch.distributed as dist

    # Equal meshes (FSDP2 builds one per fully_shard call) share a bucket.
    buckets: dict[tuple, list[Tensor]] = defaultdict(list)
    for item in items:
        for mesh_dims, stats in ((item.layout.reduce_mesh_dims, item.reduce),
                                 (item.layout.sharded_mesh_dims, item.complement_reduce)):
            for mesh_dim in mesh_dims:
                for stat in stats:
                    buckets[(item.layout.mesh, mesh_dim, stat.dtype, stat.device)].append(stat)
    calls = nbytes = 0
    for (mesh, mesh_dim, _, _), stats in buckets.items():
        flat = torch.cat([s.reshape(-1) for s in stats])
        if flat.device.type != mesh.device_type:  # CPU-resident shards on a cuda/nccl mesh
            flat = flat.to(mesh.device_type)
        dist.all_reduce(flat, group=mesh.get_group(mesh_dim))
        calls += 1
        nbytes += flat.numel() * flat.element_size()
        offset = 0
        for s in stats:
            s.copy_(flat[offset : offset + s.numel()].view_as(s))
            offset += s.numel()
    return calls, nbytes
