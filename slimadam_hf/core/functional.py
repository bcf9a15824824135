"""The SlimAdamW update as functions, in the style of ``torch/optim/adamw.py``.

For each parameter with compress segments ``S`` (see :mod:`slimadam_hf.core.compress_spec`)::

    p  <- p * (1 - lr * weight_decay)                      # decoupled weight decay
    m  <- beta1 * m + (1 - beta1) * g
    v_s <- beta2 * v_s + (1 - beta2) * mean_{dims_s}(g_s ** 2)    for every segment s
    p_s <- p_s - lr / (1 - beta1**t) * m_s / (sqrt(v_s / (1 - beta2**t)) + eps)

With no dims this is exactly ``torch.optim.AdamW``. ``v`` is float32 (float64 for float64 params).
``m`` may be stored in another precision than the parameter (``SlimAdamW(momentum_dtype=...)``): it is
then updated in float32, rounded to nearest, and the stored value drives the update.

``second_moment_stats`` hands in ``mean(g_s ** 2)`` per segment instead of computing it from the
gradient (an entry may be ``None``: that segment computes it from the gradient): the sharded (DTensor)
and flat-partition (DeepSpeed ZeRO) steps reduce their statistics across ranks and then run this same
update on the local shards. A segment with ``shares_v`` (one box of a weight that a flat partition
cuts into several) leaves the second moment to the earlier segment that updates it and only uses it.

Implementations (``implementation=``):

* ``"reference"``: :func:`_single_tensor_slimadamw`, the plain per-tensor oracle the others are tested
  against;
* ``"foreach"``: :func:`_multi_tensor_slimadamw`, the same math batched with ``torch._foreach_*`` kernels
  and no full-size temporaries; the eager default;
* ``"compiled"``: :func:`slimadam_hf.core.compiled.compiled_slimadamw`, ``torch.compile``-d kernels that
  make each parameter's step a single pass over ``p``, ``g``, ``m``.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Optional, Sequence

import torch
from torch import Tensor

from .compress_spec import Segment
from .options import IMPLEMENTATIONS

Stats = Optional[Sequence[Optional[Sequence[Optional[Tensor]]]]]
"""Per parameter: ``None`` (compute from the gradient) or one ``mean(g**2)`` tensor (or ``None``) per segment."""


def slimadamw(
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
    implementation: str = "foreach",
    second_moment_stats: Stats = None,
) -> None:
    """Apply one SlimAdamW step to every parameter, in place (``implementation``: see the module doc)."""
    if implementation == "compiled":
        from .compiled import compiled_slimadamw

        impl = compiled_slimadamw
    elif implementation == "foreach":
        impl = _multi_tensor_slimadamw
    elif implementation == "reference":
        impl = _single_tensor_slimadamw
    else:
        raise ValueError(f"implementation={implementation!r}: choose one of {', '.join(IMPLEMENTATIONS)}")
    stats = second_moment_stats if second_moment_stats is not None else [None] * len(params)
    impl(
        params, grads, exp_avgs, exp_avg_sqs, state_steps, param_segments, stats,
        lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay,
    )


def _single_tensor_slimadamw(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    state_steps: Sequence[Tensor],
    param_segments: Sequence[Sequence[Segment]],
    second_moment_stats: Sequence[Optional[Sequence[Tensor]]],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
) -> None:
    for param, grad, exp_avg, exp_avg_sq, step_t, segs, stats in zip(
        params, grads, exp_avgs, exp_avg_sqs, state_steps, param_segments, second_moment_stats
    ):
        step_t += 1
        step = step_t.item()
        if weight_decay != 0:
            param.mul_(1 - lr * weight_decay)
        if exp_avg.dtype == grad.dtype:
            exp_avg.lerp_(grad, 1 - beta1)
        else:
            exp_avg.copy_(exp_avg.float().lerp_(grad.float(), 1 - beta1))

        step_size = lr / (1 - beta1**step)
        bias_correction2_sqrt = (1 - beta2**step) ** 0.5
        for k, seg in enumerate(segs):
            v = seg.second_moment_view(exp_avg_sq)
            stat = None if stats is None else stats[k]
            if seg.shares_v:
                pass  # updated by an earlier segment of this step
            elif stat is not None:
                v.mul_(beta2).add_(stat, alpha=1 - beta2)
            else:
                g = seg.view(grad).to(v.dtype)
                if seg.dims is None:
                    v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
                else:
                    v.mul_(beta2).add_((g * g).mean(dim=seg.dims, keepdim=True), alpha=1 - beta2)
            denom = (seg.denominator_view(v).sqrt() / bias_correction2_sqrt).add_(eps)
            seg.view(param).addcdiv_(seg.view(exp_avg), denom, value=-step_size)


def lerp_momentum_(exp_avgs: list[Tensor], grads: list[Tensor], weight: float) -> None:
    """``m <- m + weight * (g - m)``; a momentum stored in another dtype is updated in float32 and rounded."""
    same = [i for i, (m, g) in enumerate(zip(exp_avgs, grads)) if m.dtype == g.dtype]
    if same:
        torch._foreach_lerp_([exp_avgs[i] for i in same], [grads[i] for i in same], weight)
    if len(same) < len(exp_avgs):  # one tensor at a time bounds the float32 temporaries
        for m, g in zip(exp_avgs, grads):
            if m.dtype != g.dtype:
                m.copy_(m.float().lerp_(g.float(), weight))


def _multi_tensor_slimadamw(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    state_steps: Sequence[Tensor],
    param_segments: Sequence[Sequence[Segment]],
    second_moment_stats: Sequence[Optional[Sequence[Tensor]]],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
) -> None:
    buckets: dict[tuple, list[int]] = defaultdict(list)
    for i, (p, m) in enumerate(zip(params, exp_avgs)):
        buckets[(p.device, p.dtype, m.dtype)].append(i)
    for indices in buckets.values():
        _multi_tensor_bucket(
            *([seq[i] for i in indices] for seq in (
                params, grads, exp_avgs, exp_avg_sqs, state_steps, param_segments, second_moment_stats
            )),
            lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay,
        )


def _multi_tensor_bucket(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    param_segments: list[Sequence[Segment]],
    second_moment_stats: list[Optional[Sequence[Tensor]]],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
) -> None:
    """One device/dtype bucket: whole-tensor ops batched, then full and reduced segments batched."""
    torch._foreach_add_(state_steps, 1)
    if weight_decay != 0:
        torch._foreach_mul_(params, 1 - lr * weight_decay)
    lerp_momentum_(exp_avgs, grads, 1 - beta1)

    full: dict[str, list] = defaultdict(list)  # v updated from g * g, elementwise
    reduced: dict[str, list] = defaultdict(list)  # v updated from a mean of g * g (and segments sharing a v)
    for param, grad, exp_avg, exp_avg_sq, step_t, segs, stats in zip(
        params, grads, exp_avgs, exp_avg_sqs, state_steps, param_segments, second_moment_stats
    ):
        step = step_t.item()
        neg_step_size = -lr / (1 - beta1**step)
        bias_correction2_sqrt = (1 - beta2**step) ** 0.5
        for k, seg in enumerate(segs):
            v = seg.second_moment_view(exp_avg_sq)
            stat = None if stats is None else stats[k]
            if seg.shares_v:  # applied after every v update, its own v's included
                bucket = reduced
            elif stat is None and seg.dims is None:
                bucket = full
                bucket["x"].append(seg.view(grad))
                bucket["v"].append(v)
            else:
                bucket = reduced
                bucket["x"].append(stat if stat is not None else _mean_of_squares(seg.view(grad), seg.dims, v))
                bucket["v"].append(v)
            bucket["p"].append(seg.view(param))
            bucket["m"].append(seg.view(exp_avg))
            bucket["v_den"].append(seg.denominator_view(v))
            bucket["neg_step_size"].append(neg_step_size)
            bucket["bc2_sqrt"].append(bias_correction2_sqrt)

    if full:
        v_dtype = full["v"][0].dtype
        g = full["x"] if full["x"][0].dtype == v_dtype else [t.to(v_dtype) for t in full["x"]]
        torch._foreach_mul_(full["v"], beta2)
        torch._foreach_addcmul_(full["v"], g, g, 1 - beta2)
        _apply_update(full, eps)
    if reduced:
        if reduced["v"]:
            torch._foreach_mul_(reduced["v"], beta2)
            torch._foreach_add_(reduced["v"], reduced["x"], alpha=1 - beta2)
        _apply_update(reduced, eps)


def _mean_of_squares(g: Tensor, dims: tuple[int, ...], v: Tensor) -> Tensor:
    return _sum_of_squares(g, dims, v.dtype).mul_(v.numel() / g.numel())


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


def _apply_update(bucket: dict[str, list], eps: float) -> None:
    denoms = torch._foreach_sqrt(bucket["v_den"])
    torch._foreach_div_(denoms, bucket["bc2_sqrt"])
    torch._foreach_add_(denoms, eps)
    denoms = [d.expand_as(p) for d, p in zip(denoms, bucket["p"])]
    torch._foreach_addcdiv_(bucket["p"], bucket["m"], denoms, bucket["neg_step_size"])
