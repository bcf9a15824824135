"""Build a :class:`SlimAdamW` for a model from a compression plan."""

from __future__ import annotations

from typing import Any, Iterable, Optional, Union

from torch import nn

from ..core.options import AUTO_SNR_PRESET, SlimAdamConfig
from ..optim.optimizer import SlimAdamW
from .plan import CompressionPlan
from .planner import Overrides, plan_compression
from .presets import Preset


def decay_parameter_names(model: nn.Module) -> set[str]:
    """Names that get weight decay, exactly as ``transformers.Trainer.get_decay_parameter_names``."""
    from transformers import Trainer

    # The method only reads `model`; calling it unbound keeps the split identical to the Trainer's.
    return set(Trainer.get_decay_parameter_names(None, model))


def slimadam_param_groups(
    model: nn.Module,
    plan: CompressionPlan,
    weight_decay: float,
    decay_names: Optional[Iterable[str]] = None,
) -> list[dict[str, Any]]:
    """Two param groups (decay / no decay) with ``(name, param)`` pairs and aligned compress specs."""
    decay = set(decay_names) if decay_names is not None else decay_parameter_names(model)
    params = dict(model.named_parameters())
    groups: list[dict[str, Any]] = []
    for wants_decay, wd in ((True, weight_decay), (False, 0.0)):
        entries = [e for e in plan.entries if (e.name in decay) == wants_decay]
        if entries:
            groups.append(
                {
                    "params": [(e.name, params[e.name]) for e in entries],
                    "compress": [e.spec for e in entries],
                    "weight_decay": wd,
                }
            )
    return groups


def build_slimadam(
    model: nn.Module,
    preset: Union[str, Preset] = "auto",
    overrides: Overrides = None,
    *,
    plan: Optional[CompressionPlan] = None,
    config: Optional[SlimAdamConfig] = None,
    **options: Any,
) -> SlimAdamW:
    """A :class:`SlimAdamW` for ``model`` in one line.

    Args:
        model: the model to train (trainable parameters only are optimized).
        preset, overrides: see :func:`slimadam_hf.plan_compression`; ignored when ``plan`` is given.
        plan: a plan made earlier with :func:`slimadam_hf.plan_compression`.
        config: a :class:`slimadam_hf.SlimAdamConfig`; ``options`` override its fields.
        **options: any :class:`slimadam_hf.SlimAdamConfig` field: ``lr``, ``betas``, ``eps``,
            ``weight_decay`` (applied to the parameters the HF Trainer decays: not biases, not norms),
            ``implementation``, ``momentum_dtype``, ...

    Options the preset sets by default (its ``options:``, e.g. ``robust`` in the bert preset) apply where
    neither ``config`` nor ``options`` gives a value. The plan is kept as ``optimizer.plan``.
    """
    if config is None:
        config = SlimAdamConfig.from_kwargs("build_slimadam", preset=preset, overrides=overrides, **options)
    elif options:
        config = SlimAdamConfig.from_kwargs("build_slimadam", **{**vars(config), **options})
    if config.auto_snr:
        raise ValueError(
            f"build_slimadam(preset={AUTO_SNR_PRESET!r}): the one-run SNR mode is built by "
            "slimadam_hf.build_auto_snr(model, probe_steps=N, ...)"
        )
    plan = plan if plan is not None else plan_compression(model, config.preset, config.overrides)
    config = config.with_preset_options(plan.preset_options)
    plan = plan.with_options(config.momentum_dtype, config.robust)
    optimizer = SlimAdamW.from_config(slimadam_param_groups(model, plan, config.weight_decay), config)
    optimizer.plan = plan
    return optimizer
