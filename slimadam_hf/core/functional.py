"""The SlimAdamW update as functions, in the style of ``torch/optim/adamw.py``.

For each parameter with compress segments ``S`` (see :mod:`slimadam_hf.core.compress_spec`)::

    p  <- p * (1 - lr * weight_decay)                      # decoupled weight decay
    m  <- beta1 * m + (1 - beta1) * g
    v_s <- beta2 * v_s + (1 - beta2) * mean_{dims_s}(g_s ** 2)    for every segment s
    p_s <- p_s - lr / (1 - beta1**t) * m_s / (sqrt(v_s / (1 - beta2**t)) + eps)

With no dims this is exactly ``torch.optim.AdamW``. ``v`` is float32 (float64 for float64 params).
``m`` may be stored in another precision than the parameter (``SlimAdamW(momentum_dtype=...)``): it is
then updated in float32 and stored back (bfloat16: rounded to nearest or stochastically, see
:mod:`slimadam_hf.core.rounding`; int8: block-quantized, see :mod:`slimadam_hf.core.quant`), and the
stored value drives the update.

``exp_avg_sq_complements`` (``robust=True``): per parameter ``None`` or its
:class:`~slimadam_hf.core.factored.Complement`; the compressed segments of a parameter that has one use a
factored second moment (:mod:`slimadam_hf.core.factored`).

``second_moment_stats`` hands in ``mean(g_s ** 2)`` per segment instead of computing it from the
gradient (an entry may be ``None``: that segment computes it from the gradient): the sharded (DTensor)
and flat-partition (DeepSpeed ZeRO) steps reduce their statistics across ranks and then run this same
update on the local shards. A segment with ``shares_v`` (one box of a weight that a flat partition
cuts into several) leaves the second moment to the earlier segment that updates it and only uses it.

Implementations (``implementation=``):

* ``"reference"``: :func:`_single_tensor_slimadamw`, the plain per-tensor oracle the others are tested
  against;
* ``"fused"``: :func:`slimadam_hf.core.fused.fused_slimadamw`, a C++ kernel for float32 CPU parameters
  (one pass per row); the default where it builds, the rest of a batch taking ``"foreach"``;
* ``"triton"``: :func:`slimadam_hf.core.triton_step.triton_slimadamw`, Triton kernels for CUDA parameters
  (a handful of launches per step; one pass per row where the second moment is kept per row), the rest of a
  batch taking ``"foreach"``;
* ``"foreach"``: :func:`_multi_tensor_slimadamw`, the same math batched with ``torch._foreach_*`` kernels
  and no full-size temporaries; any device.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from .compress_spec import Segment
from .options import IMPLEMENTATIONS
from .chunked import factored_update_, quantized_update
from .factored import Complement, factors
from .quant import QuantizedMomentum, RangeQuantizedMomentum
from .reductions import mean_of_squares
from .rounding import Noise, NoiseOffset, lerp_low_precision_, noise_bases, noise_key

Stats = Optional[Sequence[Optional[Sequence[Optional[Tensor]]]]]
"""Per parameter: ``None`` (compute from the gradient) or one ``mean(g**2)`` tensor (or ``None``) per segment."""


@dataclass
class UpdateBatch:
    """The inputs of one :func:`slimadamw` call, as aligned lists (a param group's, or a ZeRO partition's)."""

    params: list[Tensor] = field(default_factory=list)
    grads: list[Tensor] = field(default_factory=list)
    exp_avgs: list[Tensor] = field(default_factory=list)
    exp_avg_sqs: list[Tensor] = field(default_factory=list)
    steps: list[Tensor] = field(default_factory=list)
    segments: list[tuple[Segment, ...]] = field(default_factory=list)
    stats: list[Optional[list[Optional[Tensor]]]] = field(default_factory=list)
    complements: list[Optional[Complement]] = field(default_factory=list)
    noise_offsets: list[NoiseOffset] = field(default_factory=list)  # where a shard sits in its parameter(s)

    def add(self, param, grad, exp_avg, exp_avg_sq, step, segs, stats=None, complement=None,  # noqa: ANN001
            noise_offset: NoiseOffset = 0) -> None:
        for seq, value in zip(
            (self.params, self.grads, self.exp_avgs, self.exp_avg_sqs, self.steps, self.segments, self.stats,
             self.complements, self.noise_offsets),
            (param, grad, exp_avg, exp_avg_sq, step, segs, stats, complement, noise_offset),
        ):
            seq.append(value)


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
    rounding_seed: Optional[int] = None,
    noise_offsets: Optional[Sequence[NoiseOffset]] = None,
    exp_avg_sq_complements: Optional[Sequence[Optional[Complement]]] = None,
) -> None:
    """Apply one SlimAdamW step to every parameter, in place (``implementation``: see the module doc).

    ``rounding_seed``: round a bfloat16 first moment stochastically, with noise keyed by this seed, the
    parameter's position in these lists and its step (:mod:`slimadam_hf.core.rounding`); ``None``: to nearest.
    ``noise_offsets``: per tensor, the flat position of its first element in the whole parameter (a shard's
    start; for a ZeRO partition, its ranges of each weight: :data:`~slimadam_hf.core.rounding.NoiseOffset`), so
    that a sharded step draws each element's noise as one process does; ``None``: all 0.
    ``exp_avg_sq_complements``: factored second moments where an entry is a tensor (``robust=True``).
    """
    if implementation == "fused":
        impl = _with_foreach_rest(_fused_covered)
    elif implementation == "triton":
        impl = _with_foreach_rest(_triton_covered)
    elif implementation == "foreach":
        impl = _multi_tensor_slimadamw
    elif implementation == "reference":
        impl = _single_tensor_slimadamw
    else:
        raise ValueError(f"implementation={implementation!r}: choose one of {', '.join(IMPLEMENTATIONS)}")
    stats = second_moment_stats if second_moment_stats is not None else [None] * len(params)
    complements = exp_avg_sq_complements if exp_avg_sq_complements is not None else [None] * len(params)
    impl(
        params, grads, exp_avgs, exp_avg_sqs, state_steps, param_segments, stats,
        noise_bases(rounding_seed, len(params), noise_offsets), complements,
        lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay,
    )


def _fused_covered(*seqs: Sequence, **hyper: float) -> list[int]:
    """The C++ kernel's step of the parameters it covers; returns the positions of the others."""
    from .fused import fused_covers, fused_slimadamw

    params, grads, exp_avgs, exp_avg_sqs, _, param_segments, stats, noise, complements = seqs
    covered = [fused_covers(*args) for args in zip(
        params, grads, exp_avgs, exp_avg_sqs, param_segments, stats, noise, complements)]
    picked = [i for i, c in enumerate(covered) if c]
    if picked:
        fused_slimadamw(*([seq[i] for i in picked] for seq in seqs), **hyper)
    return [i for i, c in enumerate(covered) if not c]


def _triton_covered(*seqs: Sequence, **hyper: float) -> list[int]:
    from .triton_step import triton_slimadamw

    return triton_slimadamw(*seqs, **hyper)


def _with_foreach_rest(fast: Callable[..., list[int]]) -> Callable[..., None]:
    """An implementation that steps what ``fast`` covers through it and the rest of the batch through foreach."""

    def step(*seqs: Sequence, **hyper: float) -> None:
        rest = fast(*seqs, **hyper)
        if rest:
            _multi_tensor_slimadamw(*([seq[i] for i in rest] for seq in seqs), **hyper)

    return step


def _single_tensor_slimadamw(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    state_steps: Sequence[Tensor],
    param_segments: Sequence[Sequence[Segment]],
    second_moment_stats: Sequence[Optional[Sequence[Tensor]]],
    noise: Sequence[Optional[Noise]],
    complements: Sequence[Optional[Complement]],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
) -> None:
    for param, grad, exp_avg, exp_avg_sq, step_t, segs, stats, base, complement in zip(
        params, grads, exp_avgs, exp_avg_sqs, state_steps, param_segments, second_moment_stats, noise, complements
    ):
        step_t += 1
        step = step_t.item()
        if weight_decay != 0:
            param.mul_(1 - lr * weight_decay)
        key = noise_key(base, step, exp_avg)
        if isinstance(exp_avg, (QuantizedMomentum, RangeQuantizedMomentum)):  # int8: update in float32, store,
            exp_avg = exp_avg.store_(exp_avg.dequantize().lerp_(grad.float(), 1 - beta1))  # use what was stored
        elif exp_avg.dtype == grad.dtype and key is None:
            exp_avg.lerp_(grad, 1 - beta1)
        else:
            lerp_low_precision_(exp_avg, grad, 1 - beta1, key)

        step_size = lr / (1 - beta1**step)
        bias_correction2_sqrt = (1 - beta2**step) ** 0.5
        comps = (None,) * len(segs) if complement is None else complement.segments
        for k, (seg, comp) in enumerate(zip(segs, comps)):
            v = seg.second_moment_view(exp_avg_sq)
            stat = None if stats is None else stats[k]
            g = seg.view(grad).to(v.dtype)
            if seg.shares_v:
                pass  # updated by an earlier segment of this step
            elif stat is not None:
                v.mul_(beta2).add_(stat, alpha=1 - beta2)
            elif seg.dims is None:
                v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
            else:
                v.mul_(beta2).add_((g * g).mean(dim=seg.dims, keepdim=True), alpha=1 - beta2)
            v_hat = seg.denominator_view(v)
            if comp is not None:  # the factored estimate, full size: this is the oracle
                w = complement.moment(k)
                stat_c = complement.stats[k] if complement.stats is not None else None
                if not seg.shares_v:
                    w.mul_(beta2).add_((g * g).mean(dim=comp.dims, keepdim=True) if stat_c is None else stat_c,
                                       alpha=1 - beta2)
                v_hat = v_hat * comp.denominator_view(w) / w.mean().clamp_min(torch.finfo(w.dtype).tiny)
            denom = (v_hat.sqrt() / bias_correction2_sqrt).add_(eps)
            seg.view(param).addcdiv_(seg.view(exp_avg), denom, value=-step_size)


def lerp_momentum_(exp_avgs: list[Tensor], grads: list[Tensor], weight: float, keys: list[Optional[Noise]]) -> None:
    """``m <- m + weight * (g - m)``; a momentum stored in another dtype, or rounded stochastically (a key),
    is updated in float32 chunk by chunk (:func:`~slimadam_hf.core.rounding.lerp_low_precision_`)."""
    same = [i for i, (m, g, key) in enumerate(zip(exp_avgs, grads, keys)) if m.dtype == g.dtype and key is None]
    if same:
        torch._foreach_lerp_([exp_avgs[i] for i in same], [grads[i] for i in same], weight)
    if len(same) < len(exp_avgs):
        for m, g, key in zip(exp_avgs, grads, keys):
            if m.dtype != g.dtype or key is not None:
                lerp_low_precision_(m, g, weight, key)


def _multi_tensor_slimadamw(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    state_steps: Sequence[Tensor],
    param_segments: Sequence[Sequence[Segment]],
    second_moment_stats: Sequence[Optional[Sequence[Tensor]]],
    noise: Sequence[Optional[Noise]],
    complements: Sequence[Optional[Complement]],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
) -> None:
    buckets: dict[tuple, list[int]] = defaultdict(list)
    exp_avgs = list(exp_avgs)
    for i, (p, m) in enumerate(zip(params, exp_avgs)):
        if isinstance(m, RangeQuantizedMomentum):  # a shard's int8 ranges: stored first, then a float32 moment
            exp_avgs[i] = m.store_(m.advance(grads[i], 1 - beta1))
            buckets[(p.device, p.dtype, exp_avgs[i].dtype, True)].append(i)
            continue
        if isinstance(m, QuantizedMomentum):
            quantized_update(
                p, grads[i], m, exp_avg_sqs[i], state_steps[i], param_segments[i], second_moment_stats[i],
                complements[i], lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay,
            )
            continue
        buckets[(p.device, p.dtype, m.dtype, False)].append(i)
    for (*_, advanced), indices in buckets.items():
        _multi_tensor_bucket(
            *([seq[i] for i in indices] for seq in (
                params, grads, exp_avgs, exp_avg_sqs, state_steps, param_segments, second_moment_stats, noise,
                complements,
            )),
            lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, advanced=advanced,
        )


def _multi_tensor_bucket(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    param_segments: list[Sequence[Segment]],
    second_moment_stats: list[Optional[Sequence[Tensor]]],
    noise: list[Optional[Noise]],
    complements: list[Optional[Complement]],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    advanced: bool = False,
) -> None:
    """One device/dtype bucket: whole-tensor ops batched, every second moment updated, then the updates.
    ``advanced``: the first moments already hold this step's values."""
    torch._foreach_add_(state_steps, 1)
    if weight_decay != 0:
        torch._foreach_mul_(params, 1 - lr * weight_decay)
    if not advanced:
        keys = [noise_key(base, step_t.item(), m) for base, step_t, m in zip(noise, state_steps, exp_avgs)]
        lerp_momentum_(exp_avgs, grads, 1 - beta1, keys)

    full_v, full_g = [], []  # v <- beta2 * v + (1 - beta2) * g * g
    mean_v, mean_x = [], []  # v <- beta2 * v + (1 - beta2) * x, x a mean of g * g (or handed in)
    plain: dict[str, list] = defaultdict(list)  # p <- p + step * m / (sqrt(v) / bc2_sqrt + eps), batched
    factored = []  # (p, m, v_den, w_den, w, step, bc2_sqrt): the denominator from two small moments, chunked
    for param, grad, exp_avg, exp_avg_sq, step_t, segs, stats, complement in zip(
        params, grads, exp_avgs, exp_avg_sqs, state_steps, param_segments, second_moment_stats, complements
    ):
        step = step_t.item()
        neg_step_size = -lr / (1 - beta1**step)
        bias_correction2_sqrt = (1 - beta2**step) ** 0.5
        comps = (None,) * len(segs) if complement is None else complement.segments
        for k, (seg, comp) in enumerate(zip(segs, comps)):
            v = seg.second_moment_view(exp_avg_sq)
            stat = None if stats is None else stats[k]
            if seg.shares_v:
                pass  # its v is updated by an earlier segment; every update is applied after all of them
            elif stat is None and seg.dims is None:
                full_v.append(v)
                full_g.append(seg.view(grad))
            else:
                mean_v.append(v)
                mean_x.append(stat if stat is not None else mean_of_squares(seg.view(grad), seg.dims, v))
            if comp is not None:
                w = complement.moment(k)
                if not seg.shares_v:
                    mean_v.append(w)
                    mean_x.append(complement.statistic(k, seg.view(grad)))
                factored.append((seg.view(param), seg.view(exp_avg), seg.denominator_view(v), comp.denominator_view(w),
                                 w, neg_step_size, bias_correction2_sqrt))
                continue
            plain["p"].append(seg.view(param))
            plain["m"].append(seg.view(exp_avg))
            plain["v_den"].append(seg.denominator_view(v))
            plain["neg_step_size"].append(neg_step_size)
            plain["bc2_sqrt"].append(bias_correction2_sqrt)

    if full_v:
        g = full_g if full_g[0].dtype == full_v[0].dtype else [t.to(full_v[0].dtype) for t in full_g]
        torch._foreach_mul_(full_v, beta2)
        torch._foreach_addcmul_(full_v, g, g, 1 - beta2)
    if mean_v:
        torch._foreach_mul_(mean_v, beta2)
        torch._foreach_add_(mean_v, mean_x, alpha=1 - beta2)
    if plain:
        denoms = torch._foreach_sqrt(plain["v_den"])
        torch._foreach_div_(denoms, plain["bc2_sqrt"])
        torch._foreach_add_(denoms, eps)
        denoms = [d.expand_as(p) for d, p in zip(denoms, plain["p"])]
        torch._foreach_addcdiv_(plain["p"], plain["m"], denoms, plain["neg_step_size"])
    for p, m, v_den, w_den, w, neg_step_size, bias_correction2_sqrt in factored:
        factored_update_(p, m, *factors(v_den, w_den, w, bias_correction2_sqrt), eps, neg_step_size)
