"""Fused SlimAdamW update on CPU: one C++ kernel call per float32 parameter (per part of a weight cut by rows).

Like ``torch.optim.AdamW(fused=True)``, the whole update of an element (momentum, weight decay, step)
happens in one pass. A segment whose second moment is kept per row (the rule averages every dim but
the first, the common case) also takes its statistic in that pass: each row is summed and updated while
it is in cache, so ``p``, ``g`` and ``m`` are read from memory once where fused AdamW also reads and
writes a full ``v``. The kernel (``csrc/slimadamw.cpp``) is built on first use with
:mod:`torch.utils.cpp_extension` and the system's C++ compiler, cached per machine and torch version
(a later process loads it in a fraction of a second), and called through :mod:`ctypes`.

Parameters the kernel does not cover take the eager foreach path in the same step, with the same math
(:func:`fused_covers`; :func:`slimadam_hf.core.functional.slimadamw` splits the batch): other dtypes or
devices, non-contiguous tensors, a first moment stored in int8 or rounded stochastically (a bfloat16 one
rounded to nearest is covered), statistics handed in by a distributed step (FSDP2, ZeRO), and dims that
are neither per row, per column, all nor none of the parameter seen as ``(shape[0], -1)``. ``robust=True``
is covered: a per-row or per-column segment's factored second moment takes one pass over ``g`` for its
column sums, then the same pass over the rows.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import math
import os
import platform
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import Tensor

from .compress_spec import Segment
from .factored import Complement
from .step_scalars import step_scalars

__all__ = ["fused_slimadamw", "fused_covers", "fused_available", "FusedUnavailableError"]

logger = logging.getLogger(__name__)
_SOURCE = Path(__file__).with_name("csrc") / "slimadamw.cpp"
_FULL, _ROWS, _COLS, _ALL, _ROWS_FACTORED, _COLS_FACTORED = 0, 1, 2, 3, 4, 5
_CFLAGS = [
    "-O3",
    "-march=native",  # this CPU's vector width; the build directory is keyed on its feature flags
    "-fopenmp",  # ATen's parallel_for is OpenMP in its headers; it runs on torch's own libgomp, already loaded
    "-fno-math-errno",  # lets sqrt vectorize
    "-ffp-contract=off",  # round every operation in torch's order (no implicit fused multiply-adds)
]

_lock = threading.Lock()
_library: Optional[ctypes.CDLL] = None
_failure: Optional[FusedUnavailableError] = None
_warned = False


class FusedUnavailableError(RuntimeError):
    """The fused CPU kernel could not be built here (no C++ compiler, or the build failed)."""


def _build_directory() -> Path:
    """Per kernel source, torch version and CPU (the kernel is compiled for this machine's instruction set)."""
    cpu = platform.processor() or platform.machine()
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        flags = ""
    key = hashlib.sha256(f"{torch.__version__}|{cpu}|{flags}|".encode() + _SOURCE.read_bytes()).hexdigest()[:12]
    root = os.environ.get("SLIMADAM_HF_KERNEL_DIR") or Path(
        os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "slimadam_hf"
    return Path(root) / f"fused-{key}"


def _load() -> ctypes.CDLL:
    global _library, _failure
    with _lock:
        if _library is not None:
            return _library
        if _failure is not None:
            raise _failure
        from torch.utils import cpp_extension

        directory = _build_directory()
        start = time.perf_counter()
        try:
            directory.mkdir(parents=True, exist_ok=True)
            path = cpp_extension.load(
                name="slimadam_hf_fused", sources=[str(_SOURCE)], build_directory=str(directory),
                extra_cflags=_CFLAGS, extra_ldflags=["-fopenmp"], is_python_module=False, verbose=False,
            )
        except Exception as exc:  # noqa: BLE001 - re-raised with the fix named
            _failure = FusedUnavailableError(
                f"implementation='fused': building the SlimAdamW CPU kernel failed ({type(exc).__name__}: "
                f"{str(exc).strip().splitlines()[-1] if str(exc).strip() else exc}). Install a C++ compiler "
                "(g++) and ninja, or use implementation='foreach'."
            )
            raise _failure from exc
        library = ctypes.CDLL(path)
        fn = library.slimadamw_block
        fn.restype = None
        fn.argtypes = ([ctypes.c_void_p] * 3 + [ctypes.c_int32] + [ctypes.c_void_p] * 2 + [ctypes.c_int64] * 2
                       + [ctypes.c_int32] + [ctypes.POINTER(ctypes.c_int64)] * 2 + [ctypes.POINTER(ctypes.c_int32)]
                       + [ctypes.POINTER(ctypes.c_int64)] * 2 + [ctypes.c_float] * 7)
        _library = library
        logger.info("fused CPU kernel ready in %.1f s (built or loaded from %s)", time.perf_counter() - start,
                    directory)
        return library


def fused_available() -> bool:
    """Whether the kernel builds (or is already built) here; the first failure is reported as a warning."""
    global _warned
    try:
        _load()
    except FusedUnavailableError as exc:
        if not _warned:
            _warned = True
            warnings.warn(f"{exc} SlimAdamW steps with implementation='foreach' (the same update, slower).",
                          stacklevel=3)
        return False
    return True


@dataclass(frozen=True)
class _Call:
    """One ``slimadamw_block`` call: ``rows`` rows of ``ld`` floats from element ``offset`` of the parameter,
    cut into column segments (the C arrays: first column, columns, kind, offset in the second moment and
    in the complement)."""

    offset: int
    rows: int
    ld: int
    nseg: int
    col_start: ctypes.Array
    ncols: ctypes.Array
    kinds: ctypes.Array
    v_offset: ctypes.Array
    w_offset: ctypes.Array


def _kind(dims: Optional[tuple[int, ...]], ndim: int, factored: bool) -> Optional[int]:
    if ndim == 1:
        return _FULL if dims is None else None
    if dims is None:
        return _FULL
    if len(dims) == ndim:
        return _ALL
    if dims == tuple(range(1, ndim)):
        return _ROWS_FACTORED if factored else _ROWS
    if dims == (0,):
        return _COLS_FACTORED if factored else _COLS
    return None


@functools.lru_cache(maxsize=None)
def _calls(shape: tuple[int, ...], segs: tuple[Segment, ...],
           comps: Optional[tuple[Optional[Segment], ...]] = None) -> Optional[tuple[_Call, ...]]:
    """The kernel calls of a parameter of ``shape`` seen as ``(shape[0], -1)`` (1-D: one row); ``None`` when a
    segment's dims are neither per row, per column, all nor none, or it is cut along a dim past the second.
    ``comps``: ``robust=True``'s complement segments (:func:`slimadam_hf.core.factored.complement_segments`)."""
    ndim = len(shape)
    rows, cols = (1, shape[0]) if ndim == 1 else (shape[0], math.prod(shape[1:]))
    comps = comps or (None,) * len(segs)
    kinds = [_kind(seg.dims, ndim, comp is not None) for seg, comp in zip(segs, comps)]
    if None in kinds or any(comp is not None and kind not in (_ROWS_FACTORED, _COLS_FACTORED)
                            for comp, kind in zip(comps, kinds)):
        return None
    w_offsets = [0 if comp is None else comp.v_offset for comp in comps]

    def call(offset: int, rows: int, ld: int, parts: list[tuple[int, int, int, int, int]]) -> _Call:
        arrays = [(ctype * len(parts))(*column) for ctype, column in zip(
            (ctypes.c_int64, ctypes.c_int64, ctypes.c_int32, ctypes.c_int64, ctypes.c_int64), zip(*parts))]
        return _Call(offset, rows, ld, len(parts), *arrays)

    if segs[0].split_dim is None:
        return (call(0, rows, cols, [(0, cols, kinds[0], 0, 0)]),)
    if segs[0].split_dim == 0 and ndim > 1:
        return tuple(call(seg.offset * cols, seg.size, cols, [(0, cols, kind, seg.v_offset, w_offset)])
                     for seg, kind, w_offset in zip(segs, kinds, w_offsets))
    if segs[0].split_dim == 1 and ndim == 2:
        return (call(0, rows, cols, [(seg.offset, seg.size, kind, seg.v_offset, w_offset)
                                     for seg, kind, w_offset in zip(segs, kinds, w_offsets)]),)
    return None


def _complement_segments(complement: Optional[Complement]) -> Optional[tuple[Optional[Segment], ...]]:
    return None if complement is None else complement.segments


def fused_covers(param: Tensor, grad: Tensor, exp_avg: object, exp_avg_sq: Tensor, segs: Sequence[Segment],
                 stats: object, noise_base: Optional[int], complement: object) -> bool:
    """Whether the kernel can step this parameter (see the module doc for what it leaves to foreach)."""
    return (
        param.device.type == "cpu"
        and param.dtype == torch.float32
        and type(exp_avg) is Tensor
        and (exp_avg.dtype == torch.float32 or (exp_avg.dtype == torch.bfloat16 and noise_base is None))
        and grad.dtype == torch.float32
        and exp_avg_sq.dtype == torch.float32
        and all(t.is_contiguous() for t in (param, grad, exp_avg, exp_avg_sq))
        and stats is None
        and (complement is None or (complement.stats is None and complement.tensor.dtype == torch.float32
                                    and complement.tensor.is_contiguous()
                                    and not any(c is not None and c.v_box for c in complement.segments)))
        and param.numel() > 0
        and all(seg.window is None and not seg.v_box and not seg.shares_v for seg in segs)
        and _calls(tuple(param.shape), tuple(segs), _complement_segments(complement)) is not None
    )


def fused_slimadamw(
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
    """The contract of :func:`slimadam_hf.core.functional.slimadamw` for parameters that :func:`fused_covers`
    (their ``second_moment_stats`` are ``None``, and ``noise`` too for a bfloat16 first moment: it is rounded
    to nearest)."""
    kernel = _load().slimadamw_block
    torch._foreach_add_(list(state_steps), 1)
    for param, grad, exp_avg, exp_avg_sq, step_t, segs, complement in zip(
        params, grads, exp_avgs, exp_avg_sqs, state_steps, param_segments, complements
    ):
        hyper = step_scalars(step_t.item(), lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay)
        p, g, m, v = param.data_ptr(), grad.data_ptr(), exp_avg.data_ptr(), exp_avg_sq.data_ptr()
        w = None if complement is None else complement.tensor.data_ptr()
        bf16 = exp_avg.dtype == torch.bfloat16
        for c in _calls(tuple(param.shape), tuple(segs), _complement_segments(complement)):
            kernel(p + 4 * c.offset, g + 4 * c.offset, m + exp_avg.element_size() * c.offset, bf16, v, w, c.rows,
                   c.ld, c.nseg, c.col_start, c.ncols, c.kinds, c.v_offset, c.w_offset, *hyper)
