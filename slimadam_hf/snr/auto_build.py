"""Build the one-run SNR optimizer (:class:`~slimadam_hf.snr.auto.AutoSNRSlimAdamW`) for a model."""

from __future__ import annotations

import logging
from typing import Any, Optional

from torch import nn

from ..core.options import AUTO_SNR_PRESET, SlimAdamConfig
from ..distributed.guards import is_dtensor
from ..distributed.ranks import is_main_process
from ..rules.builder import slimadam_param_groups
from ..rules.planner import plan_compression
from .auto import AutoSNRSlimAdamW, plan_with_specs
from .targets import snr_targets, unwrap_model

logger = logging.getLogger(__name__)

__all__ = ["build_auto_snr"]


def build_auto_snr(
    model: nn.Module,
    preset: Any = "auto",
    overrides: Any = None,
    *,
    config: Optional[SlimAdamConfig] = None,
    **options: Any,
) -> AutoSNRSlimAdamW:
    """An :class:`AutoSNRSlimAdamW` for ``model``: Trainer weight-decay split, named parameters.

    Args:
        model: the model to train.
        preset, overrides: only name roles and splits (which tensors are measured, how fused weights are
            cut, what ``by_role`` pools) and set their option defaults (``robust`` for bert); their compression
            rules are not used. ``"auto-snr"`` reads as ``"auto"``.
        config: a :class:`slimadam_hf.SlimAdamConfig` with ``preset="auto-snr"``; ``options`` override it.
        **options: :class:`slimadam_hf.SlimAdamConfig` fields: ``probe_steps`` (required), ``probe_every``,
            ``cutoff``, ``select``, ``by_role``, and the update options (``lr``, ``weight_decay``, ...).
    """
    values = {**(vars(config) if config is not None else {}), **options, "preset": AUTO_SNR_PRESET}
    config = SlimAdamConfig.from_kwargs("build_auto_snr", **values)
    model = unwrap_model(model)  # DDP: plan, groups and SNR targets all use the inner model's names
    if preset == AUTO_SNR_PRESET:
        preset = "auto"
    for name, p in model.named_parameters():
        if p.requires_grad and is_dtensor(p):
            raise ValueError(
                f"auto-snr: parameter {name!r} is sharded (DTensor, FSDP2/tensor parallel); the probe needs "
                "whole second moments. Derive rules on a proxy (slimadam rules --by-role) and pass config="
            )
    plan = plan_compression(model, preset, overrides)
    config = config.with_preset_options(plan.preset_options)
    probe_plan = plan_with_specs(plan, [], {}, "auto-snr probe")
    optimizer = AutoSNRSlimAdamW(
        slimadam_param_groups(model, probe_plan, config.weight_decay),
        targets=snr_targets(model, plan),
        base_plan=plan,
        **config.auto_snr_options(),
        **config.optimizer_defaults(),
    )
    if is_main_process():
        steps = [s for s in range(1, optimizer.probe_steps + 1) if optimizer.measures_at(s)]
        logger.info(
            "auto-snr: full second moments (AdamW) for the first %d steps, SNR of %d tensors/parts at steps %s, "
            "then compression in place", optimizer.probe_steps, len(optimizer.targets),
            steps if len(steps) <= 6 else f"{steps[:3]} ... {steps[-1]}",
        )
    return optimizer
