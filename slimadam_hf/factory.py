"""Build a :class:`SlimAdamW` for a model from a compression plan."""

from __future__ import annotations

from typing import Any, Iterable, Optional, Union

from torch import nn

from .optimizer import SlimAdamW
from .plan import CompressionPlan, Overrides, plan_compression
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
    weight_decay: float = 1e-2,
    **hyperparams: Any,
) -> SlimAdamW:
    """A :class:`SlimAdamW` for ``model`` in one line.

    Args:
        model: the model to train (trainable parameters only are optimized).
        preset, overrides: see :func:`slimadam_hf.plan_compression`; ignored when ``plan`` is given.
        weight_decay: applied to the parameters the HF Trainer decays (not biases, not norms).
        **hyperparams: ``lr``, ``betas``, ``eps``, ``foreach`` for :class:`SlimAdamW`.

    The plan is kept as ``optimizer.plan``.
    """
    plan = plan if plan is not None else plan_compression(model, preset, overrides)
    optimizer = SlimAdamW(slimadam_param_groups(model, plan, weight_decay), weight_decay=weight_decay, **hyperparams)
    optimizer.plan = plan
    return optimizer
