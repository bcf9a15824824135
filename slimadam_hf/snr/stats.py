"""Signal-to-noise ratio (SNR) of Adam's second moment along candidate compression dims.

For a second-moment tensor ``V`` and a set of dims ``K`` (the dims SlimAdam would average over),

    SNR_K(V) = mean over the remaining dims K' of  (mean_K V)^2 / var_K V

with the population variance (ddof 0); entries of the ratio that are not finite (a slice with zero
variance) are dropped from the mean.  Like the authors' CSV files (``paper_data/snr_*.csv``), each
measurement also reports

    mean_sqr = mean over K' of (mean_K V)^2        var = mean over K' of var_K V

(plain means over all of K', nothing dropped).  A large SNR means the entries along ``K`` are close to
their mean, so replacing them by it (compressing along ``K``) loses little.

Everything here runs on the tensor's device and returns device tensors; nothing is copied to the host,
so a caller that measures many tensors synchronises once (see :func:`stats_to_rows`).
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import combinations
from typing import Iterable, Sequence

import torch

__all__ = [
    "SNRStat",
    "candidate_dims",
    "snr_stats",
    "snr_table",
    "stats_to_rows",
    "format_dims",
]

Dims = tuple[int, ...]


def candidate_dims(ndim: int) -> list[Dims]:
    """Every non-empty subset of ``range(ndim)``, smallest first, in the authors' order.

    >>> candidate_dims(2)
    [(0,), (1,), (0, 1)]
    """
    if ndim < 1:
        raise ValueError(f"SNR needs a tensor with at least one dim, got ndim={ndim}")
    out: list[Dims] = []
    for r in range(1, ndim + 1):
        out.extend(tuple(c) for c in combinations(range(ndim), r))
    return out


def format_dims(dims: Sequence[int]) -> str:
    """Dims as the authors' CSV writes them: ``(0,)``, ``(0, 1)`` (read back by
    :func:`slimadam_hf.core.compress_spec.parse_dims`)."""
    return str(tuple(int(d) for d in dims))


@dataclass(frozen=True)
class SNRStat:
    """One CSV row's numbers for one candidate ``dims``."""

    dims: Dims
    snr: float
    mean_sqr: float
    var: float


def snr_stats(v: torch.Tensor, candidates: Iterable[Dims] | None = None) -> torch.Tensor:
    """SNR statistics of ``v`` for each candidate, as one device tensor of shape ``(n_candidates, 3)``.

    Columns are ``snr, mean_sqr, var`` (see the module docstring).  ``candidates`` defaults to
    :func:`candidate_dims` of ``v.dim()``.  The computation is in float32 on ``v.device`` on a copy of
    ``v`` scaled by its largest absolute value (second moments can be ~1e-26, whose squares underflow in
    float32); the SNR is scale-free and ``mean_sqr``/``var`` are scaled back in float64.
    """
    if v.dim() < 1:
        raise ValueError(f"SNR needs a tensor with at least one dim, got shape {tuple(v.shape)}")
    cands = list(candidates) if candidates is not None else candidate_dims(v.dim())
    x = v.detach().float()
    scale = x.abs().amax()
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    x = x / scale
    rows = []
    for dims in cands:
        bad = [d for d in dims if not 0 <= d < v.dim()]
        if bad or not dims:
            raise ValueError(f"candidate dims {dims} invalid for a tensor of shape {tuple(v.shape)}")
        var, mean = torch.var_mean(x, dim=dims, correction=0)
        msq = mean.square()
        ratio = msq / var
        finite = torch.isfinite(ratio)
        snr = torch.where(finite, ratio, torch.zeros_like(ratio)).sum() / finite.sum()
        # 0/0 -> nan when no entry is finite, as the authors report it.
        rows.append(torch.stack([snr, msq.mean(), var.mean()]))
    out = torch.stack(rows).double()
    s2 = scale.double().square()
    return torch.cat([out[:, :1], out[:, 1:] * s2], dim=1)


def stats_to_rows(stats: Sequence[torch.Tensor]) -> list[list[list[float]]]:
    """Copy many :func:`snr_stats` results to the host in one transfer (one device sync)."""
    if not stats:
        return []
    sizes = [s.shape[0] for s in stats]
    flat = torch.cat([s.reshape(-1, 3).to(torch.float64) for s in stats]).cpu().tolist()
    out, i = [], 0
    for n in sizes:
        out.append(flat[i : i + n])
        i += n
    return out


def snr_table(v: torch.Tensor, candidates: Iterable[Dims] | None = None) -> dict[Dims, SNRStat]:
    """Convenience wrapper of :func:`snr_stats` returning ``{dims: SNRStat}`` (synchronises)."""
    cands = list(candidates) if candidates is not None else candidate_dims(v.dim())
    (rows,) = stats_to_rows([snr_stats(v, cands)])
    return {d: SNRStat(d, *r) for d, r in zip(cands, rows)}
