"""The optimizer: ``SlimAdamW`` (update, state, checkpoints) and in-place recompression."""

from .optimizer import SlimAdamW, unwrap_optimizer
from .recompress import compress_in_place

__all__ = ["SlimAdamW", "compress_in_place", "unwrap_optimizer"]
