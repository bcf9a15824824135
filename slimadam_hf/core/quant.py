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
from typing import Sequence

import torch
from torch import Tensor

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


def quantize(values: Tensor) -> tuple[Tensor, Tensor]:
    """Codes and scales of ``values`` (any shape, float) in the row-block layout of its shape."""
    x = _blocked(values.float())
    absmax = x.abs().amax(dim=1, keepdim=True)
    scaled = x / torch.where(absmax > 0, absmax, torch.ones_like(absmax))
    codes = (scaled.sign() * scaled.abs().sqrt() * LEVELS).round_().to(torch.int8)
    return codes, absmax


def decode(codes: Tensor, absmax: Tensor) -> Tensor:
    """The float32 values of ``codes``/``absmax``, block by block (a new ``(blocks, BLOCK)`` tensor)."""
    unit = codes.float().div_(LEVELS)
    return unit.abs_().square_().mul_(codes.sign()).mul_(absmax)


def dequantize(codes: Tensor, absmax: Tensor, shape: torch.Size) -> Tensor:
    """The float32 values of ``codes``/``absmax``, in ``shape`` (a new tensor)."""
    rows, cols = rows_and_cols(shape)
    values = decode(codes, absmax).view(max(rows, 1), -1)[:, :cols]
    return values.reshape(shape)


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
