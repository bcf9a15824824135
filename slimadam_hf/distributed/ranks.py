"""Which process speaks, and agreeing on one value across ranks."""

from __future__ import annotations

from typing import Any, TypeVar

import torch

T = TypeVar("T")


def _initialized() -> bool:
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized()


def is_main_process() -> bool:
    """Rank 0 of a torch.distributed job, or the only process."""
    return not _initialized() or torch.distributed.get_rank() == 0


def same_on_all_ranks(value: T) -> T:
    """Rank 0's ``value`` on every rank (a picklable object; returned as is without a process group)."""
    if _initialized() and torch.distributed.get_world_size() > 1:
        box: list[Any] = [value]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]
    return value
