"""DDP worker: SlimAdamW under DistributedDataParallel vs one process on the same global batch."""

from __future__ import annotations

import copy
from pathlib import Path

from torch.nn.parallel import DistributedDataParallel

from slimadam_hf import SlimAdamW

from . import models


def ddp_vs_single(rank: int, world_size: int, out_dir: Path, steps: int = 4) -> dict:
    ref = models.make_model()
    model = DistributedDataParallel(copy.deepcopy(ref))
    opt = SlimAdamW(models.param_groups(model.module), lr=1e-2, weight_decay=0.1)
    ref_opt = SlimAdamW(models.param_groups(ref), lr=1e-2, weight_decay=0.1, foreach=False)
    for step in range(steps):
        model(models.batch(step, rank, world_size)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        ref(models.batch(step)).backward()
        ref_opt.step()
        ref_opt.zero_grad(set_to_none=True)
    diff = max((p - q).abs().max().item() for p, q in zip(model.module.parameters(), ref.parameters()))
    moved = max((p - q).abs().max().item() for p, q in zip(ref.parameters(), models.make_model().parameters()))
    return {"max_param_diff": diff, "max_param_change": moved, "dtype": str(ref.emb.weight.dtype)}
