"""The one renderer of a compression plan: per-tensor or per-role ``rich`` tables, and the savings line.

Everything a user reads about savings (``str(plan)``, ``slimadam inspect``, the Trainer's log, the example
scripts) comes from here, so it is stated one way: "second moments saved: P%", and optimizer state
"AdamW X -> SlimAdamW Y (Z% of AdamW)" in binary units chosen by size.

Width: every line fits the terminal the text goes to (``COLUMNS`` when set, else the terminal's own width):
tables shrink and fold, and the header, savings and warning lines fold between their clauses. Where there
is no terminal (a log file, a pipe, a notebook) tables are 100 columns wide and each of those lines stays
one line, so it can be grepped whole.
"""

from __future__ import annotations

import io
import logging
import os
import re
import sys
from collections import defaultdict
from typing import TYPE_CHECKING, Any, Optional, Sequence

if TYPE_CHECKING:
    from .plan import CompressionPlan, PlanEntry


def format_bytes(n: float) -> str:
    """``1536`` -> ``'1.50 KiB'``; ``2**30`` -> ``'1.00 GiB'``."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"  # pragma: no cover


def header_clauses(plan: "CompressionPlan") -> list[str]:
    """The header's clauses: ``SlimAdam plan: preset P (model_type T)``, ``N trainable tensors, M parameters``,
    and ``robust=True`` when the optimizer keeps factored second moments (noting a preset's default)."""
    clauses = [
        f"SlimAdam plan: preset {plan.preset} (model_type {plan.model_type})",
        f"{len(plan.entries)} trainable tensors, {plan.num_parameters:,} parameters",
    ]
    if plan.robust:
        by_preset = plan.preset_options.get("robust") is True
        clauses.append("robust=True" + (f" (preset {plan.preset}'s default)" if by_preset else ""))
    return clauses


def header_line(plan: "CompressionPlan") -> str:
    return ", ".join(header_clauses(plan))


def savings_clauses(plan: "CompressionPlan") -> list[str]:
    """The savings statement in its two clauses: second moments, then optimizer state."""
    return [
        f"second moments saved: {plan.second_moment_savings:.2%} ({plan.second_moment_numel:,} of "
        f"{plan.num_parameters:,} kept)",
        f"optimizer state: AdamW {format_bytes(plan.adamw_state_bytes)} -> "
        f"SlimAdamW {format_bytes(plan.slimadam_state_bytes)} ({plan.state_bytes_ratio:.1%} of AdamW)",
    ]


def savings_line(plan: "CompressionPlan") -> str:
    """``second moments saved: 99.79% (N of M kept); optimizer state: AdamW X -> SlimAdamW Y (50.1% of AdamW)``."""
    return "; ".join(savings_clauses(plan))


MIN_ROOM = 20
"""Fewest columns :func:`fold` fills per line; in a narrower terminal lines run over rather than cut words."""


def fold(
    clauses: Sequence[str], width: Optional[int], sep: str = "; ", prefix: str = "", lead: int = 0
) -> list[str]:
    """``prefix + sep.join(clauses)`` on lines of at most ``width`` characters; ``None`` (no terminal): one line.

    Lines break between clauses (the separator's mark ends the line), and between the words of a clause
    only where it is longer than a line; so the lines joined with a space give the one-line text back.
    Continuation lines are indented to the width of ``prefix``; ``lead`` counts characters that something
    else writes before the first line (a log record's time and level); where that leaves under
    :data:`MIN_ROOM` columns, the text starts on the next line.
    """
    if not sep.endswith(" ") or sep[:-1].endswith(" "):
        raise ValueError(f"fold(sep={sep!r}): use a separator that ends in one space, such as '; ' or ', '")
    pieces = [clause + sep[:-1] for clause in clauses[:-1]] + list(clauses[-1:])
    if width is None:
        return [prefix + " ".join(pieces)]
    if lead and width - len(prefix) - lead < MIN_ROOM:  # no room beside the lead: start on the next line
        return [""] + fold(clauses, width, sep, prefix)

    def room(line: int) -> int:
        return max(width - len(prefix) - (lead if line == 0 else 0), MIN_ROOM)

    lines: list[str] = []
    for piece in pieces:
        if lines and len(lines[-1]) + 1 + len(piece) <= room(len(lines) - 1):
            lines[-1] += " " + piece
            continue
        for i, word in enumerate(piece.split(" ")):  # the clause starts a line
            if i and len(lines[-1]) + 1 + len(word) <= room(len(lines) - 1):
                lines[-1] += " " + word
                continue
            while len(word) > room(len(lines)):  # a word longer than a line is cut
                lines.append(word[: room(len(lines))])
                word = word[room(len(lines) - 1):]
            lines.append(word)
    return [prefix + lines[0]] + [" " * len(prefix) + line for line in lines[1:]]


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


NO_TERMINAL_TABLE_WIDTH = 100
"""Width of the tables where there is no terminal (the prose lines then stay one line each)."""


def _columns_env() -> Optional[int]:
    columns = os.environ.get("COLUMNS", "").strip()
    return int(columns) if columns.isdigit() and int(columns) > 0 else None


def _tty_columns(stream: Any) -> Optional[int]:
    try:
        return (os.get_terminal_size(stream.fileno()).columns or None) if stream.isatty() else None
    except (AttributeError, OSError, ValueError):  # no stream, a closed one, or one without a file descriptor
        return None


def terminal_width(stream: Any = None) -> Optional[int]:
    """The width to fit text written to ``stream`` (default ``sys.stdout``): ``COLUMNS`` when set, else
    the terminal's; ``None`` when it is not a terminal (a file, a pipe)."""
    return _columns_env() or _tty_columns(sys.stdout if stream is None else stream)


def log_layout(logger: logging.Logger, level: int = logging.INFO) -> tuple[Optional[int], int]:
    """How a record of ``logger`` at ``level`` is shown: (width, lead).

    width: ``COLUMNS`` when set, else the narrowest terminal the logger's handlers write to; ``None`` when
    one writes elsewhere (a log file keeps one line) or none would. lead: the longest text a handler's
    formatter puts before the message (time, level, logger name), which shares the first line.
    """
    record = logging.LogRecord(logger.name, level, __file__, 0, "", None, None)
    widths: list[Optional[int]] = []
    lead = 0
    current: Optional[logging.Logger] = logger
    while current is not None:
        for handler in current.handlers:
            if level >= handler.level and handler.filter(record):
                widths.append(_tty_columns(getattr(handler, "stream", None)))
                formatter = handler.formatter or logging.Formatter()
                lead = max(lead, len(formatter.format(record).split("\n")[0]))
        current = current.parent if current.propagate else None
    columns = _columns_env()
    if columns or not widths or None in widths:
        return columns, lead
    return min(widths), lead  # type: ignore[type-var]


def render_plan(
    plan: "CompressionPlan",
    width: Optional[int] = None,
    collapse_layers: bool = True,
    by: str = "tensor",
    logger: Optional[logging.Logger] = None,
) -> str:
    """The plan as text: header, table (``by="tensor"`` or ``"role"``), savings line, warnings.

    Every line fits ``width`` columns; by default the width of where the text goes: the terminal of
    ``sys.stdout``, or with ``logger`` that of the logger's handlers, less what their formatters put
    before the message's first line (:func:`log_layout`). Where that is
    not a terminal, the tables are 100 columns wide and the header, savings and warning lines stay one
    line each. Long parameter names fold rather than push columns off screen.
    """
    from rich.console import Console

    if by not in ("tensor", "role"):
        raise ValueError(f"render_plan(by={by!r}): use 'tensor' or 'role'")
    lead = 0
    if logger is not None:
        found, lead = log_layout(logger)
        width = width or found
    elif not width:
        width = terminal_width()
    table_width = width or NO_TERMINAL_TABLE_WIDTH
    buffer = io.StringIO()
    console = Console(file=buffer, width=table_width, force_terminal=False, color_system=None)
    table = tensor_table(plan, collapse_layers, narrow=table_width < 120) if by == "tensor" else role_table(plan)
    console.print(table)
    lines = [
        *fold(header_clauses(plan), width, sep=", ", lead=lead),
        *buffer.getvalue().splitlines(),
        *fold(savings_clauses(plan), width),
        *(line for warning in plan.warnings for line in fold([f"warning: {warning}"], width)),
    ]
    return "".join(line + "\n" for line in lines)
