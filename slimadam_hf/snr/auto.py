"""One-run SNR auto mode: probe with full second moments, derive rules from their SNR, compress in place.

For the first ``probe_steps`` optimizer steps an :class:`AutoSNRSlimAdamW` runs with full second
moments (exactly AdamW) and measures the SNR of every matrix's second moment (every ``probe_every``
steps and at ``probe_steps``; :mod:`slimadam_hf.snr.targets`). At the end of step ``probe_steps`` it
derives one rule per tensor, or per part of a split weight (:mod:`slimadam_hf.snr.rules`: time-mean
SNR, the highest candidate above ``cutoff``; ``by_role=True`` pools each role across depth), and
replaces each chosen second moment by its mean over the chosen dims (:func:`compress_in_place`). From
then on it is a SlimAdamW with those rules, and the full second moments are freed.

Everything the mode needs to resume lives in the optimizer's own state dict (``state_dict()["auto_snr"]``:
the probe step, the SNR measured so far, the switch step and the rules; after the switch the param
groups carry the ``compress`` specs as in any SlimAdamW checkpoint). So a checkpoint taken before or
after the switch resumes exactly, in the Trainer or in any loop that saves ``optimizer.state_dict()``.

Trainer: ``--optim slimadam --optim_args preset=auto-snr,probe_steps=N`` (see :func:`build_auto_snr`
for the other keys); :class:`AutoSNRCallback` (added by ``slimadam_hf.register()``) writes the rules to
``<output_dir>/slimadam_auto_snr_rules.json`` and into each later checkpoint.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import torch

from ..core.compress_spec import CompressSpec, normalize_spec, parse_dims
from ..core.options import AUTO_SNR_PRESET, SlimAdamConfig
from ..distributed import zero
from ..distributed.guards import UnsupportedShardingError
from ..distributed.ranks import is_main_process, same_on_all_ranks
from ..optim.optimizer import SlimAdamW
from ..optim.recompress import compress_in_place
from ..rules.layouts import Layout
from ..rules.plan import CompressionPlan, PartPlan
from ..rules.render import format_bytes, render_plan
from ..rules.roles import RuleError, rule_to_dims
from .rules import KeyInfo, Rules, dims_to_rule, role_rules, rules_to_json, select_rules, summarize_snr
from .targets import SNRTarget, measure_snr

logger = logging.getLogger(__name__)

__all__ = ["AutoSNRSlimAdamW", "RULES_FILENAME", "specs_from_rules", "switch_summary"]

RULES_FILENAME = "slimadam_auto_snr_rules.json"


# -- rules from SNR ---------------------------------------------------------------------------------


def _rule_dims(rule: Any, info: KeyInfo, shape: tuple[int, ...], key: str) -> Optional[tuple[int, ...]]:
    layout = Layout(info.fan_in, info.fan_out) if info.fan_in is not None and info.fan_out is not None else None
    try:
        return rule_to_dims(rule, layout, shape, key)
    except RuleError:
        logger.warning("auto-snr: %s has no known fan_in/fan_out layout; its role rule %r cannot apply, kept full",
                       key, rule)
        return None


def specs_from_rules(targets: Sequence[SNRTarget], rules: Mapping[str, Any]) -> dict[str, CompressSpec]:
    """Parameter name -> compress spec from per-key dims (split weights: one spec from their parts)."""
    by_name: dict[str, list[SNRTarget]] = {}
    for t in targets:
        by_name.setdefault(t.name, []).append(t)
    specs: dict[str, CompressSpec] = {}
    for name, ts in by_name.items():
        if ts[0].split_dim is None:
            dims = rules.get(ts[0].key)
            specs[name] = None if dims is None else tuple(dims)
            continue
        part_dims = [rules.get(t.key) for t in ts]
        specs[name] = None if all(d is None for d in part_dims) else {
            "split_dim": ts[0].split_dim,
            "sizes": [t.size for t in ts],
            "dims": [None if d is None else list(d) for d in part_dims],
        }
    return specs


def plan_with_specs(plan: CompressionPlan, targets: Sequence[SNRTarget], specs: Mapping[str, CompressSpec],
                     label: str) -> CompressionPlan:
    """``plan`` with each entry's rule/dims replaced by ``specs`` (missing names: no compression)."""
    infos = {t.name: KeyInfo(t.role, t.fan_in, t.fan_out) for t in targets}
    entries = []
    for e in plan.entries:
        spec = normalize_spec(specs.get(e.name), e.name)
        info = infos.get(e.name, KeyInfo(e.role))
        if e.parts is None:
            dims = None if spec is None or isinstance(spec, dict) else tuple(spec)
            entries.append(dataclasses.replace(
                e, rule=dims_to_rule(dims, info, len(e.shape)), dims=dims, decided_by=label))
        else:
            part_dims = spec["dims"] if isinstance(spec, dict) else [None] * len(e.parts)
            parts = tuple(
                PartPlan(part.role, dims_to_rule(None if d is None else tuple(d), info, len(e.shape)), part.size,
                         None if d is None else tuple(d))
                for part, d in zip(e.parts, part_dims)
            )
            entries.append(dataclasses.replace(e, parts=parts, decided_by=label))
    return dataclasses.replace(plan, entries=entries, preset=f"{AUTO_SNR_PRESET} ({plan.preset})",
                               warnings=list(plan.warnings))


# -- the optimizer ----------------------------------------------------------------------------------


class AutoSNRSlimAdamW(SlimAdamW):
    """A SlimAdamW that runs uncompressed for ``probe_steps`` steps, then compresses itself by SNR.

    Args:
        params: ``(name, tensor)`` pairs or groups of them, with nothing compressed.
        targets: the tensors (and split parts) to measure, from
            :func:`slimadam_hf.snr.targets.snr_targets`; tensors not among them stay full.
        probe_steps: optimizer steps with full second moments; the switch happens at the end of this step.
        probe_every: measure SNR at every multiple of this step count and at ``probe_steps``
            (default ``max(1, probe_steps // 4)``: four measurements, skipping the first steps as the paper does).
        cutoff, select: rule selection as ``slimadam rules`` (highest time-mean SNR above ``cutoff``;
            ``"most-compressive"``: the smallest second moment above it).
        by_role: one rule per role, pooled across depth (``slimadam rules --by-role``, mean SNR)
            instead of one per tensor.
        base_plan: the compression plan that gave roles and splits (kept to report the chosen plan).
        **kwargs: :class:`SlimAdamW` hyperparameters.

    Attributes: ``probe_step``, ``switched_at`` (``None`` until the switch), ``rules`` (``{key: dims}``
    after the switch; keys as in the SNR CSV, ``<name>[<role>]`` for split parts), ``plan``.
    """

    def __init__(
        self,
        params: Any,
        *,
        targets: Sequence[SNRTarget],
        probe_steps: int,
        probe_every: Optional[int] = None,
        cutoff: float = 1.0,
        select: str = "max-snr",
        by_role: bool = False,
        base_plan: Optional[CompressionPlan] = None,
        **kwargs: Any,
    ) -> None:
        config = SlimAdamConfig.from_kwargs(
            "AutoSNRSlimAdamW", preset=AUTO_SNR_PRESET, probe_steps=probe_steps, probe_every=probe_every,
            cutoff=cutoff, select=select, by_role=by_role, **kwargs,
        )
        super().__init__(params, **config.optimizer_defaults())
        for group in self.param_groups:
            if "compress" in group:
                raise ValueError(
                    "auto-snr: the optimizer must start uncompressed (no 'compress' in its param groups); the "
                    "rules are derived after the probe"
                )
            if not group.get("param_names"):
                raise ValueError("auto-snr: build the optimizer from (name, tensor) pairs (use build_auto_snr)")
        live = {id(p) for g in self.param_groups for p in g["params"]}
        self.targets = [t for t in targets if id(t.param) in live]
        self.probe_steps = probe_steps
        self.probe_every = probe_every if probe_every is not None else max(1, probe_steps // 4)
        self.cutoff = float(cutoff)
        self.select = select
        self.by_role = bool(by_role)
        self.base_plan = base_plan.with_options(config.momentum_dtype, config.robust) if base_plan else None
        self.plan = plan_with_specs(self.base_plan, self.targets, {}, "auto-snr probe") if base_plan else None
        self.probe_step = 0
        self.switched_at: Optional[int] = None
        self.rules: Optional[dict[str, Optional[list[int]]]] = None
        self.snr_rows: list[list[Any]] = []  # [step, key, [dims], snr]
        self.freed_bytes = 0
        self._warned: set[str] = set()

    # -- probe and switch -----------------------------------------------------------------------

    def measures_at(self, step: int) -> bool:
        """Whether SNR is measured after optimizer step ``step`` (during the probe)."""
        return step <= self.probe_steps and (step % self.probe_every == 0 or step == self.probe_steps)

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:  # noqa: D102 (SlimAdamW.step, then the probe)
        if self.switched_at is None and zero.is_flattened(self):
            raise UnsupportedShardingError(
                "auto-snr cannot probe under DeepSpeed ZeRO (flat partitions hold the second moments); measure "
                "SNR on a run without ZeRO (single process or DDP), then train under ZeRO with its rules file"
            )
        loss = super().step(closure)
        if self.switched_at is None:
            self.probe_step += 1
            if self.measures_at(self.probe_step):
                self.measure()
            if self.probe_step >= self.probe_steps:
                self.switch()
        return loss

    def measure(self) -> int:
        """Measure the SNR of every target now (at ``probe_step``); returns the number of rows added."""
        rows = measure_snr(self, self.targets, self.probe_step, self._warned)
        self.snr_rows.extend(
            [r["step"], r["key"], list(parse_dims(r["compress_dims"], r["key"])), r["snr"]] for r in rows
        )
        return len(rows)

    def derive_rules(self) -> dict[str, Optional[tuple[int, ...]]]:
        """Rules ``{key: dims | None}`` from the SNR measured so far (one entry per target)."""
        shapes = {t.key: _target_shape(t) for t in self.targets}
        rows = [dict(step=s, key=k, shape=shapes[k], compress_dims=tuple(d), snr=v)
                for s, k, d, v in self.snr_rows if k in shapes]
        rules: dict[str, Optional[tuple[int, ...]]] = {t.key: None for t in self.targets}
        if not rows:
            logger.warning("auto-snr: no SNR was measured (no parameter had gradients?); nothing is compressed")
            return rules
        summaries = summarize_snr(rows)
        if not self.by_role:
            rules.update(select_rules(summaries, self.cutoff, self.select))  # type: ignore[arg-type]
            return rules
        infos = {t.key: KeyInfo(t.role, t.fan_in, t.fan_out) for t in self.targets}
        chosen = role_rules(summaries, infos, self.cutoff, self.select, "mean")
        for key, s in summaries.items():
            info = infos[key]
            rr = chosen.get(info.role) if info.role is not None else None
            rules[key] = None if rr is None else _rule_dims(rr.rule, info, s.shape, key)
        return rules

    def switch(self) -> None:
        """Derive the rules and compress in place now (normally called by :meth:`step`)."""
        if self.switched_at is not None:
            raise RuntimeError(f"auto-snr: already switched at step {self.switched_at}")
        derived = same_on_all_ranks(self.derive_rules())  # DDP ranks agree even if kernels jitter
        specs = specs_from_rules(self.targets, derived)
        self.freed_bytes = compress_in_place(self, specs)
        self.switched_at = self.probe_step
        self.rules = {k: (None if d is None else list(d)) for k, d in derived.items()}
        if self.base_plan is not None:
            self.plan = plan_with_specs(self.base_plan, self.targets, specs, f"auto-snr at step {self.switched_at}")
        _log_switch(self)

    def rules_json(self) -> str:
        """The rules in the authors' format ``{key: [dims] | null}``, every trainable parameter listed
        (split weights per part, ``<name>[<role>]``); ``None`` values for tensors never compressed."""
        if self.rules is None:
            raise RuntimeError("auto-snr: no rules yet; the switch happens at the end of step probe_steps")
        out: Rules = {}
        parts: dict[str, list[str]] = {}
        for t in self.targets:
            parts.setdefault(t.name, []).append(t.key)
        names = [n for g in self.param_groups for n in g["param_names"]]
        if self.base_plan is not None:  # model order, as the authors' files
            order = {e.name: i for i, e in enumerate(self.base_plan.entries)}
            names.sort(key=lambda n: order.get(n, len(order)))
        for name in names:
            for key in parts.get(name, [name]):
                dims = self.rules.get(key)
                out[key] = None if dims is None else tuple(dims)
        return rules_to_json(out)

    def save_rules(self, path: str | Path) -> Path:
        """Write :meth:`rules_json` to ``path``."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.rules_json() + "\n")
        return path

    # -- checkpoints ----------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """SlimAdamW's state dict plus ``"auto_snr"``: probe step, SNR rows, switch step, rules."""
        sd = super().state_dict()
        auto: dict[str, Any] = {"probe_steps": self.probe_steps, "probe_step": self.probe_step}
        if self.snr_rows:
            auto["snr_rows"] = [list(r) for r in self.snr_rows]
        if self.switched_at is not None:
            auto["switched_at"] = self.switched_at
            auto["rules"] = dict(self.rules or {})
        sd["auto_snr"] = auto
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a checkpoint of this mode, before or after the switch.

        After the switch the saved groups carry compress specs: they are adopted first (the live optimizer
        is compressed in place with them), then SlimAdamW's loader checks and loads the state. A checkpoint
        without ``"auto_snr"`` (AdamW, or an uncompressed SlimAdamW) starts the probe at step 0.
        """
        state_dict = dict(state_dict)
        auto = state_dict.pop("auto_snr", None)
        saved_groups = state_dict["param_groups"]
        if auto is None:
            if any(g.get("compress") for g in saved_groups):
                raise ValueError(
                    "auto-snr: this checkpoint is of a SlimAdamW with fixed rules, not of an auto-snr run; "
                    "resume it with the preset/config it was trained with"
                )
            super().load_state_dict(state_dict)
            logger.info("auto-snr: loaded a checkpoint without probe state; the probe starts at step 0")
            return
        switched_at = auto.get("switched_at")
        if switched_at is None and int(auto["probe_step"]) >= self.probe_steps:
            raise ValueError(
                f"auto-snr: the checkpoint is at probe step {auto['probe_step']} (of its probe_steps="
                f"{auto['probe_steps']}), not before this run's probe_steps={self.probe_steps}; use its probe_steps"
            )
        if switched_at is not None and len(saved_groups) == len(self.param_groups):
            specs: dict[str, CompressSpec] = {}
            for live, saved in zip(self.param_groups, saved_groups):
                saved_names = saved.get("param_names")
                if saved_names is not None and list(saved_names) != list(live["param_names"]):
                    raise ValueError("auto-snr: the checkpoint's parameter names differ from this model's")
                for name, spec in zip(live["param_names"], saved.get("compress") or []):
                    if spec is not None and "compress" not in live:
                        specs[name] = spec
            compress_in_place(self, specs)
        super().load_state_dict(state_dict)
        self.probe_step = int(auto["probe_step"])
        self.snr_rows = [list(r) for r in auto.get("snr_rows", [])]
        self.switched_at = None if switched_at is None else int(switched_at)
        self.rules = None if switched_at is None else {k: (None if d is None else list(d))
                                                      for k, d in auto["rules"].items()}
        if self.switched_at is not None and self.base_plan is not None:
            self.plan = plan_with_specs(
                self.base_plan, self.targets,
                {n: s for g in self.param_groups for n, s in zip(g["param_names"], self._group_specs(g))},
                f"auto-snr at step {self.switched_at}",
            )


def _target_shape(t: SNRTarget) -> tuple[int, ...]:
    shape = list(t.param.shape)
    if t.split_dim is not None:
        shape[t.split_dim] = t.size
    return tuple(shape)


def _state_bytes(opt: SlimAdamW, key: str) -> int:
    return sum(s[key].numel() * s[key].element_size() for s in opt.state.values() if key in s)


def switch_summary(opt: AutoSNRSlimAdamW, logger: Optional[logging.Logger] = None) -> str:
    """What the switch chose: counts, memory, and the per-role plan table (when the plan is known),
    fitted to the terminal of ``sys.stdout`` or, with ``logger``, of the logger's handlers."""
    rules = opt.rules or {}
    chosen = sum(d is not None for d in rules.values())
    v_now = _state_bytes(opt, "exp_avg_sq")
    lines = [
        f"auto-snr: switched to SlimAdam at step {opt.switched_at} (SNR measured at "
        f"{len({r[0] for r in opt.snr_rows})} steps; cutoff {opt.cutoff:g}, {opt.select}"
        f"{', by role' if opt.by_role else ''}): {chosen} of {len(rules)} tensors/parts compressed; "
        f"second moments {format_bytes(v_now + opt.freed_bytes)} -> {format_bytes(v_now)} "
        f"(freed {format_bytes(opt.freed_bytes)})",
    ]
    if opt.plan is not None:
        lines.append(render_plan(opt.plan, by="role", logger=logger).rstrip())
    return "\n".join(lines)


def _log_switch(opt: AutoSNRSlimAdamW) -> None:
    if is_main_process():
        logger.info("%s", switch_summary(opt, logger))
