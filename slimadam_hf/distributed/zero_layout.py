"""Where each weight of a DeepSpeed ZeRO flat partition sits, as segments of one flat update input.

For :mod:`slimadam_hf.distributed.zero`. A partition holds a contiguous range of each of several weights
(the flattened param group, stages 1/2; every weight's own slice, stage 3). A weight's range is cut
into boxes (partial first row, whole rows, partial last row; at most ``2 * ndim - 1``), each a view of
the partition with the weight's number of dims; every (box, compress segment) pair becomes a
:class:`~slimadam_hf.core.compress_spec.Segment` with a ``window`` and a ``v_box``. Layouts are built
from the wrapper's own bookkeeping once per (optimizer, partition) and cached.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass
from typing import Any, Optional

from torch import Tensor

from ..core.compress_spec import Segment, second_moment_numel, segments
from ..core.factored import complement_numel, complement_segments
from ..core.quant import Range, block_of_position, block_span
from .guards import UnsupportedShardingError

# Per-optimizer cache, kept off the optimizer so that pickling or deep-copying it is unaffected.
_LAYOUTS: "weakref.WeakKeyDictionary[Any, dict]" = weakref.WeakKeyDictionary()


@dataclass
class Layout:
    """A partition's weights as segments of one flat item, and how their statistics are gathered."""

    key: tuple
    pg: Any  # the process group that partitions this group
    fingerprint: dict[str, Any]
    v_numel: int
    stat_numel: int
    reduce_numel: int  # statistics [0, reduce_numel) are summed over the process group
    segments: tuple[Segment, ...]
    stat_segments: tuple[Optional[tuple[Segment, int]], ...]  # per segment: its statistic's view and count
    named: tuple[tuple[str, int, int, Optional[tuple[int, int]]], ...]  # name, v offset, v numel, local range
    # robust=True: every compressed weight's complement (whole, one after another; 0 entries without
    # robust), and per segment where its complement and that statistic live (None: not factored)
    complement_numel: int
    complement_segments: tuple[Optional[Segment], ...]
    complement_stat_segments: tuple[Optional[tuple[Segment, int]], ...]
    complement_named: tuple[tuple[str, int, int], ...]  # name, complement offset, numel
    # each held weight's local range (the first moment's view of it: stochastic rounding's noise, int8 blocks);
    # for momentum_dtype="int8" its blocks' scale slots (one more for the padding) and, per block shared with
    # other ranks, its slot and its entries in the group's table of boundaries
    ranges: tuple[Range, ...] = ()
    range_names: tuple[str, ...] = ()  # the weight of each range
    range_positions: tuple[int, ...] = ()  # and its index in the param group
    absmax_numel: int = 1
    shared_blocks: tuple[tuple[int, tuple[int, ...]], ...] = ()
    boundary_numel: int = 0


def _boxes(shape: tuple[int, ...], start: int, stop: int) -> list[tuple[int, tuple[int, ...], tuple[int, ...]]]:
    """Cut the flat range ``[start, stop)`` of a row-major tensor of ``shape`` into boxes.

    Each box is ``(flat start, offset, box shape)``: indices fixed on the leading dims, a range on one
    dim, whole trailing dims; so it is a contiguous run that views as a tensor of ``len(shape)`` dims.
    """
    out: list[tuple[int, tuple[int, ...], tuple[int, ...]]] = []
    ndim = len(shape)

    def cut(dim: int, base: int, lo: int, hi: int, prefix: tuple[int, ...]) -> None:
        if lo >= hi:
            return
        inner = math.prod(shape[dim + 1 :])
        if dim == ndim - 1:
            out.append((base + lo, prefix + (lo,), (1,) * dim + (hi - lo,)))
            return
        (r0, c0), (r1, c1) = divmod(lo, inner), divmod(hi, inner)
        if r0 == r1:
            cut(dim + 1, base + r0 * inner, c0, c1, prefix + (r0,))
            return
        if c0:
            cut(dim + 1, base + r0 * inner, c0, inner, prefix + (r0,))
            r0 += 1
        if r1 > r0:
            out.append((base + r0 * inner, prefix + (r0,) + (0,) * (ndim - dim - 1),
                        (1,) * dim + (r1 - r0,) + tuple(shape[dim + 1 :])))
        if c1:
            cut(dim + 1, base + r1 * inner, 0, c1, prefix + (r1,))

    cut(0, 0, start, stop, ())
    return out


def _stage12_entries(wrapper: Any, i: int, rank: int) -> list[tuple]:
    """Per weight of ZeRO-1/2 group ``i`` (flat order): (param, shape, first local element, local count,
    its offset in the partition, cut by a boundary?, its offset in the partitioned flat, the partition size)."""
    params = wrapper.round_robin_bit16_groups[i]
    offsets = getattr(wrapper, "round_robin_bit16_offsets", None)
    offsets = offsets[i] if offsets else [sum(p.numel() for p in params[:k]) for k in range(len(params))]
    metas = getattr(wrapper, "round_robin_bit16_meta", None)
    shapes = [tuple(m.shape) for m in metas[i]] if metas else [tuple(p.shape) for p in params]
    size = int(wrapper.partition_size[i])
    start = rank * size
    out = []
    for p, off, shape in zip(params, offsets, shapes):
        numel = math.prod(shape)
        lo, hi = max(off, start), min(off + numel, start + size)
        cut = numel > 0 and off // size != (off + numel - 1) // size
        out.append((p, shape, lo - off, max(0, hi - lo), lo - start, cut, off, size))
    return out


def _stage3_entries(wrapper: Any, k: int, rank: int) -> list[tuple]:
    """The same for ZeRO-3 sub-group ``k``: each weight is partitioned on its own (rank r holds elements
    ``[r * partition_numel, (r + 1) * partition_numel)``, the last rank padded)."""
    out, offset = [], 0
    for p in wrapper.fp16_groups[k]:
        shape, numel, size = tuple(p.ds_shape), int(p.ds_numel), int(p.partition_numel())
        lo, hi = min(rank * size, numel), min(rank * size + size, numel)
        out.append((p, shape, lo, hi - lo, offset, numel > size, 0, size))
        offset += size
    return out


def _locate(wrapper: Any, stage: str, flat: Tensor) -> tuple[int, Any, list]:
    """Which of the wrapper's partitions ``flat`` is, its process group and its weights."""
    import torch.distributed as dist

    if stage == "3":
        parts = wrapper.fp32_partitioned_groups_flat
        k = next((n for n, t in enumerate(parts) if t is flat), None)
        if k is None:
            raise RuntimeError("SlimAdamW: a ZeRO-3 step handed a tensor that is none of the wrapper's partitions")
        groups = getattr(wrapper, "sub_group_process_groups", None)
        pg = groups[k] if groups else wrapper.dp_process_group
        return k, pg, _stage3_entries(wrapper, k, dist.get_rank(group=pg))
    parts = wrapper.single_partition_of_fp32_groups
    i = next((n for n, t in enumerate(parts) if t is flat), None)
    if i is None:
        raise RuntimeError("SlimAdamW: a ZeRO-1/2 step handed a tensor that is none of the wrapper's partitions")
    pg = wrapper.real_dp_process_group[i]
    return i, pg, _stage12_entries(wrapper, i, dist.get_rank(group=pg))


_Placed = tuple[Segment, Segment, int]  # a segment, its statistic's segment, the statistic's count


def _weight_segments(
    shape: tuple[int, ...], spec: Any, name: str, local: tuple[int, int, int], v_offset: int, stat_offset: int,
    complement: Optional[tuple[int, int]] = None,
) -> list[tuple[_Placed, Optional[_Placed]]]:
    """A compressed or split weight's segments on this rank, each with its complement's (or ``None``).

    ``local`` is (first held element, held count, its offset in the partition); ``complement`` (robust=True)
    is where the weight's complement and its statistics start. Per compress segment the first entry
    updates the second moment (and complement), the others (``shares_v``) only read them; a split part
    this rank holds nothing of still gets an empty entry that updates its (replicated) moments.
    """
    start, numel, partition_offset = local
    boxes = _boxes(shape, start, start + numel)
    gsegs = segments(spec, shape, name)
    gcomps = complement_segments(gsegs, shape) if complement is not None else (None,) * len(gsegs)
    out = []
    for gseg, gcomp in zip(gsegs, gcomps):
        sd = gseg.split_dim
        seg_shape = [gseg.size if d == sd else s for d, s in enumerate(shape)]

        def place(box: tuple, cut: tuple, shares: bool) -> tuple[_Placed, Optional[_Placed]]:
            placed = _triple(gseg, shape, box, cut, v_offset, stat_offset, shares, seg_shape)
            if gcomp is None:
                return placed, None
            return placed, _triple(gcomp, shape, box, cut, *complement, shares, seg_shape)

        first = True
        for flat_start, off, bshape in boxes:
            if sd is None:
                local_start, length, box_start = 0, bshape[0], 0
            else:
                lo, hi = max(gseg.offset, off[sd]), min(gseg.offset + gseg.size, off[sd] + bshape[sd])
                if hi <= lo:
                    continue
                local_start, length, box_start = lo - off[sd], hi - lo, lo - gseg.offset
            out.append(place((flat_start - start + partition_offset, off, bshape), (local_start, length, box_start),
                             not first))
            first = False
        if first:
            flat_start, off, bshape = boxes[0]
            out.append(place((flat_start - start + partition_offset, off, bshape), (0, 0, 0), False))
    return out


def _triple(gseg: Segment, shape: tuple[int, ...], box: tuple, cut: tuple, v_offset: int, stat_offset: int,
            shares: bool, seg_shape: list[int]) -> _Placed:
    """``gseg`` (a weight's segment, or its complement) placed on one box of the partition."""
    window_start, off, bshape = box
    local_start, length, box_start = cut
    sd, dims = gseg.split_dim, set(gseg.dims or ())
    v_box = tuple(
        (d, box_start, length) if d == sd else (d, off[d], bshape[d])
        for d in range(len(shape))
        if d not in dims and (d == sd or bshape[d] != shape[d])
    )
    common = dict(split_dim=sd, offset=local_start, size=length if sd is not None else bshape[0], dims=gseg.dims,
                  v_shape=gseg.v_shape, v_box=v_box, window=(window_start, tuple(bshape)))
    seg = Segment(v_offset=v_offset + gseg.v_offset, shares_v=shares, **common)
    count = math.prod(seg_shape[d] for d in dims) if dims else 1
    return seg, Segment(v_offset=stat_offset + gseg.v_offset, **common), count


def _build_layout(known: dict, wrapper: Any, stage: str, group: dict[str, Any], flat: Tensor, key: tuple) -> Layout:
    """A partition's layout; each compressed weight's statistics are its second moment's then, with
    ``robust``, its complement's."""
    import torch.distributed as dist

    index, pg, entries = _locate(wrapper, stage, flat)
    specs, names = group.get("compress"), group.get("param_names")
    rank, world = dist.get_rank(group=pg), dist.get_world_size(group=pg)
    resolved = []
    for p, shape, start, numel, offset, cut, *_ in entries:
        record = known.get(id(p))
        if record is None or record[0] is not p:
            raise UnsupportedShardingError(
                f"SlimAdamW: a parameter of shape {list(shape)} in DeepSpeed's partition {index} is not one this "
                "optimizer was built with; build SlimAdamW from the model handed to deepspeed.initialize"
            )
        j = record[1]
        resolved.append((j, specs[j] if specs else None, names[j] if names else f"params[{j}]", shape, start,
                         numel, offset, cut))
    robust = bool(group.get("robust"))

    def sizes(spec: Any, shape: tuple[int, ...], name: str) -> tuple[int, int]:
        v = second_moment_numel(spec, shape, name)
        return v, complement_numel(segments(spec, shape, name), shape) if robust else 0

    # statistics of weights that a partition boundary cuts: one slot per weight, the same on every rank
    slots, reduce_numel = {}, 0
    for j, spec, name, shape, *_, cut in resolved:
        if spec is not None and cut:
            slots[j] = reduce_numel
            reduce_numel += sum(sizes(spec, shape, name))
    segs, stat_segs, comp_segs, comp_stat_segs, named, comp_named, fingerprint = [], [], [], [], [], [], []
    v_numel, stat_numel, c_numel = 0, reduce_numel, 0
    for j, spec, name, shape, start, numel, offset, cut in resolved:
        if numel == 0:
            continue
        fingerprint.append([j, start, numel])
        if spec is None:
            segs.append(Segment(None, 0, numel, None, v_offset=v_numel, v_shape=(numel,), window=(offset, (numel,))))
            stat_segs.append(None)
            comp_segs.append(None)
            comp_stat_segs.append(None)
            named.append((name, v_numel, numel, (start, numel)))
            v_numel += numel
            continue
        size, c_size = sizes(spec, shape, name)
        stat_offset = slots.get(j, stat_numel)
        stat_numel += 0 if j in slots else size + c_size
        placed = _weight_segments(shape, spec, name, (start, numel, offset), v_numel, stat_offset,
                                  (c_numel, stat_offset + size) if c_size else None)
        for (seg, stat, count), comp in placed:
            segs.append(seg)
            stat_segs.append((stat, count))
            comp_segs.append(None if comp is None else comp[0])
            comp_stat_segs.append(None if comp is None else comp[1:])
        named.append((name, v_numel, size, None))
        if c_size:
            comp_named.append((name, c_numel, c_size))
        v_numel += size
        c_numel += c_size
    ranges, absmax_numel, shared = _int8_blocks(entries, world)
    held = [(j, name) for j, _, name, _, _, numel, *_ in resolved if numel]
    # ints only: torch's load_state_dict rebuilds every iterable in the state, strings included
    stage_number = 3 if stage == "3" else 2 if getattr(wrapper, "partition_gradients", False) else 1
    layout_print = {"stage": stage_number, "world_size": world, "rank": rank, "numel": flat.numel(),
                    "weights": fingerprint}
    return Layout(key, pg, layout_print, v_numel, stat_numel, reduce_numel, tuple(segs), tuple(stat_segs),
                  tuple(named), c_numel, tuple(comp_segs), tuple(comp_stat_segs), tuple(comp_named),
                  ranges, tuple(name for _, name in held), tuple(j for j, _ in held), absmax_numel, shared,
                  len(entries) * (world + 1))


def _int8_blocks(entries: list[tuple], world: int) -> tuple[tuple[Range, ...], int, tuple]:
    """The int8 layout of a partition: each held range's scale slots, and the blocks it shares with other ranks.

    A block is shared when a partition boundary falls inside it; the boundaries are numbered per weight
    (``entry * (world + 1) + k`` for the boundary at ``k * partition size``), the same on every rank, so that
    one all-reduce (max) over that table gives each shared block its largest magnitude.
    """
    ranges, shared, slot = [], [], 0
    for j, (_, shape, start, numel, offset, _, weight_offset, size) in enumerate(entries):
        if numel == 0:
            continue
        first = block_of_position(shape, start)
        ranges.append(Range(offset, numel, tuple(shape), start, slot, first))
        for position in sorted({start, start + numel - 1}):
            lo, hi = block_span(shape, position)
            inside = [k for k in range((weight_offset + lo) // size + 1, (weight_offset + hi - 1) // size + 1)
                      if lo < k * size - weight_offset < hi]
            if inside:
                shared.append((slot + block_of_position(shape, position) - first,
                               tuple(j * (world + 1) + k for k in inside)))
        slot += block_of_position(shape, start + numel - 1) - first + 1
    return tuple(ranges), slot + 1, tuple(shared)


def layout(optimizer: Any, known: dict, wrapper: Any, stage: str, group: dict[str, Any], flat: Tensor) -> Layout:
    """The cached layout of ``flat`` (rebuilt when the wrapper, its lists or the group's specs change).

    ``known`` maps ``id(param)`` to ``(param, index in its SlimAdamW group)``.
    """
    lists = wrapper.fp16_groups if stage == "3" else wrapper.round_robin_bit16_groups
    key = (id(wrapper), id(flat), flat.numel(), id(lists), tuple(map(id, lists)), tuple(map(len, lists)),
           repr(group.get("compress")), bool(group.get("robust")))
    cache = _LAYOUTS.setdefault(optimizer, {})
    layout = cache.get(id(flat))
    if layout is None or layout.key != key:
        layout = cache[id(flat)] = _build_layout(known, wrapper, stage, group, flat, key)
    return layout



def layouts(optimizer: Any) -> dict[int, Layout]:
    """The layouts built for ``optimizer``, by ``id`` of their partition."""
    return _LAYOUTS.get(optimizer, {})
