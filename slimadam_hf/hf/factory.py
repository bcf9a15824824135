"""``SlimAdamFactory``: the optimizer factory the Trainer calls with the model it trains."""

from __future__ import annotations

from typing import Any, Union

from torch import nn

from ..core.options import SlimAdamConfig
from ..optim.optimizer import SlimAdamW
from ..rules.builder import build_slimadam
from ..rules.planner import Overrides
from ..rules.presets import Preset
from ..snr.auto_build import build_auto_snr
from .callbacks import log_plan_summary


class SlimAdamFactory:
    """An optimizer factory for ``Trainer(optimizer_cls_and_kwargs=(SlimAdamFactory, kwargs))``.

    The Trainer instantiates it without arguments and calls it with the model it trains (after FSDP
    wrapping, when sharding) and ``kwargs``: any :class:`~slimadam_hf.SlimAdamConfig` field (``lr``:
    give it, the scheduler scales it; ``betas``, ``eps``, ``weight_decay``, ``preset``, ``overrides``
    or ``config`` as in ``--optim_args``, ``implementation``, ``momentum_dtype``, the auto-SNR keys).
    Parameter groups follow the Trainer's weight-decay split, carry parameter names, and hold the
    compress specs of the plan; the plan is ``optimizer.plan``.
    """

    def __call__(
        self,
        model: nn.Module,
        *,
        preset: Union[str, Preset] = "auto",
        overrides: Overrides = None,
        config: Overrides = None,
        **options: Any,
    ) -> SlimAdamW:
        if overrides is not None and config is not None:
            raise ValueError("SlimAdamFactory: give the override file as 'overrides' or 'config', not both")
        options = SlimAdamConfig.from_kwargs(
            "SlimAdamFactory", preset=preset, overrides=overrides if overrides is not None else config, **options
        )
        if options.auto_snr:  # one-run SNR mode: full Adam for probe_steps, then compress in place
            optimizer: SlimAdamW = build_auto_snr(model, config=options)
        else:
            optimizer = build_slimadam(model, config=options)
        log_plan_summary(optimizer)
        return optimizer


__all__ = ["SlimAdamFactory"]
