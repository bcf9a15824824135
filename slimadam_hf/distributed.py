"""SlimAdamW on sharded parameters: exact FSDP2 / DTensor steps, loud refusal of flat shards.

FSDP2 (``torch.distributed.fsdp.fully_shard``) and tensor parallelism hand the optimizer ``DTensor``
parameters that keep their global shape, so per-tensor compression stays possible:

* a compressed dim that is *not* sharded is averaged locally; the second moment is sharded like the
  parameter (``Shard(d)`` on the mesh dims that shard a kept dim);
* a compressed dim that *is* sharded needs a global mean: each rank sums ``g**2`` over its shard, and
  one all-reduce per mesh dim (batched over every such parameter of every param group) adds the
  partial sums up. That second moment is ``Replicate`` on those mesh dims, identical on every rank;
* a split (fused) parameter keeps one flat second moment holding every part; under sharding it is
  replicated and refreshed by the same batched all-reduce (each rank fills in the entries it owns).

Second moments are DTensors with the single-process global shape, so ``torch.distributed.checkpoint``
(sharded or full state dicts) and accelerate save, load and reshard them like any other state.

FSDP1 and DeepSpeed ZeRO 1/2/3 give the optimizer flat 1-D shards that mix many weights; the second
moment of a weight cannot be averaged over its rows or columns there. :func:`check_param_group` (at
creation) and :func:`check_before_step` (each step) raise :class:`UnsupportedShardingError` naming the
backend and the supported alternatives instead of running uncompressed or wrong.
"""

from __future__ import annotations

import math
import sys
import weakref
from collections import defaultdict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional, Sequence

import torch
from torch import Tensor

from .compress_spec import (
    CompressSpec,
    Dims,
    cached_segments,
    second_moment_dtype,
    second_moment_shape,
    segments,
)

if TYPE_CHECKING:
    from .optimizer import SlimAdamW


# Per-optimizer caches, kept off the optimizer so that pickling or deep-copying it is unaffected.
_CHECKED_GROUPS: "weakref.WeakKeyDictionary[Any, tuple]" = weakref.WeakKeyDictionary()
_LAYOUTS: "weakref.WeakKeyDictionary[Any, dict]" = weakref.WeakKeyDictionary()

SUPPORTED_ALTERNATIVES = (
    "Use FSDP2 instead (torch.distributed.fsdp.fully_shard; accelerate/Trainer fsdp_version: 2), "
    "or DDP; see docs/distributed.md"
)


class UnsupportedShardingError(RuntimeError):
    """SlimAdamW was handed flat parameter shards (FSDP1, DeepSpeed ZeRO) it cannot compress."""


# -- detection of flat-shard backends ------------------------------------------------------------


def _dtensor_type() -> Optional[type]:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed
        return None
    return DTensor


def is_dtensor(tensor: Any) -> bool:
    """Whether ``tensor`` is a ``torch.distributed.tensor.DTensor`` (FSDP2 / tensor parallel)."""
    cls = _dtensor_type()
    return cls is not None and isinstance(tensor, cls)


def flat_backend(param: Tensor, name: Optional[str] = None) -> Optional[str]:
    """The backend that turned ``param`` into a flat shard, or ``None`` for a per-tensor parameter.

    Recognizes FSDP1 ``FlatParameter`` s (``use_orig_params=False``), FSDP1 original-parameter views
    (``use_orig_params=True``: flattened 1-D shards, ``_fsdp_wrapped_module`` in their names) and
    DeepSpeed ZeRO-3 partitioned parameters (``ds_shape`` / ``ds_id`` attributes).
    """
    if getattr(param, "_is_flat_param", False) or (name is not None and name.endswith("_flat_param")):
        return "FSDP1 (FullyShardedDataParallel)"
    if not is_dtensor(param) and (
        getattr(param, "_fsdp_flattened", False) or (name is not None and "_fsdp_wrapped_module" in name)
    ):
        return "FSDP1 (FullyShardedDataParallel)"
    if hasattr(param, "ds_shape") or hasattr(param, "ds_id"):
        return "DeepSpeed ZeRO stage 3"
    return None


def _flattening_caller() -> Optional[str]:
    """Name the DeepSpeed optimizer wrapper that called ``step()``, if any (it swaps in flat tensors)."""
    frame = sys._getframe(1)
    while frame is not None:
        owner = frame.f_locals.get("self")
        module = type(owner).__module__ if owner is not None else ""
        if module.startswith("deepspeed."):
            cls = type(owner).__name__
            if "Stage3" in cls:
                return "DeepSpeed ZeRO stage 3"
            if cls == "DeepSpeedZeroOptimizer":
                return f"DeepSpeed ZeRO stage {2 if getattr(owner, 'partition_gradients', False) else 1}"
            if "Optimizer" in cls:
                return f"DeepSpeed ({cls}, flat master weights)"
        frame = frame.f_back
    return None


def _flat_error(backend: str, what: str) -> UnsupportedShardingError:
    return UnsupportedShardingError(
        f"SlimAdamW cannot run under {backend}: {what}. SlimAdam averages each weight's second moment "
        "over that weight's rows or columns, which is impossible on flat shards that mix many weights "
        f"(it would silently run uncompressed or wrong). {SUPPORTED_ALTERNATIVES}."
    )


def check_param_group(group: dict[str, Any]) -> None:
    """Raise :class:`UnsupportedShardingError` if a new param group holds FSDP1/ZeRO-3 flat shards."""
    names = group.get("param_names")
    for i, p in enumerate(group["params"]):
        name = names[i] if names else None
        backend = flat_backend(p, name)
        if backend is not None:
            label = repr(name) if name else f"params[{i}]"
            raise _flat_error(backend, f"parameter {label} is a flat shard of shape {list(p.shape)}")


def check_before_step(optimizer: "SlimAdamW") -> bool:
    """Raise if a wrapper swapped the param groups' tensors for flat shards; whether any is a DTensor.

    DeepSpeed ZeRO 1/2/3 (and its fp16/bf16 optimizers) replace every group's ``params`` with one flat
    partition after the optimizer was built; accelerate swaps in FSDP2's DTensors. The check reruns
    only when a group's params list changed.
    """
    key = tuple((id(g["params"]), len(g["params"])) for g in optimizer.param_groups)
    cached = _CHECKED_GROUPS.get(optimizer)
    if cached is not None and cached[0] == key:
        return cached[1]
    for index, group in enumerate(optimizer.param_groups):
        params, names, compress = group["params"], group.get("param_names"), group.get("compress")
        expected = len(compress) if compress is not None else len(names) if names else len(params)
        if len(params) != expected:
            backend = _flattening_caller() or "a wrapper that flattens parameters (DeepSpeed ZeRO or FSDP1)"
            shapes = [list(p.shape) for p in params]
            raise _flat_error(
                backend,
                f"param group {index} was built with {expected} per-tensor parameters, but now holds "
                f"{len(params)} flat tensor(s) of shape(s) {shapes}",
            )
        check_param_group(group)
        for i, (p, spec) in enumerate(zip(params, compress or ())):
            if spec is not None and p.dim() < 2:
                backend = _flattening_caller() or "a wrapper that flattens parameters (DeepSpeed ZeRO or FSDP1)"
                label = repr(names[i]) if names else f"params[{i}]"
                raise _flat_error(
                    backend, f"parameter {label} of group {index} is now a flat shard of shape {list(p.shape)}"
                )
    sharded = has_dtensor_params(optimizer)
    _CHECKED_GROUPS[optimizer] = (key, sharded)
    return sharded


# -- per-rank layout of a DTensor parameter --------------------------------------------------------


@dataclass(frozen=True)
class _Piece:
    """One compress segment of a sharded parameter, as seen from this rank."""

    narrow: Optional[tuple[int, int, int]]  # (dim, start, length) of the segment in the local shard
    dims: Optional[Dims]
    count: int  # global number of gradient entries averaged into one second-moment entry
    v_flat: Optional[tuple[int, tuple[int, ...]]]  # split params: (offset, global segment v shape)
    v_box: tuple[tuple[int, int, int], ...]  # split params: narrows of the segment's v to this rank


@dataclass(frozen=True)
class _Layout:
    """How one DTensor parameter's second moment is stored and reduced on this rank."""

    mesh: Any
    v_placements: tuple
    v_global_shape: tuple[int, ...]
    v_local_shape: tuple[int, ...]
    reduce_mesh_dims: tuple[int, ...]  # mesh dims whose partial sums must be added up
    split: bool
    pieces: tuple[_Piece, ...]


def _contiguous_stride(shape: Sequence[int]) -> tuple[int, ...]:
    stride, acc = [], 1
    for size in reversed(shape):
        stride.append(acc)
        acc *= max(size, 1)
    return tuple(reversed(stride))


def _shard_dim(placement: Any) -> Optional[int]:
    from torch.distributed.tensor import Shard

    return placement.dim if isinstance(placement, Shard) else None


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
        piece = _Piece(None, dims, count, None, ())
        return _Layout(mesh, v_placements, segs[0].v_shape, v_local, reduce_dims, False, (piece,))

    # Split parameter: one flat, replicated second moment; each rank fills in the box it owns.
    if any(type(placements[i]) is not Shard for i in sharded_mesh_dims):
        raise UnsupportedShardingError(
            f"SlimAdamW: split parameter {name!r} has placements {placements}; split (fused) weights "
            "need plain Shard placements (contiguous shards). Give it an unsplit compress spec instead."
        )
    pieces = []
    for seg in segs:
        sd = seg.split_dim
        start = max(seg.offset, offset[sd])
        stop = min(seg.offset + seg.size, offset[sd] + local_shape[sd])
        length = max(0, stop - start)
        local_start, box_start = (start - offset[sd], start - seg.offset) if length else (0, 0)
        dims_set = set(seg.dims or ())
        box = []
        for d in range(len(shape)):
            if d in dims_set:
                continue
            if d == sd:
                box.append((d, box_start, length))
            elif local_shape[d] != shape[d]:
                box.append((d, offset[d], local_shape[d]))
        seg_shape = shape[:sd] + (seg.size,) + shape[sd + 1 :]
        count = math.prod(seg_shape[d] for d in dims_set) if seg.dims else 1
        pieces.append(
            _Piece((sd, local_start, length), seg.dims, count, (seg.v_offset, seg.v_shape), tuple(box))
        )
    v_shape = second_moment_shape(spec, shape, name)
    return _Layout(
        mesh, tuple(Replicate() for _ in placements), v_shape, v_shape, sharded_mesh_dims, True, tuple(pieces)
    )


def _layout(optimizer: "SlimAdamW", param: Tensor, spec: CompressSpec, name: str) -> _Layout:
    cache = _LAYOUTS.setdefault(optimizer, {})
    key = (tuple(param.shape), tuple(param.placements), param.device_mesh, repr(spec))
    layout = cache.get(key)
    if layout is None:
        layout = cache[key] = _build_layout(param, spec, name)
    return layout


# -- state --------------------------------------------------------------------------------------


def _localize(tensor: Tensor, like_mesh: Any, placements: tuple, global_shape: tuple[int, ...], name: str) -> Tensor:
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
    return DTensor.from_local(
        local.contiguous(), like_mesh, placements, run_check=False,
        shape=torch.Size(global_shape), stride=_contiguous_stride(global_shape),
    )


def _init_state(
    optimizer: "SlimAdamW", group: dict[str, Any], param: Tensor, layout: _Layout, name: str
) -> dict[str, Tensor]:
    from torch.distributed.tensor import DTensor

    state = optimizer.state[param]
    v_dtype = second_moment_dtype(param.dtype)
    if not state:
        state["step"] = torch.tensor(0.0, dtype=torch.float32)
        state["exp_avg"] = torch.zeros_like(param, dtype=optimizer._momentum_dtype(group, param))
        local_v = torch.zeros(layout.v_local_shape, dtype=v_dtype, device=param.to_local().device)
        state["exp_avg_sq"] = DTensor.from_local(
            local_v, layout.mesh, layout.v_placements, run_check=False,
            shape=torch.Size(layout.v_global_shape), stride=_contiguous_stride(layout.v_global_shape),
        )
        return state
    # State loaded from a plain (single-process or gathered) state dict: shard it like the parameter.
    state["exp_avg"] = _localize(state["exp_avg"], param.device_mesh, tuple(param.placements), tuple(param.shape), name)
    state["exp_avg_sq"] = _localize(
        state["exp_avg_sq"], layout.mesh, layout.v_placements, layout.v_global_shape, name
    )
    return state


# -- the step -----------------------------------------------------------------------------------


def has_dtensor_params(optimizer: "SlimAdamW") -> bool:
    """Whether any param group holds a DTensor (FSDP2 / tensor parallel) parameter."""
    return any(is_dtensor(p) for group in optimizer.param_groups for p in group["params"])


@dataclass
class _Item:
    param: Tensor
    local: Tensor
    grad: Tensor
    exp_avg: Tensor
    v: Tensor  # local part of exp_avg_sq (the whole flat v for split params)
    step: Tensor
    layout: _Layout
    stats: list  # per piece: mean of g**2 over its dims (compressed) / the increment buffer (split)


def _local_sum(g: Tensor, dims: Optional[Dims], v_dtype: torch.dtype, count: int) -> Tensor:
    g = g.to(v_dtype)
    if dims is None:
        return g * g
    return (g * g).sum(dim=dims, keepdim=True).div_(count)


def _collect(optimizer: "SlimAdamW", group: dict[str, Any]) -> tuple[list[_Item], list[int]]:
    """This group's DTensor items (statistics computed locally) and the indices of plain params."""
    items, plain = [], []
    specs = optimizer._group_specs(group)
    for i, (p, spec) in enumerate(zip(group["params"], specs)):
        if p.grad is None:
            continue
        if not is_dtensor(p):
            plain.append(i)
            continue
        name = optimizer._param_name(group, i)
        layout = _layout(optimizer, p, spec, name)
        state = _init_state(optimizer, group, p, layout, name)
        grad = p.grad
        if tuple(grad.placements) != tuple(p.placements):
            grad = grad.redistribute(p.device_mesh, p.placements)
        local, g = p.to_local(), grad.to_local()
        v = state["exp_avg_sq"].to_local()
        item = _Item(p, local, g, state["exp_avg"].to_local(), v, state["step"], layout, [])
        if layout.split:
            buf = torch.zeros_like(v)
            for piece in layout.pieces:
                seg_g = g.narrow(*piece.narrow)
                offset, v_shape = piece.v_flat
                target = buf.narrow(0, offset, math.prod(v_shape)).view(v_shape)
                for d, start, length in piece.v_box:
                    target = target.narrow(d, start, length)
                target.add_(_local_sum(seg_g, piece.dims, v.dtype, piece.count))
            item.stats.append(buf)
        else:
            piece = layout.pieces[0]
            if piece.dims is not None:
                item.stats.append(_local_sum(g, piece.dims, v.dtype, piece.count))
        items.append(item)
    return items, plain


def _all_reduce(items: list[_Item]) -> tuple[int, int]:
    """Sum partial statistics over the mesh dims that shard them: one all-reduce per (mesh, mesh dim, dtype)."""
    import torch.distributed as dist

    # Equal meshes (FSDP2 builds one per fully_shard call) share a bucket.
    buckets: dict[tuple, list[Tensor]] = defaultdict(list)
    for item in items:
        for mesh_dim in item.layout.reduce_mesh_dims:
            for stat in item.stats:
                buckets[(item.layout.mesh, mesh_dim, stat.dtype, stat.device)].append(stat)
    calls = nbytes = 0
    for (mesh, mesh_dim, _, _), stats in buckets.items():
        flat = torch.cat([s.reshape(-1) for s in stats])
        if flat.device.type != mesh.device_type:  # FSDP2 CPU offload on a cuda/nccl mesh
            flat = flat.to(mesh.device_type)
        dist.all_reduce(flat, group=mesh.get_group(mesh_dim))
        calls += 1
        nbytes += flat.numel() * flat.element_size()
        offset = 0
        for s in stats:
            s.copy_(flat[offset : offset + s.numel()].view_as(s))
            offset += s.numel()
    return calls, nbytes


def _update(items: list[_Item], *, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float) -> None:
    """The SlimAdamW update on local shards (batched with ``_foreach`` ops), given global statistics."""
    if not items:
        return
    torch._foreach_add_([it.step for it in items], 1)
    if weight_decay != 0:
        torch._foreach_mul_([it.local for it in items], 1 - lr * weight_decay)
    same = [it for it in items if it.exp_avg.dtype == it.grad.dtype]
    if same:
        torch._foreach_lerp_([it.exp_avg for it in same], [it.grad for it in same], 1 - beta1)
    for it in items:  # momentum_dtype differs from the parameter's: float32 math, rounded store
        if it.exp_avg.dtype != it.grad.dtype:
            it.exp_avg.copy_(it.exp_avg.float().lerp_(it.grad.float(), 1 - beta1))
    buckets: dict[str, dict[str, list]] = {"full": defaultdict(list), "compressed": defaultdict(list)}
    for item in items:
        step = item.step.item()
        neg_step_size = -lr / (1 - beta1**step)
        bias_correction2_sqrt = (1 - beta2**step) ** 0.5
        if item.layout.split:
            v = item.v.mul_(beta2).add_(item.stats[0], alpha=1 - beta2)
            for piece in item.layout.pieces:
                offset, v_shape = piece.v_flat
                seg_v = v.narrow(0, offset, math.prod(v_shape)).view(v_shape)
                for d, start, length in piece.v_box:
                    seg_v = seg_v.narrow(d, start, length)
                denom = (seg_v.sqrt() / bias_correction2_sqrt).add_(eps)
                item.local.narrow(*piece.narrow).addcdiv_(item.exp_avg.narrow(*piece.narrow), denom, value=neg_step_size)
            continue
        bucket = buckets["full" if item.layout.pieces[0].dims is None else "compressed"]
        bucket["p"].append(item.local)
        bucket["m"].append(item.exp_avg)
        bucket["v"].append(item.v)
        bucket["x"].append(item.grad.to(item.v.dtype) if item.layout.pieces[0].dims is None else item.stats[0])
        bucket["neg_step_size"].append(neg_step_size)
        bucket["bc2_sqrt"].append(bias_correction2_sqrt)
    for kind, bucket in buckets.items():
        if not bucket:
            continue
        torch._foreach_mul_(bucket["v"], beta2)
        if kind == "full":
            torch._foreach_addcmul_(bucket["v"], bucket["x"], bucket["x"], 1 - beta2)
        else:
            torch._foreach_add_(bucket["v"], bucket["x"], alpha=1 - beta2)
        denoms = torch._foreach_sqrt(bucket["v"])
        torch._foreach_div_(denoms, bucket["bc2_sqrt"])
        torch._foreach_add_(denoms, eps)
        if kind == "compressed":
            denoms = [d.expand_as(p) for d, p in zip(denoms, bucket["p"])]
        torch._foreach_addcdiv_(bucket["p"], bucket["m"], denoms, bucket["neg_step_size"])


def sharded_step(optimizer: "SlimAdamW") -> None:
    """One SlimAdamW step for param groups holding DTensor parameters (FSDP2, tensor parallel).

    DTensor parameters are updated on their local shards with ``torch._foreach_*`` ops (the group's
    ``implementation`` applies to plain tensors only); plain tensors in the same groups take the
    ordinary single-process path. Communication: one
    all-reduce per (mesh, mesh dim) for all parameters whose compressed dims include a sharded dim
    (and all split parameters), of their compressed second-moment size; recorded in
    ``optimizer.comm_stats`` (``all_reduce_calls``, ``all_reduce_bytes`` of the last step).
    """
    from .functional import slimadamw
    from .optimizer import _as_float, _resolve_implementation

    per_group = [_collect(optimizer, group) for group in optimizer.param_groups]
    calls, nbytes = _all_reduce([item for items, _ in per_group for item in items])
    optimizer.comm_stats = {"all_reduce_calls": calls, "all_reduce_bytes": nbytes}
    for group, (items, plain) in zip(optimizer.param_groups, per_group):
        beta1, beta2 = (_as_float(b) for b in group["betas"])
        hyper = dict(
            lr=_as_float(group["lr"]), beta1=beta1, beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"]
        )
        _update(items, **hyper)
        if plain:
            specs = optimizer._group_specs(group)
            params = [group["params"][i] for i in plain]
            names = [optimizer._param_name(group, i) for i in plain]
            states = [optimizer._init_state(p, specs[i], n, group) for p, i, n in zip(params, plain, names)]
            slimadamw(
                params,
                [p.grad for p in params],
                [s["exp_avg"] for s in states],
                [s["exp_avg_sq"] for s in states],
                [s["step"] for s in states],
                [cached_segments(specs[i], p.shape, n) for p, i, n in zip(params, plain, names)],
                foreach=group["foreach"] is not False,
                implementation=_resolve_implementation(group.get("implementation"), group["foreach"]),
                **hyper,
            )
