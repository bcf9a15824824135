"""8-bit block-quantized storage of the first moment (``momentum_dtype="int8"``).

The moment is seen as rows, ``(shape[0], -1)`` (a 1-D or 0-D tensor is one row), and each row is cut into
blocks of :data:`BLOCK` values, the last one padded: a block never spans two rows. So a shard of whole
rows (FSDP2 cuts dim 0) holds whole blocks, and a kernel that walks a row owns that row's blocks.
Each block keeps its largest magnitude (``absmax``, float32) and one signed byte per value. Bytes are
*companded*: a value ``x`` is stored as ``round(127 * sign(x) * sqrt(|x| / absmax))`` and read back as
``sign(q) * (q / 127)**2 * absmax``. The square root spends the 255 codes where momentum values are dense
(near zero): the relative error of a value 100x smaller than its block's largest is about 4%, where a
linear code would have rounded it to 0. One block is 256 bytes of codes plus 4 bytes of scale: 1.016
bytes per parameter when a row is a multiple of 256 long.

Quantization is round-to-nearest and deterministic; the value read back (not the float32 one computed
before storing) drives the update, so a resumed run is bitwise the run that saved the checkpoint.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor

STATE_KEY = "exp_avg_absmax"  # the optimizer state entry of the block scales, beside the codes in exp_avg
BLOCK = 256
LEVELS = 127.0


def rows_and_cols(shape: Sequence[int]) -> tuple[int, int]:
    """The moment as a matrix: ``(shape[0], rest)``; a 1-D or 0-D tensor is one row."""
    numel = math.prod(shape)
    if len(shape) < 2:
        return 1, numel
    return shape[0], numel // shape[0] if shape[0] else 0


def blocks_per_row(shape: Sequence[int]) -> int:
    return max(1, math.ceil(rows_and_cols(shape)[1] / BLOCK))


def num_blocks(shape: Sequence[int]) -> int:
    """Blocks of a moment of ``shape``: ``rows * ceil(cols / BLOCK)`` (at least one)."""
    return max(1, rows_and_cols(shape)[0]) * blocks_per_row(shape)


def empty_state(param: Tensor) -> tuple[Tensor, Tensor]:
    """Zeroed codes ``(blocks, BLOCK)`` int8 and scales ``(blocks, 1)`` float32 for ``param``."""
    blocks = num_blocks(param.shape)
    codes = torch.zeros((blocks, BLOCK), dtype=torch.int8, device=param.device)
    absmax = torch.zeros((blocks, 1), dtype=torch.float32, device=param.device)
    return codes, absmax


def _blocked(values: Tensor) -> Tensor:
    """``values`` as ``(blocks, BLOCK)`` rows of blocks, each row padded with zeros to whole blocks."""
    rows, cols = rows_and_cols(values.shape)
    x = values.reshape(max(rows, 1), cols)
    pad = blocks_per_row(values.shape) * BLOCK - cols
    return (torch.nn.functional.pad(x, (0, pad)) if pad else x).reshape(-1, BLOCK)


def encode(x: Tensor, absmax: Tensor) -> Tensor:
    """The int8 codes of float32 ``x`` against its block's ``absmax`` (broadcast to ``x``)."""
    scaled = x / torch.where(absmax > 0, absmax, torch.ones_like(absmax))
    return (scaled.sign() * scaled.abs().sqrt() * LEVELS).round_().to(torch.int8)


def quantize(values: Tensor) -> tuple[Tensor, Tensor]:
    """Codes and scales of ``values`` (any shape, float) in the row-block layout of its shape."""
    x = _blocked(values.float())
    absmax = x.abs().amax(dim=1, keepdim=True)
    return encode(x, absmax), absmax


def decode(codes: Tensor, absmax: Tensor) -> Tensor:
    """The float32 values of ``codes``/``absmax``, block by block (a new ``(blocks, BLOCK)`` tensor)."""
    unit = codes.float().div_(LEVELS)
    return unit.abs_().square_().mul_(codes.sign()).mul_(absmax)


def dequantize(codes: Tensor, absmax: Tensor, shape: torch.Size) -> Tensor:
    """The float32 values of ``codes``/``absmax``, in ``shape`` (a new tensor)."""
    rows, cols = rows_and_cols(shape)
    values = decode(codes, absmax).view(max(rows, 1), -1)[:, :cols]
    return values.reshape(shape)


def row_blocks(codes: Tensor, scales: Tensor, shape: Sequence[int]) -> Optional[tuple[Tensor, Tensor]]:
    """Codes and scales of a moment of ``shape`` saved in any layout of the row blocks, as ``(blocks, BLOCK)``
    and ``(blocks, 1)``: the single-process one, FSDP2's ``(rows, blocks_per_row * BLOCK)`` or, for a 1-D
    moment, one code per element; ``None`` when they hold another shape's blocks."""
    blocks = num_blocks(shape)
    if codes.dtype != torch.int8 or scales.numel() != blocks:
        return None
    if codes.numel() == blocks * BLOCK:
        return codes.reshape(blocks, BLOCK), scales.float().reshape(blocks, 1)
    if len(shape) < 2 and codes.numel() == math.prod(shape):
        padded = torch.nn.functional.pad(codes.reshape(-1), (0, blocks * BLOCK - codes.numel()))
        return padded.view(blocks, BLOCK), scales.float().reshape(blocks, 1)
    return None


def dequantize_flat(codes: Tensor, absmax: Tensor, shape: torch.Size) -> Tensor:
    """Values of codes saved in the earlier flat layout, whose blocks ran across rows (checkpoints of 0.1)."""
    return decode(codes, absmax).view(-1)[: math.prod(shape)].view(shape)


def flat_num_blocks(shape: Sequence[int]) -> int:
    """Blocks of the earlier flat layout (:func:`dequantize_flat`)."""
    return max(1, math.ceil(math.prod(shape) / BLOCK))


@dataclass
class QuantizedMomentum:
    """A first moment stored as int8 codes and float32 block scales (the optimizer state's tensors)."""

    codes: Tensor
    absmax: Tensor
    shape: torch.Size

    def dequantize(self) -> Tensor:
        return dequantize(self.codes, self.absmax, self.shape)

    def store_(self, values: Tensor) -> Tensor:
        """Quantize ``values`` into the state, then overwrite ``values`` with what was stored."""
        codes, absmax = quantize(values.view(self.shape))
        self.codes.copy_(codes)
        self.absmax.copy_(absmax)
        values.copy_(self.dequantize().view(values.shape))
        return values


# -- a shard's flat ranges ------------------------------------------------------------------------


@dataclass(frozen=True)
class Range:
    """``numel`` elements of a weight of ``shape`` from its flat position ``start``, held at ``offset`` of a local
    tensor; their blocks' scales sit at ``slot`` onwards, one per block from the block of ``first_block``."""

    offset: int
    numel: int
    shape: tuple[int, ...]
    start: int
    slot: int
    first_block: int


def block_of(shape: Sequence[int], flat: Tensor) -> Tensor:
    """The block (row-block layout of ``shape``) of each flat position in ``flat`` (an int64 tensor)."""
    _, cols = rows_and_cols(shape)
    cols = max(cols, 1)
    return (flat // cols) * blocks_per_row(shape) + (flat % cols) // BLOCK


def block_of_position(shape: Sequence[int], position: int) -> int:
    """The block holding flat ``position`` of a weight of ``shape``."""
    _, cols = rows_and_cols(shape)
    row, col = divmod(position, max(cols, 1))
    return row * blocks_per_row(shape) + col // BLOCK


def block_span(shape: Sequence[int], position: int) -> tuple[int, int]:
    """The flat ``[start, stop)`` of the block holding ``position`` of a weight of ``shape``."""
    _, cols = rows_and_cols(shape)
    row, col = divmod(position, max(cols, 1))
    start = row * cols + col // BLOCK * BLOCK
    return start, min(start + BLOCK, (row + 1) * cols)


@dataclass
class RangeQuantizedMomentum:
    """The int8 first moment of a shard that holds flat ranges of weights (one code per element, unpadded),
    whose edge blocks other ranks share: DeepSpeed ZeRO partitions, 1-D FSDP2 shards.

    Codes are those one process stores for the whole weight, provided every block's scale is its largest
    magnitude over the whole block: ranks find that of a shared block by exchanging their local ones and
    hand it in as ``floor`` before the update stores the moment. Elements outside every range (a partition's
    padding) share the last scale.
    """

    codes: Tensor  # int8, one per local element
    absmax: Tensor  # float32, one per block slot, plus one for the padding
    shape: torch.Size  # the local tensor's shape
    ranges: tuple[Range, ...]
    floor: Optional[Tensor] = None  # per slot, the block's largest magnitude on any rank (set before store_)
    advanced: Optional[Tensor] = None  # this step's float32 values once computed (built anew every step)

    def slots(self) -> Tensor:
        """Each local element's scale slot (int64)."""
        numel = self.codes.numel()
        slots = torch.full((numel,), self.absmax.numel() - 1, dtype=torch.int64, device=self.codes.device)
        for r in self.ranges:
            if r.numel:
                flat = torch.arange(r.start, r.start + r.numel, device=self.codes.device)
                slots[r.offset : r.offset + r.numel] = block_of(r.shape, flat) - r.first_block + r.slot
        return slots

    def dequantize(self) -> Tensor:
        return decode(self.codes.view(-1), self.absmax[self.slots()]).view(self.shape)

    def local_maxima(self, values: Tensor) -> Tensor:
        """Per slot, the largest magnitude of ``values`` (local tensor shape) among this rank's elements."""
        out = torch.zeros_like(self.absmax)
        return out.scatter_reduce_(0, self.slots(), values.reshape(-1).abs(), "amax")

    def store_(self, values: Tensor) -> Tensor:
        """Quantize ``values`` into the state against every block's scale, then overwrite ``values`` with what
        was stored."""
        slots = self.slots()
        absmax = self.local_maxima(values)
        if self.floor is not None:
            absmax = torch.maximum(absmax, self.floor)
        self.absmax.copy_(absmax)
        per_element = absmax[slots]
        self.codes.view(-1).copy_(encode(values.reshape(-1).float(), per_element))
        values.copy_(decode(self.codes.view(-1), per_element).view(values.shape))
        return values

    def advance(self, grad: Tensor, weight: float) -> Tensor:
        """The moment's new float32 values (``m + weight * (g - m)``), not yet stored; computed once, for the
        exchange of the block maxima and the update alike."""
        if self.advanced is None:
            self.advanced = self.dequantize().lerp_(grad.float(), weight)
        return self.advanced

    def propose_floor(self, grad: Tensor, weight: float) -> Tensor:
        """Set ``floor`` to this rank's largest magnitude per scale slot of the advanced moment, and return it
        for the exchange between ranks to raise in place."""
        self.floor = self.local_maxima(self.advance(grad, weight))
        return self.floor
