"""Spawn real worker processes with a gloo process group on 127.0.0.1 and a free port."""

from __future__ import annotations

import faulthandler
import json
import os
import signal
import socket
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from slimadam_hf.distributed.ranks import shut_down_process_groups


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world_size: int, port: int, fn: Callable[..., Any], out_dir: str, kwargs: dict) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size),
    )
    faulthandler.enable()  # a native abort (gloo collective mismatch) still prints Python stacks
    faulthandler.register(signal.SIGUSR1)  # `kill -USR1 <pid>` prints a hung rank's stack
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timedelta(seconds=90))
    try:
        result = fn(rank=rank, world_size=world_size, out_dir=Path(out_dir), **kwargs)
        if rank == 0:
            Path(out_dir, "result.json").write_text(json.dumps(result))
        dist.barrier()
    finally:
        shut_down_process_groups()  # as slimadam_hf.run does: no gloo abort at interpreter exit


def spawn(fn: Callable[..., Any], world_size: int, out_dir: Path, **kwargs: Any) -> Any:
    """Run ``fn(rank=, world_size=, out_dir=, **kwargs)`` in ``world_size`` processes; rank 0's JSON result."""
    mp.start_processes(
        _entry, args=(world_size, free_port(), fn, str(out_dir), kwargs), nprocs=world_size, start_method="spawn"
    )
    return json.loads(Path(out_dir, "result.json").read_text())


def worker_result(results: dict, name: str) -> dict:
    """Check ``name``'s entry of a worker suite's results: fail the calling test with the worker's traceback
    (for the check, or for one of its sub-results) instead of a KeyError further on."""
    import pytest

    result = results[name]
    if "traceback" in result:
        pytest.fail(f"{name} failed in the worker:\n{result['traceback']}")
    for key, value in result.items():
        if isinstance(value, dict) and "traceback" in value:
            pytest.fail(f"{name}/{key} failed in the worker:\n{value['traceback']}")
    return result
