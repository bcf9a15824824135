"""Which process speaks, agreeing on one value across ranks, and shutting the process groups down."""

from __future__ import annotations

import time
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


GLOO_SETTLE_SECONDS = 0.25
"""How long :func:`shut_down_process_groups` waits, without holding the GIL, after the teardown."""


def shut_down_process_groups() -> None:
    """Destroy the process groups left open (HF example scripts leave them), before the interpreter exits.

    A gloo worker thread releases the last collective's work, and with it Python-owned tensors (which takes
    the GIL), only after the caller's ``wait()`` has returned. If the interpreter is finalizing by then, the
    thread aborts the process ("terminate called without an active exception", pytorch/pytorch#179291)
    after training has finished, which fails the whole ``accelerate launch``. The wait lets it finish.
    """
    if _initialized():
        torch.distributed.destroy_process_group()
        time.sleep(GLOO_SETTLE_SECONDS)
