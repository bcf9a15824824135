"""SNR CSV -> per-parameter compression rules (the authors' selection), and the rules JSON format.

CSV columns: ``step,key,shape,compress_dims,snr,mean_sqr,var`` (one row per measured step, parameter
key and candidate dims), as written by the authors' ``SNRTracker`` and by
:mod:`slimadam_hf.snr.targets`.

Selection (``select="max-snr"``, the authors' ``get_rules_slim_snr.py``): per key, average each
candidate's SNR over the measured steps (NaN measurements skipped); among candidates whose mean SNR
is above ``cutoff`` take the one with the highest mean SNR; none above -> ``None`` (no compression).
Norm weights are always ``None``, and so is any 1-D tensor (biases).  ``select="most-compressive"``
takes instead the candidate above the cutoff that leaves the smallest second moment (ties: higher SNR).

Rules JSON (the authors' format): ``{key: [dims] | null}`` in CSV first-appearance order, written with
``json.dumps(indent=4)`` and no trailing newline, byte-identical to ``paper_data/slimadam_C1.0_rules.json``.

Role-level rules (:func:`role_rules`, ``slimadam rules --by-role``): pool the keys of one role (e.g.
every layer's ``query``) by mean SNR or by majority of their own rules, and write a preset override
``rules: {role: fan_in | fan_out | both | none}`` that applies to any depth/width of the same family.
"""

from __future__ import annotations

import csv
import gzip
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Collection, Iterable, Literal

from ..core.compress_spec import Dims, parse_dims
from ..rules.presets import Preset, canonical_name, load_preset
from ..rules.roles import NEVER_COMPRESSED_ROLES, is_norm_name

__all__ = [
    "SNRSummary",
    "read_snr_csv",
    "summarize_snr",
    "select_rules",
    "rules_to_json",
    "write_rules_json",
    "rules_from_csv",
    "compressed_fraction",
    "KeyInfo",
    "key_infos",
    "dims_to_rule",
    "RoleRule",
    "role_rules",
    "role_rules_override",
    "param_rules_override",
    "split_part_key",
]

CSV_COLUMNS = ("step", "key", "shape", "compress_dims", "snr", "mean_sqr", "var")
Select = Literal["max-snr", "most-compressive"]
Rules = dict[str, "Dims | None"]

@dataclass
class SNRSummary:
    """Time-averaged SNR of one key: shape, candidate -> mean SNR, and the steps that went in."""

    key: str
    shape: tuple[int, ...]
    mean_snr: dict[Dims, float] = field(default_factory=dict)
    steps: list[int] = field(default_factory=list)


def read_snr_csv(path: str | Path) -> list[dict[str, object]]:
    """Rows of an SNR CSV (or ``.csv.gz``) with typed values (``step`` int, ``shape``/``compress_dims``
    tuples, floats)."""
    path = Path(path)
    with (gzip.open(path, "rt", newline="") if path.suffix == ".gz" else path.open(newline="")) as fh:
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
                        "shape": tuple(int(n) for n in re.findall(r"\d+", r["shape"])),
                        "compress_dims": parse_dims(r["compress_dims"], "compress_dims"),
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


# -- role-level rules ---------------------------------------------------------------------------

ROLE_AGGREGATES = ("mean", "majority")
_PART_KEY = re.compile(r"^(?P<name>.+)\[(?P<role>[A-Za-z_]+?)\d*\]$")
_EMBEDDING_ROLES = {"token_embedding", "position_embedding"}


@dataclass(frozen=True)
class KeyInfo:
    """What a CSV key is: its role and which tensor dims are fan_in / fan_out (``None``: unknown)."""

    role: str | None
    fan_in: Dims | None = None
    fan_out: Dims | None = None


def split_part_key(key: str) -> tuple[str, str | None]:
    """``"w[query]"`` -> ``("w", "query")``; a plain key -> ``(key, None)``."""
    m = _PART_KEY.match(key)
    return (m["name"], m["role"]) if m else (key, None)


def key_infos(
    summaries: dict[str, SNRSummary],
    roles_file: str | Path | None = None,
    preset: object = None,
    torch_layout: bool = False,
) -> dict[str, KeyInfo]:
    """Role and layout of each key, from (first hit wins) the ``<csv>.roles.json`` written by the SNR
    recorder, a ``name[role]`` key, the role patterns of ``preset`` (a name, YAML path or Preset), or
    the name (norms).  ``torch_layout`` assumes ``nn.Embedding`` / ``nn.Linear`` layouts for keys with
    no recorded layout (e.g. the authors' nanoGPT CSVs)."""
    recorded: dict[str, dict] = json.loads(Path(roles_file).read_text()) if roles_file else {}
    patterns = ()
    if preset is not None:

        patterns = (preset if isinstance(preset, Preset) else load_preset(str(preset))).patterns
    infos: dict[str, KeyInfo] = {}
    for key, s in summaries.items():
        rec = recorded.get(key, {})
        role = rec.get("role") or split_part_key(key)[1]
        if role is None and patterns:
            name = canonical_name(key)
            role = next((p.role for p in patterns if p.role and p.matches(name)), None)
        if role is None and is_norm_name(key):
            role = "norm"
        fan_in, fan_out = rec.get("fan_in"), rec.get("fan_out")
        if fan_in is None and torch_layout and len(s.shape) == 2:
            fan_in, fan_out = ((0,), (1,)) if role in _EMBEDDING_ROLES else ((1,), (0,))
        infos[key] = KeyInfo(role, tuple(fan_in) if fan_in else None, tuple(fan_out) if fan_out else None)
    return infos


def dims_to_rule(dims: Dims | None, info: KeyInfo, ndim: int) -> str | list[int]:
    """Layout-free rule name for ``dims``: ``none``, ``both``, ``fan_in``, ``fan_out``, else the dims."""
    if dims is None:
        return "none"
    dims = tuple(sorted(dims))
    if dims == tuple(range(ndim)):
        return "both"
    if info.fan_in is not None and dims == tuple(sorted(info.fan_in)):
        return "fan_in"
    if info.fan_out is not None and dims == tuple(sorted(info.fan_out)):
        return "fan_out"
    return list(dims)


@dataclass
class RoleRule:
    """The rule chosen for one role, and the evidence."""

    role: str
    rule: str | list[int]
    keys: list[str]
    mean_snr: dict[str, float]  # rule label -> SNR averaged over the role's keys
    votes: dict[str, int]  # rule label -> keys whose own selection it is


def _label(rule: str | list[int]) -> str:
    return rule if isinstance(rule, str) else str(rule)


def role_rules(
    summaries: dict[str, SNRSummary],
    infos: dict[str, KeyInfo],
    cutoff: float = 1.0,
    select: Select = "max-snr",
    aggregate: str = "mean",
) -> dict[str, RoleRule]:
    """One rule per role, aggregated over the role's keys (usually: across depth).

    Candidates are first mapped to layout-free labels (``fan_in``, ``fan_out``, ``both`` or explicit
    dims, see :func:`dims_to_rule`), so keys with different layouts can be pooled.

    * ``mean``: average each label's time-mean SNR over the keys, then select as for one key.
    * ``majority``: select per key, then the most frequent choice; ties go to ``none`` if it is among
      them, else to the tied label with the highest mean SNR.

    Roles that are never compressed (norm, bias, router), ``other`` and keys without a role are left out.
    """
    if aggregate not in ROLE_AGGREGATES:
        raise ValueError(f"unknown aggregate {aggregate!r}; use one of {ROLE_AGGREGATES}")
    per_key = select_rules(summaries, cutoff, select)
    by_role: dict[str, list[str]] = {}
    for key, s in summaries.items():
        info = infos.get(key) or KeyInfo(None)
        if info.role is None or info.role in NEVER_COMPRESSED_ROLES or info.role == "other" or len(s.shape) < 2:
            continue
        by_role.setdefault(info.role, []).append(key)
    out: dict[str, RoleRule] = {}
    for role, keys in by_role.items():
        sums: dict[str, list[float]] = {}
        kept: dict[str, float] = {}
        rules_by_label: dict[str, str | list[int]] = {}
        votes: dict[str, int] = {}
        for key in keys:
            s, info = summaries[key], infos[key]
            for dims, snr in s.mean_snr.items():
                rule = dims_to_rule(dims, info, len(s.shape))
                lab = _label(rule)
                rules_by_label[lab] = rule
                if not math.isnan(snr):
                    sums.setdefault(lab, []).append(snr)
                kept[lab] = max(kept.get(lab, 0), _kept_size(s.shape, dims) / math.prod(s.shape))
            lab = _label(dims_to_rule(per_key[key], info, len(s.shape)))
            votes[lab] = votes.get(lab, 0) + 1
        mean_snr = {lab: sum(v) / len(v) for lab, v in sums.items()}
        if aggregate == "mean":
            above = [(lab, v) for lab, v in mean_snr.items() if v > cutoff]
            if not above:
                choice = "none"
            elif select == "max-snr":
                choice = max(above, key=lambda lv: lv[1])[0]
            else:
                choice = min(above, key=lambda lv: (kept[lv[0]], -lv[1]))[0]
        else:
            top = max(votes.values())
            tied = [lab for lab, n in votes.items() if n == top]
            choice = "none" if "none" in tied else max(tied, key=lambda lab: mean_snr.get(lab, -math.inf))
        out[role] = RoleRule(role, rules_by_label.get(choice, "none"), keys, mean_snr, votes)
    return out


def role_rules_override(rules: dict[str, RoleRule], source: str = "") -> dict[str, object]:
    """A preset override (YAML/JSON mapping) with ``rules: {role: rule}``."""
    return {
        "name": "snr-roles",
        "description": f"SlimAdam role rules derived from SNR{f' ({source})' if source else ''}",
        "rules": {r.role: r.rule for r in rules.values()},
    }


def param_rules_override(
    rules: Rules, source: str = ""
) -> tuple[dict[str, object], list[str]]:
    """A preset override with ``params: {name: [dims] | null}``; split-weight parts keep their
    ``name[role]`` keys, which the planner reads as per-part exact rules. Also returns the keys left out:
    parts of a split that repeats a role (``name[mlp_up1]``), which a ``name[role]`` key cannot tell apart."""
    params: dict[str, list[int] | None] = {}
    skipped = []
    for key, dims in rules.items():
        if _INDEXED_PART_KEY.match(key):
            skipped.append(key)
            continue
        params[key] = list(dims) if dims is not None else None
    data = {
        "name": "snr-params",
        "description": f"SlimAdam per-parameter rules derived from SNR{f' ({source})' if source else ''}",
        "params": params,
    }
    return data, skipped


_INDEXED_PART_KEY = re.compile(r"^.+\[[A-Za-z_]+\d+\]$")
