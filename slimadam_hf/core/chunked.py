"""Updates done a chunk of rows at a time, so their float32 workspace stays a few MiB: an int8 first
moment (dequantized, updated, requantized per chunk) and the factored denominator of ``robust=True``."""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from .compress_spec import Segment
from .factored import Complement, factors
from . import quant
from .quant import QuantizedMomentum
from .reductions import mean_of_squares


# Elements of one parameter updated at a time when its momentum is int8: bounds the float32 workspace
# (dequantized moment, quantizer temporaries) to a few MiB whatever the parameter's size.
_CHUNK_ELEMS = 1 << 20


def row_chunks(param: Tensor) -> list[tuple[int, int]]:
    """``(first row, rows)`` pieces of ``param`` of about :data:`_CHUNK_ELEMS` elements (whole rows, so whole
    quantization blocks)."""
    rows = param.shape[0] if param.dim() > 1 else 1
    row_numel = param.numel() // max(rows, 1)
    step = max(1, _CHUNK_ELEMS // max(row_numel, 1))
    return [(r, min(step, rows - r)) for r in range(0, rows, step)]


def _chunk_pieces(seg: Segment, first: int, count: int) -> Optional[tuple[tuple[int, int], tuple[int, int]]]:
    """Rows of a chunk ``[first, first + count)`` that ``seg`` covers: (rows in the parameter, rows in the
    chunk); ``None`` when it covers none. Segments cut along dim 0 cover only their own rows."""
    if seg.split_dim != 0:
        return (first, count), (0, count)
    start, stop = max(first, seg.offset), min(first + count, seg.offset + seg.size)
    return None if start >= stop else ((start, stop - start), (start - first, stop - start))


def quantized_update(
    param: Tensor,
    grad: Tensor,
    exp_avg: QuantizedMomentum,
    exp_avg_sq: Tensor,
    step_t: Tensor,
    segs: Sequence[Segment],
    stats: Optional[Sequence[Tensor]],
    complement: Optional[Complement],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
) -> None:
    """One parameter with an int8 first moment: the statistics and ``v`` first (they need only ``g``), then
    the elementwise update chunk by chunk, each chunk's moment dequantized, updated, stored and used."""
    step_t += 1
    step = step_t.item()
    neg_step_size = -lr / (1 - beta1**step)
    bias_correction2_sqrt = (1 - beta2**step) ** 0.5
    if weight_decay != 0:
        param.mul_(1 - lr * weight_decay)
    denominators: list[tuple[Tensor, ...]] = []  # (denominator,) or the factors (a, b) of a factored one
    comps = (None,) * len(segs) if complement is None else complement.segments
    for k, (seg, comp) in enumerate(zip(segs, comps)):
        v = seg.second_moment_view(exp_avg_sq)
        g = seg.view(grad)
        if stats is not None:
            v.mul_(beta2).add_(stats[k], alpha=1 - beta2)
        elif seg.dims is None:
            g = g.to(v.dtype)
            v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        else:
            v.mul_(beta2).add_(mean_of_squares(g, seg.dims, v), alpha=1 - beta2)
        if comp is None:
            denominators.append(((seg.denominator_view(v).sqrt() / bias_correction2_sqrt).add_(eps),))
            continue
        w = complement.moment(k)
        w.mul_(beta2).add_(complement.statistic(k, g), alpha=1 - beta2)
        denominators.append(factors(seg.denominator_view(v), comp.denominator_view(w), w, bias_correction2_sqrt))
    per_row = quant.blocks_per_row(param.shape)
    for first, count in row_chunks(param):
        p_rows = param.narrow(0, first, count) if param.dim() > 1 else param
        g_rows = grad.narrow(0, first, count) if param.dim() > 1 else grad
        blocks = slice(first * per_row, (first + count) * per_row)
        chunk = QuantizedMomentum(exp_avg.codes[blocks], exp_avg.absmax[blocks], p_rows.shape)
        m_rows = chunk.store_(chunk.dequantize().lerp_(g_rows.float(), 1 - beta1))
        for seg, denom in zip(segs, denominators):
            pieces = _chunk_pieces(seg, first, count)
            if pieces is None:
                continue
            (p_first, rows), (m_first, _) = pieces
            if seg.split_dim == 0:
                p_view = param.narrow(0, p_first, rows)
                m_view = m_rows.narrow(0, m_first, rows)
                d_first = p_first - seg.offset
            else:
                p_view, m_view, d_first = seg.view(p_rows), seg.view(m_rows), p_first
            d = [x.narrow(0, d_first, rows) if param.dim() > 1 and x.shape[0] > 1 else x for x in denom]
            p_view.addcdiv_(m_view, d[0] if len(d) == 1 else (d[0] * d[1]).add_(eps), value=neg_step_size)


def factored_update_(p: Tensor, m: Tensor, a: Tensor, b: Tensor, eps: float, neg_step_size: float) -> None:
    """``p += neg_step_size * m / (a * b + eps)`` with ``a``, ``b`` broadcasting to ``p``, a chunk of rows at a
    time (the full-size denominator never exists)."""
    rows = p.shape[0] if p.dim() else 1
    per_row = max(1, p.numel() // max(rows, 1))
    step = max(1, _CHUNK_ELEMS // per_row)
    for first in range(0, rows, step):
        count = min(step, rows - first)
        pick = (lambda t: t.narrow(0, first, count) if t.dim() and t.shape[0] == rows and rows > 1 else t)
        denom = torch.mul(pick(a), pick(b)).add_(eps)
        pick(p).addcdiv_(pick(m), denom, value=neg_step_size)
