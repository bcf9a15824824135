"""The SlimAdamW update as functions, in the style of ``torch/optim/adamw.py``.

For each parameter with compress segments ``S`` (see :mod:`slimadam_hf.compress_spec`)::

    p  <- p * (1 - lr * weight_decay)                      # decoupled weight decay
    m  <- beta1 * m + (1 - beta1) * g
    v_s <- beta2 * v_s + (1 - beta2) * mean_{dims_s}(g_s ** 2)    for every segment s
    p_s <- p_s - lr / (1 - beta1**t) * m_s / (sqrt(v_s / (1 - beta2**t)) + eps)

With no dims this is exactly ``torch.optim.AdamW``. ``v`` is float32 (float64 for float64 params).
``m`` may be stored in another precision than the parameter (``SlimAdamW(momentum_dtype=...)``): it is
then updated in float32, rounded to nearest, and the stored value drives the update.

Implementations (``implementation=``):

* ``"reference"``: ``_single_tensor_slimadamw``, the plain per-tensor reference;
* ``"foreach"``: ``_multi_tensor_slimadamw``, the same math batched with ``torch._foreach_*`` kernels
  and no full-size temporaries; the eager default;
* ``"compiled"``: :func:`slimadam_hf.fused.compiled_slimadamw`, one ``torch.compile``-d kernel set per
  parameter signature, each a single pass over ``p``, ``g``, ``m`` (fastest; compiles on first use).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Optional, Sequence

import torch
from torch import Tensor

from .compress_spec import Segment

IMPLEMENTATIONS = ("foreach", "compiled", "reference")


def slimadamw(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    state_steps: Sequence[Tensor],
    param_segments: Sequence[Sequence[Segment]],
    *,
    foreach: bool,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    implementation: Optional[str] = None,
) -> None:
    """Apply one SlimAdamW step to every parameter, in place.

    ``implementation`` is one of :data:`IMPLEMENTATIONS`; ``None`` keeps the meaning of ``foreach``
    (``True``: ``"foreach"``, ``False``: ``"reference"``).
    """
    if implementation is None:
        implementation = "foreach" if foreach else "reference"
    if implementation == "compiled":
        from .fused import compiled_slimadamw

        impl = compiled_slimadamw
    elif implementation == "foreach":
        impl = _multi_tensor_slimadamw
    elif implementation == "reference":
        impl = _single_tensor_slimadamw
    else:
        raise ValueError(f"Invalid implementation {implementation!r}: choose one of {list(IMPLEMENTATIONS)}")
    impl(
        params,
        grads,
        exp_avgs,
        exp_avg_sqs,
        state_steps,
        param_segments,
        lr=lr,
        beta1=beta1,
        beta2=beta2,
        eps=eps,
        weight_decay=weight_decay,
    )


def _single_tensor_slimadamw(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    state_steps: Sequence[Tensor],
    param_segments: Sequence[Sequence[Segment]],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
) -> None:
    for param, grad, exp_avg, exp_avg_sq, step_t, segs in zip(
        params, grads, exp_avgs, exp_avg_sqs, state_steps, param_segments
    ):
        step_t += 1
        step = step_t.item()
        if weight_decay != 0:
            param.mul_(1 - lr * weight_decay)
        if exp_avg.dtype == grad.dtype:
            exp_avg.lerp_(grad, 1 - beta1)
        else:  # momentum_dtype differs from the parameter's: update in float32, store rounded
            exp_avg.copy_(exp_avg.float().lerp_(grad.float(), 1 - beta1))

        step_size = lr / (1 - beta1**step)
        bias_correction2_sqrt = (1 - beta2**step) ** 0.5
        for seg in segs:
            v = seg.second_moment_view(exp_avg_sq)
            g = seg.view(grad).to(v.dtype)
            if seg.dims is None:
                v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
            else:
                v.mul_(beta2).add_((g * g).mean(dim=seg.dims, keepdim=True), alpha=1 - beta2)
            denom = (v.sqrt() / bias_correction2_sqrt).add_(eps)
            seg.view(param).addcdiv_(seg.view(exp_avg), denom, value=-step_size)


def _group_by_device_and_dtype(params: Sequence[Tensor], exp_avgs: Sequence[Tensor]) -> dict[tuple, list[int]]:
    groups: dict[tuple, list[int]] = defaultdict(list)
    for i, (p, m) in enumerate(zip(params, exp_avgs)):
        groups[(p.device, p.dtype, m.dtype)].append(i)
    return groups


def _multi_tensor_slimadamw(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    state_steps: Sequence[Tensor],
    param_segments: Sequence[Sequence[Segment]],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
) -> None:
    for indices in _group_by_device_and_dtype(params, exp_avgs).values():
        _multi_tensor_group(
            [params[i] for i in indices],
            [grads[i] for i in indices],
            [exp_avgs[i] for i in indices],
            [exp_avg_sqs[i] for i in indices],
            [state_steps[i] for i in indices],
            [param_segments[i] for i in indices],
            lr=lr,
            beta1=beta1,
            beta2=beta2,
            eps=eps,
            weight_decay=weight_decay,
        )


def _multi_tensor_group(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    param_segments: list[Sequence[Segment]],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
) -> None:
    """One device/dtype bucket: whole-tensor ops batched, then full and compressed segments batched."""
    torch._foreach_add_(state_steps, 1)
    if weight_decay != 0:
        torch._foreach_mul_(params, 1 - lr * weight_decay)
    if exp_avgs[0].dtype == grads[0].dtype:
        torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
    else:  # low-precision momentum: float32 math, rounded store (one tensor at a time bounds the temporaries)
        for exp_avg, grad in zip(exp_avgs, grads):
            exp_avg.copy_(exp_avg.float().lerp_(grad.float(), 1 - beta1))

    full: dict[str, list] = defaultdict(list)
    compressed: dict[str, list] = defaultdict(list)
    for param, grad, exp_avg, exp_avg_sq, step_t, segs in zip(
        params, grads, exp_avgs, exp_avg_sqs, state_steps, param_segments
    ):
        step = step_t.item()
        neg_step_size = -lr / (1 - beta1**step)
        bias_correction2_sqrt = (1 - beta2**step) ** 0.5
        for seg in segs:
            bucket = full if seg.dims is None else compressed
            bucket["p"].append(seg.view(param))
            bucket["g"].append(seg.view(grad))
            bucket["m"].append(seg.view(exp_avg))
            bucket["v"].append(seg.second_moment_view(exp_avg_sq))
            bucket["neg_step_size"].append(neg_step_size)
            bucket["bc2_sqrt"].append(bias_correction2_sqrt)
            if seg.dims is not None:
                bucket["dims"].append(seg.dims)

    if full:
        v_dtype = full["v"][0].dtype
        g = full["g"] if full["g"][0].dtype == v_dtype else [t.to(v_dtype) for t in full["g"]]
        torch._foreach_mul_(full["v"], beta2)
        torch._foreach_addcmul_(full["v"], g, g, 1 - beta2)
        _apply_update(full, eps, broadcast=False)

    if compressed:
        sums = [
            _sum_of_squares(g, dims, v.dtype)
            for g, v, dims in zip(compressed["g"], compressed["v"], compressed["dims"])
        ]
        scales = [(1 - beta2) * v.numel() / g.numel() for g, v in zip(compressed["g"], compressed["v"])]
        torch._foreach_mul_(compressed["v"], beta2)
        torch._foreach_mul_(sums, scales)
        torch._foreach_add_(compressed["v"], sums)
        _apply_update(compressed, eps, broadcast=True)


# Row block of the streamed column reduction: about 256 KiB of float32 accumulators, cache resident.
_COLUMN_BLOCK_ELEMS = 1 << 16


def _sum_of_squares(g: Tensor, dims: tuple[int, ...], dtype: torch.dtype) -> Tensor:
    """``sum(g**2)`` over ``dims`` (kept), in ``dtype``, without a full-size ``g**2`` temporary.

    A squared norm in general. On CPU, reducing a 2-D tensor over its rows only (``dims == (0,)``)
    with the norm kernel strides down columns and is an order of magnitude slower than a pass over
    the data, so rows are streamed through a small accumulator block instead.
    """
    if g.device.type == "cpu" and g.dim() == 2 and dims == (0,) and g.stride(1) == 1:
        rows, cols = g.shape
        block = max(1, _COLUMN_BLOCK_ELEMS // cols)
        if rows > 2 * block:
            acc = torch.zeros((block, cols), dtype=dtype)
            for chunk in g.split(block):
                acc[: chunk.shape[0]].addcmul_(chunk, chunk)
            return acc.sum(0, keepdim=True)
    norm = torch.linalg.vector_norm(g, 2, dim=dims, keepdim=True, dtype=dtype)
    return norm.mul_(norm)


def _apply_update(bucket: dict[str, list], eps: float, *, broadcast: bool) -> None:
    denoms = torch._foreach_sqrt(bucket["v"])
    torch._foreach_div_(denoms, bucket["bc2_sqrt"])
    torch._foreach_add_(denoms, eps)
    if broadcast:
        denoms = [d.expand_as(p) for d, p in zip(denoms, bucket["p"])]
    torch._foreach_addcdiv_(bucket["p"], bucket["m"], denoms, bucket["neg_step_size"])
