"""slimadam-hf: SlimAdam (AdamW with compressed second moments) for the Hugging Face stack."""

from .core.compress_spec import CompressSpec, CompressSpecError
from .core.options import OptionsError, SlimAdamConfig
from .distributed.guards import UnsupportedShardingError
from .optim.optimizer import SlimAdamW
from .optim.recompress import compress_in_place
from .rules.builder import build_slimadam, decay_parameter_names, slimadam_param_groups
from .rules.layouts import Layout, register_layout
from .rules.plan import CompressionPlan, PartPlan, PlanEntry
from .rules.planner import plan_compression
from .rules.presets import Preset, PresetError, available_presets, load_overrides, load_preset
from .rules.roles import DEFAULT_RULES, ROLES, RuleError

__version__ = "0.1.0"

# The Hugging Face layer imports transformers.Trainer (and, through it, peft), and the SNR tooling is
# for a minority of runs: load them on first use so that `import slimadam_hf` stays light.
_LAZY = {
    "AutoSNRCallback": "hf.snr_callbacks",
    "AutoSNRSlimAdamW": "snr.auto",
    "build_auto_snr": "snr.auto_build",
    "SNRCallback": "hf.snr_callbacks",
    "SNRRecorder": "snr.recorder",
    "SlimAdamCallback": "hf.callbacks",
    "SlimAdamFactory": "hf.factory",
    "register": "hf.register",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = [
    "AutoSNRCallback",
    "AutoSNRSlimAdamW",
    "SNRCallback",
    "SNRRecorder",
    "CompressSpec",
    "CompressSpecError",
    "CompressionPlan",
    "DEFAULT_RULES",
    "OptionsError",
    "Layout",
    "PartPlan",
    "PlanEntry",
    "Preset",
    "PresetError",
    "ROLES",
    "RuleError",
    "SlimAdamCallback",
    "SlimAdamConfig",
    "SlimAdamFactory",
    "SlimAdamW",
    "UnsupportedShardingError",
    "available_presets",
    "build_auto_snr",
    "build_slimadam",
    "compress_in_place",
    "decay_parameter_names",
    "load_overrides",
    "load_preset",
    "plan_compression",
    "register",
    "register_layout",
    "slimadam_param_groups",
]
