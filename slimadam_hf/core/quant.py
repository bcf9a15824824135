"""8-bit block-quantized storage of the first moment (``momentum_dtype="int8"``).

The flattened moment is cut into blocks of :data:`BLOCK` values; each block keeps its largest magnitude
(``absmax``, float32) and one signed byte per value. Bytes are *companded*: a value ``x`` is stored as
``round(127 * sign(x) * sqrt(|x| / absmax))`` and read back as ``sign(q) * (q / 127)**2 * absmax``.
The square root spends the 255 codes where momentum values are dense (near zero): the relative error of a
value 100x smaller than its block's largest is about 4%, where a linear code would have rounded it to 0.
One block is 256 bytes of codes plus 4 bytes of scale: 1.016 bytes per parameter.

Quantization is round-to-nearest and deterministic; the value read back (not the float32 one computed
before storing) drives the update, so a resumed run is bitwise the run that saved the checkpoint.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

BLOCK = 256
_LEVELS = 127.0


def num_blocks(numel: int) -> int:
    return max(1, math.ceil(numel / BLOCK))


def empty_state(param: Tensor) -> tuple[Tensor, Tensor]:
    """Zeroed codes ``(blocks, BLOCK)`` int8 and scales ``(blocks, 1)`` float32 for ``param``."""
    blocks = num_blocks(param.numel())
    codes = torch.zeros((blocks, BLOCK), dtype=torch.int8, device=param.device)
    absmax = torch.zeros((blocks, 1), dtype=torch.float32, device=param.device)
    return codes, absmax


def _blocked(flat: Tensor, blocks: int) -> Tensor:
    pad = blocks * BLOCK - flat.numel()
    return (torch.nn.functional.pad(flat, (0, pad)) if pad else flat).view(blocks, BLOCK)


def quantize(values: Tensor, blocks: int) -> tuple[Tensor, Tensor]:
    """Codes and scales of ``values`` (any shape, float), flattened row-major into ``blocks`` blocks."""
    x = _blocked(values.reshape(-1).float(), blocks)
    absmax = x.abs().amax(dim=1, keepdim=True)
    scaled = x / torch.where(absmax > 0, absmax, torch.ones_like(absmax))
    codes = (scaled.sign() * scaled.abs().sqrt() * _LEVELS).round_().to(torch.int8)
    return codes, absmax


def dequantize(codes: Tensor, absmax: Tensor, shape: torch.Size) -> Tensor:
    """The float32 values of ``codes``/``absmax``, in ``shape`` (a new tensor)."""
    unit = codes.float().div_(_LEVELS)
    values = unit.abs_().square_().mul_(codes.sign()).mul_(absmax)
    numel = math.prod(shape)
    return values.view(-1)[:numel].view(shape)


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
        codes, absmax = quantize(values, self.codes.shape[0])
        self.codes.copy_(codes)
        self.absmax.copy_(absmax)
        values.copy_(self.dequantize())
        return values
