"""FSDP2 workers: SlimAdamW on DTensor params against single-process SlimAdamW."""

from __future__ import annotations

import copy
import functools
from pathlib import Path

import torch
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

from slimadam_hf import SlimAdamW
from slimadam_hf.core import quant

from . import models


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def _max_diff(model, ref, opt, ref_opt) -> dict:
    params = max((_full(p) - q).abs().max().item() for p, q in zip(model.parameters(), ref.parameters()))
    state = state_int8 = 0.0
    for p, q in zip(model.parameters(), ref.parameters()):
        assert set(opt.state[p]) == set(ref_opt.state[q]), (set(opt.state[p]), set(ref_opt.state[q]))
        for key in sorted(set(ref_opt.state[q]) - {"step"}):  # the same order on every rank (collectives)
            a, b = _full(opt.state[p][key]), ref_opt.state[q][key]
            if "exp_avg_absmax" in ref_opt.state[q] and key in ("exp_avg", "exp_avg_absmax"):
                # int8: FSDP2's layouts of the single-process codes and scales
                codes, absmax = quant.row_blocks(_full(opt.state[p]["exp_avg"]),
                                                 _full(opt.state[p]["exp_avg_absmax"]), tuple(q.shape))
                a = (codes if key == "exp_avg" else absmax).float()
                state_int8 = max(state_int8, (a - b.float()).abs().max().item())
                continue
            assert a.shape == b.shape, (key, a.shape, b.shape)
            state = max(state, (a - b).abs().max().item())
    return {"params": params, "state": state, "state_int8": state_int8}


def exact_steps(rank: int, world_size: int, out_dir: Path, steps: int = 3, hsdp=None, dtype=torch.float64,
                **options) -> dict:
    """Synthetic gradients: optimizer built after fully_shard vs the single-process reference."""
    ref = models.make_model(dtype=dtype)
    model = models.shard(copy.deepcopy(ref), hsdp)
    opt = SlimAdamW(models.param_groups(model), lr=1e-2, weight_decay=0.1, **options)
    ref_opt = SlimAdamW(models.param_groups(ref), lr=1e-2, weight_decay=0.1, foreach=False, **options)
    comm = []
    for step in range(steps):
        torch.manual_seed(100 + step)
        for (name, p), q in zip(model.named_parameters(), ref.parameters()):
            g = torch.randn(q.shape, dtype=q.dtype) * (1 + step)
            q.grad = g.clone()
            p.grad = distribute_tensor(g, p.device_mesh, p.placements)
        opt.step()
        ref_opt.step()
        comm.append(dict(opt.comm_stats))
    mismatch = 0.0  # replicated second moments must stay identical on every rank
    for p in model.parameters():
        replicated = ("exp_avg_sq", "exp_avg_sq_complement", "exp_avg_absmax")
        for v in (opt.state[p].get(key) for key in replicated):
            if v is not None and all(pl.is_replicate() for pl in v.placements):
                copies = [torch.empty_like(v.to_local()) for _ in range(world_size)]
                torch.distributed.all_gather(copies, v.to_local().contiguous())
                mismatch = max(mismatch, max((c - copies[0]).abs().max().item() for c in copies))
    shapes = {n: list(p.to_local().shape) for n, p in model.named_parameters()}
    placements = {n: str(opt.state[p]["exp_avg_sq"].placements) for n, p in model.named_parameters()}
    return {"diff": _max_diff(model, ref, opt, ref_opt), "comm": comm, "local_shapes": shapes, "replica_mismatch": mismatch,
            "v_placements": placements}


def _switch_like_accelerate(model: torch.nn.Module, opt: torch.optim.Optimizer) -> torch.nn.Module:
    """accelerate's FSDP2 order: placeholders, fully_shard, then its own parameter switch."""
    from accelerate.utils.fsdp_utils import fsdp2_switch_optimizer_parameters

    old = {n: p.data_ptr() for n, p in model.named_parameters()}
    for group in opt.param_groups:
        for i, p in enumerate(group["params"]):
            group["params"][i] = torch.empty(1, dtype=p.dtype)
            group["params"][i].data_ptr = p.data_ptr()
    model = models.shard(model)
    new = {n: p for n, p in model.named_parameters()}
    fsdp2_switch_optimizer_parameters(opt, {old[n]: new[n] for n in old})
    return model


def train(model, opt, steps, rank, world_size, start=0) -> None:
    for step in range(start, start + steps):
        loss = model(models.batch(step, rank, world_size))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def training_accelerate_order(rank: int, world_size: int, out_dir: Path, steps: int = 3) -> dict:
    """Real forward/backward: optimizer built before fully_shard (params swapped) vs one process."""
    ref = models.make_model()
    model = copy.deepcopy(ref)
    opt = SlimAdamW(models.param_groups(model), lr=1e-2, weight_decay=0.1)
    model = _switch_like_accelerate(model, opt)
    ref_opt = SlimAdamW(models.param_groups(ref), lr=1e-2, weight_decay=0.1, foreach=False)
    train(model, opt, steps, rank, world_size)
    train(ref, ref_opt, steps, None, 1)
    return {"diff": _max_diff(model, ref, opt, ref_opt), "comm": opt.comm_stats}


def _full_params(model) -> list[torch.Tensor]:
    return [_full(p).detach().clone() for p in model.parameters()]


def _accelerate_full_state_roundtrip(model, opt, out_dir: Path, dtype, **options):
    """Save with accelerate's FSDP2 FULL_STATE_DICT path, load into a model/optimizer built in its order."""
    from accelerate import Accelerator
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import load_fsdp_model, load_fsdp_optimizer, save_fsdp_model, save_fsdp_optimizer

    from accelerate.utils import DistributedType

    accelerator = Accelerator(cpu=True)
    plugin = FullyShardedDataParallelPlugin(fsdp_version=2, state_dict_type="FULL_STATE_DICT")
    # accelerate only enables FSDP on accelerators; on gloo CPU the state is set by hand (test only).
    accelerator.state.distributed_type = DistributedType.FSDP
    accelerator.state.fsdp_plugin = plugin
    assert accelerator.is_fsdp2
    ckpt = out_dir / "accelerate_full"
    save_fsdp_model(plugin, accelerator, model, str(ckpt))
    save_fsdp_optimizer(plugin, accelerator, opt, model, str(ckpt))
    fresh = models.make_model(seed=1, dtype=dtype)
    fresh_opt = SlimAdamW(models.param_groups(fresh), lr=1e-2, weight_decay=0.1, **options)
    fresh = _switch_like_accelerate(fresh, fresh_opt)
    load_fsdp_model(plugin, accelerator, fresh, str(ckpt))
    load_fsdp_optimizer(plugin, accelerator, fresh_opt, fresh, str(ckpt))
    return fresh, fresh_opt


def _dcp_roundtrip(model, opt, out_dir: Path, dtype, **options):
    """Sharded save/load through torch.distributed.checkpoint into a fresh FSDP2 model and optimizer."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    ckpt = out_dir / "dcp"
    model_sd, optim_sd = get_state_dict(model, opt)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(ckpt))
    fresh = models.shard(models.make_model(seed=1, dtype=dtype))
    fresh_opt = SlimAdamW(models.param_groups(fresh), lr=1e-2, weight_decay=0.1, **options)
    model_sd, optim_sd = get_state_dict(fresh, fresh_opt)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=str(ckpt))
    set_state_dict(fresh, fresh_opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    return fresh, fresh_opt


def _from_single_process_checkpoint(rank: int, out_dir: Path, dtype, **options):
    """A plain single-process checkpoint (torch.save) loaded into an FSDP2 model and optimizer."""
    ref = models.make_model(dtype=dtype)
    ref_opt = SlimAdamW(models.param_groups(ref), lr=1e-2, weight_decay=0.1, **options)
    train(ref, ref_opt, 2, None, 1)
    path = out_dir / f"single_rank{rank}.pt"
    torch.save({"model": ref.state_dict(), "optim": ref_opt.state_dict()}, path)
    ckpt = torch.load(path, weights_only=True)
    fresh = models.make_model(seed=1, dtype=dtype)
    fresh.load_state_dict(ckpt["model"])
    fresh = models.shard(fresh)
    fresh_opt = SlimAdamW(models.param_groups(fresh), lr=1e-2, weight_decay=0.1, **options)
    fresh_opt.load_state_dict(ckpt["optim"])
    return fresh, fresh_opt


def checkpoints(rank: int, world_size: int, out_dir: Path, dtype=torch.float64, **options) -> dict:
    """Resume after 2 of 4 steps (DCP sharded, accelerate full state dict) vs the uninterrupted run."""
    model = models.shard(models.make_model(dtype=dtype))
    opt = SlimAdamW(models.param_groups(model), lr=1e-2, weight_decay=0.1, **options)
    train(model, opt, 2, rank, world_size)
    resumed = {"dcp": _dcp_roundtrip(model, opt, out_dir, dtype, **options),
               "accelerate_full_state_dict": _accelerate_full_state_roundtrip(model, opt, out_dir, dtype, **options),
               "single_process_checkpoint": _from_single_process_checkpoint(rank, out_dir, dtype, **options)}
    train(model, opt, 2, rank, world_size, start=2)
    expected = _full_params(model)
    diffs = {}
    for key, (m, o) in resumed.items():
        train(m, o, 2, rank, world_size, start=2)
        diffs[key] = max((a - b).abs().max().item() for a, b in zip(_full_params(m), expected))
        state = o.state_dict()
        diffs[key + "_steps"] = sorted({float(s["step"]) for s in state["state"].values()})
    return diffs


def tensor_parallel_dim1(rank: int, world_size: int, out_dir: Path, steps: int = 3) -> dict:
    """DTensor params sharded on dim 1 (column-wise tensor parallel), synthetic gradients."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard

    mesh = init_device_mesh("cpu", (world_size,))
    ref = models.make_model()
    model = copy.deepcopy(ref)
    for name, p in list(model.named_parameters()):
        prefix, _, leaf = name.rpartition(".")
        placement = Shard(1) if p.dim() >= 2 else Replicate()
        setattr(model.get_submodule(prefix), leaf, torch.nn.Parameter(distribute_tensor(p.detach(), mesh, [placement])))
    opt = SlimAdamW(models.param_groups(model), lr=1e-2, weight_decay=0.1)
    ref_opt = SlimAdamW(models.param_groups(ref), lr=1e-2, weight_decay=0.1, foreach=False)
    for step in range(steps):
        torch.manual_seed(100 + step)
        for p, q in zip(model.parameters(), ref.parameters()):
            g = torch.randn(q.shape, dtype=q.dtype)
            q.grad = g.clone()
            p.grad = distribute_tensor(g, p.device_mesh, p.placements)
        opt.step()
        ref_opt.step()
    return {"diff": _max_diff(model, ref, opt, ref_opt), "comm": opt.comm_stats}


def hf_models(rank: int, world_size: int, out_dir: Path, steps: int = 4, **options) -> dict:
    """Tiny HF GPT-2 and Llama (the ZeRO tests' models and presets), each block and the root under FSDP2, each
    rank half of the global batch, float32, against one process on the whole batch: the worst relative
    parameter difference of SlimAdamW with ``options`` and of torch AdamW in the same harness."""
    from . import zero

    result = {}
    for preset in ("gpt2", "llama"):
        for kind in ("adamw", "slimadam"):
            ref = zero.tiny(preset)
            model = copy.deepcopy(ref)
            blocks = model.transformer.h if preset == "gpt2" else model.model.layers
            for block in blocks:
                fully_shard(block)
            fully_shard(model)
            make = functools.partial(zero.optimizer, preset=preset, kind=kind, per_weight=False, **options)
            opt, ref_opt = make(model), make(ref)
            for step in range(steps):
                for m, o, ids in ((model, opt, zero.batch(step, rank, world_size)), (ref, ref_opt, zero.batch(step))):
                    zero._loss(m, ids).backward()
                    o.step()
                    o.zero_grad(set_to_none=True)
            rel = max(((_full(p) - q).abs().max() / q.abs().max()).item()
                      for p, q in zip(model.parameters(), ref.parameters()))
            result[f"{preset}:{kind}"] = rel
    return result
