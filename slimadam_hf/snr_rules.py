"""SNR CSV -> per-parameter compression rules (the authors' selection), and the rules JSON format.

CSV columns: ``step,key,shape,compress_dims,snr,mean_sqr,var`` (one row per measured step, parameter
key and candidate dims), as written by the authors' ``SNRTracker`` and by
:mod:`slimadam_hf.snr_callback`.

Selection (``select="max-snr"``, the authors' ``get_rules_slim_snr.py``): per key, average each
candidate's SNR over the measured steps (NaN measurements skipped); among candidates whose mean SNR
is above ``cutoff`` take the one with the highest mean SNR; none above -> ``None`` (no compression).
Norm weights are always ``None``, and so is any 1-D tensor (biases).  ``select="most-compressive"``
takes instead the candidate above the cutoff that leaves the smallest second moment (ties: higher SNR).

Rules JSON (the authors' format): ``{key: [dims] | null}`` in CSV first-appearance order, written with
``json.dumps(indent=4)`` and no trailing newline, byte-identical to ``paper_data/slimadam_C1.0_rules.json``.
"""

from __future__ import annotations

import csv
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Collection, Iterable, Literal

from .snr import Dims, parse_dims

__all__ = [
    "SNRSummary",
    "read_snr_csv",
    "summarize_snr",
    "select_rules",
    "is_norm_name",
    "rules_to_json",
    "write_rules_json",
    "rules_from_csv",
    "compressed_fraction",
]

CSV_COLUMNS = ("step", "key", "shape", "compress_dims", "snr", "mean_sqr", "var")
Select = Literal["max-snr", "most-compressive"]
Rules = dict[str, "Dims | None"]

# A dotted name component that starts with ``ln_`` (GPT-2 ``ln_1``, ``ln_f``) or contains ``norm``
# (``input_layernorm``, ``LayerNorm``, ``model.norm``, ``q_norm``).
_NORM_RE = re.compile(r"(^|\.)(ln_[^.]*|[^.]*norm[^.]*)\.", re.IGNORECASE)


def is_norm_name(key: str) -> bool:
    """Whether ``key`` names a normalisation-layer parameter (by name, like the authors)."""
    return bool(_NORM_RE.search(key + "."))


@dataclass
class SNRSummary:
    """Time-averaged SNR of one key: shape, candidate -> mean SNR, and the steps that went in."""

    key: str
    shape: tuple[int, ...]
    mean_snr: dict[Dims, float] = field(default_factory=dict)
    steps: list[int] = field(default_factory=list)


def read_snr_csv(path: str | Path) -> list[dict[str, object]]:
    """Rows of an SNR CSV with typed values (``step`` int, ``shape``/``compress_dims`` tuples, floats)."""
    path = Path(path)
    with path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        missing = [c for c in CSV_COLUMNS[:5] if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(
                f"{path}: not an SNR CSV, missing column(s) {missing}; expected header "
                f"{','.join(CSV_COLUMNS)} (written by SNRCallback or the authors' SNRTracker)"
            )
        rows = []
        for i, r in enumerate(reader, start=2):
            try:
                rows.append(
                    {
                        "step": int(float(r["step"])),
                        "key": r["key"],
                        "shape": parse_dims(r["shape"]),
                        "compress_dims": parse_dims(r["compress_dims"]),
                        "snr": float(r["snr"]) if r["snr"] not in ("", None) else math.nan,
                    }
                )
            except ValueError as exc:
                raise ValueError(f"{path}:{i}: bad row {r}: {exc}") from exc
    return rows


def summarize_snr(
    rows: Iterable[dict[str, object]], skip_before: int | None = None
) -> dict[str, SNRSummary]:
    """Average each (key, candidate)'s SNR over steps >= ``skip_before`` (NaN skipped, like pandas).

    Keys keep their first-appearance order.  A candidate whose every measurement is NaN averages to NaN
    (never selected).
    """
    sums: dict[str, dict[Dims, list[float]]] = {}
    out: dict[str, SNRSummary] = {}
    for r in rows:
        step = int(r["step"])  # type: ignore[arg-type]
        if skip_before is not None and step < skip_before:
            continue
        key = str(r["key"])
        summ = out.get(key)
        if summ is None:
            summ = out[key] = SNRSummary(key, tuple(r["shape"]))  # type: ignore[arg-type]
            sums[key] = {}
        if not summ.steps or summ.steps[-1] != step:
            summ.steps.append(step)
        acc = sums[key].setdefault(tuple(r["compress_dims"]), [0.0, 0])  # type: ignore[arg-type]
        snr = float(r["snr"])  # type: ignore[arg-type]
        if not math.isnan(snr):
            acc[0] += snr
            acc[1] += 1
    for key, per in sums.items():
        out[key].steps = sorted(set(out[key].steps))
        out[key].mean_snr = {d: (s / n if n else math.nan) for d, (s, n) in per.items()}
    if not out:
        raise ValueError(
            f"no SNR measurements at or after step {skip_before}; lower --skip-before"
            if skip_before is not None
            else "the SNR CSV has no rows"
        )
    return out


def _kept_size(shape: tuple[int, ...], dims: Dims) -> int:
    """Number of second-moment entries left after averaging over ``dims``."""
    return math.prod(s for i, s in enumerate(shape) if i not in dims)


def select_rules(
    summaries: dict[str, SNRSummary],
    cutoff: float = 1.0,
    select: Select = "max-snr",
    norm_names: Collection[str] | None = None,
    is_norm: Callable[[str], bool] = is_norm_name,
) -> Rules:
    """Pick one rule per key (see the module docstring). ``norm_names`` adds exact names to treat as norms."""
    if select not in ("max-snr", "most-compressive"):
        raise ValueError(f"unknown select={select!r}; use 'max-snr' (authors) or 'most-compressive'")
    extra = set(norm_names or ())
    rules: Rules = {}
    for key, s in summaries.items():
        if key in extra or is_norm(key) or len(s.shape) < 2:
            rules[key] = None
            continue
        above = [(d, v) for d, v in s.mean_snr.items() if v > cutoff]  # NaN compares False
        if not above:
            rules[key] = None
        elif select == "max-snr":
            rules[key] = max(above, key=lambda dv: dv[1])[0]
        else:
            rules[key] = min(above, key=lambda dv: (_kept_size(s.shape, dv[0]), -dv[1]))[0]
    return rules


def rules_to_json(rules: Rules) -> str:
    """The authors' JSON text: ``{key: [dims] | null}``, indent 4, no trailing newline."""
    return json.dumps({k: (list(v) if v is not None else None) for k, v in rules.items()}, indent=4)


def write_rules_json(rules: Rules, path: str | Path) -> None:
    """Write :func:`rules_to_json` to ``path``."""
    Path(path).write_text(rules_to_json(rules))


def rules_from_csv(
    path: str | Path,
    cutoff: float = 1.0,
    skip_before: int | None = None,
    select: Select = "max-snr",
    norm_names: Collection[str] | None = None,
) -> Rules:
    """Read an SNR CSV, time-average and select: the whole ``slimadam rules`` JSON pipeline."""
    return select_rules(
        summarize_snr(read_snr_csv(path), skip_before), cutoff, select, norm_names=norm_names
    )


def compressed_fraction(summaries: dict[str, SNRSummary], rules: Rules) -> float:
    """Fraction (0..1) of second-moment entries removed by ``rules`` over the keys in ``summaries``."""
    total = sum(math.prod(s.shape) for s in summaries.values())
    kept = sum(
        _kept_size(s.shape, rules[k]) if rules.get(k) is not None else math.prod(s.shape)  # type: ignore[arg-type]
        for k, s in summaries.items()
    )
    return 1.0 - kept / total if total else 0.0
