"""What SNR is measured on (every matrix, split weights per part) and the measurement itself.

Run full Adam (``torch.optim.AdamW``, or ``SlimAdamW`` with nothing compressed) and measure, on a
schedule (default as the authors: step 1, then every 100 steps), the SNR of every candidate dims
subset of every matrix's second moment (:mod:`slimadam_hf.snr`). Rows go to a CSV in the authors'
format ``step,key,shape,compress_dims,snr,mean_sqr,var``, appended after each measurement.

Keys are parameter names from ``model.named_parameters()``. A split (fused) weight, e.g. GPT-2's
``c_attn`` (Q|K|V), is measured per part as in the compression plan, keyed ``<name>[<role>]`` (e.g.
``transformer.h.0.attn.c_attn.weight[query]``) with the part's shape; the dims of a part index the
same tensor dims as the whole weight. 1-D tensors and norms are skipped (never compressed).

Beside the CSV, ``<csv>.roles.json`` records ``{key: {"role", "fan_in", "fan_out"}}`` from the plan, so
that ``slimadam rules --by-role`` can turn dims into layout-free rules (``fan_in``/``fan_out``).

Cost: all candidates of all tensors are computed on the tensors' device and copied to the host in one
transfer per measurement (one device sync).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Iterable, Optional

import torch
from torch import nn

from ..core.compress_spec import normalize_spec, segments
from ..optim.optimizer import unwrap_optimizer
from ..rules.layouts import weight_layout
from ..rules.planner import plan_compression
from ..rules.presets import PresetError
from ..rules.roles import is_norm_name
from .stats import candidate_dims, format_dims, snr_stats, stats_to_rows

logger = logging.getLogger(__name__)

__all__ = ["SNRTarget", "SNRSchedule", "snr_targets", "measure_snr", "unwrap_model"]


@dataclass(frozen=True)
class SNRTarget:
    """One measured tensor: a parameter, or one part of a split parameter."""

    key: str
    name: str
    param: torch.Tensor
    role: Optional[str] = None
    split_dim: Optional[int] = None
    offset: int = 0
    size: int = 0
    fan_in: Optional[tuple[int, ...]] = None
    fan_out: Optional[tuple[int, ...]] = None

    def view(self, v: torch.Tensor) -> torch.Tensor:
        """This target's slice of a parameter-shaped second moment."""
        return v if self.split_dim is None else v.narrow(self.split_dim, self.offset, self.size)


@dataclass(frozen=True)
class SNRSchedule:
    """Measure at step ``first`` and at every multiple of ``every`` (the authors': 1 and every 100)."""

    every: int = 100
    first: int = 1

    def __post_init__(self) -> None:
        if self.every < 1:
            raise ValueError(f"SNR schedule every={self.every}: must be >= 1 (steps between measurements)")

    def __call__(self, step: int) -> bool:
        return step == self.first or (step > 0 and step % self.every == 0)


def unwrap_model(model: nn.Module) -> nn.Module:
    while hasattr(model, "module") and isinstance(model.module, nn.Module):  # DDP / DataParallel
        model = model.module
    return model


def snr_targets(model: nn.Module, plan: Any = None, preset: Any = "auto") -> list[SNRTarget]:
    """The tensors to measure: every trainable >= 2-D non-norm parameter, split weights per part.

    Roles, layouts and splits come from ``plan`` (default: ``plan_compression(model, preset)``). A model
    no preset knows is measured whole, without roles, with a warning.
    """
    model = unwrap_model(model)
    if plan is None:
        try:
            plan = plan_compression(model, preset)
        except PresetError as err:
            logger.warning("SNR: no compression plan (%s); measuring whole tensors without roles", err)
    entries = {e.name: e for e in plan.entries} if plan is not None else {}
    modules = dict(model.named_modules())
    targets: list[SNRTarget] = []
    for name, p in model.named_parameters():
        if not p.requires_grad or p.dim() < 2:
            continue
        entry = entries.get(name)
        role = entry.role if entry is not None else None
        if role == "norm" or (role is None and is_norm_name(name)):
            continue
        owner = modules.get(name.rsplit(".", 1)[0] if "." in name else "", model)
        layout = weight_layout(owner, name.rsplit(".", 1)[-1], p.dim())
        fan = dict(fan_in=layout.fan_in, fan_out=layout.fan_out) if layout is not None else {}
        if entry is not None and entry.parts is not None:
            roles = [part.role for part in entry.parts]
            offset = 0
            for i, part in enumerate(entry.parts):
                label = part.role if roles.count(part.role) == 1 else f"{part.role}{i}"
                targets.append(
                    SNRTarget(f"{name}[{label}]", name, p, part.role, entry.split_dim, offset, part.size, **fan)
                )
                offset += part.size
        else:
            targets.append(SNRTarget(name, name, p, role, **fan))
    return targets


def _specs_by_param(optimizer: torch.optim.Optimizer) -> dict[int, Any]:
    specs: dict[int, Any] = {}
    for group in optimizer.param_groups:
        for p, spec in zip(group["params"], group.get("compress") or [None] * len(group["params"])):
            specs[id(p)] = spec
    return specs


def _full_second_moment(
    target: SNRTarget, state: dict[str, Any], spec: Any, warned: set[str]
) -> Optional[torch.Tensor]:
    """The target's full second moment, or ``None`` (with a one-time warning) when there is none."""
    v = state.get("exp_avg_sq")
    if v is None:
        return None
    p = target.param
    if spec is not None:
        spec = normalize_spec(spec, target.name)
        if isinstance(spec, dict) and target.split_dim == spec["split_dim"]:
            # SlimAdamW keeps split weights as one flat tensor of parts; measure full parts only.
            for seg in segments(spec, p.shape, target.name):
                if seg.offset == target.offset and seg.size == target.size and seg.dims is None:
                    return seg.second_moment_view(v)
        if target.key not in warned:
            warned.add(target.key)
            logger.warning(
                "SNR: %s has a compressed second moment (spec %r) and is skipped; measure SNR on a "
                "full-Adam run (torch AdamW, or SlimAdamW with preset rules 'none')", target.key, spec
            )
        return None
    if tuple(v.shape) != tuple(p.shape):
        if target.key not in warned:
            warned.add(target.key)
            logger.warning(
                "SNR: exp_avg_sq of %s has shape %s, not the parameter's %s (sharded by FSDP/ZeRO?); "
                "skipped. Measure SNR without optimizer-state sharding (single GPU or DDP).",
                target.name, list(v.shape), list(p.shape),
            )
        return None
    return target.view(v)


def measure_snr(
    optimizer: Any, targets: Iterable[SNRTarget], step: int, _warned: Optional[set[str]] = None
) -> list[dict[str, Any]]:
    """SNR rows (CSV dicts) of every target's current second moment; one host transfer in total."""
    optimizer = unwrap_optimizer(optimizer)
    specs = _specs_by_param(optimizer)
    warned = _warned if _warned is not None else set()
    measured: list[tuple[SNRTarget, tuple[int, ...], list[tuple[int, ...]]]] = []
    stats = []
    with torch.no_grad():
        for target in targets:
            state = optimizer.state.get(target.param)
            if not state:
                continue
            v = _full_second_moment(target, state, specs.get(id(target.param)), warned)
            if v is None:
                continue
            cands = candidate_dims(v.dim())
            stats.append(snr_stats(v, cands))
            measured.append((target, tuple(v.shape), cands))
    rows = []
    for (target, shape, cands), values in zip(measured, stats_to_rows(stats)):
        for dims, (snr, msq, var) in zip(cands, values):
            rows.append(
                dict(step=step, key=target.key, shape=str(shape), compress_dims=format_dims(dims),
                     snr=snr, mean_sqr=msq, var=var)
            )
    return rows
