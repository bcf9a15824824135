"""Compression plans: which dims each trainable parameter's second moment is averaged over (the data)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Optional, Union

import torch

from ..core import quant
from ..core.compress_spec import CompressSpec, cached_segments, second_moment_dtype, second_moment_numel
from ..core.factored import complement_numel
from ..core.options import momentum_dtype_name
from .presets import canonical_name
from .render import render_plan
from .roles import Rule

@dataclass(frozen=True)
class PartPlan:
    """One part of a split (fused) weight."""

    role: str
    rule: Rule
    size: int
    dims: Optional[tuple[int, ...]]


@dataclass(frozen=True)
class PlanEntry:
    """The plan for one trainable parameter."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    owner: str
    role: str
    rule: Rule
    dims: Optional[tuple[int, ...]]
    parts: Optional[tuple[PartPlan, ...]] = None
    split_dim: Optional[int] = None
    aliases: tuple[str, ...] = ()
    decided_by: str = ""

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def spec(self) -> CompressSpec:
        """The compress spec the optimizer uses for this parameter."""
        if self.parts is None:
            return self.dims
        if all(part.dims is None for part in self.parts):
            return None
        return {
            "split_dim": self.split_dim,
            "sizes": [part.size for part in self.parts],
            "dims": [None if part.dims is None else list(part.dims) for part in self.parts],
        }

    @property
    def second_moment_numel(self) -> int:
        return second_moment_numel(self.spec, self.shape, self.name)

    @property
    def compressed(self) -> bool:
        return self.spec is not None

    def pieces(self) -> list[tuple[str, Rule, int, int]]:
        """``(role, rule, parameters, second-moment entries kept)`` for the tensor or each split part."""
        if self.parts is None:
            return [(self.role, self.rule, self.numel, self.second_moment_numel)]
        result = []
        for part in self.parts:
            part_shape = list(self.shape)
            part_shape[self.split_dim] = part.size
            kept = math.prod(1 if i in (part.dims or ()) else n for i, n in enumerate(part_shape))
            result.append((part.role, part.rule, math.prod(part_shape), kept))
        return result

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "shape": list(self.shape),
            "dtype": str(self.dtype).replace("torch.", ""),
            "owner": self.owner,
            "role": self.role,
            "rule": self.rule,
            "dims": None if self.dims is None else list(self.dims),
            "parts": None
            if self.parts is None
            else [
                {"role": p.role, "rule": p.rule, "size": p.size, "dims": None if p.dims is None else list(p.dims)}
                for p in self.parts
            ],
            "aliases": list(self.aliases),
            "second_moment_numel": self.second_moment_numel,
            "numel": self.numel,
            "decided_by": self.decided_by,
        }


def _bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype, device="meta").element_size()


@dataclass
class CompressionPlan:
    """Per-parameter compression decisions for a model, with memory totals."""

    entries: list[PlanEntry]
    preset: str
    model_type: Optional[str] = None
    warnings: list[str] = field(default_factory=list)
    momentum_dtype: Optional[str] = None
    """How the optimizer stores the first moment (``SlimAdamConfig.momentum_dtype``); counts in the bytes."""
    robust: bool = False
    """``SlimAdamConfig.robust``: compressed weights also keep ``exp_avg_sq_complement``; counts in the bytes."""
    preset_options: dict[str, Any] = field(default_factory=dict)
    """The optimizer options the preset (and override) set by default (``options:``, e.g. bert's ``robust``);
    :meth:`~slimadam_hf.SlimAdamConfig.with_preset_options` applies them where the user gave none."""

    def __getitem__(self, name: str) -> PlanEntry:
        for entry in self.entries:
            if name == entry.name or name in entry.aliases or canonical_name(entry.name) == name:
                return entry
        raise KeyError(name)

    def with_options(self, momentum_dtype: Any = None, robust: bool = False) -> "CompressionPlan":
        """This plan with the optimizer's storage options, which every byte count below reads.

        Every path that attaches a plan to an optimizer (``build_slimadam``, auto-snr, ``slimadam inspect``)
        sets them here, so the state bytes are computed one way for all of them.
        """
        return replace(self, momentum_dtype=momentum_dtype_name(momentum_dtype), robust=bool(robust))

    def specs(self) -> dict[str, CompressSpec]:
        """Parameter name -> compress spec."""
        return {e.name: e.spec for e in self.entries}

    @property
    def num_parameters(self) -> int:
        return sum(e.numel for e in self.entries)

    def complement_numel(self, entry: PlanEntry) -> int:
        """Entries of one parameter's ``exp_avg_sq_complement`` (0 unless :attr:`robust`)."""
        if not self.robust:
            return 0
        return complement_numel(cached_segments(entry.spec, entry.shape, entry.name), entry.shape)

    @property
    def second_moment_numel(self) -> int:
        """Second-moment entries the optimizer keeps (complements included)."""
        return sum(e.second_moment_numel + self.complement_numel(e) for e in self.entries)

    @property
    def second_moment_savings(self) -> float:
        """Fraction (0..1) of AdamW's second-moment entries that SlimAdamW does not keep."""
        total = self.num_parameters
        return 0.0 if total == 0 else 1.0 - self.second_moment_numel / total

    @property
    def adamw_state_bytes(self) -> int:
        """Optimizer-state bytes of torch AdamW (exp_avg and exp_avg_sq in the parameter dtype)."""
        return sum(2 * e.numel * _bytes(e.dtype) for e in self.entries)

    def first_moment_bytes(self, entry: PlanEntry) -> int:
        """Bytes of one parameter's ``exp_avg`` under :attr:`momentum_dtype` (int8: codes plus block scales)."""
        if self.momentum_dtype == "int8":
            return quant.num_blocks(entry.shape) * (quant.BLOCK + 4)
        dtype = entry.dtype if self.momentum_dtype is None else getattr(torch, self.momentum_dtype)
        return entry.numel * _bytes(dtype)

    def second_moment_bytes(self, entry: PlanEntry) -> int:
        """Bytes of one parameter's ``exp_avg_sq`` (and, with :attr:`robust`, ``exp_avg_sq_complement``)."""
        return _bytes(second_moment_dtype(entry.dtype)) * (entry.second_moment_numel + self.complement_numel(entry))

    @property
    def slimadam_state_bytes(self) -> int:
        """Optimizer-state bytes of SlimAdamW: ``exp_avg`` as stored, float32 compressed second moments."""
        return sum(self.first_moment_bytes(e) + self.second_moment_bytes(e) for e in self.entries)

    @property
    def state_bytes_ratio(self) -> float:
        return self.slimadam_state_bytes / max(self.adamw_state_bytes, 1)

    def role_summary(self) -> list[dict[str, Any]]:
        """Per role (split parts under their own roles): tensors, parameters, rule, entries kept."""
        rows: dict[str, dict[str, Any]] = {}
        for entry in self.entries:
            for role, rule, numel, kept in entry.pieces():
                row = rows.setdefault(role, {"role": role, "tensors": 0, "parameters": 0, "kept": 0, "rules": set()})
                row["tensors"] += 1
                row["parameters"] += numel
                row["kept"] += kept
                row["rules"].add(str(rule))
        for row in rows.values():
            row["rule"] = "/".join(sorted(row.pop("rules")))
            row["saved"] = 1.0 - row["kept"] / max(row["parameters"], 1)
        return list(rows.values())

    def totals(self) -> dict[str, float]:
        """Numbers worth logging as metrics."""
        return {
            "slimadam/second_moment_savings": self.second_moment_savings,
            "slimadam/state_bytes": self.slimadam_state_bytes,
            "slimadam/adamw_state_bytes": self.adamw_state_bytes,
            "slimadam/state_ratio_vs_adamw": self.state_bytes_ratio,
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "preset": self.preset,
            "model_type": self.model_type,
            "totals": self.totals(),
            "warnings": list(self.warnings),
            "momentum_dtype": self.momentum_dtype,
            "robust": self.robust,
            "preset_options": dict(self.preset_options),
            "parameters": [e.to_dict() for e in self.entries],
        }

    def save_json(self, path: Union[str, Path]) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    def render(
        self, width: Optional[int] = None, collapse_layers: bool = True, by: str = "tensor", logger: Any = None
    ) -> str:
        """The plan as text: see :func:`slimadam_hf.rules.render.render_plan`."""
        return render_plan(self, width=width, collapse_layers=collapse_layers, by=by, logger=logger)

    def __str__(self) -> str:
        return self.render()
