"""``implementation="triton"``: the SlimAdamW step on CUDA as a handful of Triton launches.

A step launches at most one statistics kernel per gradient dtype, one kernel that folds statistics into
second moments, one for ``robust=True``'s means and one update kernel per (parameter dtype, first-moment
storage): GPT-2's 148 tensors take three launches and one copy of the job table to the device
(:mod:`slimadam_hf.core.triton_kernels`, :mod:`slimadam_hf.core.triton_plan`). Parameters the kernels do not
cover take the foreach path in the same step: float64 ones, tensors that are not contiguous, gradients of
another dtype than their parameter, dims no 2-D window of the tensor can express, and int8 first moments
whose split parts do not start on a quantization block.

On CPU the kernels run under Triton's interpreter when ``TRITON_INTERPRET=1`` is set before this module is
imported (the tests do); otherwise this path is for CUDA tensors.
"""

from __future__ import annotations

import importlib.util
import os
import warnings
from collections import OrderedDict
from typing import Any, Optional, Sequence

import torch
from torch import Tensor

from .compress_spec import Segment
from .factored import Complement
from .rounding import Noise, noise_key, noise_seed
from .triton_plan import MOMENTUM_INT8, STATS_ROWS, Plan, build_plan

EMA_BLOCK = 1024
UPDATE_BLOCK = 1024
STATS_COLS = 64
MEAN_BLOCK = 1024
_PLAN_CACHE_SIZE = 16

_plans: OrderedDict[tuple, Plan] = OrderedDict()
_warned = False
launches = 0
"""Kernel launches so far in this process (read by the tests and benchmarks)."""


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def triton_available(device: torch.device) -> bool:
    """Whether the kernels can run for tensors on ``device``: Triton importable, and a CUDA device (or any
    device under the interpreter). A CUDA device without Triton warns once, naming the fix."""
    global _warned
    if device.type != "cuda" and not interpreting():
        return False
    if importlib.util.find_spec("triton") is not None:
        return True
    if not _warned:
        _warned = True
        warnings.warn("SlimAdamW: Triton is not installed, so CUDA parameters take implementation='foreach' (the "
                      "same update, slower); `pip install triton` (it ships with CUDA builds of torch) to use the "
                      "fused kernels", stacklevel=3)
    return False


def _key(tensors: Sequence[Any], grads: Sequence[Tensor], segs: Sequence[Sequence[Segment]], stats: Sequence[Any],
         noise: Sequence[Optional[Noise]]) -> tuple:
    return (tuple(map(id, tensors)), tuple((g.dtype, g.is_contiguous()) for g in grads), tuple(map(tuple, segs)),
            tuple(None if s is None else tuple(x is not None for x in s) for s in stats),
            tuple(noise))


def plan_for(params: Sequence[Tensor], grads: Sequence[Tensor], exp_avgs: Sequence[Any],
             exp_avg_sqs: Sequence[Tensor], param_segments: Sequence[Sequence[Segment]], stats: Sequence[Any],
             noise: Sequence[Optional[Noise]], complements: Sequence[Optional[Complement]]) -> Plan:
    """The cached plan of these tensors (built on first sight, or again when any of them was replaced)."""
    tensors = [*params, *(getattr(m, "codes", m) for m in exp_avgs),  # int8 momenta: their codes and scales
               *(m.absmax for m in exp_avgs if not isinstance(m, Tensor)), *exp_avg_sqs,
               *(c.tensor for c in complements if c is not None)]
    key = _key(tensors, grads, param_segments, stats, noise)
    plan = _plans.get(key)
    if plan is None or not plan.alive(tensors):
        plan = build_plan(params, grads, exp_avgs, exp_avg_sqs, param_segments, stats, noise, complements, tensors,
                          EMA_BLOCK)
        _plans[key] = plan
        while len(_plans) > _PLAN_CACHE_SIZE:
            _plans.popitem(last=False)
    _plans.move_to_end(key)
    return plan


def triton_slimadamw(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Any],
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
) -> list[int]:
    """The contract of :func:`slimadam_hf.core.functional.slimadamw` for the parameters the kernels cover;
    returns the positions of the others, which it leaves untouched (their steps too)."""
    plan = plan_for(params, grads, exp_avgs, exp_avg_sqs, param_segments, second_moment_stats, noise, complements)
    if plan.covered:
        _run(plan, params, grads, exp_avgs, state_steps, second_moment_stats, noise, complements, lr=lr,
             beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay)
    return sorted(set(range(len(params))) - set(plan.covered))


def _step_scalars(state_steps: Sequence[Tensor], covered: Sequence[int], lr: float, beta1: float,
                  beta2: float) -> Tensor:
    """Per parameter ``(-lr / (1 - beta1**t), sqrt(1 - beta2**t))`` computed in float64 as the reference does,
    as float32 pairs packed into int64 slots (0 for parameters the kernels do not step)."""
    covered_steps = [state_steps[i] for i in covered]
    torch._foreach_add_(covered_steps, 1)
    steps = torch.stack(covered_steps).to(torch.float64)
    values = torch.zeros(len(state_steps), 2, dtype=torch.float64)
    values[covered, 0] = -lr / (1 - beta1**steps)
    values[covered, 1] = (1 - beta2**steps).sqrt()
    return values.to(torch.float32).view(torch.int64).view(-1)


def _run(plan: Plan, params: Sequence[Tensor], grads: Sequence[Tensor], exp_avgs: Sequence[Any],
         state_steps: Sequence[Tensor], stats: Sequence[Any], noise: Sequence[Optional[Noise]],
         complements: Sequence[Optional[Complement]], *, lr: float, beta1: float, beta2: float, eps: float,
         weight_decay: float) -> None:
    from . import triton_kernels as K

    global launches
    device = plan.device
    scratch = torch.empty(max(plan.scratch, 1), dtype=torch.float32, device=device)
    table = plan.static.clone()
    grad_addresses = torch.tensor([g.data_ptr() for g in grads], dtype=torch.int64)
    table[plan.grad_at] = grad_addresses[plan.grad_param] + plan.grad_offset
    table[plan.scratch_at] += scratch.data_ptr()
    handed = []  # keeps the float32 copies of statistics alive until the kernels are queued
    for pos, (i, k, which) in plan.stat_at:
        source = stats[i][k] if which == "v" else complements[i].stats[k]
        source = source.to(torch.float32).contiguous()
        handed.append(source)
        table[pos] = source.data_ptr()
    for pos, i in plan.noise_at:
        table[pos] = noise_seed(noise_key(noise[i], state_steps[i].item() + 1, exp_avgs[i]).base)
    table = torch.cat([table, _step_scalars(state_steps, plan.covered, lr, beta1, beta2)])
    if device.type == "cuda":
        table = table.pin_memory().to(device, non_blocking=True)
    scalars = table[plan.static.numel():].view(torch.float32)

    def span(key: tuple) -> Tensor:
        start, length = plan.slices[key]
        return table[start:start + length]

    one_minus_beta2 = 1 - beta2
    for (name, dtype), job_of in plan.job_of.items():
        if name == "stats":
            K.stats_kernel[(job_of.numel(),)](span((name, dtype)), job_of, RS=STATS_ROWS, CB=STATS_COLS,
                                              G_DTYPE=_tl(dtype))
            launches += 1
    if ("ema", None) in plan.slices:
        job_of = plan.job_of["ema", None]
        K.ema_kernel[(job_of.numel(),)](span(("ema", None)), plan.ema_scales, job_of, beta2, one_minus_beta2,
                                        EB=EMA_BLOCK)
        launches += 1
    if ("means", None) in plan.slices:
        means = span(("means", None))
        K.mean_kernel[(means.numel() // 3,)](means, torch.finfo(torch.float32).tiny, MB=MEAN_BLOCK)
        launches += 1
    decay = 1 - lr * weight_decay
    for (name, bucket), job_of in plan.job_of.items():
        if name != "update":
            continue
        p_dtype, m_dtype, momentum = bucket
        K.update_kernel[(job_of.numel(),)](
            span((name, bucket)), job_of, scalars, decay, 1 - beta1, beta2, one_minus_beta2, eps,
            BLOCK_C=256 if momentum == MOMENTUM_INT8 else UPDATE_BLOCK, P_DTYPE=_tl(p_dtype), G_DTYPE=_tl(p_dtype),
            M_DTYPE=_tl(m_dtype), MOMENTUM=momentum,
        )
        launches += 1
    del handed


def _tl(dtype: torch.dtype) -> Any:
    import triton.language as tl

    return {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16,
            torch.int8: tl.int8}[dtype]
