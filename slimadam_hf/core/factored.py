"""The factored second moment of ``robust=True``: the rule's mean times the mean over the other dims.

A compressed segment keeps ``v_a``, the running mean of ``g**2`` over its dims ``D`` (the paper's
statistic). With ``robust=True`` it also keeps ``v_b``, the running mean over the remaining dims, and its
denominator uses their rank-one estimate of the full second moment (Adafactor's, Shazeer & Stern 2018)::

    v_hat = v_a * v_b / mean(v_a)

It equals the full ``v`` whenever ``v`` is a row scale times a column scale, where ``v_a`` alone keeps
only one of the two; it costs one entry per row plus one per column. A segment with nothing left to
factor (a full second moment, or one averaged over every dim) keeps the paper's update. (``mean(v_a)``
and ``mean(v_b)`` are the same running mean of ``g**2``; the update divides by ``mean(v_b)``, which is
whole on every rank also when ``v_a`` is sharded.)

A parameter's complements live in one tensor, ``exp_avg_sq_complement``, laid out like ``exp_avg_sq``:
the reduced shape for an unsplit parameter, flat and one part after another for a split one. Under FSDP2
it is replicated: each rank reduces its shard's share and one all-reduce completes it
(:mod:`slimadam_hf.distributed.dtensor`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor

from .compress_spec import Dims, Segment
from .reductions import mean_of_squares

STATE_KEY = "exp_avg_sq_complement"

Complements = tuple[Optional[Segment], ...]

_CACHE: dict[tuple, Complements] = {}


def complement_dims(dims: Optional[Dims], ndim: int) -> Optional[Dims]:
    """The dims ``dims`` leaves out, or ``None`` when there is nothing to factor (no dims, or all of them)."""
    if dims is None or len(dims) >= ndim:
        return None
    return tuple(d for d in range(ndim) if d not in dims)


def complement_segments(segs: Sequence[Segment], shape: Sequence[int]) -> Complements:
    """For each segment of a parameter of ``shape``: the segment averaged over its complement dims (its
    ``v_offset``/``v_shape`` place it in ``exp_avg_sq_complement``), or ``None`` when it is not factored."""
    key = (tuple(segs), tuple(shape))
    found = _CACHE.get(key)
    if found is not None:
        return found
    result: list[Optional[Segment]] = []
    offset = 0
    for seg in segs:
        if seg.window is not None or seg.v_box:
            raise ValueError("a factored second moment needs whole, unsharded segments")
        part_shape = list(shape)
        if seg.split_dim is not None:
            part_shape[seg.split_dim] = seg.size
        dims = complement_dims(seg.dims, len(shape))
        if dims is None:
            result.append(None)
            continue
        v_shape = tuple(1 if i in dims else n for i, n in enumerate(part_shape))
        result.append(Segment(seg.split_dim, seg.offset, seg.size, dims, offset, v_shape))
        offset += math.prod(v_shape)
    _CACHE[key] = tuple(result)
    return _CACHE[key]


def complement_shape(segs: Sequence[Segment], shape: Sequence[int]) -> Optional[tuple[int, ...]]:
    """Shape of ``exp_avg_sq_complement``; ``None`` when no segment is factored (no state then)."""
    comps = complement_segments(segs, shape)
    kept = [c for c in comps if c is not None]
    if not kept:
        return None
    if len(comps) == 1 and comps[0] is not None and comps[0].split_dim is None:
        return comps[0].v_shape
    return (sum(c.v_numel for c in kept),)


def complement_numel(segs: Sequence[Segment], shape: Sequence[int]) -> int:
    """Entries of ``exp_avg_sq_complement`` (0 when nothing is factored)."""
    found = complement_shape(segs, shape)
    return 0 if found is None else math.prod(found)


@dataclass(frozen=True)
class Complement:
    """One parameter's ``exp_avg_sq_complement`` as the update takes it.

    ``segments``: per compress segment, where its complement lives in ``tensor`` (with a box narrowing it to
    a shard's entries under FSDP2), or ``None`` (not factored). ``stats``: per segment, the mean of ``g**2``
    over the complement dims when it was reduced across ranks; ``None``: computed from the gradient.
    """

    tensor: Tensor
    segments: Complements
    stats: Optional[tuple[Optional[Tensor], ...]] = None

    @classmethod
    def of(cls, tensor: Tensor, segs: Sequence[Segment], shape: Sequence[int]) -> "Complement":
        return cls(tensor, complement_segments(segs, shape))

    def moment(self, k: int) -> Tensor:
        """Segment ``k``'s whole complement (every rank holds all of it)."""
        comp = self.segments[k]
        assert comp is not None
        return comp.second_moment_view(self.tensor)

    def statistic(self, k: int, grad_segment: Tensor) -> Tensor:
        """Segment ``k``'s new ``mean(g**2)`` over its complement dims."""
        if self.stats is not None and self.stats[k] is not None:
            return self.stats[k]
        comp = self.segments[k]
        return mean_of_squares(grad_segment, comp.dims, self.moment(k))


def factors(v_den: Tensor, w_den: Tensor, w: Tensor, bias_correction2_sqrt: float | Tensor) -> tuple[Tensor, Tensor]:
    """``(a, b)`` with ``sqrt(v_hat) / sqrt(bias correction) = a * b``, each as small as its moment:
    ``a = sqrt(v_den) / sqrt(bc2)``, ``b = sqrt(w_den / mean(w))`` (``*_den``: the entries this tensor's
    slice uses, ``w``: the segment's whole complement; a zero mean gives zero, not NaN)."""
    scale = w.mean().clamp_min(torch.finfo(w.dtype).tiny)
    return v_den.sqrt() / bias_correction2_sqrt, (w_den / scale).sqrt()


def complement_from_full(full: Tensor, segs: Sequence[Segment]) -> Optional[Tensor]:
    """``exp_avg_sq_complement`` from a full (parameter-shaped) second moment: each mean over its complement."""
    comps = complement_segments(segs, full.shape)
    pieces = [seg.view(full).mean(dim=c.dims, keepdim=True) for seg, c in zip(segs, comps) if c is not None]
    return _pack(pieces, segs, full.shape)


def complement_from_compressed(v: Tensor, segs: Sequence[Segment], shape: Sequence[int]) -> Optional[Tensor]:
    """A complement for a run that kept only ``v`` (a checkpoint saved without ``robust``): each segment's
    complement is its overall mean, so that ``v_hat == v`` at first and the factored estimate takes over
    as new gradients arrive."""
    comps = complement_segments(segs, shape)
    pieces = [
        seg.second_moment_view(v).mean().expand(c.v_shape) for seg, c in zip(segs, comps) if c is not None
    ]
    return _pack(pieces, segs, shape)


def _pack(pieces: list[Tensor], segs: Sequence[Segment], shape: Sequence[int]) -> Optional[Tensor]:
    target = complement_shape(segs, shape)
    if target is None:
        return None
    return torch.cat([piece.reshape(-1) for piece in pieces]).reshape(target).clone()
