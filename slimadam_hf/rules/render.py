"""The one renderer of a compression plan: per-tensor or per-role ``rich`` tables, and the savings line.

Everything a user reads about savings (``str(plan)``, ``slimadam inspect``, the Trainer's log, the example
scripts) comes from here, so it is stated one way: "second moments saved: P%", and optimizer state
"AdamW X -> SlimAdamW Y (Z% of AdamW)" in binary units chosen by size.
"""

from __future__ import annotations

import io
import re
import shutil
from collections import defaultdict
from typing import TYPE_CHECKING, Any, Optional

if TYPE_CHECKING:
    from .plan import CompressionPlan, PlanEntry


def format_bytes(n: float) -> str:
    """``1536`` -> ``'1.50 KiB'``; ``2**30`` -> ``'1.00 GiB'``."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"  # pragma: no cover


def header_line(plan: "CompressionPlan") -> str:
    return (
        f"SlimAdam plan: preset {plan.preset} (model_type {plan.model_type}), {len(plan.entries)} trainable "
        f"tensors, {plan.num_parameters:,} parameters"
    )


def savings_line(plan: "CompressionPlan") -> str:
    """``second moments saved: 99.79% (N of M kept); optimizer state: AdamW X -> SlimAdamW Y (50.1% of AdamW)``."""
    return (
        f"second moments saved: {plan.second_moment_savings:.2%} ({plan.second_moment_numel:,} of "
        f"{plan.num_parameters:,} kept); optimizer state: AdamW {format_bytes(plan.adamw_state_bytes)} -> "
        f"SlimAdamW {format_bytes(plan.slimadam_state_bytes)} ({plan.state_bytes_ratio:.1%} of AdamW)"
    )


def _dims_text(dims: Optional[tuple[int, ...]]) -> str:
    return "-" if dims is None else str(list(dims))


_WIDE_COLUMNS = ("parameter", "x", "shape", "owner", "role", "rule", "dims", "v kept", "saved")
_NARROW_COLUMNS = ("parameter", "x", "shape", "role", "dims", "saved")  # under 120 columns
_NUMERIC = ("x", "v kept", "saved")


def tensor_table(plan: "CompressionPlan", collapse_layers: bool = True, narrow: bool = False) -> Any:
    """One row per kind of tensor; repeated layers collapse into one row with ``x`` = their count.

    ``narrow`` drops the owner, rule and entries-kept columns so the table fits an 80-column terminal.
    """
    from rich.table import Table

    columns = _NARROW_COLUMNS if narrow else _WIDE_COLUMNS
    table = Table(box=None, pad_edge=False)
    for column in columns:
        numeric = column in _NUMERIC
        table.add_column(
            column, justify="right" if numeric else "left", overflow="fold", no_wrap=column != "parameter",
            min_width=20 if column == "parameter" else None,
        )
    rows: dict[tuple, list["PlanEntry"]] = defaultdict(list)
    for e in plan.entries:
        key_name = re.sub(r"\.\d+\.", ".N.", e.name) if collapse_layers else e.name
        rows[(key_name, e.shape, e.owner, e.role, str(e.rule), str(e.spec))].append(e)
    for (key_name, shape, owner, role, rule, _), group in rows.items():
        e = group[0]
        if e.parts is not None:
            role = "|".join(p.role for p in e.parts)
            rule = "|".join(str(p.rule) for p in e.parts)
            dims = "|".join(_dims_text(p.dims) for p in e.parts)
        else:
            dims = _dims_text(e.dims)
        cells = {
            "parameter": key_name + (f" (= {', '.join(e.aliases)})" if e.aliases else ""),
            "x": str(len(group)),
            "shape": "x".join(map(str, shape)),
            "owner": owner,
            "role": role,
            "rule": rule,
            "dims": dims,
            "v kept": f"{e.second_moment_numel:,}",
            "saved": f"{1 - e.second_moment_numel / e.numel:.1%}",
        }
        table.add_row(*(cells[c] for c in columns))
    return table


def role_table(plan: "CompressionPlan") -> Any:
    """One row per role (split parts under their own roles), largest first."""
    from rich.table import Table

    table = Table(box=None, pad_edge=False)
    for column in ("role", "tensors", "parameters", "rule", "v kept", "saved"):
        table.add_column(column, justify="left" if column in ("role", "rule") else "right")
    for r in sorted(plan.role_summary(), key=lambda r: -r["parameters"]):
        table.add_row(
            r["role"], f"{r['tensors']}", f"{r['parameters']:,}", r["rule"], f"{r['kept']:,}", f"{r['saved']:.1%}"
        )
    return table


def terminal_width(default: int = 100) -> int:
    """The width of the terminal (``COLUMNS`` first), or ``default`` when output is not a terminal."""
    return shutil.get_terminal_size((default, 24)).columns


def render_plan(
    plan: "CompressionPlan", width: Optional[int] = None, collapse_layers: bool = True, by: str = "tensor"
) -> str:
    """The plan as text: header, table (``by="tensor"`` or ``"role"``), savings line, warnings.

    ``width`` defaults to the terminal's; long parameter names fold rather than push columns off screen.
    """
    from rich.console import Console

    if by not in ("tensor", "role"):
        raise ValueError(f"render_plan(by={by!r}): use 'tensor' or 'role'")
    buffer = io.StringIO()
    width = width or terminal_width()
    console = Console(file=buffer, width=width, force_terminal=False, color_system=None)
    console.print(header_line(plan), soft_wrap=True)
    console.print(tensor_table(plan, collapse_layers, narrow=width < 120) if by == "tensor" else role_table(plan))
    console.print(savings_line(plan), soft_wrap=True)
    for warning in plan.warnings:
        console.print(f"warning: {warning}", soft_wrap=True)
    return buffer.getvalue()
