"""``--optim_args`` for ``--optim slimadam``: read the string into :class:`~slimadam_hf.SlimAdamConfig` fields.

Transformers splits ``--optim_args "preset=llama,config=rules.yaml,momentum_dtype=bfloat16"`` into
``key=value`` pairs (spaces removed, split on ``,`` and ``=``). The keys are the fields of
:class:`~slimadam_hf.SlimAdamConfig` that ``TrainingArguments`` does not already set (``config`` is the
``overrides`` field); the learning rate, betas, epsilon and weight decay come from ``--learning_rate``,
``--adam_beta1``, ``--adam_beta2``, ``--adam_epsilon`` and ``--weight_decay``. :func:`optim_args_help`
lists them.

Values are checked completely here, before any model is built: the preset must exist, an override file
must exist and parse, and option combinations must be valid (``SlimAdamConfig``'s own checks).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Union

from ..core.options import AUTO_SNR_PRESET, OptionsError, SlimAdamConfig
from ..rules.presets import PresetError, available_presets, load_overrides


class OptimArgsError(ValueError):
    """An ``--optim_args`` key or value that ``--optim slimadam`` cannot use."""


def optim_args_specs() -> dict[str, dataclasses.Field]:
    """Every key ``--optim slimadam`` accepts in ``--optim_args``, with its :class:`SlimAdamConfig` field."""
    return SlimAdamConfig.optim_arg_keys()


def optim_args_help() -> str:
    """The accepted ``--optim_args`` keys, one per line, for ``--help`` texts."""
    return "\n".join(["--optim_args keys for --optim slimadam (key=value, comma-separated):"]
                     + [f"  {line}" for line in SlimAdamConfig.help_lines()])


def _check_preset(value: Any) -> None:
    if not isinstance(value, str) or value in ("auto", AUTO_SNR_PRESET) or value in available_presets():
        return
    if value.endswith((".yaml", ".yml")):
        if not Path(value).is_file():
            raise ValueError(f"preset file {value!r} does not exist")
        return
    raise ValueError(
        f"expected auto, {AUTO_SNR_PRESET}, {', '.join(available_presets())} or a path to a YAML preset"
    )


def _check_config(value: Any) -> None:
    if not isinstance(value, str):
        return
    if not value.endswith((".yaml", ".yml", ".json")):
        raise ValueError("expected a path to a YAML override or a JSON rules file")
    if not Path(value).is_file():
        raise ValueError(f"file {value!r} does not exist")
    try:
        load_overrides(value)
    except (PresetError, ValueError) as err:
        raise ValueError(f"the file cannot be used: {err}") from None


_VALUE_CHECKS = {"preset": _check_preset, "overrides": _check_config}


def split_optim_args(optim_args: Union[None, str, dict[str, str]]) -> dict[str, str]:
    """``"a=1,b=2"`` -> ``{"a": "1", "b": "2"}`` as transformers splits it; a dict passes through."""
    if optim_args is None or optim_args == "":
        return {}
    if not isinstance(optim_args, str):
        return {str(k): str(v) for k, v in optim_args.items()}
    items: dict[str, str] = {}
    for mapping in optim_args.replace(" ", "").split(","):
        if mapping.count("=") != 1:
            raise OptimArgsError(
                f"--optim_args entry {mapping!r} is not key=value (values cannot contain ',', '=' or "
                f"spaces); valid keys for --optim slimadam: {SlimAdamConfig.keys_text()}"
            )
        key, value = mapping.split("=")
        items[key] = value
    return items


def parse_optim_args(optim_args: Union[None, str, dict[str, str]]) -> dict[str, Any]:
    """Read ``--optim_args`` into :class:`SlimAdamConfig` keyword arguments (``config`` -> ``overrides``).

    Raises :class:`OptimArgsError` with a one-line message naming the key and the fix on an unknown key,
    a value that cannot be read, a missing file, an unknown preset or an invalid combination.
    """
    result: dict[str, Any] = {}
    for key, text in split_optim_args(optim_args).items():
        try:
            name, value = SlimAdamConfig.parse_optim_arg(key, text)
            check = _VALUE_CHECKS.get(name)
            if check is not None:
                try:
                    check(value)
                except ValueError as err:
                    raise OptionsError(
                        f"--optim_args {key}={text!r} cannot be read: {err}; valid keys: {SlimAdamConfig.keys_text()}"
                    ) from None
        except OptionsError as err:
            raise OptimArgsError(str(err)) from None
        result[name] = value
    try:
        SlimAdamConfig(**result)
    except OptionsError as err:
        raise OptimArgsError(f"--optim_args: {err}") from None
    return result


__all__ = ["OptimArgsError", "optim_args_help", "optim_args_specs", "parse_optim_args", "split_optim_args"]
