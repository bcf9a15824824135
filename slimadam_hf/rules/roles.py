"""Roles (what a parameter does) and rules (how a role's second moment is compressed).

Default rules are Table 1 of the SlimAdam paper (see ``paper-notes.md``).
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

from ..core.compress_spec import parse_dims
from .layouts import Layout

Rule = Union[str, list[int]]

RULE_NAMES = ("fan_in", "fan_out", "both", "none")

DEFAULT_RULES: dict[str, str] = {
    "token_embedding": "fan_out",
    "position_embedding": "fan_out",
    "query": "fan_in",
    "key": "fan_in",
    "value": "fan_out",
    "attention_output": "fan_out",
    "mlp_up": "fan_out",
    "mlp_gate": "fan_out",
    "mlp_down": "fan_out",
    "lm_head": "fan_in",
    "patch_embedding": "fan_in",
    "classifier": "fan_in",
    "adapter": "none",
    "norm": "none",
    "bias": "none",
    "router": "none",
    "other": "none",
}
"""Role -> rule. ``adapter`` covers LoRA/DoRA factors: they are small, low-rank and move fast early
in training, and Table 1 says nothing about them, so they keep a full second moment by default."""

ROLES = tuple(DEFAULT_RULES)
NEVER_COMPRESSED_ROLES = frozenset({"norm", "bias", "router"})


class RuleError(ValueError):
    """An unknown role or rule, or a rule that cannot apply to its parameter."""


def check_role(role: str, where: str) -> str:
    if role not in DEFAULT_RULES:
        raise RuleError(f"{where}: unknown role {role!r}; valid roles are {', '.join(ROLES)}")
    return role


def check_rule(rule: object, where: str) -> Rule:
    if isinstance(rule, str) and rule in RULE_NAMES:
        return rule
    if rule is None:
        return "none"
    if isinstance(rule, (list, tuple)) and rule and all(isinstance(d, int) and not isinstance(d, bool) for d in rule):
        return list(rule)
    raise RuleError(
        f"{where}: unknown rule {rule!r}; a rule is one of {', '.join(RULE_NAMES)} or a non-empty list of dims"
    )


def rule_to_dims(
    rule: Rule, layout: Optional[Layout], shape: Sequence[int], name: str
) -> Optional[tuple[int, ...]]:
    """Resolve ``rule`` to the dims of a tensor of ``shape`` through the owner's ``layout``."""
    if rule == "none":
        return None
    if rule == "both":
        return tuple(range(len(shape)))
    if isinstance(rule, list):
        dims: Sequence[int] = rule
    else:
        if layout is None:
            raise RuleError(
                f"parameter {name!r}: rule {rule!r} needs to know the tensor's fan_in/fan_out dims, but its "
                "owner module has no known layout (a bare nn.Parameter?); give the preset entry a "
                "'layout: {fan_in: [...], fan_out: [...]}' or explicit 'dims: [...]'"
            )
        dims = layout.fan_in if rule == "fan_in" else layout.fan_out
    return parse_dims(list(dims), f"parameter {name!r} (rule {rule!r})", shape=shape)


def is_norm_name(name: str, owner: object = None) -> bool:
    """Whether ``name`` is a normalisation layer's parameter: its module is called ``ln_*`` or ``*norm*``
    (``ln_1``, ``input_layernorm``, ``LayerNorm``, ``q_norm``), or ``owner``'s class is a norm."""
    if owner is not None and "norm" in type(owner).__name__.lower():
        return True
    module = name.rsplit(".", 2)[-2] if "." in name else ""
    return "norm" in module.lower() or module.startswith("ln_")
