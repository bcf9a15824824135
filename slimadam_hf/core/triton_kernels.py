"""The Triton kernels of ``implementation="triton"`` (CUDA; tested on CPU under ``TRITON_INTERPRET=1``).

Each kernel walks a table of jobs (int64 rows built by :mod:`slimadam_hf.core.triton_plan`), so one launch
serves every parameter of a step: a job's tensors are addresses in its row, and ``job_of[program]`` names the
job a program works on. The launches of a step, in order:

1. :func:`stats_kernel`: per job and block of ``RS`` rows, the sums of ``g**2`` along each row and, per
   column, over those rows (partial column sums in a scratch buffer): one read of ``g`` gives both, for the
   second moments that are not kept per row (per column, a single mean, ``robust=True``'s two factors).
2. :func:`ema_kernel`: ``mom <- beta2 * mom + (1 - beta2) * scale * sum_k src[k * stride + i]``: the partial
   sums (or statistics handed in by a sharded step) folded into their second moments.
3. :func:`mean_kernel`: the mean of each ``robust=True`` complement (the factored denominator's scale).
4. :func:`update_kernel`: one program per row of a job (the step-dependent scalars of each parameter come from
   a small table, so parameters at different steps share the launch). A second moment kept per row takes its statistic in
   the same program (the row is summed, then updated while it is in cache); a full one is updated element by
   element. The first moment is updated in float32 and stored (rounded to nearest, stochastically by
   :func:`slimadam_hf.core.rounding.element_noise`'s hash, or as int8 codes of one block of 256 per chunk),
   and the stored value drives the step, as in the reference.

The math is the reference's (:func:`slimadam_hf.core.functional._single_tensor_slimadamw`) in float32, with
IEEE-rounded square roots and divisions, so it agrees with it to float32 rounding.
"""

from __future__ import annotations

import triton
import triton.language as tl

from . import triton_layout as L



@triton.jit
def _ptr(row, field, dtype: tl.constexpr):
    return tl.load(row + field).to(tl.pointer_type(dtype))


@triton.jit
def _mix32(x):
    x = x ^ (x >> 16)
    x = x * 0x7FEB352D
    x = x ^ (x >> 15)
    x = x * 0x846CA68B
    return x ^ (x >> 16)


@triton.jit
def stats_kernel(jobs, job_of, RS: tl.constexpr, CB: tl.constexpr, G_DTYPE: tl.constexpr):
    pid = tl.program_id(0)
    job = tl.load(job_of + pid).to(tl.int64)
    row = jobs + job * L.STATS_FIELDS
    g_ptr = _ptr(row, L.ST_G, G_DTYPE)
    rows = tl.load(row + L.ST_ROWS)
    cols = tl.load(row + L.ST_COLS)
    ld = tl.load(row + L.ST_LD)
    part = tl.load(row + L.ST_PART)
    rowsum = tl.load(row + L.ST_ROWSUM)
    block = pid - tl.load(row + L.ST_FIRST)
    r = block * RS + tl.arange(0, RS)
    r_mask = r < rows
    acc = tl.zeros([RS], dtype=tl.float32)
    for c0 in range(0, cols, CB):
        c = c0 + tl.arange(0, CB)
        c_mask = c < cols
        g = tl.load(g_ptr + r[:, None] * ld + c[None, :], mask=r_mask[:, None] & c_mask[None, :], other=0.0)
        sq = g.to(tl.float32) * g.to(tl.float32)
        acc += tl.sum(sq, axis=1)
        if part != 0:
            tl.store(part.to(tl.pointer_type(tl.float32)) + block * cols + c, tl.sum(sq, axis=0), mask=c_mask)
    if rowsum != 0:
        tl.store(rowsum.to(tl.pointer_type(tl.float32)) + r, acc, mask=r_mask)


@triton.jit
def ema_kernel(jobs, scales, job_of, beta2, one_minus_beta2, EB: tl.constexpr):
    pid = tl.program_id(0)
    job = tl.load(job_of + pid).to(tl.int64)
    row = jobs + job * L.EMA_FIELDS
    dst = _ptr(row, L.EMA_DST, tl.float32)
    src = _ptr(row, L.EMA_SRC, tl.float32)
    n = tl.load(row + L.EMA_N)
    stride = tl.load(row + L.EMA_STRIDE)
    i = (pid - tl.load(row + L.EMA_FIRST)) * EB + tl.arange(0, EB)
    mask = i < n
    acc = tl.zeros([EB], dtype=tl.float32)
    for k in range(0, tl.load(row + L.EMA_NPARTS)):
        acc += tl.load(src + k * stride + i, mask=mask, other=0.0)
    x = acc * tl.load(scales + job)
    old = tl.load(dst + i, mask=mask)
    tl.store(dst + i, old * beta2 + one_minus_beta2 * x, mask=mask)


@triton.jit
def mean_kernel(jobs, tiny, MB: tl.constexpr):
    row = jobs + tl.program_id(0).to(tl.int64) * L.MEAN_FIELDS
    src = _ptr(row, L.MEAN_SRC, tl.float32)
    n = tl.load(row + L.MEAN_N)
    acc = tl.zeros([MB], dtype=tl.float32)
    for i0 in range(0, n, MB):
        i = i0 + tl.arange(0, MB)
        acc += tl.load(src + i, mask=i < n, other=0.0)
    mean = tl.div_rn(tl.sum(acc, axis=0), n.to(tl.float32))
    tl.store(_ptr(row, L.MEAN_DST, tl.float32), tl.maximum(mean, tiny))


@triton.jit
def _cast(x, dtype: tl.constexpr):
    """``x`` (float32) in ``dtype``, rounded to nearest even; to bfloat16 through its bits, so the result is
    the same compiled and under the interpreter (whose own conversion truncates)."""
    if dtype == tl.bfloat16:
        bits = x.to(tl.int32, bitcast=True)
        bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & -65536
        return bits.to(tl.float32, bitcast=True).to(tl.bfloat16)
    return x.to(dtype)


@triton.jit
def _round_half_even(x):
    return (x + 12582912.0) - 12582912.0  # 1.5 * 2**23: rounds |x| < 2**22 to an integer, ties to even


@triton.jit
def update_kernel(
    jobs, job_of, scalars, decay, one_minus_beta1, beta2, one_minus_beta2, eps,
    BLOCK_C: tl.constexpr, P_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr, M_DTYPE: tl.constexpr,
    MOMENTUM: tl.constexpr,
):
    pid = tl.program_id(0)
    job = tl.load(job_of + pid).to(tl.int64)
    row = jobs + job * L.UPDATE_FIELDS
    r = pid - tl.load(row + L.FIRST)
    p_ptr = _ptr(row, L.P, P_DTYPE) + r * tl.load(row + L.P_LD)
    g_ptr = _ptr(row, L.G, G_DTYPE) + r * tl.load(row + L.G_LD)
    m_ptr = _ptr(row, L.M, M_DTYPE) + r * tl.load(row + L.M_LD)
    cols = tl.load(row + L.COLS)
    n_valid = tl.load(row + L.N_VALID)
    kind = tl.load(row + L.KIND)
    v_ptr = _ptr(row, L.V, tl.float32) + r * tl.load(row + L.VR)
    vc = tl.load(row + L.VC)
    w_addr = tl.load(row + L.W)
    neg_step_size = tl.load(scalars + 2 * tl.load(row + L.SCALARS))  # -lr / (1 - beta1**step) of its parameter
    bias_correction2_sqrt = tl.load(scalars + 2 * tl.load(row + L.SCALARS) + 1)
    lane = tl.arange(0, BLOCK_C)

    if kind == L.KIND_ROWSTAT:  # this row's mean of g**2 is its second moment: sum it, then update the row
        acc = tl.zeros([BLOCK_C], dtype=tl.float32)
        for c0 in range(0, cols, BLOCK_C):
            c = c0 + lane
            g = tl.load(g_ptr + c, mask=(c < cols) & (r * cols + c < n_valid), other=0.0).to(tl.float32)
            acc += g * g
        mean = tl.sum(acc, axis=0) * (1.0 / cols.to(tl.float32))
        tl.store(v_ptr, tl.load(v_ptr) * beta2 + one_minus_beta2 * mean)

    for c0 in range(0, cols, BLOCK_C):
        c = c0 + lane
        valid = (c < cols) & (r * cols + c < n_valid)
        p = tl.load(p_ptr + c, mask=valid, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + c, mask=valid, other=0.0).to(tl.float32)

        if MOMENTUM == L.MOMENTUM_INT8:  # one chunk is one block of codes (BLOCK_C == L.QBLOCK)
            s_ptr = _ptr(row, L.S, tl.float32) + r * tl.load(row + L.S_LD) + c0 // L.QBLOCK
            block_exists = r * cols + c0 < tl.load(row + L.N_PAD)  # the last row of a 1-D moment ends early
            codes = tl.load(m_ptr + c, mask=valid, other=0).to(tl.float32)
            unit = tl.abs(codes) / 127.0
            m_old = tl.where(codes < 0, -(unit * unit), unit * unit) * tl.load(s_ptr, mask=block_exists, other=0.0)
            m_new = m_old + one_minus_beta1 * (g - m_old)
            m_new = tl.where(valid, m_new, 0.0)
            absmax = tl.max(tl.abs(m_new), axis=0)
            scaled = tl.div_rn(tl.abs(m_new), tl.where(absmax > 0, absmax, 1.0))
            level = _round_half_even(tl.sqrt_rn(scaled) * 127.0)
            stored = (level / 127.0) * (level / 127.0) * absmax
            m = tl.where(m_new < 0, -stored, stored)
            level = tl.where(m_new < 0, -level, level)
            padded = (c < tl.load(row + L.COLS_PAD)) & (r * cols + c < tl.load(row + L.N_PAD))
            tl.store(m_ptr + c, level.to(tl.int8), mask=padded)
            tl.store(s_ptr, absmax, mask=block_exists)
        else:
            m_old = tl.load(m_ptr + c, mask=valid, other=0.0).to(tl.float32)
            m_new = m_old + one_minus_beta1 * (g - m_old)
            if MOMENTUM == L.MOMENTUM_STOCHASTIC:  # 16 hashed bits below bfloat16's mantissa, then truncate
                position = (tl.load(row + L.NOISE_OFF) + r * tl.load(row + L.P_LD) + c).to(tl.uint32)
                noise = _mix32(position ^ tl.load(row + L.NOISE_SEED).to(tl.uint32)) & 0xFFFF
                bits = (m_new.to(tl.int32, bitcast=True) + noise.to(tl.int32)) & -65536
                m_stored = bits.to(tl.float32, bitcast=True).to(M_DTYPE)
            else:
                m_stored = _cast(m_new, M_DTYPE)
            tl.store(m_ptr + c, m_stored, mask=valid)
            m = m_stored.to(tl.float32)

        if kind == L.KIND_FULL:
            v = tl.load(v_ptr + c * vc, mask=valid, other=0.0)
            v = v * beta2 + one_minus_beta2 * (g * g)
            tl.store(v_ptr + c * vc, v, mask=valid)
        else:
            v = tl.load(v_ptr + c * vc, mask=valid, other=0.0)
        if w_addr != 0:  # robust=True: v * w / mean(w)
            w_ptr = w_addr.to(tl.pointer_type(tl.float32)) + r * tl.load(row + L.WR)
            w = tl.load(w_ptr + c * tl.load(row + L.WC), mask=valid, other=0.0)
            v = tl.div_rn(v * w, tl.load(_ptr(row, L.MEAN, tl.float32)))
        denom = tl.div_rn(tl.sqrt_rn(v), bias_correction2_sqrt) + eps
        decayed = p * decay
        if P_DTYPE != tl.float32:  # the reference stores p after its weight decay
            decayed = _cast(decayed, P_DTYPE).to(tl.float32)
        p = decayed + neg_step_size * tl.div_rn(m, denom)
        tl.store(p_ptr + c, _cast(p, P_DTYPE), mask=valid)
