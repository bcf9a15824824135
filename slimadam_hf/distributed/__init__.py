"""Sharded training: refusal of flat-shard backends, and the statistics of DTensor (FSDP2) parameters."""

from .guards import UnsupportedShardingError, check_before_step, check_param_group, flat_backend, is_dtensor

__all__ = ["UnsupportedShardingError", "check_before_step", "check_param_group", "flat_backend", "is_dtensor"]
