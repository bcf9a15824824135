"""SNR math (slimadam_hf.snr.stats) against an independent float64 numpy reference."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from slimadam_hf.core.compress_spec import parse_dims
from slimadam_hf.snr.stats import candidate_dims, format_dims, snr_stats, snr_table, stats_to_rows


def reference(v: np.ndarray, dims: tuple[int, ...]) -> tuple[float, float, float]:
    """SNR, mean_sqr, var computed the slow, obvious way in float64."""
    kept = [d for d in range(v.ndim) if d not in dims]
    moved = np.moveaxis(v.astype(np.float64), list(dims) + kept, range(v.ndim))
    n = int(np.prod([v.shape[d] for d in dims]))
    slices = moved.reshape(n, -1)  # one column per index of the kept dims
    ratios, msqs, vars_ = [], [], []
    for col in slices.T:
        mu = sum(col) / n
        var = sum((c - mu) ** 2 for c in col) / n
        msqs.append(mu * mu)
        vars_.append(var)
        if var > 0:
            ratios.append(mu * mu / var)
    return (sum(ratios) / len(ratios) if ratios else math.nan), sum(msqs) / len(msqs), sum(vars_) / len(vars_)


def test_candidate_dims_order_matches_authors():
    assert candidate_dims(1) == [(0,)]
    assert candidate_dims(2) == [(0,), (1,), (0, 1)]
    assert candidate_dims(3) == [(0,), (1,), (2,), (0, 1), (0, 2), (1, 2), (0, 1, 2)]
    with pytest.raises(ValueError):
        candidate_dims(0)


def test_dims_text_roundtrip():
    for d in candidate_dims(3):
        assert parse_dims(format_dims(d)) == d
    assert format_dims((0,)) == "(0,)" and format_dims((0, 1)) == "(0, 1)"
    assert parse_dims("[1]") == (1,)


@pytest.mark.parametrize("shape", [(6,), (5, 7), (4, 3, 5), (2, 3, 2, 4)])
def test_matches_float64_reference(shape):
    g = torch.Generator().manual_seed(1)
    v = torch.rand(shape, generator=g) ** 3 + 1e-3
    table = snr_table(v)
    assert list(table) == candidate_dims(len(shape))
    for dims, stat in table.items():
        snr, msq, var = reference(v.numpy(), dims)
        assert stat.snr == pytest.approx(snr, rel=1e-5)
        assert stat.mean_sqr == pytest.approx(msq, rel=1e-5)
        assert stat.var == pytest.approx(var, rel=1e-5)


def test_tiny_values_do_not_underflow():
    # Real second moments can be ~1e-26; their squares underflow float32 without the rescaling.
    g = torch.Generator().manual_seed(2)
    v = (torch.rand(8, 9, generator=g) + 0.1) * 1e-24
    for dims, stat in snr_table(v).items():
        snr, msq, var = reference(v.numpy(), dims)
        assert stat.snr == pytest.approx(snr, rel=1e-4)
        assert stat.mean_sqr == pytest.approx(msq, rel=1e-4)
        assert stat.var == pytest.approx(var, rel=1e-4)


def test_zero_variance_slices_are_dropped_from_snr_only():
    v = torch.rand(4, 6, generator=torch.Generator().manual_seed(3))
    v[1] = 0.5  # a constant row: var along dim 1 is 0 there
    stat = snr_table(v, [(1,)])[(1,)]
    snr, msq, var = reference(v.numpy(), (1,))
    assert stat.snr == pytest.approx(snr, rel=1e-5)  # mean over the 3 finite rows
    assert stat.mean_sqr == pytest.approx(msq, rel=1e-5)  # all 4 rows
    assert stat.var == pytest.approx(var, rel=1e-5, abs=1e-12)


def test_all_constant_gives_nan_and_zero_tensor_is_safe():
    assert math.isnan(snr_table(torch.full((3, 4), 2.0))[(0, 1)].snr)
    stat = snr_table(torch.zeros(3, 4))[(0,)]
    assert math.isnan(stat.snr) and stat.mean_sqr == 0.0 and stat.var == 0.0


def test_batched_single_transfer_and_bf16():
    vs = [torch.rand(3, 5), torch.rand(4, 2, 3).bfloat16(), torch.rand(7)]
    stats = [snr_stats(v) for v in vs]
    assert all(s.device == vs[0].device and s.shape == (len(candidate_dims(v.dim())), 3) for s, v in zip(stats, vs))
    rows = stats_to_rows(stats)
    assert [len(r) for r in rows] == [3, 7, 1]
    snr, _, _ = reference(vs[1].float().numpy(), (0, 2))
    assert rows[1][4][0] == pytest.approx(snr, rel=1e-5)


def test_invalid_candidate_names_shape():
    with pytest.raises(ValueError, match=r"\(3, 4\)"):
        snr_stats(torch.rand(3, 4), [(2,)])
