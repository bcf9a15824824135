"""``SlimAdamConfig``: every option of SlimAdam in one dataclass, with its validation and help text.

``SlimAdamW``, ``build_slimadam``, ``SlimAdamFactory``, the auto-SNR mode and ``--optim_args`` all read
this one object (as PEFT's ``LoraConfig`` is read by every PEFT entry point), so an option is declared,
checked and documented once. Each field's metadata says how ``--optim_args`` reads it from a string
(``kind``), its help text, and whether it comes from ``TrainingArguments`` instead (``training_arg``).
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Union

import torch

IMPLEMENTATIONS = ("fused", "triton", "foreach", "reference")
"""``SlimAdamW(implementation=...)``: C++ CPU kernel, Triton CUDA kernels, batched eager kernels, plain loop."""

RETIRED_IMPLEMENTATIONS = ("compiled",)
"""Names that older configs and checkpoints carry: read as the default (the fast path of the device)."""

AUTO_SNR_PRESET = "auto-snr"
"""``preset="auto-snr"``: probe with full second moments, derive the rules by SNR, compress in place."""

SELECTS = ("max-snr", "most-compressive")

ROUNDINGS = ("nearest", "stochastic")

MOMENTUM_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float64": torch.float64,
    "int8": torch.int8,  # block-quantized, see slimadam_hf.core.quant
}
_DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp64": "float64"}


class OptionsError(ValueError):
    """An option value that SlimAdam cannot use; the message names the option and the fix."""


def momentum_dtype_name(value: Any) -> Optional[str]:
    """Canonical name (``"bfloat16"``...) of a ``momentum_dtype``; ``None`` means the parameter's dtype."""
    if value is None:
        return None
    if isinstance(value, torch.dtype):
        name = str(value).removeprefix("torch.")
    elif isinstance(value, str):
        name = value.lower().removeprefix("torch.")
        name = _DTYPE_ALIASES.get(name, name)
    else:
        name = ""
    if name not in MOMENTUM_DTYPES:
        raise OptionsError(
            f"momentum_dtype={value!r} is not supported; use None (the parameter's dtype), "
            f"{', '.join(MOMENTUM_DTYPES)} (or torch.bfloat16, ...)"
        )
    return name


def momentum_dtype_for(name: Optional[str], param: torch.Tensor) -> torch.dtype:
    """The dtype of ``exp_avg`` for ``param`` under ``momentum_dtype`` ``name``."""
    return param.dtype if name is None else MOMENTUM_DTYPES[name]


def check_momentum_dtype(name: Optional[str], param: torch.Tensor, where: str) -> None:
    """Refuse a momentum storage that cannot hold ``param``'s moment faithfully."""
    if name == "int8" and param.dtype == torch.float64:
        raise OptionsError(
            f"{where}: momentum_dtype='int8' on a float64 parameter would drop the precision float64 is for; "
            "use momentum_dtype=None (float64) for it, or train in float32"
        )


def retire_implementation(name: Optional[str]) -> Optional[str]:
    """``name``, or ``None`` (the device's fast path) with a one-line notice for a retired implementation."""
    if name in RETIRED_IMPLEMENTATIONS:
        logging.getLogger("slimadam_hf").warning(
            "SlimAdamW: implementation=%r is retired (it was slower than the default on CPU and GPU); using the "
            "default, the device's fast path (fused on CPU, triton on CUDA)", name)
        return None
    return name


def _option(default: Any, help: str, kind: str, **extra: Any) -> Any:
    return field(default=default, metadata={"help": help, "kind": kind, **extra})


_NONE_WORDS = {"none", "null", "default"}


def _parse_bool(text: str) -> bool:
    low = text.lower()
    if low in {"true", "1", "yes", "on"}:
        return True
    if low in {"false", "0", "no", "off"}:
        return False
    raise ValueError("expected true or false")


_PARSERS: dict[str, Callable[[str], Any]] = {
    "bool": _parse_bool,
    "int": int,
    "float": float,
    "text": str,
}


@dataclass
class SlimAdamConfig:
    """All SlimAdam options. Built by every entry point; invalid values raise :class:`OptionsError`.

    Groups of fields: what to compress (``preset``, ``overrides``), the update (``lr`` ... ``foreach``)
    and the auto-SNR mode (``probe_steps`` ... ``by_role``, only with ``preset="auto-snr"``).
    """

    preset: Any = _option(
        "auto", "compression preset: auto (by model_type), gpt2, llama, vit, bert, generic, auto-snr, or a "
        "YAML path", "text", label="preset name or YAML path")
    overrides: Any = _option(
        None, "YAML override (preset schema) or the authors' JSON rules file, merged on the preset", "text",
        optim_arg="config", label="YAML/JSON path")
    lr: Union[float, torch.Tensor] = _option(1e-3, "learning rate", "float", training_arg="--learning_rate")
    betas: tuple[float, float] = _option(
        (0.9, 0.999), "coefficients of the running averages of g and g**2", "float",
        training_arg="--adam_beta1/--adam_beta2")
    eps: float = _option(1e-8, "added to the denominator, outside the square root", "float",
                         training_arg="--adam_epsilon")
    weight_decay: float = _option(1e-2, "decoupled weight decay (not on biases and norms)", "float",
                                  training_arg="--weight_decay")
    implementation: Optional[str] = _option(
        None, "fused (C++ kernel for float32 CPU weights), triton (Triton kernels for CUDA weights), foreach "
        "(eager batched kernels, any device) or reference (plain loop); default: the device's fast path",
        "choice", choices=IMPLEMENTATIONS, retired=RETIRED_IMPLEMENTATIONS)
    momentum_dtype: Optional[str] = _option(
        None, "storage of the first moment: none (the parameter's dtype), float32, bfloat16 (half its memory) "
        "or int8 (block-quantized, about a quarter)", "dtype")
    momentum_rounding: str = _option(
        "nearest", "how a bfloat16 first moment is rounded: nearest, or stochastic (unbiased, reproducible "
        "under a fixed seed)", "choice", choices=ROUNDINGS)
    robust: Optional[bool] = _option(
        None, "factored second moment: compressed weights also keep the mean of g**2 over the other dims and use "
        "v_rule*v_other/mean(v_rule) (a row and a column scale); holds AdamW's loss at high learning rates for "
        "one extra entry per row/column; false = the paper's algorithm; default: the preset's choice (on in "
        "bert, off in the others)", "bool", preset_option=False)
    foreach: Optional[bool] = _option(
        None, "legacy switch: true = implementation=foreach, false = implementation=reference", "bool")
    probe_steps: Optional[int] = _option(
        None, "auto-snr: full-Adam steps before the rules are derived and applied (e.g. the warmup)", "int")
    probe_every: Optional[int] = _option(
        None, "auto-snr: measure SNR every N probe steps (default probe_steps//4)", "int")
    cutoff: float = _option(1.0, "auto-snr: SNR threshold above which a dim may be compressed", "float")
    select: str = _option("max-snr", "auto-snr: max-snr or most-compressive", "choice", choices=SELECTS)
    by_role: bool = _option(False, "auto-snr: one rule per role, pooled across depth", "bool")

    def __post_init__(self) -> None:
        self._check_update()
        self._check_auto_snr()

    def _check_update(self) -> None:
        lr = self.lr
        if isinstance(lr, torch.Tensor):
            if lr.numel() != 1:
                raise OptionsError(f"lr: a tensor learning rate must have one element, got shape {list(lr.shape)}")
            lr = lr.item()
        if not 0.0 <= lr:
            raise OptionsError(f"lr={lr}: the learning rate must be >= 0")
        if not 0.0 <= self.eps:
            raise OptionsError(f"eps={self.eps}: it must be >= 0")
        betas = tuple(self.betas)
        if len(betas) != 2:
            raise OptionsError(f"betas={self.betas!r}: give two values, e.g. (0.9, 0.999)")
        for i, beta in enumerate(betas):
            value = beta.item() if isinstance(beta, torch.Tensor) else beta
            if not 0.0 <= value < 1.0:
                raise OptionsError(f"betas[{i}]={beta}: each beta must be in [0, 1)")
        self.betas = betas  # type: ignore[assignment]
        if not 0.0 <= self.weight_decay:
            raise OptionsError(f"weight_decay={self.weight_decay}: it must be >= 0")
        self.implementation = retire_implementation(self.implementation)
        if self.implementation is not None and self.implementation not in IMPLEMENTATIONS:
            raise OptionsError(
                f"implementation={self.implementation!r}: choose one of {', '.join(IMPLEMENTATIONS)}"
            )
        if (
            self.foreach is not None
            and self.implementation is not None
            and (self.implementation == "reference") == bool(self.foreach)
        ):
            raise OptionsError(
                f"foreach={self.foreach} contradicts implementation={self.implementation!r}; give only implementation"
            )
        self.momentum_dtype = momentum_dtype_name(self.momentum_dtype)
        if self.momentum_rounding not in ROUNDINGS:
            raise OptionsError(
                f"momentum_rounding={self.momentum_rounding!r}: choose one of {', '.join(ROUNDINGS)}"
            )
        if self.momentum_rounding == "stochastic" and self.momentum_dtype not in (None, "bfloat16"):
            raise OptionsError(
                f"momentum_rounding='stochastic' rounds a bfloat16 first moment, but momentum_dtype="
                f"{self.momentum_dtype!r}; set momentum_dtype='bfloat16' or drop momentum_rounding"
            )

    def _check_auto_snr(self) -> None:
        auto = self.preset == AUTO_SNR_PRESET
        given = [f.name for f in _AUTO_SNR_FIELDS if getattr(self, f.name) != f.default]
        if not auto:
            if given:
                raise OptionsError(
                    f"{', '.join(given)} only apply to preset={AUTO_SNR_PRESET}; add preset={AUTO_SNR_PRESET} "
                    "or remove them"
                )
            return
        if self.overrides is not None:
            raise OptionsError(
                f"preset={AUTO_SNR_PRESET} derives the rules from SNR, so an override file (config=) cannot be "
                "combined with it; use config= alone to train with rules saved by an earlier run"
            )
        if not _is_count(self.probe_steps):
            raise OptionsError(
                f"probe_steps={self.probe_steps!r}: preset={AUTO_SNR_PRESET} needs probe_steps=N, an int >= 1: "
                "the number of full-Adam steps before the switch, e.g. the warmup steps"
            )
        if self.probe_every is not None and not _is_count(self.probe_every):
            raise OptionsError(f"probe_every={self.probe_every!r}: give a step count >= 1 or leave it out")
        if self.select not in SELECTS:
            raise OptionsError(f"select={self.select!r}: use one of {', '.join(SELECTS)}")
        if not (isinstance(self.cutoff, (int, float)) and math.isfinite(self.cutoff) and self.cutoff >= 0):
            raise OptionsError(f"cutoff={self.cutoff!r}: give an SNR threshold >= 0 (the paper's is 1.0)")

    # -- views for the entry points ------------------------------------------------------------------

    @property
    def auto_snr(self) -> bool:
        return self.preset == AUTO_SNR_PRESET

    def optimizer_defaults(self) -> dict[str, Any]:
        """The param-group defaults of :class:`~slimadam_hf.SlimAdamW` (a preset option still unset: its fallback)."""
        resolved = self.with_preset_options({})
        return {f.name: getattr(resolved, f.name) for f in _OPTIMIZER_FIELDS}

    def with_preset_options(self, options: Mapping[str, Any]) -> "SlimAdamConfig":
        """This config with every preset option it leaves unset (``None``) taken from ``options`` (a preset's
        ``options:``), else from the option's fallback; a value the user gave is kept."""
        changes = {
            name: options.get(name, f.metadata["preset_option"])
            for name, f in PRESET_OPTIONS.items()
            if getattr(self, name) is None
        }
        return self.replace(**changes) if changes else self

    def auto_snr_options(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in _AUTO_SNR_FIELDS}

    def replace(self, **changes: Any) -> "SlimAdamConfig":
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_kwargs(cls, where: str, **kwargs: Any) -> "SlimAdamConfig":
        """A config from keyword arguments; an unknown name is refused with the valid ones listed."""
        names = [f.name for f in dataclasses.fields(cls)]
        for key in kwargs:
            if key not in names:
                close = difflib.get_close_matches(key, names, n=1)
                raise TypeError(
                    f"{where}: unknown option {key!r}"
                    + (f" (did you mean {close[0]!r}?)" if close else "")
                    + f"; valid options: {', '.join(names)}"
                )
        return cls(**kwargs)

    # -- --optim_args ---------------------------------------------------------------------------------

    @classmethod
    def optim_arg_keys(cls) -> dict[str, dataclasses.Field]:
        """``--optim_args`` key -> field: every option not taken from ``TrainingArguments``."""
        return {
            f.metadata.get("optim_arg", f.name): f
            for f in dataclasses.fields(cls)
            if "training_arg" not in f.metadata
        }

    @classmethod
    def parse_optim_arg(cls, key: str, text: str) -> tuple[str, Any]:
        """``(field name, value)`` of one ``--optim_args`` entry; raises :class:`OptionsError`."""
        keys = cls.optim_arg_keys()
        f = keys.get(key)
        if f is None:
            training = {f.name: f.metadata["training_arg"] for f in dataclasses.fields(cls) if "training_arg" in f.metadata}
            if key in training:
                raise OptionsError(f"--optim_args {key}=...: set it with {training[key]} instead")
            close = difflib.get_close_matches(key, list(keys), n=1)
            raise OptionsError(
                f"--optim_args key {key!r} is not known to --optim slimadam"
                + (f" (did you mean {close[0]!r}?)" if close else "")
                + f"; valid keys: {cls.keys_text()}"
            )
        kind = f.metadata["kind"]
        if text.lower() in _NONE_WORDS and (f.default is None or kind == "dtype"):
            return f.name, None
        try:
            if kind == "choice":
                choices = f.metadata["choices"]
                if text not in choices + f.metadata.get("retired", ()):
                    raise ValueError(f"expected one of {', '.join(choices)}")
                value: Any = text
            elif kind == "dtype":
                value = momentum_dtype_name(text)
            else:
                value = _PARSERS[kind](text)
        except ValueError as err:
            raise OptionsError(
                f"--optim_args {key}={text!r} cannot be read: {err}; valid keys: {cls.keys_text()}"
            ) from None
        return f.name, value

    @classmethod
    def keys_text(cls) -> str:
        """``key (kind), ...`` for every ``--optim_args`` key."""
        return ", ".join(f"{key} ({_kind_text(f)})" for key, f in cls.optim_arg_keys().items())

    @classmethod
    def help_lines(cls) -> list[str]:
        """One line per ``--optim_args`` key: ``key (kind, default X): help``."""
        lines = []
        for key, f in cls.optim_arg_keys().items():
            default = "the preset's" if "preset_option" in f.metadata else f.default
            lines.append(f"{key} ({_kind_text(f)}, default {default}): {f.metadata['help']}")
        return lines


def _kind_text(f: dataclasses.Field) -> str:
    if "label" in f.metadata:
        return f.metadata["label"]
    return "/".join(f.metadata["choices"]) if f.metadata["kind"] == "choice" else f.metadata["kind"]


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


_OPTIMIZER_FIELDS = tuple(
    f for f in dataclasses.fields(SlimAdamConfig)
    if f.name in ("lr", "betas", "eps", "weight_decay", "implementation", "momentum_dtype", "momentum_rounding",
                  "robust", "foreach")
)
_AUTO_SNR_FIELDS = tuple(
    f for f in dataclasses.fields(SlimAdamConfig) if f.name in ("probe_steps", "probe_every", "cutoff", "select", "by_role")
)
PRESET_OPTIONS: dict[str, dataclasses.Field] = {
    f.name: f for f in dataclasses.fields(SlimAdamConfig) if "preset_option" in f.metadata
}
"""Options a preset may set in its ``options:`` (the metadata holds the fallback when neither does)."""


def parse_preset_options(raw: Any, where: str, error: type[ValueError] = OptionsError) -> dict[str, Any]:
    """A preset's ``options:`` mapping, checked: known keys only, each value of its option's kind."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise error(f"{where}: 'options' is a mapping of option -> value, e.g. {{robust: true}}; got {raw!r}")
    options = {}
    for key, value in raw.items():
        f = PRESET_OPTIONS.get(key)
        if f is None:
            raise error(
                f"{where}: options: {key!r} cannot be set by a preset; valid keys: {', '.join(PRESET_OPTIONS)} "
                "(give other options to the optimizer, e.g. --optim_args)"
            )
        if f.metadata["kind"] == "bool" and not isinstance(value, bool):
            raise error(f"{where}: options: {key}={value!r}; write true or false")
        options[key] = value
    return options

