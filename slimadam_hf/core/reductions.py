"""Sums of squares of gradients over the compressed dims, without full-size temporaries."""

from __future__ import annotations

import torch
from torch import Tensor


def mean_of_squares(g: Tensor, dims: tuple[int, ...], v: Tensor) -> Tensor:
    total = sum_of_squares(g, dims, v.dtype)
    if g.numel() == 0:  # an empty split part: a mean of nothing, as torch.mean gives it
        return total.fill_(float("nan"))
    return total.mul_(v.numel() / g.numel())


# Row block of the streamed column reduction: about 256 KiB of float32 accumulators, cache resident.
_COLUMN_BLOCK_ELEMS = 1 << 16


def sum_of_squares(g: Tensor, dims: tuple[int, ...], dtype: torch.dtype) -> Tensor:
    """``sum(g**2)`` over ``dims`` (kept), in ``dtype``, without a full-size ``g**2`` temporary.

    A squared norm in general. On CPU, reducing a 2-D tensor over its rows only (``dims == (0,)``)
    with the norm kernel strides down columns and is an order of magnitude slower than a pass over
    the data, so rows are streamed through a small accumulator block instead.
    """
    if g.device.type == "cpu" and g.dim() == 2 and dims == (0,) and g.stride(1) == 1 and g.shape[1] > 0:
        rows, cols = g.shape
        block = max(1, _COLUMN_BLOCK_ELEMS // cols)
        if rows > 2 * block:
            acc = torch.zeros((block, cols), dtype=dtype)
            for chunk in g.split(block):
                acc[: chunk.shape[0]].addcmul_(chunk, chunk)
            return acc.sum(0, keepdim=True)
    norm = torch.linalg.vector_norm(g, 2, dim=dims, keepdim=True, dtype=dtype)
    return norm.mul_(norm)
