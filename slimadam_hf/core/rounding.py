"""Updating a first moment stored in bfloat16/float16: in float32, then rounded back, in bounded chunks.

Round-to-nearest (the default) loses updates smaller than half a bf16 ulp, which biases a slowly changing
moment; ``momentum_rounding="stochastic"`` rounds a bfloat16 moment up or down with probability given by
the distance (unbiased: the expected stored value is the float32 one). Its 16 random bits per element are a
hash of the element's flat position in the parameter and a noise key (from the run's seed, the parameter's
position and the step): :func:`element_noise`. Every path (eager, Triton) and every sharding draws the same
bits for the same element, a run is reproducible under a fixed seed, and a resumed run is bitwise the
uninterrupted one.

The work goes chunk by chunk (:data:`CHUNK` elements) so the float32 workspace stays a few MiB.
"""

from __future__ import annotations

from typing import Any, Iterator, NamedTuple, Optional, Sequence, Union

import torch
from torch import Tensor

CHUNK = 1 << 20
_LOW_BITS = 1 << 16  # float32 bits below bfloat16's mantissa


class Noise(NamedTuple):
    """A parameter's noise: its ``base`` (a step's key, from :func:`noise_key`) and the flat position of its
    tensor's first element in the whole parameter (a shard's start; 0 unsharded). A tensor that holds flat
    ranges of several weights (a DeepSpeed ZeRO partition) has ``pieces`` instead: per range, its offset in
    the tensor, its length and the noise of its weight; elements outside every range round to nearest."""

    base: int
    offset: int = 0
    pieces: tuple[tuple[int, int, "Noise"], ...] = ()


# Where a tensor's elements sit in the whole parameter: the flat position of its first element, or, for a
# tensor of several weights' ranges, per range (offset in the tensor, length, the weight's position in its
# param group, the range's first flat position in the weight).
NoiseOffset = Union[int, tuple[tuple[int, int, int, int], ...]]


def _base(seed: int, position: int, offset: NoiseOffset) -> Noise:
    if isinstance(offset, int):
        return Noise(seed * 1_000_003 + position, offset)
    return Noise(0, 0, tuple((at, numel, _base(seed, weight, start)) for at, numel, weight, start in offset))


def noise_bases(seed: Optional[int], count: int,
                offsets: Optional[Sequence[NoiseOffset]] = None) -> list[Optional[Noise]]:
    """Per parameter position, the base of its noise keys (``None`` everywhere: round to nearest)."""
    if seed is None:
        return [None] * count
    return [_base(seed, position, 0 if offsets is None else offsets[position]) for position in range(count)]


def _step_key(noise: Noise, step: int) -> Noise:
    return Noise(noise.base * 1_000_033 + step, noise.offset,
                 tuple((at, numel, _step_key(piece, step)) for at, numel, piece in noise.pieces))


def noise_key(noise: Optional[Noise], step: float, exp_avg: Any) -> Optional[Noise]:
    """The key of one parameter's noise at ``step``; ``None`` (round to nearest) without a base or when
    ``exp_avg`` is not a bfloat16 tensor: stochastic rounding is for bfloat16 moments only."""
    if noise is None or getattr(exp_avg, "dtype", None) != torch.bfloat16:
        return None
    return _step_key(noise, int(step))


_MASK32 = 0xFFFFFFFF


def _mulmod32(x: Tensor, c: int) -> Tensor:
    """``x * c mod 2**32`` for int64 ``x`` in ``[0, 2**32)``, without overflowing int64."""
    return (x.bitwise_and(0xFFFF).mul(c) + x.bitwise_right_shift(16).mul(c).bitwise_and(0xFFFF).bitwise_left_shift(16)
            ).bitwise_and_(_MASK32)


def mix32(x: Tensor) -> Tensor:
    """A 32-bit integer hash (``lowbias32``, C. Wellons) of int64 ``x`` in ``[0, 2**32)``; the Triton kernel
    computes the same on uint32."""
    x = x.bitwise_xor(x.bitwise_right_shift(16))
    x = _mulmod32(x, 0x7FEB352D)
    x = x.bitwise_xor(x.bitwise_right_shift(15))
    x = _mulmod32(x, 0x846CA68B)
    return x.bitwise_xor(x.bitwise_right_shift(16))


def noise_seed(key: int) -> int:
    """The 32-bit seed of a noise key: ``lowbias32`` of the key folded to 32 bits."""
    folded = torch.tensor([(key ^ (key >> 32) ^ (key >> 64)) & _MASK32], dtype=torch.int64)
    return int(mix32(folded).item())


def element_noise(seed: int, positions: Tensor) -> Tensor:
    """16 random bits (int32, ``[0, 2**16)``) for the elements at flat ``positions`` (int64) under ``seed``."""
    x = positions.bitwise_and(_MASK32).bitwise_xor_(seed)
    return mix32(x).bitwise_and_(_LOW_BITS - 1).to(torch.int32)


def _chunks(m: Tensor, g: Tensor) -> Iterator[tuple[int, Tensor, Tensor]]:
    if not (m.is_contiguous() and g.is_contiguous()):
        yield 0, m, g
        return
    flat_m, flat_g = m.view(-1), g.reshape(-1)
    for start in range(0, flat_m.numel(), CHUNK):
        yield start, flat_m[start : start + CHUNK], flat_g[start : start + CHUNK]


def lerp_low_precision_(m: Tensor, g: Tensor, weight: float, key: Union[None, int, Noise] = None) -> None:
    """``m <- m + weight * (g - m)`` in float32, stored into ``m``'s dtype: nearest, or stochastic with ``key``
    (a :class:`Noise` from :func:`noise_key`, or a bare key for a whole unsharded tensor)."""
    noise = Noise(key) if isinstance(key, int) else key  # noise_key gives keys for bfloat16 moments only
    if noise is not None and noise.pieces:
        flat_m, flat_g, done = m.view(-1), g.reshape(-1), 0
        for at, numel, piece in sorted(noise.pieces, key=lambda entry: entry[0]):
            lerp_low_precision_(flat_m[done:at], flat_g[done:at], weight)
            lerp_low_precision_(flat_m[at : at + numel], flat_g[at : at + numel], weight, piece)
            done = at + numel
        lerp_low_precision_(flat_m[done:], flat_g[done:], weight)
        return
    seed = None if noise is None else noise_seed(noise.base)
    for start, m_part, g_part in _chunks(m, g):
        exact = m_part.float().lerp_(g_part.float(), weight)
        if seed is not None:
            first = noise.offset + start
            positions = torch.arange(first, first + exact.numel(), device=exact.device)
            exact.view(torch.int32).add_(element_noise(seed, positions).view(exact.shape)).bitwise_and_(-_LOW_BITS)
        m_part.copy_(exact)  # after the noise, exactly a bfloat16 value
