"""``--optim_args`` for ``--optim slimadam``: which keys exist and how their string values are read.

Transformers splits ``--optim_args "preset=llama,config=rules.yaml,foreach=false"`` into a dict of
strings (spaces removed, split on ``,`` and ``=``). The keys are

* ``preset``: a shipped preset name (``gpt2``, ``llama``, ...), ``auto``, or a path to a YAML preset;
* ``config``: a YAML override in the preset schema, or the paper authors' JSON rules file;
* with ``preset=auto-snr`` (one-run SNR mode, :mod:`slimadam_hf.auto_snr`): ``probe_steps`` (required),
  ``probe_every``, ``cutoff``, ``select``, ``by_role``;
* every keyword-only option of :class:`~slimadam_hf.SlimAdamW` (``foreach``, and whatever options the
  installed version has, such as ``momentum_dtype``), read from the constructor's signature so this
  list never goes stale.

The learning rate, betas, epsilon and weight decay come from ``TrainingArguments``
(``--learning_rate``, ``--adam_beta1``, ``--adam_beta2``, ``--adam_epsilon``, ``--weight_decay``).
"""

from __future__ import annotations

import inspect
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Union

import torch

from . import optimizer as optimizer_module
from .optimizer import SlimAdamW
from .auto_snr import AUTO_SNR_PRESET
from .presets import available_presets


class OptimArgsError(ValueError):
    """An ``--optim_args`` key or value that ``--optim slimadam`` cannot use."""


@dataclass(frozen=True)
class OptimArgSpec:
    """One accepted ``--optim_args`` key."""

    key: str
    kind: str  # shown in errors and docs: "preset name or path", "bool", "torch dtype", ...
    parse: Callable[[str], Any]
    help: str = ""


_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}
_NONE = {"none", "null", "auto", "default"}


def _bool_parser(optional: bool) -> Callable[[str], Any]:
    def parse(value: str) -> Any:
        low = value.lower()
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
        if optional and low in _NONE:
            return None
        raise ValueError(f"expected true/false{'/none' if optional else ''}")

    return parse


def _dtype_parser(optional: bool) -> Callable[[str], Any]:
    def parse(value: str) -> Any:
        if optional and value.lower() in _NONE:
            return None
        dtype = getattr(torch, value.removeprefix("torch."), None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError("expected a torch dtype name such as float32 or bfloat16")
        return dtype

    return parse


def _choice_parser(choices: tuple[Any, ...]) -> Callable[[str], Any]:
    def parse(value: str) -> Any:
        for choice in choices:
            if str(choice).lower() == value.lower() or (choice is None and value.lower() in _NONE):
                return choice
        raise ValueError(f"expected one of {', '.join(map(str, choices))}")

    return parse


def _number_parser(kind: type, optional: bool) -> Callable[[str], Any]:
    def parse(value: str) -> Any:
        if optional and value.lower() in _NONE:
            return None
        return kind(value)

    return parse


def _string_parser(optional: bool) -> Callable[[str], Any]:
    def parse(value: str) -> Any:
        return None if optional and value.lower() in _NONE else value

    return parse


def _parser_for(name: str, annotation: Any, default: Any) -> tuple[str, Callable[[str], Any]]:
    """How to read a string into the type of a ``SlimAdamW`` keyword option."""
    args = typing.get_args(annotation)
    optional = default is None or (typing.get_origin(annotation) is Union and type(None) in args)
    inner = [a for a in args if a is not type(None)] if typing.get_origin(annotation) is Union else [annotation]
    base = inner[0] if len(inner) == 1 else annotation
    if typing.get_origin(base) is typing.Literal:
        choices = typing.get_args(base) + ((None,) if optional else ())
        return "one of " + "/".join(map(str, choices)), _choice_parser(choices)
    if base is bool or isinstance(default, bool):
        return "bool", _bool_parser(optional)
    if base is torch.dtype or isinstance(default, torch.dtype) or name.endswith("dtype"):
        return "torch dtype", _dtype_parser(optional)
    if base is int or (isinstance(default, int) and not isinstance(default, bool)):
        return "int", _number_parser(int, optional)
    if base is float or isinstance(default, float):
        return "float", _number_parser(float, optional)
    return "string", _string_parser(optional)


def _read_preset(value: str) -> str:
    if value in ("auto", AUTO_SNR_PRESET) or value in available_presets():
        return value
    if value.endswith((".yaml", ".yml")):
        if not Path(value).is_file():
            raise ValueError(f"preset file {value!r} does not exist")
        return value
    raise ValueError(
        f"expected auto, {AUTO_SNR_PRESET}, {', '.join(available_presets())} or a path to a YAML preset"
    )


def _read_config(value: str) -> str:
    if not value.endswith((".yaml", ".yml", ".json")):
        raise ValueError("expected a path to a YAML override or a JSON rules file")
    if not Path(value).is_file():
        raise ValueError(f"file {value!r} does not exist")
    return value


# String options whose valid values the optimizer module lists in a constant.
_CHOICE_CONSTANTS = {"implementation": "IMPLEMENTATIONS"}

# Constructor arguments that TrainingArguments already controls.
_FROM_TRAINING_ARGS = {"params", "lr", "betas", "eps", "weight_decay"}


def optimizer_option_specs() -> dict[str, OptimArgSpec]:
    """The ``SlimAdamW`` keyword options accepted in ``--optim_args``, from its signature."""
    signature = inspect.signature(SlimAdamW.__init__)
    try:
        hints = typing.get_type_hints(SlimAdamW.__init__)
    except Exception:  # unresolvable annotations: fall back to defaults
        hints = {}
    specs = {}
    for name, param in signature.parameters.items():
        if name == "self" or name in _FROM_TRAINING_ARGS or param.kind not in (
            param.KEYWORD_ONLY,
            param.POSITIONAL_OR_KEYWORD,
        ):
            continue
        default = None if param.default is param.empty else param.default
        kind, parse = _parser_for(name, hints.get(name, Any), default)
        choices = getattr(optimizer_module, _CHOICE_CONSTANTS.get(name, ""), None)
        if choices:
            choices = tuple(choices) + ((None,) if default is None else ())
            kind, parse = "one of " + "/".join(map(str, choices)), _choice_parser(choices)
        specs[name] = OptimArgSpec(name, kind, parse, f"SlimAdamW({name}=...), default {default!r}")
    return specs


def optim_args_specs() -> dict[str, OptimArgSpec]:
    """Every key ``--optim slimadam`` accepts in ``--optim_args``."""
    specs = {
        "preset": OptimArgSpec("preset", "preset name or path", _read_preset, "compression preset, default auto"),
        "config": OptimArgSpec(
            "config", "path", _read_config, "YAML override (preset schema) or authors' JSON rules file"
        ),
    }
    specs.update(_auto_snr_specs())
    specs.update(optimizer_option_specs())
    return specs


def _auto_snr_specs() -> dict[str, OptimArgSpec]:
    """Keys of ``preset=auto-snr`` (:mod:`slimadam_hf.auto_snr`); other presets reject them."""
    only = f"(preset={AUTO_SNR_PRESET} only)"
    return {
        "probe_steps": OptimArgSpec("probe_steps", "int", _number_parser(int, False),
                                    f"full-Adam steps before compressing by SNR {only}"),
        "probe_every": OptimArgSpec("probe_every", "int", _number_parser(int, True),
                                    f"measure SNR every N probe steps, default probe_steps//4 {only}"),
        "cutoff": OptimArgSpec("cutoff", "float", _number_parser(float, False), f"SNR cutoff, default 1.0 {only}"),
        "select": OptimArgSpec("select", "one of max-snr/most-compressive",
                               _choice_parser(("max-snr", "most-compressive")), f"rule selection {only}"),
        "by_role": OptimArgSpec("by_role", "bool", _bool_parser(False), f"one rule per role {only}"),
    }


def _valid_keys_text(specs: dict[str, OptimArgSpec]) -> str:
    return ", ".join(f"{s.key} ({s.kind})" for s in specs.values())


def parse_optim_args(optim_args: Union[None, str, dict[str, str]]) -> dict[str, Any]:
    """Read ``--optim_args`` into keyword arguments for :class:`~slimadam_hf.SlimAdamFactory`.

    Returns a dict with ``preset`` / ``overrides`` (from ``config``) when given, plus typed
    ``SlimAdamW`` options. Raises :class:`OptimArgsError` listing the valid keys on an unknown key or
    a value that cannot be read.
    """
    if optim_args is None or optim_args == "":
        return {}
    specs = optim_args_specs()
    if isinstance(optim_args, str):
        items: dict[str, str] = {}
        for mapping in optim_args.replace(" ", "").split(","):
            if mapping.count("=") != 1:
                raise OptimArgsError(
                    f"--optim_args entry {mapping!r} is not key=value (values cannot contain ',', '=' or "
                    f"spaces); valid keys for --optim slimadam: {_valid_keys_text(specs)}"
                )
            key, value = mapping.split("=")
            items[key] = value
    else:
        items = dict(optim_args)
    result: dict[str, Any] = {}
    for key, value in items.items():
        spec = specs.get(key)
        if spec is None:
            raise OptimArgsError(
                f"--optim_args key {key!r} is not known to --optim slimadam; valid keys: "
                f"{_valid_keys_text(specs)}. The learning rate, betas, eps and weight decay come from "
                "--learning_rate, --adam_beta1, --adam_beta2, --adam_epsilon and --weight_decay"
            )
        try:
            parsed = spec.parse(str(value))
        except ValueError as err:
            raise OptimArgsError(
                f"--optim_args {key}={value!r} cannot be read: {err} ({key}: {spec.kind}); "
                f"valid keys: {_valid_keys_text(specs)}"
            ) from None
        result["overrides" if key == "config" else key] = parsed
    return result


__all__ = ["OptimArgSpec", "OptimArgsError", "optim_args_specs", "optimizer_option_specs", "parse_optim_args"]
