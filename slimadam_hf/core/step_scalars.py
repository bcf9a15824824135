"""The per-step scalars of the fused update, in the order the C++ kernel takes them."""

from __future__ import annotations


def step_scalars(step: float, *, lr: float, beta1: float, beta2: float, eps: float,
                 weight_decay: float) -> tuple[float, ...]:
    """``(decay, 1 - beta1, beta2, 1 - beta2, -lr / bc1, sqrt(bc2), eps)`` at ``step`` (counted from 1), with
    ``bc1 = 1 - beta1**step`` and ``bc2 = 1 - beta2**step``; in float64, so ``1 - beta2`` keeps its digits."""
    return (1 - lr * weight_decay, 1 - beta1, beta2, 1 - beta2, -lr / (1 - beta1**step), (1 - beta2**step) ** 0.5, eps)
