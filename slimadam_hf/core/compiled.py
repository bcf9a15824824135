"""Compiled SlimAdamW update: ``torch.compile`` (inductor) fuses each parameter's whole step.

One graph per parameter *signature* (shape, strides, dtypes, device, compress segments), each in a
function of its own (one dynamo cache entry, one guard set per call), so the layers of a transformer
share a handful of compiled kernels. Per parameter the generated code reads
``p``, ``g`` and ``m`` once, reads ``g`` once more for the reduction ``mean(g**2)`` (fused, no
full-size temporary), and writes ``p`` and ``m``: weight decay, bias correction and the ``eps``
placement are folded into that single pass. Hyperparameters and bias corrections enter as runtime
values of one small tensor, so changing ``lr`` or the step count does not recompile. The compressed
denominator is an opaque custom op on the small second moment, so the loop over the parameter has no
per-element sqrt or division.

The math is the reference's (:func:`slimadam_hf.core.functional._single_tensor_slimadamw`) in the second
moment's dtype (float32; float64 for float64 parameters); results agree with it to that rounding
(the kernels may reassociate the reduction).
"""

from __future__ import annotations

import time
import types
from typing import Any, Callable, Optional, Sequence

import torch
from torch import Tensor

from . import quant
from .compress_spec import Segment
from .factored import Complement
from .quant import QuantizedMomentum
from .rounding import lerp_low_precision_, noise_key
from .step_scalars import step_scalars

__all__ = ["compiled_slimadamw", "compile_copy", "compile_stats", "CompileUnavailableError"]

# dynamo keeps a bounded number of graphs per code object (a signature's function can still see
# several, e.g. a new device index)
_RECOMPILE_LIMIT = 1024

_STATS: dict[str, float] = {"graphs": 0, "compile_seconds": 0.0}
_SEEN: set[tuple] = set()
_COMPILED: dict[tuple, Callable[..., None]] = {}


class CompileUnavailableError(RuntimeError):
    """``torch.compile`` cannot build the fused kernels here (no compiler, unsupported backend)."""


@torch.library.custom_op("slimadam_hf::step_over_denominator", mutates_args=())
def _step_over_denominator(v: Tensor, scalars: Tensor) -> Tensor:
    """``-lr/bc1 / (sqrt(v)/sqrt(bc2) + eps)`` of a compressed second moment (a small tensor).

    Opaque to inductor on purpose: inlined, the sqrt and two divisions would be recomputed for every
    element of the parameter; as an op of its own they run once per kept entry and the fused pass
    over the parameter is multiply-adds only.
    """
    neg_step_size, bias_correction2_sqrt, eps = scalars[4], scalars[5], scalars[6]
    return neg_step_size / (v.sqrt() / bias_correction2_sqrt + eps)


@_step_over_denominator.register_fake
def _(v: Tensor, scalars: Tensor) -> Tensor:
    return torch.empty_like(v)


def _update(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_absmax: Optional[Tensor],
    exp_avg_sq: Tensor,
    segs: tuple[Segment, ...],
    scalars: Tensor,
    stats: Optional[tuple[Tensor, ...]],
    update_momentum: bool,
    complement: Optional[Tensor],
    comps: tuple[Optional[Segment], ...],
    complement_stats: Optional[tuple[Optional[Tensor], ...]],
) -> None:
    # 1 - beta2 comes in computed in float64: formed from a float32 beta2 it would lose 4 digits
    decay, one_minus_beta1, beta2, one_minus_beta2, neg_step_size, bias_correction2_sqrt, eps = scalars.unbind()
    dtype = exp_avg_sq.dtype  # float32, or float64 for float64 parameters
    g = grad.to(dtype)
    # the stored (low-precision or int8) momentum drives the update
    if not update_momentum:  # done before the call (stochastic rounding)
        m = exp_avg.to(dtype)
    elif exp_avg_absmax is None:
        m = torch.lerp(exp_avg.to(dtype), g, one_minus_beta1)
        exp_avg.copy_(m)
        m = exp_avg.to(dtype)
    else:
        m = torch.lerp(quant.dequantize(exp_avg, exp_avg_absmax, param.shape).to(dtype), g, one_minus_beta1)
        codes, absmax = quant.quantize(m, exp_avg.shape[0])
        exp_avg.copy_(codes)
        exp_avg_absmax.copy_(absmax)
        m = quant.dequantize(codes, absmax, param.shape).to(dtype)
    p = param.to(dtype) * decay
    for k, seg in enumerate(segs):
        gs, ms, ps = seg.view(g), seg.view(m), seg.view(p)
        v = seg.second_moment_view(exp_avg_sq)
        if stats is not None:
            sq = stats[k]
        elif seg.dims is None:
            sq = gs * gs
        else:
            sq = (gs * gs).mean(dim=seg.dims, keepdim=True)
        v_new = v * beta2 + sq * one_minus_beta2
        v.copy_(v_new)
        v_den = seg.denominator_view(v_new)
        comp = comps[k]
        if comp is not None:  # robust: the factored second moment (slimadam_hf.core.factored)
            w = comp.second_moment_view(complement)
            sq_c = (gs * gs).mean(dim=comp.dims, keepdim=True) if complement_stats is None else complement_stats[k]
            w_new = w * beta2 + sq_c * one_minus_beta2
            w.copy_(w_new)
            b = (comp.denominator_view(w_new) / w_new.mean().clamp_min(torch.finfo(dtype).tiny)).sqrt()
            denom = v_den.sqrt() / bias_correction2_sqrt * b + eps
            seg.view(param).copy_(ps + neg_step_size * ms / denom)
        elif v_den.shape == ps.shape:
            denom = v_den.sqrt() / bias_correction2_sqrt + eps
            seg.view(param).copy_(ps + neg_step_size * ms / denom)
        else:
            seg.view(param).copy_(ps + ms * _step_over_denominator(v_den, scalars))


def _compiled(key: tuple) -> Callable[..., None]:
    """The compiled update for one parameter signature.

    Each signature gets its own copy of ``_update``'s code object, so dynamo keeps one cache entry
    per function and a call checks one set of guards instead of walking every signature's.
    """
    fn = _COMPILED.get(key)
    if fn is None:
        fn = compile_copy(_update, str(len(_COMPILED)))
        _COMPILED[key] = fn
    return fn


def compile_copy(fn: Callable[..., None], tag: str) -> Callable[..., None]:
    """``torch.compile`` (fullgraph, static shapes) of a copy of ``fn`` whose code object is its own
    (``{name}_{tag}``), so that dynamo keeps a cache entry, and checks guards, for this copy alone."""
    code = fn.__code__.replace(co_name=f"{fn.__name__}_{tag}")
    copy = types.FunctionType(code, fn.__globals__, code.co_name)
    # emulate_precision_casts: a low-precision momentum is really rounded before it is used
    return torch.compile(copy, dynamic=False, fullgraph=True, options={"emulate_precision_casts": True})


def _signature(t: Tensor) -> tuple:
    return (tuple(t.shape), tuple(t.stride()), t.dtype, t.device.type)


def compile_stats() -> dict[str, float]:
    """How many parameter signatures were compiled in this process, and the wall time it took."""
    return dict(_STATS)


def compiled_slimadamw(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    state_steps: Sequence[Tensor],
    param_segments: Sequence[Sequence[Segment]],
    second_moment_stats: Sequence[Optional[Sequence[Tensor]]],
    noise: Sequence[Optional[int]],
    complements: Sequence[Optional[Complement]],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
) -> None:
    """Same contract as :func:`slimadam_hf.core.functional.slimadamw`, one compiled call per parameter."""
    torch._foreach_add_(list(state_steps), 1)
    scalar_tensors: dict[tuple, Tensor] = {}
    with torch._dynamo.config.patch(recompile_limit=_RECOMPILE_LIMIT, accumulated_recompile_limit=_RECOMPILE_LIMIT):
        for param, grad, exp_avg, exp_avg_sq, step_t, segs, stats, base, complement in zip(
            params, grads, exp_avgs, exp_avg_sqs, state_steps, param_segments, second_moment_stats, noise,
            complements,
        ):
            step = step_t.item()
            key = noise_key(base, step, exp_avg)
            stochastic = key is not None
            if stochastic:
                lerp_low_precision_(exp_avg, grad, 1 - beta1, key)
            stats = None if stats is None else tuple(stats)
            absmax = None
            if isinstance(exp_avg, QuantizedMomentum):
                exp_avg, absmax = exp_avg.codes, exp_avg.absmax
            key = (
                _signature(param), _signature(grad), _signature(exp_avg), _signature(exp_avg_sq), tuple(segs),
                None if stats is None else tuple(map(_signature, stats)),
                None if absmax is None else _signature(absmax),
                stochastic,
                None if complement is None else _signature(complement.tensor),
                None if complement is None or complement.stats is None else tuple(map(_signature, complement.stats)),
            )
            values = step_scalars(step, lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay)
            scalars = scalar_tensors.get((values, param.device, exp_avg_sq.dtype))
            if scalars is None:
                scalars = torch.tensor(values, dtype=exp_avg_sq.dtype, device=param.device)
                scalar_tensors[(values, param.device, exp_avg_sq.dtype)] = scalars
            args: tuple[Any, ...] = (
                param, grad, exp_avg, absmax, exp_avg_sq, tuple(segs), scalars, stats, not stochastic,
                *((None, (None,) * len(segs), None) if complement is None
                  else (complement.tensor, complement.segments, complement.stats)),
            )
            fn = _compiled(key)
            if key in _SEEN:
                fn(*args)
                continue
            start = time.perf_counter()
            try:
                fn(*args)
            except Exception as exc:  # noqa: BLE001 - re-raised with the fix named
                raise CompileUnavailableError(
                    f"implementation='compiled': torch.compile could not build the SlimAdamW kernel for a "
                    f"parameter of shape {list(param.shape)} ({type(exc).__name__}: {exc}). Use "
                    "implementation='foreach' (eager), or install a working C++ compiler / Triton."
                ) from exc
            _SEEN.add(key)
            _STATS["graphs"] += 1
            _STATS["compile_seconds"] += time.perf_counter() - start
