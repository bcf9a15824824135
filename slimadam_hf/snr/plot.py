"""Figures of an SNR CSV (matplotlib, written as PNG files).

* ``snr_heatmap.png``: parameter x candidate dims, colour = time-averaged log10 SNR, diverging at the
  cutoff (red: above, compressible; blue: below); the selected rule of each row is boxed.
* ``snr_over_steps.png``: one panel per role, SNR over steps per candidate, the line the median over
  the parameters of that role (usually: over depth) and the band their min..max; the cutoff dashed.

Roles come from ``roles`` (``{key: role}``, e.g. from the compression plan) or, by default, from the
key with its layer index replaced by ``*`` (``transformer.h.*.attn.q_proj.weight``).
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Mapping

from ..core.compress_spec import Dims
from .stats import format_dims
from .rules import Rules, SNRSummary, read_snr_csv, select_rules, summarize_snr

__all__ = ["depth_pattern", "plot_heatmap", "plot_over_steps", "plot_snr_csv"]


def depth_pattern(key: str) -> str:
    """``key`` with every numeric name component replaced by ``*`` (groups layers across depth)."""
    return re.sub(r"(?<=\.)\d+(?=\.)", "*", key)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_heatmap(
    summaries: Mapping[str, SNRSummary],
    rules: Rules,
    path: str | Path,
    cutoff: float = 1.0,
    title: str | None = None,
) -> Path:
    """Heatmap of time-averaged log10 SNR, keys (>= 2-D only) x candidates; returns the file path."""
    from matplotlib.colors import TwoSlopeNorm
    from matplotlib.patches import Rectangle

    plt = _plt()
    keys = [k for k, s in summaries.items() if len(s.shape) >= 2]
    if not keys:
        raise ValueError("no tensor with >= 2 dims in the SNR data; nothing to plot")
    cands: list[Dims] = []
    for k in keys:
        for d in summaries[k].mean_snr:
            if d not in cands:
                cands.append(d)
    cands.sort(key=lambda d: (len(d), d))
    grid = [
        [_log10(summaries[k].mean_snr.get(d, math.nan)) for d in cands] for k in keys
    ]
    finite = [v for row in grid for v in row if math.isfinite(v)]
    center = math.log10(cutoff)
    lo = min([center - 0.5, *finite])
    hi = max([center + 0.5, *finite])
    fig_h = max(3.0, 0.17 * len(keys) + 1.5)
    fig, ax = plt.subplots(figsize=(2.2 + 1.2 * len(cands), fig_h))
    im = ax.imshow(
        [[v if math.isfinite(v) else math.nan for v in row] for row in grid],
        aspect="auto",
        cmap="RdBu_r",
        norm=TwoSlopeNorm(vmin=lo, vcenter=center, vmax=hi),
        interpolation="nearest",
    )
    ax.set_xticks(range(len(cands)), [format_dims(d) for d in cands])
    ax.set_yticks(range(len(keys)), keys, fontsize=6 if len(keys) > 40 else 8)
    ax.set_xlabel("compress dims K")
    small = len(keys) <= 120
    for i, k in enumerate(keys):
        for j, d in enumerate(cands):
            v = grid[i][j]
            if small and math.isfinite(v):
                dark = abs(v - center) > 0.6 * max(hi - center, center - lo)
                ax.text(j, i, f"{v:.1f}", ha="center", va="center", color="white" if dark else "black",
                        fontsize=5 if len(keys) > 40 else 7)
        rule = rules.get(k)
        if rule is not None and tuple(rule) in cands:
            j = cands.index(tuple(rule))
            ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, lw=1.5, ec="black"))
    cb = fig.colorbar(im, ax=ax, fraction=0.08, pad=0.02)
    cb.set_label(f"log10 time-mean SNR (black line: cutoff {cutoff:g})")
    cb.ax.axhline(center, color="black", lw=2)
    ax.set_title(title or f"time-mean SNR (boxed: chosen rule, cutoff {cutoff:g})", fontsize=9)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _log10(v: float) -> float:
    return math.log10(v) if v > 0 and math.isfinite(v) else math.nan


def plot_over_steps(
    rows: list[dict[str, object]],
    path: str | Path,
    cutoff: float = 1.0,
    roles: Mapping[str, str] | None = None,
    title: str | None = None,
) -> Path:
    """SNR over steps, one panel per role (median and min..max band across that role's keys)."""
    plt = _plt()
    # role -> candidate -> step -> list of snr
    data: dict[str, dict[Dims, dict[int, list[float]]]] = {}
    for r in rows:
        if len(r["shape"]) < 2:  # type: ignore[arg-type]
            continue
        key = str(r["key"])
        role = (roles or {}).get(key) or depth_pattern(key)
        snr = float(r["snr"])  # type: ignore[arg-type]
        if not (snr > 0 and math.isfinite(snr)):
            continue
        per = data.setdefault(role, {}).setdefault(tuple(r["compress_dims"]), {})  # type: ignore[arg-type]
        per.setdefault(int(r["step"]), []).append(snr)  # type: ignore[arg-type]
    if not data:
        raise ValueError("no finite SNR of a tensor with >= 2 dims in the data; nothing to plot")
    n = len(data)
    ncols = min(3, n)
    nrows = math.ceil(n / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.0 * nrows), squeeze=False, sharex=True)
    for ax, (role, per) in zip(axes.flat, data.items()):
        for dims in sorted(per, key=lambda d: (len(d), d)):
            steps = sorted(per[dims])
            vals = [sorted(per[dims][s]) for s in steps]
            med = [v[len(v) // 2] for v in vals]
            line, = ax.plot(steps, med, label=format_dims(dims), lw=1.2)
            if any(len(v) > 1 for v in vals):
                ax.fill_between(steps, [v[0] for v in vals], [v[-1] for v in vals], color=line.get_color(), alpha=0.15)
        ax.axhline(cutoff, color="black", ls="--", lw=1)
        ax.set_yscale("log")
        ax.set_title(role, fontsize=8)
        ax.set_xlabel("step", fontsize=8)
        ax.set_ylabel("SNR", fontsize=8)
        ax.legend(fontsize=7, title="K", title_fontsize=7)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[n:]:
        ax.set_visible(False)
    fig.suptitle(title or f"SNR over training (line: median over depth, band: min..max; dashed: cutoff {cutoff:g})", fontsize=9)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_snr_csv(
    csv_path: str | Path,
    out_dir: str | Path,
    cutoff: float = 1.0,
    skip_before: int | None = None,
    roles: Mapping[str, str] | None = None,
    prefix: str = "",
) -> list[Path]:
    """Both figures for one CSV into ``out_dir``; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = read_snr_csv(csv_path)
    summaries = summarize_snr(rows, skip_before)
    rules = select_rules(summaries, cutoff)
    name = Path(csv_path).stem
    name = name if len(name) <= 48 else name[:22] + "..." + name[-23:]
    return [
        plot_heatmap(summaries, rules, out / f"{prefix}snr_heatmap.png", cutoff, title=f"{name}\ntime-mean log10 SNR (boxed: rule, cutoff {cutoff:g})"),
        plot_over_steps(rows, out / f"{prefix}snr_over_steps.png", cutoff, roles),
    ]
