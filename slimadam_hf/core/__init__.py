"""The math of SlimAdam: compress specs, options, and the update (reference, foreach, fused CPU kernel, Triton)."""

from .compress_spec import CompressSpec, CompressSpecError
from .options import SlimAdamConfig

__all__ = ["CompressSpec", "CompressSpecError", "SlimAdamConfig"]
