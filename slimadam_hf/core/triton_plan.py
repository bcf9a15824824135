"""The job tables of ``implementation="triton"``: which kernel does what to which bytes.

A plan is built once per set of tensors (the cache is keyed by their identities and checked through weak
references) and then reused every step: only the gradients' addresses, the statistics a sharded step hands
in, the scratch buffer and the stochastic-rounding seeds change, and :meth:`Plan.tables` writes them into
a copy of the static table. Every segment of a parameter (:class:`~slimadam_hf.core.compress_spec.Segment`)
becomes one or more 2-D jobs: windows of ``rows`` x ``cols`` elements with a row stride, whose second moment
(and ``robust=True`` complement) is addressed by a row and a column stride, 0 where it is averaged.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch
from torch import Tensor

from . import quant
from .compress_spec import Segment
from .factored import Complement
from .quant import QuantizedMomentum
from .rounding import Noise

from .triton_layout import (
    FIRST, G, KIND_FULL, KIND_PRE, KIND_ROWSTAT, MEAN, MOMENTUM_FLOAT, MOMENTUM_INT8, MOMENTUM_STOCHASTIC,
    NOISE_OFF, NOISE_SEED, ROWS,
)

FLAT_WIDTH = 1024  # a contiguous full-moment tensor is walked as rows of this many elements
STATS_ROWS = 32  # rows per program of the statistics kernel (the partial column sums are 1/32 of g)
_NO_LIMIT = 1 << 62
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class NotCovered(Exception):
    """A parameter the kernels do not step (it takes the foreach path in the same step)."""


def _addr(t: Tensor) -> int:
    return t.data_ptr()


def _matrices(p: Tensor, v: Tensor, w: Optional[Tensor]) -> list[tuple[Tensor, Tensor, Optional[Tensor]]]:
    """``p`` (a parameter slice) with ``v`` (and ``w``) expanded to its shape, as 2-D views with unit column
    stride; a tensor no split of its dims can view so is cut along dim 0 when its moments are not averaged
    over it."""
    if p.dim() == 0:
        p, v, w = p.view(1), v.reshape(1), None if w is None else w.reshape(1)
    if p.dim() == 1:
        return [(p.view(1, -1), v.view(1, -1), None if w is None else w.view(1, -1))]
    for k in range(1, p.dim()):
        rows, cols = math.prod(p.shape[:k]), math.prod(p.shape[k:])
        try:
            views = [t.view(rows, cols) for t in (p, v, w) if t is not None]
        except RuntimeError:
            continue
        if views[0].stride(1) == 1 or cols == 1:
            return [tuple(views) + ((None,) if w is None else ())]  # type: ignore[list-item]
    if p.dim() >= 3 and v.stride(0) != 0 and (w is None or w.stride(0) != 0):
        return [m for e in range(p.shape[0]) for m in _matrices(p[e], v[e], None if w is None else w[e])]
    raise NotCovered


def _flat_rows(n: int) -> int:
    return max(1, -(-n // FLAT_WIDTH))


@dataclass
class _Builder:
    """Rows of the four tables, and what each step writes into them."""

    update: dict[tuple, list[list[int]]] = field(default_factory=dict)
    stats: dict[torch.dtype, list[list[int]]] = field(default_factory=dict)
    ema: list[list[int]] = field(default_factory=list)
    ema_scales: list[float] = field(default_factory=list)
    means: list[list[int]] = field(default_factory=list)
    scratch: int = 0  # float32 elements
    # (table, bucket, row, field) -> per-step value: ('grad', i, byte offset) | ('scratch',) | ('stat', i, k, which)
    # | ('noise', i)
    patches: list[tuple[tuple, tuple]] = field(default_factory=list)

    def take(self, elements: int) -> int:
        start, self.scratch = self.scratch, self.scratch + elements
        return start * 4


@dataclass
class Plan:
    """One set of tensors' tables, all in one flat int64 tensor (one copy to the device per step), and where
    each step writes its own addresses into it."""

    refs: list[weakref.ref]
    covered: list[int]
    static: Tensor
    slices: dict[tuple, tuple[int, int]]  # ("update", bucket) | ("stats", dtype) | ("ema",) | ("means",) -> span
    job_of: dict[tuple, Tensor]  # the same keys but ("means",) -> program -> job, on the device
    ema_scales: Optional[Tensor]
    scratch: int  # float32 elements
    grad_at: Tensor  # positions in static written with grads[grad_param[j]] + grad_offset[j]
    grad_param: Tensor
    grad_offset: Tensor
    scratch_at: Tensor  # positions that hold an offset into the scratch buffer
    stat_at: list[tuple[int, tuple]]  # positions written with a handed-in statistic's address
    noise_at: list[tuple[int, int]]  # positions written with a parameter's stochastic-rounding seed
    device: torch.device

    def alive(self, tensors: Sequence[Any]) -> bool:
        return len(tensors) == len(self.refs) and all(r() is t for r, t in zip(self.refs, tensors))


def _first_programs(rows: Sequence[list[int]], programs: Sequence[int], first_field: int,
                    device: torch.device) -> Tensor:
    """Write each job's first program into its row; return ``job_of``, the job of every program."""
    counts = torch.tensor(programs, dtype=torch.int64)
    for row, first in zip(rows, (torch.cumsum(counts, 0) - counts).tolist()):
        row[first_field] = first
    return torch.repeat_interleave(torch.arange(len(rows), dtype=torch.int32), counts).to(device)


def build_plan(
    params: Sequence[Tensor], grads: Sequence[Tensor], exp_avgs: Sequence[Any], exp_avg_sqs: Sequence[Tensor],
    param_segments: Sequence[Sequence[Segment]], stats: Sequence[Any], noise: Sequence[Optional[Noise]],
    complements: Sequence[Optional[Complement]], tensors: Sequence[Any], ema_block: int,
) -> Plan:
    """The plan of a batch; parameters the kernels do not cover are left out of ``covered``."""
    builder, covered = _Builder(), []
    for i, args in enumerate(zip(params, grads, exp_avgs, exp_avg_sqs, param_segments, stats, noise, complements)):
        snapshot = (len(builder.patches), builder.scratch, {k: len(v) for k, v in builder.update.items()},
                    {k: len(v) for k, v in builder.stats.items()}, len(builder.ema), len(builder.means))
        try:
            _add_parameter(builder, i, *args)
            covered.append(i)
        except NotCovered:
            _rollback(builder, snapshot)
    device = params[0].device
    tables: dict[tuple, list[list[int]]] = {}
    job_of: dict[tuple, Tensor] = {}
    for bucket, rows in builder.update.items():
        tables["update", bucket] = rows
        job_of["update", bucket] = _first_programs(rows, [r[ROWS] for r in rows], FIRST, device)
    for dtype, rows in builder.stats.items():
        tables["stats", dtype] = rows
        job_of["stats", dtype] = _first_programs(rows, [-(-r[1] // STATS_ROWS) for r in rows], 6, device)
    if builder.ema:
        tables["ema", None] = builder.ema
        job_of["ema", None] = _first_programs(builder.ema, [-(-r[2] // ema_block) for r in builder.ema], 5, device)
    if builder.means:
        tables["means", None] = builder.means
    slices, flat, at = {}, [], 0
    for key, rows in tables.items():
        width = len(rows[0])
        slices[key] = (at, width * len(rows))
        flat.extend(value for row in rows for value in row)
        at += width * len(rows)
    grads, scratch, stat_at, noise_at = [], [], [], []
    for (table, bucket, row, field_), source in builder.patches:
        pos = slices[table, bucket][0] + row * len(tables[table, bucket][0]) + field_
        if source[0] == "grad":
            grads.append((pos, source[1], source[2]))
        elif source[0] == "scratch":
            scratch.append(pos)
        elif source[0] == "stat":
            stat_at.append((pos, source[1:]))
        else:
            noise_at.append((pos, source[1]))
    grad_at, grad_param, grad_offset = (torch.tensor(c, dtype=torch.int64) for c in zip(*grads)) if grads else (
        torch.zeros(0, dtype=torch.int64),) * 3
    scales = torch.tensor(builder.ema_scales, dtype=torch.float32, device=device) if builder.ema else None
    return Plan([weakref.ref(t) for t in tensors], covered, torch.tensor(flat, dtype=torch.int64), slices, job_of,
                scales, builder.scratch, grad_at, grad_param, grad_offset, torch.tensor(scratch, dtype=torch.int64),
                stat_at, noise_at, device)


def _rollback(builder: _Builder, snapshot: tuple) -> None:
    patches, scratch, update, stats, ema, means = snapshot
    del builder.patches[patches:]
    builder.scratch = scratch
    for table, sizes in ((builder.update, update), (builder.stats, stats)):
        for key in list(table):
            del table[key][sizes.get(key, 0):]
            if not table[key]:
                del table[key]
    del builder.ema[ema:], builder.ema_scales[ema:], builder.means[means:]


def _add_parameter(builder: _Builder, i: int, param: Tensor, grad: Tensor, exp_avg: Any, exp_avg_sq: Tensor,
                   segs: Sequence[Segment], stats: Any, noise: Optional[Noise],
                   complement: Optional[Complement]) -> None:
    if not isinstance(exp_avg, (Tensor, QuantizedMomentum)):
        raise NotCovered  # a shard's int8 ranges (RangeQuantizedMomentum)
    int8 = isinstance(exp_avg, QuantizedMomentum)
    m_tensor = exp_avg.codes if int8 else exp_avg
    if (param.dtype not in _FLOAT_DTYPES or grad.dtype != param.dtype or not grad.is_contiguous()
            or exp_avg_sq.dtype != torch.float32 or not param.is_contiguous()
            or not m_tensor.is_contiguous() or param.numel() == 0 or (not int8 and m_tensor.dtype not in _FLOAT_DTYPES)
            or (complement is not None and (complement.tensor.dtype != torch.float32
                                            or not complement.tensor.is_contiguous()))):
        raise NotCovered
    if int8:
        momentum = MOMENTUM_INT8
    elif noise is not None and m_tensor.dtype == torch.bfloat16:
        if noise.pieces:
            raise NotCovered  # several weights' ranges (a ZeRO partition), each with its own noise
        momentum = MOMENTUM_STOCHASTIC
    else:
        momentum = MOMENTUM_FLOAT
    bucket = (param.dtype, m_tensor.dtype, momentum)
    comps = (None,) * len(segs) if complement is None else complement.segments
    first_job = len(builder.update.get(bucket, []))
    for k, (seg, comp) in enumerate(zip(segs, comps)):
        _add_segment(builder, i, k, bucket, param, exp_avg, exp_avg_sq, seg, stats, complement, comp)
    if momentum == MOMENTUM_STOCHASTIC:  # positions in the whole parameter: a shard starts at its offset
        for job in builder.update.get(bucket, [])[first_job:]:
            job[NOISE_OFF] += noise.offset


def _add_segment(builder: _Builder, i: int, k: int, bucket: tuple, param: Tensor, exp_avg: Any, exp_avg_sq: Tensor,
                 seg: Segment, stats: Any, complement: Optional[Complement], comp: Optional[Segment]) -> None:
    int8 = bucket[2] == MOMENTUM_INT8
    stat = None if stats is None else stats[k]
    v_whole = seg.second_moment_view(exp_avg_sq)
    p_view = seg.view(param)
    if p_view.numel() == 0 and stat is None:
        return
    w_whole = None if comp is None else complement.moment(k)
    w_stat = None if comp is None or complement.stats is None else complement.stats[k]
    handed = stat is not None or seg.shares_v
    if comp is not None and handed != (w_stat is not None or seg.shares_v):
        raise NotCovered
    if handed:
        for which, target in (("v", v_whole), ("w", w_whole)):
            if target is not None and not seg.shares_v:
                if not target.is_contiguous():
                    raise NotCovered
                _ema(builder, target, ("stat", i, k, which), None, target.numel(), 1, 0, 1.0)
    v_exp = seg.denominator_view(v_whole).expand(p_view.shape)
    w_exp = None if comp is None else comp.denominator_view(w_whole).expand(p_view.shape)
    mean_at = None
    if comp is not None:
        if not w_whole.is_contiguous():
            raise NotCovered
        mean_at = builder.take(1)
        builder.means.append([_addr(w_whole), w_whole.numel(), mean_at])
        builder.patches.append((("means", None, len(builder.means) - 1, 2), ("scratch",)))
    if p_view.numel() == 0:
        return
    for p2, v2, w2 in _matrices(p_view, v_exp, w_exp):
        _add_job(builder, i, bucket, param, exp_avg, seg, p2, v2, w2, handed, mean_at, int8)


def _add_job(builder: _Builder, i: int, bucket: tuple, param: Tensor, exp_avg: Any, seg: Segment, p2: Tensor,
             v2: Tensor, w2: Optional[Tensor], handed: bool, mean_at: Optional[int], int8: bool) -> None:
    rows, cols = p2.shape
    vr, vc = v2.stride()
    esize = param.element_size()
    offset = (_addr(p2) - _addr(param)) // esize
    full = seg.dims is None and not handed
    flat = full and p2.is_contiguous() and v2.is_contiguous() and (not int8 or param.dim() < 2)
    if flat:
        n = rows * cols
        rows, cols, p_ld, vr, vc, n_valid = _flat_rows(n), FLAT_WIDTH, FLAT_WIDTH, FLAT_WIDTH, 1, n
        cols_pad, n_pad = FLAT_WIDTH, -(-n // quant.BLOCK) * quant.BLOCK
    else:
        p_ld, n_valid, n_pad = p2.stride(0), _NO_LIMIT, _NO_LIMIT
        cols_pad = -(-cols // quant.BLOCK) * quant.BLOCK
    if int8:
        m_addr, m_ld, s_addr, s_ld = _int8_window(exp_avg, param, offset, cols, p_ld, flat)
    else:  # the first moment is laid out as the parameter (both contiguous)
        m_addr, m_ld, s_addr, s_ld = _addr(exp_avg) + offset * exp_avg.element_size(), p_ld, 0, 0
    row_unique = vr != 0 or rows == 1
    if full:
        kind = KIND_FULL
    elif handed:
        kind = KIND_PRE
    elif vc == 0 and row_unique and w2 is None:
        kind = KIND_ROWSTAT
    else:
        kind = KIND_PRE
        _statistics(builder, i, p2, v2, w2, offset * esize)
    w_addr, wr, wc = (0, 0, 0) if w2 is None else (_addr(w2), *w2.stride())
    job = [_addr(p2), 0, m_addr, s_addr, rows, cols, p_ld, p_ld, m_ld, s_ld, n_valid, n_pad, cols_pad, kind, _addr(v2), vr, vc,
           w_addr, wr, wc, 0 if mean_at is None else mean_at, 0, offset, 0, i]
    table = builder.update.setdefault(bucket, [])
    table.append(job)
    builder.patches.append((("update", bucket, len(table) - 1, G), ("grad", i, offset * esize)))
    if mean_at is not None:
        builder.patches.append((("update", bucket, len(table) - 1, MEAN), ("scratch",)))
    if bucket[2] == MOMENTUM_STOCHASTIC:
        builder.patches.append((("update", bucket, len(table) - 1, NOISE_SEED), ("noise", i)))


def _int8_window(exp_avg: QuantizedMomentum, param: Tensor, offset: int, cols: int, p_ld: int,
                 flat: bool) -> tuple[int, int, int, int]:
    """Where a job's codes and block scales start, and their row strides: blocks lie in the parameter's rows,
    so a job must start on a block and either end on one or at its row's end."""
    per_row = quant.blocks_per_row(param.shape)
    row_len = per_row * quant.BLOCK
    if flat:  # a 1-D parameter, one row of blocks walked FLAT_WIDTH at a time
        if offset != 0:
            raise NotCovered
        return _addr(exp_avg.codes), FLAT_WIDTH, _addr(exp_avg.absmax), FLAT_WIDTH // quant.BLOCK
    _, param_cols = quant.rows_and_cols(param.shape)
    first_row, first_col = divmod(offset, param_cols)
    if (p_ld != param_cols or first_col % quant.BLOCK or (cols % quant.BLOCK and first_col + cols != param_cols)):
        raise NotCovered
    block = first_row * per_row + first_col // quant.BLOCK
    return (_addr(exp_avg.codes) + first_row * row_len + first_col, row_len,
            _addr(exp_avg.absmax) + 4 * block, per_row)


def _ema(builder: _Builder, target: Tensor, source: tuple, scratch_at: Optional[int], n: int, parts: int,
         stride: int, scale: float) -> None:
    builder.ema.append([_addr(target), 0 if scratch_at is None else scratch_at, n, parts, stride, 0])
    builder.ema_scales.append(scale)
    builder.patches.append((("ema", None, len(builder.ema) - 1, 1), source))


def _statistics(builder: _Builder, i: int, p2: Tensor, v2: Tensor, w2: Optional[Tensor], g_offset: int) -> None:
    """The statistics pass of a job whose second moment (or complement) is not kept per row of it."""
    rows, cols = p2.shape
    blocks = -(-rows // STATS_ROWS)
    need_part = need_rows = False
    targets = []
    for moment in (v2, w2):
        if moment is None:
            continue
        mr, mc = moment.stride()
        if mr == 0 and mc != 0:  # per column: the partial column sums, folded
            if mc != 1:
                raise NotCovered
            need_part = True
            targets.append((moment, "part", cols, blocks, cols, 1.0 / rows))
        elif mc == 0 and mr != 0:  # per row
            if mr != 1:
                raise NotCovered
            need_rows = True
            targets.append((moment, "rows", rows, 1, 0, 1.0 / cols))
        elif mr == 0 and mc == 0:  # one mean
            need_rows = True
            targets.append((moment, "rows", 1, rows, 1, 1.0 / (rows * cols)))
        else:
            raise NotCovered
    part_at = builder.take(blocks * cols) if need_part else None
    rows_at = builder.take(rows) if need_rows else None
    table = builder.stats.setdefault(p2.dtype, [])
    table.append([0, rows, cols, p2.stride(0), 0 if part_at is None else part_at, 0 if rows_at is None else rows_at, 0])
    builder.patches.append((("stats", p2.dtype, len(table) - 1, 0), ("grad", i, g_offset)))
    for at, field_ in ((part_at, 4), (rows_at, 5)):
        if at is not None:
            builder.patches.append((("stats", p2.dtype, len(table) - 1, field_), ("scratch",)))
    for moment, source, n, parts, stride, scale in targets:
        _ema(builder, moment, ("scratch",), part_at if source == "part" else rows_at, n, parts, stride, scale)
