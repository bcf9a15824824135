"""SlimAdamW under DeepSpeed ZeRO 1, 2 and 3: exact statistics on flat partitions, then the usual update.

DeepSpeed's ZeRO optimizer wrappers replace each param group's tensors with ONE flat fp32 partition
(``DeepSpeedZeroOptimizer.single_partition_of_fp32_groups[i]`` for stages 1/2, one per sub-group
``DeepSpeedZeroOptimizer_Stage3.fp32_partitioned_groups_flat[k]`` for stage 3) and call
``optimizer.step()`` with only that group (stage 3: that sub-group) in place. This module maps the
partition back to the weights it holds and prepares one input of the shared update,
:func:`slimadam_hf.core.functional.slimadamw`:

* the wrapper that called ``step()`` is found once on the call stack (the frame whose ``self`` is a
  DeepSpeed object holding this optimizer as ``.optimizer``) and cached; every step checks that the
  cached wrapper still holds this optimizer and the partition;
* the layout of a partition (which contiguous range of which weight sits where, from the wrapper's own
  bookkeeping: ``round_robin_bit16_groups``/``_offsets``/``partition_size`` for stages 1/2, each
  parameter's ``ds_shape``/``partition_numel()`` for stage 3) is computed once per (optimizer,
  partition) and cached, keyed by the partition tensor and the wrapper's lists;
* a weight's range is cut into boxes (partial first row, whole rows, partial last row; generally at most
  ``2 * ndim - 1`` boxes), each a view of the partition with the weight's shape; every (box, compress
  segment) pair is a :class:`~slimadam_hf.core.compress_spec.Segment` with a ``window`` and a
  ``v_box``; the first one of a segment updates its second moment, the others ``share`` it;
* statistics: each rank sums ``g**2`` over the local entries of each row/column (divided by the global
  count), and one all-reduce per step (per process group and dtype) adds up those of the weights that a
  partition boundary cuts. A compressed weight's second moment is kept whole (its compressed shape,
  tiny) and identical on every rank that holds part of the weight; an uncompressed weight keeps ``v``
  for its local entries only, as AdamW under ZeRO does. ``exp_avg`` covers the partition.

Per partition the state is ``step``, ``exp_avg`` (partition-shaped, as AdamW's), ``slim_exp_avg_sq``
(every held weight's second moment, one flat float32 tensor), with ``robust=True``
``slim_exp_avg_sq_complement`` (every held compressed weight's complement, kept and reduced like its
second moment) and ``slim_zero_layout`` (the layout it was made for). DeepSpeed saves it per rank;
resuming at the same data-parallel world size is exact, another layout is refused.
"""

from __future__ import annotations

import sys
import weakref
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor

from ..core.compress_spec import second_moment_dtype
from ..core.factored import Complement
from ..core.functional import UpdateBatch
from ..core.quant import STATE_KEY as ABSMAX_KEY
from ..core.quant import RangeQuantizedMomentum
from ..core.reductions import sum_of_squares
from . import zero_layout
from .guards import UnsupportedShardingError, is_dtensor
from .zero_layout import Layout

# Per-optimizer caches, kept off the optimizer so that pickling or deep-copying it is unaffected.
_INDEX: "weakref.WeakKeyDictionary[Any, dict[int, tuple[Tensor, int]]]" = weakref.WeakKeyDictionary()
_PLAIN: "weakref.WeakKeyDictionary[Any, tuple]" = weakref.WeakKeyDictionary()
_WRAPPER: "weakref.WeakKeyDictionary[Any, Any]" = weakref.WeakKeyDictionary()
_TOTALS: "weakref.WeakKeyDictionary[Any, list[int]]" = weakref.WeakKeyDictionary()

SUPPORTED = {"DeepSpeedZeroOptimizer": "1/2", "DeepSpeedZeroOptimizer_Stage3": "3"}
V_KEY, LAYOUT_KEY = "slim_exp_avg_sq", "slim_zero_layout"
COMPLEMENT_KEY = "slim_exp_avg_sq_complement"  # robust=True


def remember_params(optimizer: Any, group: dict[str, Any]) -> None:
    """Record each parameter's index in its group: ZeRO later swaps the tensors for flat partitions."""
    index = _INDEX.setdefault(optimizer, {})
    for j, p in enumerate(group["params"]):
        index[id(p)] = (p, j)
    _PLAIN.pop(optimizer, None)


@dataclass
class ZeroStep:
    """What :meth:`SlimAdamW.step` needs under ZeRO: a batch per param group and the communication made."""

    batches: list[UpdateBatch]
    comm_stats: dict[str, int]


# -- finding the wrapper ------------------------------------------------------------------------


def _find_wrapper(optimizer: Any) -> Any:
    cached = _WRAPPER.get(optimizer)
    wrapper = cached() if cached is not None else None
    if wrapper is not None and getattr(wrapper, "optimizer", None) is optimizer:
        return wrapper
    frame = sys._getframe(1)
    while frame is not None:
        owner = frame.f_locals.get("self")
        if (
            owner is not None and type(owner).__module__.startswith("deepspeed.")
            and getattr(owner, "optimizer", None) is optimizer
        ):
            _WRAPPER[optimizer] = weakref.ref(owner)
            return owner
        frame = frame.f_back
    return None


def _refuse(what: str, instead: str) -> UnsupportedShardingError:
    return UnsupportedShardingError(f"SlimAdamW does not support {what}; {instead}")


def _check_supported(wrapper: Any) -> str:
    """The ZeRO stage of a supported wrapper; a one-line refusal naming the setting otherwise."""
    name = type(wrapper).__name__
    if name == "BF16_Optimizer":
        raise _refuse("DeepSpeed's BF16_Optimizer (bf16 with ZeRO stage 1 and data_types.grad_accum_dtype fp32)",
                      "drop data_types.grad_accum_dtype or use zero_optimization stage 2 (verified with bf16)")
    if name not in SUPPORTED:
        raise _refuse(f"the DeepSpeed optimizer wrapper {name} (flat master weights outside ZeRO 1/2/3)",
                      "use zero_optimization stage 1, 2 or 3 (fp32 or bf16), or fp32 with stage 0")
    if getattr(wrapper, "dtype", None) == torch.float16:
        raise _refuse("DeepSpeed fp16 (loss-scaled) training under ZeRO: not verified, DeepSpeed's CPU accelerator "
                      "has no fp16", "use bf16 ({\"bf16\": {\"enabled\": true}}) or fp32")
    if getattr(wrapper, "swap_optimizer", False):
        raise _refuse("offload_optimizer.device nvme (optimizer state swapping)",
                      "use offload_optimizer.device cpu or none")
    if getattr(wrapper, "elastic_checkpoint", False):
        raise _refuse("zero_optimization.elastic_checkpoint (it slices optimizer state as if it were flat)",
                      "set elastic_checkpoint false and resume at the same data-parallel world size")
    if getattr(wrapper, "zenflow", False):
        raise _refuse("DeepSpeed ZenFlow", "use plain ZeRO 1/2/3")
    return SUPPORTED[name]


# -- state and statistics -----------------------------------------------------------------------


def _state(state: dict[str, Any], flat: Tensor, layout: Layout, momentum_dtype: torch.dtype) -> dict[str, Any]:
    v_dtype = second_moment_dtype(flat.dtype)
    if not state:
        state["step"] = torch.tensor(0.0, dtype=torch.float32)
        state["exp_avg"] = torch.zeros_like(flat, dtype=momentum_dtype)
        if momentum_dtype == torch.int8:
            state[ABSMAX_KEY] = torch.zeros(layout.absmax_numel, dtype=torch.float32, device=flat.device)
        state[V_KEY] = torch.zeros(layout.v_numel, dtype=v_dtype, device=flat.device)
        if layout.complement_numel:
            state[COMPLEMENT_KEY] = torch.zeros(layout.complement_numel, dtype=v_dtype, device=flat.device)
        state[LAYOUT_KEY] = layout.fingerprint
        return state
    saved = state.get(LAYOUT_KEY)
    if saved != layout.fingerprint:
        what = "another optimizer's state" if saved is None else (
            f"data-parallel world size {saved.get('world_size')}, rank {saved.get('rank')}, "
            f"partition of {saved.get('numel')} elements")
        raise UnsupportedShardingError(
            f"SlimAdamW: the optimizer state of this DeepSpeed ZeRO partition was saved for {what}, but the live "
            f"partition is world size {layout.fingerprint['world_size']}, rank {layout.fingerprint['rank']}, "
            f"{layout.fingerprint['numel']} elements; resume a ZeRO checkpoint with the same world size, ZeRO "
            "stage and param groups it was saved with (universal/elastic resharding is not supported)"
        )
    if (state["exp_avg"].dtype == torch.int8) != (momentum_dtype == torch.int8):
        raise UnsupportedShardingError(
            f"SlimAdamW: this DeepSpeed ZeRO checkpoint holds a {state['exp_avg'].dtype} first moment and the live "
            f"optimizer stores it as {momentum_dtype}; resume with the momentum_dtype it was saved with"
        )
    if state[V_KEY].numel() != layout.v_numel:
        raise UnsupportedShardingError(f"SlimAdamW: ZeRO second moments have {state[V_KEY].numel()} entries, the "
                                       f"layout expects {layout.v_numel}; the checkpoint does not fit this run")
    if not layout.complement_numel:
        state.pop(COMPLEMENT_KEY, None)  # a robust checkpoint resumed with robust=False: the paper's update
    elif COMPLEMENT_KEY not in state or state[COMPLEMENT_KEY].numel() != layout.complement_numel:
        raise UnsupportedShardingError(
            "SlimAdamW: this DeepSpeed ZeRO checkpoint has no robust=True complement "
            f"({COMPLEMENT_KEY}) for this layout; resume it with robust=False, or start the optimizer fresh"
        )
    return state


def _statistics(
    layout: Layout, grad: Tensor, dtype: torch.dtype
) -> tuple[Tensor, list[Optional[Tensor]], list[Optional[Tensor]]]:
    """This rank's share of each segment's ``mean(g**2)`` (over its dims, and with ``robust`` over the
    complement dims) in one buffer, and the per-segment views of both."""
    buf = torch.zeros(layout.stat_numel, dtype=dtype, device=grad.device)
    per_kind: list[list[Optional[Tensor]]] = [[], []]
    for seg, *stat_of_kind in zip(layout.segments, layout.stat_segments, layout.complement_stat_segments):
        g: Optional[Tensor] = None  # the segment's gradient in the statistics' dtype, made once if needed
        for stats, stat in zip(per_kind, stat_of_kind):
            if stat is None:
                stats.append(None)
                continue
            stat_seg, count = stat
            target = stat_seg.second_moment_view(buf)
            stats.append(None if seg.shares_v else target)
            if g is None:
                g = seg.view(grad).to(dtype)
            if g.numel() == 0:
                continue
            part = g * g if stat_seg.dims is None else sum_of_squares(g, stat_seg.dims, dtype)
            stat_seg.denominator_view(target).add_(part, alpha=1.0 / count)
    return buf, per_kind[0], per_kind[1]


def _all_reduce(regions: list[tuple[Any, Tensor]], op: Any = None) -> tuple[int, int]:
    """All-reduce every region over its process group (sum, or ``op``), one call per group, dtype and device."""
    import torch.distributed as dist

    buckets: dict[tuple, list[Tensor]] = defaultdict(list)
    for pg, region in regions:
        buckets[(pg, region.dtype, region.device)].append(region)
    calls = nbytes = 0
    for (pg, _, device), parts in buckets.items():
        flat = parts[0] if len(parts) == 1 else torch.cat(parts)
        if device.type == "cpu" and dist.get_backend(pg) == "nccl":  # CPU-resident partitions, GPU collectives
            flat = flat.cuda()
        dist.all_reduce(flat, op=dist.ReduceOp.SUM if op is None else op, group=pg)
        calls += 1
        nbytes += flat.numel() * flat.element_size()
        if flat is not parts[0] or len(parts) > 1:
            offset = 0
            for part in parts:
                part.copy_(flat[offset : offset + part.numel()])
                offset += part.numel()
    return calls, nbytes


def _share_block_maxima(items: list[tuple[Layout, RangeQuantizedMomentum, Tensor, float]]) -> int:
    """int8 first moments: give each block that a partition boundary cuts its largest magnitude over the ranks
    (the momentum's ``floor``), so the partition stores the codes one process would. Each rank advances its
    moment and writes its blocks' local maxima into a table of boundaries; one all-reduce (max) per process
    group. Returns the calls made."""
    import torch.distributed as dist

    tables = []
    for layout, momentum, grad, beta1 in items:
        local = momentum.propose_floor(grad, 1 - beta1)
        table = torch.zeros(layout.boundary_numel, dtype=torch.float32, device=local.device)
        for slot, boundaries in layout.shared_blocks:
            index = torch.tensor(boundaries, device=local.device)
            table[index] = torch.maximum(table[index], local[slot])
        tables.append((layout, local, table))
    calls, _ = _all_reduce([(layout.pg, table) for layout, _, table in tables], dist.ReduceOp.MAX)
    for layout, local, table in tables:
        for slot, boundaries in layout.shared_blocks:
            local[slot] = torch.maximum(local[slot], table[list(boundaries)].max())
    return calls


def is_flattened(optimizer: Any) -> bool:
    """Whether a wrapper replaced a param group's tensors by flat ones since it was built (DeepSpeed ZeRO,
    FSDP1); FSDP2's per-tensor DTensors swapped in by accelerate do not count."""
    known = _INDEX.get(optimizer, {})
    return any(
        any(known.get(id(p), (None,))[0] is not p and not is_dtensor(p) for p in g["params"])
        or len(g["params"]) != len(g.get("compress") or g.get("param_names") or g["params"])
        for g in optimizer.param_groups
    )


def prepare_step(optimizer: Any, momentum_dtype: Any) -> Optional[ZeroStep]:
    """``None`` unless a DeepSpeed ZeRO wrapper swapped flat partitions into the param groups; else each
    group's update inputs with complete statistics (one all-reduce per process group and dtype).

    ``momentum_dtype(group, tensor)`` gives the dtype of a new ``exp_avg``.
    """
    key = tuple((id(g["params"]), len(g["params"])) for g in optimizer.param_groups)
    if _PLAIN.get(optimizer) == key:
        return None
    if not is_flattened(optimizer):
        _PLAIN[optimizer] = key
        return None
    known = _INDEX.get(optimizer, {})
    wrapper = _find_wrapper(optimizer)
    if wrapper is None:  # not DeepSpeed (FSDP2 DTensors swapped in, FSDP1, ...): check_before_step decides
        _PLAIN[optimizer] = key
        return None
    stage = _check_supported(wrapper)
    batches, regions, shared = [], [], []
    for group in optimizer.param_groups:
        batch = UpdateBatch()
        batches.append(batch)
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            continue
        if len(params) != 1:
            raise UnsupportedShardingError(
                f"SlimAdamW: a DeepSpeed ZeRO step handed {len(params)} tensors in one param group; expected one "
                "flat partition"
            )
        flat = params[0]
        layout = zero_layout.layout(optimizer, known, wrapper, stage, group, flat)
        state = _state(optimizer.state[flat], flat, layout, momentum_dtype(group, flat))
        buf, stats, complement_stats = _statistics(layout, flat.grad, state[V_KEY].dtype)
        if layout.reduce_numel:
            regions.append((layout.pg, buf[: layout.reduce_numel]))
        complement = None if not layout.complement_numel else Complement(
            state[COMPLEMENT_KEY], layout.complement_segments, tuple(complement_stats))
        exp_avg = state["exp_avg"]
        if exp_avg.dtype == torch.int8:
            exp_avg = RangeQuantizedMomentum(exp_avg, state[ABSMAX_KEY], flat.shape, layout.ranges)
            shared.append((layout, exp_avg, flat.grad, float(group["betas"][0])))
        noise = tuple((r.offset, r.numel, j, r.start) for r, j in zip(layout.ranges, layout.range_positions))
        batch.add(flat, flat.grad, exp_avg, state[V_KEY], state["step"], layout.segments, stats, complement, noise)
    calls, nbytes = _all_reduce(regions)
    max_calls = _share_block_maxima(shared)
    totals = _TOTALS.setdefault(optimizer, [0, 0, 0])
    totals[0] += calls
    totals[1] += nbytes
    totals[2] += max_calls
    return ZeroStep(batches, {"all_reduce_calls": calls, "all_reduce_bytes": nbytes, "max_all_reduce_calls": max_calls,
                              "total_all_reduce_calls": totals[0], "total_all_reduce_bytes": totals[1],
                              "total_max_all_reduce_calls": totals[2]})


def _held(optimizer: Any, key: str) -> list[tuple[Layout, Tensor]]:
    """Each partition's layout and its state tensor ``key``, after a ZeRO step."""
    out = []
    for flat_id, layout in zero_layout.layouts(optimizer).items():
        flat = next((p for p in optimizer.state if id(p) == flat_id), None)
        if flat is not None and key in optimizer.state[flat]:
            out.append((layout, optimizer.state[flat][key]))
    return out


def second_moments(optimizer: Any) -> dict[str, tuple[Tensor, Optional[tuple[int, int]]]]:
    """This rank's second moments by parameter name, after a ZeRO step: ``(v, None)`` for compressed
    weights (whole, compressed shape flattened; split weights: every part, as a single process keeps
    them) and ``(v, (start, numel))`` for uncompressed ones (the local elements of the flattened weight)."""
    return {name: (v.narrow(0, offset, numel), local)
            for layout, v in _held(optimizer, V_KEY) for name, offset, numel, local in layout.named}


def complements(optimizer: Any) -> dict[str, Tensor]:
    """``robust=True``: this rank's ``exp_avg_sq_complement`` of each compressed weight it holds part of,
    by name (whole and flattened, as a single process keeps it), after a ZeRO step."""
    return {name: w.narrow(0, offset, numel)
            for layout, w in _held(optimizer, COMPLEMENT_KEY) for name, offset, numel in layout.complement_named}


def first_moments(optimizer: Any) -> dict[str, tuple[Tensor, tuple[int, int]]]:
    """This rank's first moments by parameter name, after a ZeRO step: ``(values, (start, numel))``, the float32
    values (int8 codes read back) of the local elements of the flattened weight."""
    out = {}
    for layout, m in _held(optimizer, "exp_avg"):
        if m.dtype == torch.int8:
            state = next(s for s in optimizer.state.values() if s.get("exp_avg") is m)
            m = RangeQuantizedMomentum(m, state[ABSMAX_KEY], m.shape, layout.ranges).dequantize()
        for name, r in zip(layout.range_names, layout.ranges):
            out[name] = (m.narrow(0, r.offset, r.numel).float(), (r.start, r.numel))
    return out
