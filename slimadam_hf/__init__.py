"""slimadam-hf: SlimAdam (AdamW with compressed second moments) for the Hugging Face stack."""

from .compress_spec import CompressSpec, CompressSpecError
from .distributed import UnsupportedShardingError
from .factory import build_slimadam, decay_parameter_names, slimadam_param_groups
from .layouts import Layout, register_layout
from .optimizer import SlimAdamW
from .plan import CompressionPlan, PartPlan, PlanEntry, plan_compression
from .presets import Preset, PresetError, available_presets, load_overrides, load_preset
from .roles import DEFAULT_RULES, ROLES, RuleError

__version__ = "0.1.0"

# The Trainer integration imports transformers.Trainer (and, through it, peft): load it on first use
# so that `import slimadam_hf` stays light for plain PyTorch loops and the CLI.
_LAZY = {
    "AutoSNRCallback": "auto_snr",
    "AutoSNRSlimAdamW": "auto_snr",
    "build_auto_snr": "auto_snr",
    "compress_in_place": "auto_snr",
    "SNRCallback": "snr_callback",
    "SNRRecorder": "snr_callback",
    "SlimAdamCallback": "trainer_callback",
    "SlimAdamFactory": "trainer_integration",
    "register": "trainer_integration",
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
    "Layout",
    "PartPlan",
    "PlanEntry",
    "Preset",
    "PresetError",
    "ROLES",
    "RuleError",
    "SlimAdamCallback",
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
