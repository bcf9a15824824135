"""Updating a first moment stored in bfloat16/float16: in float32, then rounded back, in bounded chunks.

Round-to-nearest (the default) loses updates smaller than half a bf16 ulp, which biases a slowly changing
moment; ``momentum_rounding="stochastic"`` rounds a bfloat16 moment up or down with probability given by
the distance (unbiased: the expected stored value is the float32 one). Its random bits come from a
generator seeded by ``(noise key, chunk)``, the noise key from the run's seed, the parameter's position and
the step, so a run is reproducible under a fixed seed and a resumed run is bitwise the uninterrupted one.

The work goes chunk by chunk (:data:`CHUNK` elements) so the float32 workspace stays a few MiB.
"""

from __future__ import annotations

from typing import Any, Iterator, Optional

import torch
from torch import Tensor

CHUNK = 1 << 20
_LOW_BITS = 1 << 16  # float32 bits below bfloat16's mantissa


def noise_bases(seed: Optional[int], count: int) -> list[Optional[int]]:
    """Per parameter position, the base of its noise keys (``None`` everywhere: round to nearest)."""
    return [None if seed is None else seed * 1_000_003 + position for position in range(count)]


def noise_key(base: Optional[int], step: float, exp_avg: Any) -> Optional[int]:
    """The key of one parameter's noise at ``step``; ``None`` (round to nearest) without a base or when
    ``exp_avg`` is not a bfloat16 tensor: stochastic rounding is for bfloat16 moments only."""
    if base is None or getattr(exp_avg, "dtype", None) != torch.bfloat16:
        return None
    return base * 1_000_033 + int(step)


def _chunks(m: Tensor, g: Tensor) -> Iterator[tuple[Tensor, Tensor]]:
    if not (m.is_contiguous() and g.is_contiguous()):
        yield m, g
        return
    flat_m, flat_g = m.view(-1), g.reshape(-1)
    for start in range(0, flat_m.numel(), CHUNK):
        yield flat_m[start : start + CHUNK], flat_g[start : start + CHUNK]


def lerp_low_precision_(m: Tensor, g: Tensor, weight: float, key: Optional[int] = None) -> None:
    """``m <- m + weight * (g - m)`` in float32, stored into ``m``'s dtype: nearest, or stochastic with ``key``."""
    for index, (m_part, g_part) in enumerate(_chunks(m, g)):
        exact = m_part.float().lerp_(g_part.float(), weight)
        if key is not None:  # noise_key gives keys for bfloat16 moments only
            generator = torch.Generator(device=exact.device).manual_seed((key * 65_537 + index) % (1 << 62))
            noise = torch.randint(0, _LOW_BITS, exact.shape, generator=generator, dtype=torch.int32,
                                  device=exact.device)
            exact.view(torch.int32).add_(noise).bitwise_and_(-_LOW_BITS)  # now exactly a bfloat16 value
        m_part.copy_(exact)
