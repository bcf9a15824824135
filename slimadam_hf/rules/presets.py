"""Architecture presets: YAML files mapping parameter-name patterns to roles.

Schema (a preset file and an override file share it)::

    name: llama
    model_types: [llama, mistral]          # served by preset="auto"
    description: ...
    roles:                                 # first matching pattern wins
      - pattern: 'layers\\.\\d+\\.self_attn\\.q_proj\\.weight'
        role: query
      - pattern: 'layers\\.\\d+\\.self_attn\\.qkv_proj\\.weight'
        split:                             # a fused weight, cut along its output dim
          - {role: query, size: query_size}   # an int, a derived size or a config attribute
          - {role: key, size: kv_size}
          - {role: value, size: kv_size}
      - pattern: 'embeddings\\.position_embeddings'
        role: position_embedding
        layout: {fan_in: [1], fan_out: [2]}   # for a bare nn.Parameter
    rules:                                 # role -> fan_in | fan_out | both | none | [dims]
      mlp_up: fan_out
    params:                                # exact parameter name -> [dims] | null
      lm_head.weight: [1]
      transformer.h.0.attn.c_attn.weight[value]: null   # one part of a split weight, by role
    options:                               # optimizer defaults for this family; the user's value wins
      robust: true

Patterns are regexes anchored at both ends, matched against the whole parameter name or any dotted
suffix of it, after wrapper prefixes are stripped (:func:`canonical_name`). A JSON file in the paper
authors' format ``{param_name: [dims] | null}`` is read as an override with only ``params``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Optional, Union

import yaml

from ..core.compress_spec import parse_dims
from ..core.options import parse_preset_options
from .layouts import Layout
from .roles import Rule, RuleError, check_role, check_rule

Size = Union[int, str]


class PresetError(ValueError):
    """A preset or override file that cannot be used."""


# -- names --------------------------------------------------------------------------------------

_WRAPPER_SEGMENTS = (
    "_orig_mod",
    "_fsdp_wrapped_module",
    "_checkpoint_wrapped_module",
    "base_layer",  # PEFT LoRA/DoRA: the wrapped base module
    "original_module",  # PEFT modules_to_save: the frozen original
)
_NAMED_COPY_SEGMENT = "modules_to_save"  # PEFT: `<module>.modules_to_save.<adapter>.<param>`
_LEADING_PREFIXES = ("base_model.model.", "module.")


def canonical_name(name: str) -> str:
    """Strip what wrappers (PEFT, DDP, torch.compile, FSDP, activation checkpointing) add to names.

    PEFT's ``q_proj.base_layer.weight``, ``score.original_module.weight`` and
    ``score.modules_to_save.<adapter>.weight`` become ``q_proj.weight`` and ``score.weight``, so they
    get the base module's role. LoRA factors (``lora_A.<adapter>.weight``) keep their names.
    """
    parts: list[str] = []
    segments_iter = iter(name.split("."))
    for part in segments_iter:
        if part == _NAMED_COPY_SEGMENT:
            next(segments_iter, None)  # the adapter name
        elif part not in _WRAPPER_SEGMENTS:
            parts.append(part)
    name = ".".join(parts)
    stripped = True
    while stripped:
        stripped = False
        for prefix in _LEADING_PREFIXES:
            if name.startswith(prefix):
                name, stripped = name[len(prefix) :], True
    return name


# -- split sizes --------------------------------------------------------------------------------


def _head_dim(config: Any) -> int:
    head_dim = getattr(config, "head_dim", None)
    return int(head_dim) if head_dim else config.hidden_size // config.num_attention_heads


def _kv_heads(config: Any) -> int:
    return getattr(config, "num_key_value_heads", None) or config.num_attention_heads


DERIVED_SIZES: dict[str, Callable[[Any], int]] = {
    "query_size": lambda c: c.num_attention_heads * _head_dim(c),
    "kv_size": lambda c: _kv_heads(c) * _head_dim(c),
    "expert_intermediate_size": lambda c: getattr(c, "moe_intermediate_size", None) or c.intermediate_size,
}
"""Sizes computed from a config; any other name is read as a config attribute."""


def resolve_size(size: Size, config: Any, where: str) -> int:
    if isinstance(size, int):
        return size
    if config is None:
        raise PresetError(f"{where}: split size {size!r} needs the model config, but the model has none")
    if size in DERIVED_SIZES:
        return int(DERIVED_SIZES[size](config))
    value = getattr(config, size, None)
    if not isinstance(value, int):
        raise PresetError(
            f"{where}: split size {size!r} is neither an int, a derived size ({', '.join(DERIVED_SIZES)}) "
            f"nor an int attribute of {type(config).__name__}"
        )
    return value


# -- schema -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SplitPart:
    role: str
    size: Size


@dataclass(frozen=True)
class RolePattern:
    """One ``roles:`` entry of a preset."""

    pattern: str
    role: Optional[str] = None
    split: Optional[tuple[SplitPart, ...]] = None
    layout: Optional[Layout] = None
    dims: Optional[tuple[int, ...]] = None
    source: str = "?"
    regex: re.Pattern = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        try:
            regex = re.compile(rf"(?:.*\.)?(?:{self.pattern})")
        except re.error as err:
            raise PresetError(f"{self.source}: pattern {self.pattern!r} is not a valid regex: {err}") from err
        object.__setattr__(self, "regex", regex)

    def matches(self, name: str) -> bool:
        return self.regex.fullmatch(name) is not None


@dataclass(frozen=True)
class Preset:
    """A parsed preset (or override): patterns -> roles, role -> rule overrides, exact params, and the
    optimizer options it sets by default (``options``)."""

    name: str
    model_types: tuple[str, ...] = ()
    description: str = ""
    patterns: tuple[RolePattern, ...] = ()
    rules: dict[str, Rule] = field(default_factory=dict)
    params: dict[str, Optional[tuple[int, ...]]] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)
    source: str = "?"

    def merged_with(self, override: "Preset") -> "Preset":
        """``override`` on top of this preset: its patterns first, its rules, params and options win."""
        return replace(
            self,
            name=f"{self.name}+{override.name}",
            patterns=override.patterns + self.patterns,
            rules={**self.rules, **override.rules},
            params={**self.params, **override.params},
            options={**self.options, **override.options},
        )


_TOP_KEYS = {"name", "model_types", "description", "roles", "rules", "params", "options"}
_ENTRY_KEYS = {"pattern", "role", "split", "layout", "dims"}


def _parse_dims(value: Any, where: str) -> Optional[tuple[int, ...]]:
    return parse_dims(value, where, error=PresetError)


def _parse_entry(entry: Any, where: str) -> RolePattern:
    if not isinstance(entry, dict) or "pattern" not in entry:
        raise PresetError(f"{where}: each roles entry needs a 'pattern', got {entry!r}")
    unknown = set(entry) - _ENTRY_KEYS
    if unknown:
        raise PresetError(f"{where}: unknown keys {sorted(unknown)} (valid: {sorted(_ENTRY_KEYS)})")
    where = f"{where} pattern {entry['pattern']!r}"
    role = entry.get("role")
    split = entry.get("split")
    if (role is None) == (split is None):
        raise PresetError(f"{where}: give exactly one of 'role' or 'split'")
    if role is not None:
        check_role(role, where)
    parts = None
    if split is not None:
        if not isinstance(split, list) or len(split) < 2:
            raise PresetError(f"{where}: 'split' must list at least two parts of {{role, size}}")
        parts = []
        for part in split:
            if not isinstance(part, dict) or set(part) != {"role", "size"}:
                raise PresetError(f"{where}: each split part needs exactly 'role' and 'size', got {part!r}")
            parts.append(SplitPart(check_role(part["role"], where), part["size"]))
        parts = tuple(parts)
    layout = None
    if "layout" in entry:
        raw = entry["layout"]
        if not isinstance(raw, dict) or set(raw) != {"fan_in", "fan_out"}:
            raise PresetError(f"{where}: 'layout' needs exactly 'fan_in' and 'fan_out' lists of dims")
        layout = Layout(_parse_dims(raw["fan_in"], where), _parse_dims(raw["fan_out"], where))
    dims = _parse_dims(entry["dims"], where) if entry.get("dims") is not None else None
    return RolePattern(entry["pattern"], role, parts, layout, dims, source=where)


def parse_preset(data: Any, source: str) -> Preset:
    """Build a :class:`Preset` from the YAML mapping ``data`` read from ``source``."""
    if not isinstance(data, dict):
        raise PresetError(f"{source}: a preset is a mapping with keys {sorted(_TOP_KEYS)}")
    unknown = set(data) - _TOP_KEYS
    if unknown:
        raise PresetError(f"{source}: unknown keys {sorted(unknown)} (valid: {sorted(_TOP_KEYS)})")
    patterns = tuple(_parse_entry(e, source) for e in data.get("roles") or [])
    rules = {}
    for role, rule in (data.get("rules") or {}).items():
        check_role(role, f"{source} rules")
        rules[role] = check_rule(rule, f"{source} rules[{role!r}]")
    params = {str(k): _parse_dims(v, f"{source} params[{k!r}]") for k, v in (data.get("params") or {}).items()}
    return Preset(
        name=str(data.get("name") or Path(source).stem),
        model_types=tuple(data.get("model_types") or ()),
        description=str(data.get("description") or ""),
        patterns=patterns,
        rules=rules,
        params=params,
        options=parse_preset_options(data.get("options"), source, error=PresetError),
        source=source,
    )


# -- files --------------------------------------------------------------------------------------


def _preset_files() -> dict[str, Any]:
    root = resources.files("slimadam_hf.preset_files")
    return {f.name[: -len(".yaml")]: f for f in root.iterdir() if f.name.endswith(".yaml")}


def available_presets() -> list[str]:
    """Names of the presets shipped with the package."""
    return sorted(_preset_files())


def load_preset(name: str) -> Preset:
    """A shipped preset by name, or a YAML file by path."""
    files = _preset_files()
    if name in files:
        return parse_preset(yaml.safe_load(files[name].read_text()), f"preset {name!r}")
    if name.endswith((".yaml", ".yml")) and Path(name).is_file():
        return parse_preset(yaml.safe_load(Path(name).read_text()), name)
    raise PresetError(
        f"unknown preset {name!r}; available presets: {', '.join(available_presets())}, "
        "or a path to a YAML preset file"
    )


def preset_for_model_type(model_type: Optional[str]) -> Preset:
    """The shipped preset that declares ``model_type`` (used by ``preset='auto'``)."""
    for name in available_presets():
        preset = load_preset(name)
        if model_type in preset.model_types:
            return preset
    raise PresetError(
        f"no preset knows model_type {model_type!r}. Available presets: {', '.join(available_presets())}. "
        "Pass preset='generic' to match common layer names (q_proj, query, fc1, ...), or write a YAML "
        "preset (see docs/presets.md) and pass its path as preset= or overrides="
    )


def load_overrides(source: Union[str, Path, dict, Preset]) -> Preset:
    """An override: a YAML file in the preset schema, an authors'-format JSON file, or a dict."""
    if isinstance(source, Preset):
        return source
    if isinstance(source, dict):
        return parse_preset(source, "overrides")
    path = Path(source)
    if not path.is_file():
        raise PresetError(f"override file {str(path)!r} does not exist")
    text = path.read_text()
    if path.suffix == ".json":
        data = json.loads(text)
        if not isinstance(data, dict) or "roles" in data or "rules" in data:
            return parse_preset(data, str(path))
        return parse_preset({"name": path.stem, "params": data}, str(path))
    return parse_preset(yaml.safe_load(text) or {}, str(path))


__all__ = [
    "Preset",
    "PresetError",
    "RolePattern",
    "SplitPart",
    "RuleError",
    "available_presets",
    "canonical_name",
    "load_overrides",
    "load_preset",
    "parse_preset",
    "preset_for_model_type",
    "resolve_size",
]
