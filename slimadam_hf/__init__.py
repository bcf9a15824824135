"""slimadam-hf: SlimAdam (AdamW with compressed second moments) for the Hugging Face stack.

The package is layered (each layer imports only the ones above it in this list):

* ``core``: compress specs, :class:`SlimAdamConfig`, the update rule (reference, foreach, fused CPU kernel, Triton CUDA kernels);
* ``distributed``: refusal of flat shards, exact statistics for DTensor (FSDP2) parameters;
* ``optim``: :class:`SlimAdamW` and in-place recompression;
* ``rules``: module layouts, roles and rules, YAML presets, the compression plan, its renderer, the builder;
* ``snr``: the SNR statistic, recorder, rules from SNR, plots, the one-run auto-SNR mode;
* ``hf``: ``--optim slimadam`` registration, ``--optim_args``, Trainer callbacks, the run wrapper;
* ``cli``: the ``slimadam`` command.

Every public name below is imported on first use, so ``import slimadam_hf`` (and ``slimadam --help``)
does not load torch or transformers until something needs them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_PUBLIC = {
    "CompressSpec": "core.compress_spec",
    "CompressSpecError": "core.compress_spec",
    "OptionsError": "core.options",
    "SlimAdamConfig": "core.options",
    "UnsupportedShardingError": "distributed.guards",
    "SlimAdamW": "optim.optimizer",
    "compress_in_place": "optim.recompress",
    "build_slimadam": "rules.builder",
    "decay_parameter_names": "rules.builder",
    "slimadam_param_groups": "rules.builder",
    "Layout": "rules.layouts",
    "register_layout": "rules.layouts",
    "CompressionPlan": "rules.plan",
    "PartPlan": "rules.plan",
    "PlanEntry": "rules.plan",
    "plan_compression": "rules.planner",
    "Preset": "rules.presets",
    "PresetError": "rules.presets",
    "available_presets": "rules.presets",
    "load_overrides": "rules.presets",
    "load_preset": "rules.presets",
    "DEFAULT_RULES": "rules.roles",
    "ROLES": "rules.roles",
    "RuleError": "rules.roles",
    "AutoSNRSlimAdamW": "snr.auto",
    "build_auto_snr": "snr.auto_build",
    "SNRRecorder": "snr.recorder",
    "SlimAdamCallback": "hf.callbacks",
    "SlimAdamFactory": "hf.factory",
    "register": "hf.register",
    "AutoSNRCallback": "hf.snr_callbacks",
    "SNRCallback": "hf.snr_callbacks",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> Any:
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC))


if TYPE_CHECKING:  # what static tools see
    from .core.compress_spec import CompressSpec, CompressSpecError
    from .core.options import OptionsError, SlimAdamConfig
    from .distributed.guards import UnsupportedShardingError
    from .hf.callbacks import SlimAdamCallback
    from .hf.factory import SlimAdamFactory
    from .hf.register import register
    from .hf.snr_callbacks import AutoSNRCallback, SNRCallback
    from .optim.optimizer import SlimAdamW
    from .optim.recompress import compress_in_place
    from .rules.builder import build_slimadam, decay_parameter_names, slimadam_param_groups
    from .rules.layouts import Layout, register_layout
    from .rules.plan import CompressionPlan, PartPlan, PlanEntry
    from .rules.planner import plan_compression
    from .rules.presets import Preset, PresetError, available_presets, load_overrides, load_preset
    from .rules.roles import DEFAULT_RULES, ROLES, RuleError
    from .snr.auto import AutoSNRSlimAdamW
    from .snr.auto_build import build_auto_snr
    from .snr.recorder import SNRRecorder
