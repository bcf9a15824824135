"""``--optim slimadam`` for the Hugging Face ``Trainer``: ``register()`` and what it installs.

Three ways in:

* ``slimadam_hf.register()`` then ``TrainingArguments(optim="slimadam", optim_args="preset=...")``
  (or ``--optim slimadam`` on any ``HfArgumentParser`` script, a JSON/YAML config, a pickled
  ``training_args.bin``);
* ``Trainer(optimizer_cls_and_kwargs=(SlimAdamFactory, {"lr": ..., "preset": ...}))``, which the
  Trainer calls with the (possibly FSDP-wrapped) model, so it works under FSDP;
* ``Trainer(optimizers=(build_slimadam(model, ...), None))`` when not sharding.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any, Optional, Union

from torch import nn

from ..core.options import SlimAdamConfig
from .callbacks import SlimAdamCallback, ensure_visible_logging
from .factory import SlimAdamFactory
from .optim_args import parse_optim_args
from .snr_callbacks import AutoSNRCallback

logger = logging.getLogger("slimadam_hf.trainer")

OPTIM_NAME = "slimadam"
SUPPORTED_TRANSFORMERS = (">=5.0", "<6")
"""The transformers versions ``register()`` is tested with (as in pyproject.toml)."""


def trainer_optimizer_kwargs(args: Any, optim_args: Union[None, str, dict[str, str]]) -> dict[str, Any]:
    """:class:`SlimAdamFactory` kwargs from ``TrainingArguments`` and its ``optim_args``."""
    kwargs: dict[str, Any] = {
        "lr": args.learning_rate,
        "betas": (args.adam_beta1, args.adam_beta2),
        "eps": args.adam_epsilon,
        "weight_decay": args.weight_decay,
    }
    kwargs.update(parse_optim_args(optim_args))
    return kwargs


def _handler(ctx: Any) -> tuple[type, dict[str, Any]]:
    """The ``_OPTIMIZER_HANDLERS`` entry: the Trainer then calls ``SlimAdamFactory()(model, **kwargs)``."""
    return SlimAdamFactory, trainer_optimizer_kwargs(ctx.args, ctx.optim_args)


# -- OptimizerNames ------------------------------------------------------------------------------


def _extend_optimizer_names() -> None:
    """Add ``SLIMADAM = "slimadam"`` to ``transformers.training_args.OptimizerNames``.

    Argparse choices, ``TrainingArguments.__post_init__`` (``OptimizerNames(optim)``), JSON/YAML
    configs and unpickling all go through the enum's member tables, so the member is added there.
    """
    from transformers.training_args import OptimizerNames

    if OPTIM_NAME in OptimizerNames._value2member_map_:
        return
    member = str.__new__(OptimizerNames, OPTIM_NAME)
    member._name_ = OPTIM_NAME.upper()
    member._value_ = OPTIM_NAME
    member.__objclass__ = OptimizerNames
    member._sort_order_ = len(OptimizerNames._member_names_)
    OptimizerNames._member_names_.append(member._name_)
    OptimizerNames._member_map_[member._name_] = member
    OptimizerNames._value2member_map_[OPTIM_NAME] = member
    type.__setattr__(OptimizerNames, member._name_, member)


# -- dispatch ------------------------------------------------------------------------------------


def _optim_value(optim: Any) -> str:
    return getattr(optim, "value", optim)


def _install_fallback() -> None:
    """Wrap ``Trainer.get_optimizer_cls_and_kwargs`` (for transformers without the handler table)."""
    from transformers import Trainer

    original = Trainer.__dict__["get_optimizer_cls_and_kwargs"]
    if getattr(original, "__func__", original).__dict__.get("_slimadam_wrapped"):
        return
    original_fn = original.__func__ if isinstance(original, staticmethod) else original

    try:  # transformers that call factories as `factory()(model, **kwargs)`
        from transformers.trainer_optimizer import is_optimizer_factory  # noqa: F401

        calls_factories = True
    except ImportError:
        calls_factories = False

    def get_optimizer_cls_and_kwargs(args: Any, model: Optional[nn.Module] = None) -> tuple[Any, Any]:
        if _optim_value(args.optim) != OPTIM_NAME:
            return original_fn(args, model)
        kwargs = trainer_optimizer_kwargs(args, args.optim_args)
        if calls_factories:
            return SlimAdamFactory, kwargs
        if model is None:
            raise ValueError("--optim slimadam needs the model to plan compression; pass model=")
        optimizer = SlimAdamFactory()(model, **kwargs)
        # Older Trainers call `cls(kwargs.pop("params"), **kwargs)`: hand back the built optimizer.
        return (lambda params, **_: optimizer), {"params": optimizer.param_groups}

    get_optimizer_cls_and_kwargs._slimadam_wrapped = True  # type: ignore[attr-defined]
    get_optimizer_cls_and_kwargs.__doc__ = original_fn.__doc__
    Trainer.get_optimizer_cls_and_kwargs = staticmethod(get_optimizer_cls_and_kwargs)


def _describe_optim_args() -> None:
    """``--help`` of any ``HfArgumentParser`` script lists the ``--optim_args`` keys of ``--optim slimadam``."""
    import dataclasses
    import types

    from transformers import TrainingArguments

    f = {f.name: f for f in dataclasses.fields(TrainingArguments)}["optim_args"]
    marker = " With --optim slimadam: "
    if marker in f.metadata.get("help", ""):
        return
    text = f.metadata.get("help", "") + marker + "; ".join(SlimAdamConfig.help_lines()) + "."
    # HfArgumentParser hands every metadata key to argparse, so only the help text changes
    f.metadata = types.MappingProxyType({**f.metadata, "help": text})


def _validate_when_created() -> None:
    """Check ``optim_args`` when ``TrainingArguments(optim="slimadam", ...)`` is created: a mistake then
    fails at argument parsing, before a script loads data or a model."""
    from transformers import TrainingArguments

    original = TrainingArguments.__post_init__
    if getattr(original, "_slimadam_wrapped", False):
        return

    def __post_init__(self: Any) -> None:
        original(self)
        if _optim_value(self.optim) == OPTIM_NAME:
            parse_optim_args(self.optim_args)

    __post_init__._slimadam_wrapped = True  # type: ignore[attr-defined]
    TrainingArguments.__post_init__ = __post_init__


def _install_callback() -> None:
    import transformers.trainer as trainer_module

    for callback in (SlimAdamCallback, AutoSNRCallback):
        if callback not in trainer_module.DEFAULT_CALLBACKS:
            trainer_module.DEFAULT_CALLBACKS.append(callback)


def _check_version() -> None:
    import transformers
    from packaging.version import Version

    version = Version(transformers.__version__)
    if not Version("5.0") <= Version(version.base_version) < Version("6"):
        warnings.warn(
            f"slimadam_hf.register() is tested with transformers {','.join(SUPPORTED_TRANSFORMERS)}, found "
            f"{transformers.__version__}; --optim slimadam may not work",
            stacklevel=3,
        )


_registered_with: Optional[str] = None


def register(*, use_handler_table: Optional[bool] = None) -> str:
    """Make ``optim="slimadam"`` / ``--optim slimadam`` work in transformers. Idempotent.

    Adds ``slimadam`` to ``OptimizerNames``, installs the optimizer handler (in transformers'
    private handler table when it exists, else by wrapping ``Trainer.get_optimizer_cls_and_kwargs``),
    adds :class:`SlimAdamCallback` to every ``Trainer``, lists the ``--optim_args`` keys in ``--help``,
    checks ``optim_args`` when ``TrainingArguments(optim="slimadam")`` is created, and lets ``slimadam_hf``
    INFO logs show.

    Args:
        use_handler_table: force (``True``) or avoid (``False``) the handler table; ``None`` detects it.

    Returns:
        ``"handler_table"`` or ``"wrapped_get_optimizer_cls_and_kwargs"``: how it was installed.
    """
    global _registered_with
    _check_version()
    _extend_optimizer_names()
    try:
        from transformers import trainer_optimizer

        table = getattr(trainer_optimizer, "_OPTIMIZER_HANDLERS", None)
    except ImportError:
        table = None
    if use_handler_table is None:
        use_handler_table = isinstance(table, dict)
    if use_handler_table:
        if not isinstance(table, dict):
            raise RuntimeError("this transformers has no transformers.trainer_optimizer._OPTIMIZER_HANDLERS")
        from transformers.training_args import OptimizerNames

        table[OptimizerNames(OPTIM_NAME)] = _handler
        how = "handler_table"
    else:
        _install_fallback()
        how = "wrapped_get_optimizer_cls_and_kwargs"
    _install_callback()
    _describe_optim_args()
    _validate_when_created()
    ensure_visible_logging()
    if _registered_with != how:
        logger.debug("--optim %s registered (%s)", OPTIM_NAME, how)
    _registered_with = how
    return how


__all__ = ["OPTIM_NAME", "SUPPORTED_TRANSFORMERS", "register", "trainer_optimizer_kwargs"]
