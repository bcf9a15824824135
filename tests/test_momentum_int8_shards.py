"""int8 first moments of shards that cut quantization blocks (DeepSpeed ZeRO partitions, 1-D FSDP2 shards):
after the exchange of the cut blocks' largest magnitudes, every rank stores the codes one process stores.

The ranks are simulated in one process on the layout code that DeepSpeed runs use (tests/test_dist_zero.py
and tests/test_dist_multiprocess.py run it on 2 real gloo ranks), so that world sizes and partitions
smaller than a block, where one block spans several boundaries, are covered too.
"""

from __future__ import annotations

import math

import pytest
import torch

from slimadam_hf.core import quant
from slimadam_hf.distributed.zero_layout import _int8_blocks

SHAPES = [(7, 45), (3, 600), (300,), (2, 3, 100), (1,)]


def _entries(shapes: list[tuple[int, ...]], world: int, rank: int) -> tuple[list[tuple], int]:
    """ZeRO-1/2's view of one flat group of ``shapes`` split into ``world`` equal partitions (as
    ``zero_layout._stage12_entries`` builds it from DeepSpeed's bookkeeping)."""
    total = sum(math.prod(s) for s in shapes)
    size = -(-total // world)
    start, out, off = rank * size, [], 0
    for shape in shapes:
        numel = math.prod(shape)
        lo, hi = max(off, start), min(off + numel, start + size)
        out.append((None, shape, lo - off, max(0, hi - lo), lo - start, off // size != (off + numel - 1) // size,
                    off, size))
        off += numel
    return out, size


@pytest.mark.parametrize("world", [2, 3, 7, 40])
@pytest.mark.parametrize("exchange", [True, False])
def test_partitions_store_the_codes_of_one_process(world, exchange):
    torch.manual_seed(world)
    values = [torch.randn(s) * torch.rand(s[0] if s else 1).view(-1, *([1] * (len(s) - 1))) for s in SHAPES]
    flat = torch.cat([v.reshape(-1) for v in values])
    expected = [quant.quantize(v) for v in values]

    ranks = []
    for rank in range(world):
        entries, size = _entries(SHAPES, world, rank)
        ranges, absmax_numel, shared = _int8_blocks(entries, world)
        local = torch.nn.functional.pad(flat, (0, size * world - flat.numel()))[rank * size : (rank + 1) * size]
        m = quant.RangeQuantizedMomentum(torch.zeros(size, dtype=torch.int8), torch.zeros(absmax_numel),
                                         torch.Size([size]), ranges)
        ranks.append((m, local.clone(), shared, len(entries) * (world + 1)))
    # each rank's table of boundaries, then their all-reduce (max), as zero._share_block_maxima does
    tables = []
    for m, local, shared, numel in ranks:
        m.floor = m.local_maxima(local)
        table = torch.zeros(numel)
        for slot, boundaries in shared:
            table[list(boundaries)] = torch.maximum(table[list(boundaries)], m.floor[slot])
        tables.append(table)
    reduced = torch.stack(tables).amax(dim=0)
    for m, local, shared, _ in ranks:
        if exchange:
            for slot, boundaries in shared:
                m.floor[slot] = torch.maximum(m.floor[slot], reduced[list(boundaries)].max())
        m.store_(local)

    codes = torch.cat([m.codes for m, *_ in ranks])
    read_back = torch.cat([m.dequantize() for m, *_ in ranks])
    offset, mismatched = 0, 0
    for shape, (want_codes, want_scales) in zip(SHAPES, expected):
        numel = math.prod(shape)
        unpadded = quant.dequantize(want_codes, want_scales, torch.Size(shape)).reshape(-1)
        rows, cols = quant.rows_and_cols(shape)
        want = want_codes.view(max(rows, 1), -1)[:, :cols].reshape(-1)
        mismatched += int((codes[offset : offset + numel] != want).sum())
        if exchange:
            assert torch.equal(read_back[offset : offset + numel], unpadded), shape
        offset += numel
    if exchange:
        assert mismatched == 0
    else:  # without the exchange a cut block is scaled by its local part: the test can tell
        assert mismatched > 0


def test_a_rank_without_shared_blocks_needs_no_floor():
    # ranges that start and end on block edges share nothing: the 2-D weight's rows are 256 long
    entries, _ = _entries([(4, 256)], 2, 0)
    ranges, absmax_numel, shared = _int8_blocks(entries, 2)
    assert shared == () and absmax_numel == 2 + 1 and ranges[0].numel == 512
