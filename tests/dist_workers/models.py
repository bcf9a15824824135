"""A tiny float64 model whose parameters cover every sharding case of a 2-rank FSDP2 run.

Dim 0 is the FSDP2 shard dim. With 2 ranks: ``emb`` (7 rows: 4 + 3, uneven), ``qkv`` (a split along
the shard dim whose middle part straddles the shard boundary), ``side`` (a split along dim 1),
``up`` (compressed over the shard dim: global mean), ``one`` (1 row: rank 1 holds an empty shard),
``kernel`` (3-D, compressed over dims 0 and 2).
"""

from __future__ import annotations

import torch
from torch import nn

SPECS = {
    "emb.weight": (1,),
    "qkv.weight": {"split_dim": 0, "sizes": [3, 2, 2], "dims": [[1], [0], None]},
    "up.weight": (0,),
    "up.bias": None,
    "side.weight": {"split_dim": 1, "sizes": [3, 4], "dims": [[0], [1]]},
    "one.weight": (0, 1),
    "one.bias": None,
    "kernel": (0, 2),
}


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(7, 6)
        self.qkv = nn.Linear(6, 7, bias=False)
        self.up = nn.Linear(7, 5)
        self.side = nn.Linear(7, 4, bias=False)
        self.one = nn.Linear(5, 1)
        self.kernel = nn.Parameter(torch.randn(3, 2, 2))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.emb(ids)
        q = torch.tanh(self.qkv(h))
        u = torch.tanh(self.up(q))
        k = h[..., :4] @ self.kernel.reshape(3, 4).T
        return (self.one(u) ** 2).mean() + (self.side(q) ** 2).mean() + (k**2).mean()


def make_model(seed: int = 0, dtype: torch.dtype = torch.float64) -> Tiny:
    torch.manual_seed(seed)
    return Tiny().to(dtype)


def param_groups(model: nn.Module, weight_decay: float = 0.1) -> list[dict]:
    """Two groups (decay / no decay) with names and the specs above."""
    named = dict(model.named_parameters())
    decay = [n for n in SPECS if n.endswith("weight") or n == "kernel"]
    rest = [n for n in SPECS if n not in decay]
    return [
        {"params": [(n, named[n]) for n in decay], "compress": [SPECS[n] for n in decay], "weight_decay": weight_decay},
        {"params": [(n, named[n]) for n in rest], "compress": [SPECS[n] for n in rest], "weight_decay": 0.0},
    ]


def batch(step: int, rank: int | None = None, world_size: int = 1) -> torch.Tensor:
    """Token ids of the global batch for ``step`` (4 x 5), or this rank's equal slice of it."""
    g = torch.Generator().manual_seed(1000 + step)
    ids = torch.randint(0, 7, (4, 5), generator=g)
    if rank is None:
        return ids
    return ids.chunk(world_size)[rank]


def shard(model: nn.Module, hsdp: tuple[int, int] | None = None) -> nn.Module:
    """FSDP2 on every Linear and on the root: dim-0 shards over all ranks, or HSDP on a
    (replicate, shard) mesh of shape ``hsdp`` (placements ``(Replicate(), Shard(0))``)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", hsdp, mesh_dim_names=("replicate", "shard")) if hsdp else None
    for module in (model.qkv, model.up, model.side, model.one):
        fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model
