"""The planner: a model and a preset in, a :class:`~slimadam_hf.rules.plan.CompressionPlan` out."""

from __future__ import annotations

import difflib
import logging
import re
from collections import defaultdict
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import nn

from ..core.compress_spec import segments
from ..distributed.guards import logical_shape
from .layouts import Layout, weight_layout
from .plan import CompressionPlan, PartPlan, PlanEntry
from .presets import (
    Preset,
    PresetError,
    RolePattern,
    canonical_name,
    load_overrides,
    load_preset,
    preset_for_model_type,
    resolve_size,
)
from .roles import DEFAULT_RULES, NEVER_COMPRESSED_ROLES, Rule, RuleError, is_norm_name, rule_to_dims

logger = logging.getLogger(__name__)

Overrides = Union[None, str, Path, dict, Preset]



# PEFT LoRA/DoRA factors: `<module>.lora_A.<adapter>.weight`, `lora_embedding_B.<adapter>`, DoRA's
# `lora_magnitude_vector.<adapter>.weight`. They get role "adapter" (rule from `rules: {adapter: ...}`).
_ADAPTER_RE = re.compile(r"(?:^|\.)lora_(?:A|B|embedding_A|embedding_B|magnitude_vector)\.")


def _resolve_preset(model: nn.Module, preset: Union[str, Preset]) -> Preset:
    if isinstance(preset, Preset):
        return preset
    if preset == "auto":
        return preset_for_model_type(getattr(getattr(model, "config", None), "model_type", None))
    return load_preset(preset)


def _owner(modules: dict[str, nn.Module], name: str) -> nn.Module:
    module_path = name.rsplit(".", 1)[0] if "." in name else ""
    return modules.get(module_path, modules[""])


class _Planner:
    def __init__(self, preset: Preset, config: Any) -> None:
        self.preset = preset
        self.config = config
        self.pattern_hits: dict[int, int] = defaultdict(int)
        self.unmatched: list[str] = []
        self.part_names: set[str] = set()  # "name[role]" keys of split parts, usable in `params:`

    def rule_for(self, role: str) -> Rule:
        if role in NEVER_COMPRESSED_ROLES:
            return "none"
        return self.preset.rules.get(role, DEFAULT_RULES[role])

    def match(self, name: str) -> Optional[RolePattern]:
        for i, pattern in enumerate(self.preset.patterns):
            if pattern.matches(name):
                self.pattern_hits[i] += 1
                return pattern
        return None

    def plan(self, name: str, param: torch.Tensor, owner: nn.Module, aliases: tuple[str, ...]) -> PlanEntry:
        cname = canonical_name(name)
        shape = logical_shape(param)  # DeepSpeed zero.Init partitions keep theirs in ds_shape
        ndim = len(shape)
        leaf = name.rsplit(".", 1)[-1]
        layout = weight_layout(owner, leaf, ndim)
        base = dict(name=name, shape=shape, dtype=param.dtype, owner=type(owner).__name__, aliases=aliases)
        pattern = self.match(cname)

        explicit = [n for n in (name, cname, *aliases, *map(canonical_name, aliases)) if n in self.preset.params]
        if explicit:
            dims = self.preset.params[explicit[0]]
            if dims is not None and ndim < 2:
                raise RuleError(
                    f"parameter {name!r} is {ndim}-D; 1-D tensors (norms, biases) are never "
                    f"compressed, so its explicit dims {list(dims)} cannot apply: set it to null"
                )
            role = pattern.role if pattern is not None and pattern.role else ("norm" if is_norm_name(cname, owner) else "other")
            resolved = None if dims is None else rule_to_dims(list(dims), None, shape, name)
            if role in NEVER_COMPRESSED_ROLES and resolved is not None:
                raise RuleError(f"parameter {name!r} has role {role!r}, which is never compressed; set it to null")
            rule = "none" if dims is None else list(dims)
            return PlanEntry(role=role, rule=rule, dims=resolved, decided_by="params", **base)

        if _ADAPTER_RE.search(cname):
            rule = self.rule_for("adapter") if ndim >= 2 else "none"
            dims = rule_to_dims(rule, layout, shape, name)
            return PlanEntry(role="adapter", rule=rule, dims=dims, decided_by="peft adapter", **base)

        if ndim < 2:
            role = "norm" if is_norm_name(cname, owner) else "bias" if leaf == "bias" else "other"
            return PlanEntry(role=role, rule="none", dims=None, decided_by="1-D", **base)

        if pattern is None:
            if is_norm_name(cname, owner):
                return PlanEntry(role="norm", rule="none", dims=None, decided_by="norm", **base)
            self.unmatched.append(f"{name} {list(shape)}")
            return PlanEntry(role="other", rule="none", dims=None, decided_by="unmatched", **base)

        layout = pattern.layout or layout
        if pattern.split is not None:
            return self._plan_split(pattern, layout, base, name, shape)
        rule = self.rule_for(pattern.role)
        if pattern.dims is not None and rule != "none":
            rule = list(pattern.dims)
        dims = rule_to_dims(rule, layout, shape, name)
        return PlanEntry(role=pattern.role, rule=rule, dims=dims, decided_by=pattern.pattern, **base)

    def _plan_split(
        self, pattern: RolePattern, layout: Optional[Layout], base: dict, name: str, shape: tuple[int, ...]
    ) -> PlanEntry:
        if layout is None:
            raise PresetError(
                f"{pattern.source}: parameter {name!r} is split, but its owner {base['owner']} has no known "
                "layout; add 'layout: {fan_in: [...], fan_out: [...]}' to the entry"
            )
        split_dim = layout.split_dim
        sizes = [resolve_size(part.size, self.config, f"{pattern.source} ({name})") for part in pattern.split]
        parts = []
        for part, size in zip(pattern.split, sizes):
            part_names = {f"{n}[{part.role}]" for n in (name, canonical_name(name))}
            self.part_names |= part_names
            explicit = [n for n in sorted(part_names) if n in self.preset.params]
            if explicit:
                dims = self.preset.params[explicit[0]]
                rule: Rule = "none" if dims is None else list(dims)
            else:
                rule = self.rule_for(part.role)
            parts.append(PartPlan(part.role, rule, size, rule_to_dims(rule, layout, shape, name)))
        segments({"split_dim": split_dim, "sizes": sizes, "dims": [None] * len(sizes)}, shape, name)
        return PlanEntry(
            role="split", rule="split", dims=None, parts=tuple(parts), split_dim=split_dim,
            decided_by=pattern.pattern, **base,
        )


def plan_compression(
    model: nn.Module,
    preset: Union[str, Preset] = "auto",
    overrides: Overrides = None,
) -> CompressionPlan:
    """Plan SlimAdam compression for every trainable parameter of ``model``.

    Args:
        model: any ``nn.Module``; a Hugging Face model's ``config.model_type`` picks the preset when
            ``preset="auto"``. Models on the meta device work (only shapes are read).
        preset: ``"auto"``, a shipped preset name (``gpt2``, ``llama``, ``vit``, ``bert``, ``generic``),
            a path to a YAML preset, or a :class:`~slimadam_hf.rules.presets.Preset`.
        overrides: a YAML override (preset schema), an authors'-format JSON rules file
            ``{param: [dims] | null}``, or a dict in the preset schema; merged on top of the preset.

    Raises:
        PresetError / RuleError / CompressSpecError (all ``ValueError``) naming the parameter, pattern or
        rule at fault and how to fix it.
    """
    config = getattr(model, "config", None)
    base = _resolve_preset(model, preset)
    override = load_overrides(overrides) if overrides is not None else None
    merged = base.merged_with(override) if override is not None else base
    for role in merged.rules:
        if role in NEVER_COMPRESSED_ROLES and merged.rules[role] != "none":
            raise RuleError(f"{merged.source}: role {role!r} is never compressed; remove its rule")

    modules = dict(model.named_modules())
    names_by_id: dict[int, list[str]] = defaultdict(list)
    for name, param in model.named_parameters(remove_duplicate=False):
        names_by_id[id(param)].append(name)

    planner = _Planner(merged, config)
    entries = []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        aliases = tuple(n for n in names_by_id[id(param)] if n != name)
        entries.append(planner.plan(name, param, _owner(modules, name), aliases))

    _check_overrides_used(override, merged, planner, names_by_id)
    _check_preset_fits(model, preset, base, planner, entries)
    warnings = [
        f"{item} matched no pattern of preset {merged.name!r} and keeps a full second moment; add a "
        "'roles' pattern in an override YAML to compress it"
        for item in planner.unmatched
    ]
    if warnings:
        logger.warning("SlimAdam plan: %d trainable matrices keep a full second moment:\n  %s",
                       len(warnings), "\n  ".join(planner.unmatched))
    return CompressionPlan(
        entries, merged.name, getattr(config, "model_type", None), warnings, preset_options=dict(merged.options)
    )


def _check_preset_fits(
    model: nn.Module, preset: Union[str, Preset], base: Preset, planner: _Planner, entries: list[PlanEntry]
) -> None:
    """Refuse an explicitly chosen preset that matches nothing, or is for another model type and leaves
    matrices unmatched: that is a wrong preset, not a model with a few extra layers."""
    if preset == "auto" or not planner.unmatched:
        return
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    n_matrices = sum(1 for e in entries if len(e.shape) >= 2)
    foreign = bool(base.model_types) and model_type not in base.model_types
    if len(planner.unmatched) == n_matrices or foreign:
        raise PresetError(
            f"preset {base.name!r} (for model types {list(base.model_types)}) matched only "
            f"{n_matrices - len(planner.unmatched)} of the {n_matrices} trainable matrices of "
            f"{type(model).__name__} (model_type {model_type!r}); unmatched e.g. {planner.unmatched[0]}. "
            "Use preset='auto', preset='generic', or a YAML preset written for this model."
        )


def _check_overrides_used(
    override: Optional[Preset], merged: Preset, planner: _Planner, names_by_id: dict[int, list[str]]
) -> None:
    if override is None:
        return
    known = {n for names in names_by_id.values() for n in names}
    known |= {canonical_name(n) for n in known} | planner.part_names
    for name in override.params:
        if name not in known:
            close = difflib.get_close_matches(name, sorted(known), n=3)
            raise PresetError(
                f"{override.source}: rule for parameter {name!r}, which the model does not have"
                + (f"; did you mean {', '.join(map(repr, close))}?" if close else
                   "; names must be as in model.named_parameters()")
            )
    for i, pattern in enumerate(override.patterns):
        if planner.pattern_hits.get(i, 0) == 0:
            raise PresetError(
                f"{pattern.source}: pattern matches no trainable parameter (or an earlier pattern took "
                "them all); patterns are anchored regexes over a full name or dotted suffix, e.g. "
                "'layers\\.\\d+\\.mlp\\.up_proj\\.weight'"
            )
