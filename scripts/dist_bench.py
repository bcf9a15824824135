#!/usr/bin/env python
"""FSDP2 check and optimizer-step benchmark for SlimAdamW, launched with torchrun.

    torchrun --nproc_per_node 2 scripts/dist_bench.py --backend gloo          # CPU
    torchrun --nproc_per_node 8 scripts/dist_bench.py --backend nccl --hidden 1024 --layers 8

Builds a random-init Llama-style model from a config (no hub), shards it with ``fully_shard``, and

1. ``--check``: runs SlimAdamW steps on identical synthetic gradients and compares every parameter and
   second moment with single-process SlimAdamW on an unsharded copy (float64 by default);
2. times ``optimizer.step()`` for SlimAdamW and ``torch.optim.AdamW`` (foreach) on the sharded model
   and prints a table with the extra all-reduce SlimAdamW issues per step.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time

import torch
import torch.distributed as dist


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", default="nccl" if torch.cuda.is_available() else "gloo")
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=10, help="timed optimizer steps")
    parser.add_argument("--check", action="store_true", help="compare with single-process SlimAdamW first")
    parser.add_argument("--check-dtype", default="float64", choices=["float32", "float64"])
    parser.add_argument("--offload", action="store_true", help="FSDP2 CPUOffloadPolicy (params, grads, step on CPU)")
    return parser.parse_args()


def build_model(args: argparse.Namespace, dtype: torch.dtype, device: torch.device) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=args.hidden, intermediate_size=4 * args.hidden, num_hidden_layers=args.layers,
        num_attention_heads=max(1, args.hidden // 32), num_key_value_heads=max(1, args.hidden // 64),
        vocab_size=args.vocab, tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config).to(dtype=dtype, device=device)


def shard(model: torch.nn.Module, offload: bool = False) -> torch.nn.Module:
    from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard

    policy = CPUOffloadPolicy() if offload else OffloadPolicy()
    for layer in model.model.layers:
        fully_shard(layer, offload_policy=policy)
    fully_shard(model, offload_policy=policy)
    return model


def synthetic_grads(model: torch.nn.Module, step: int) -> None:
    from torch.distributed.tensor import DTensor, distribute_tensor

    torch.manual_seed(1000 + step)
    for p in model.parameters():
        shape = p.shape
        g = torch.randn(shape, dtype=p.dtype, device="cpu").to(p.device if not isinstance(p, DTensor) else p.to_local().device)
        p.grad = distribute_tensor(g, p.device_mesh, p.placements) if isinstance(p, DTensor) else g


def check(args: argparse.Namespace, device: torch.device) -> dict[str, float]:
    from slimadam_hf import build_slimadam

    dtype = getattr(torch, args.check_dtype)
    ref = build_model(args, dtype, device)
    model = shard(copy.deepcopy(ref), args.offload)
    opt = build_slimadam(model, lr=1e-2)
    ref_opt = build_slimadam(ref, lr=1e-2, foreach=False)
    for step in range(3):
        synthetic_grads(model, step)
        synthetic_grads(ref, step)
        opt.step()
        ref_opt.step()
    def full(t: torch.Tensor) -> torch.Tensor:
        return (t.full_tensor() if hasattr(t, "full_tensor") else t).to(device)

    params = max((full(p) - q).abs().max().item() for p, q in zip(model.parameters(), ref.parameters()))
    moments = max(
        (full(opt.state[p]["exp_avg_sq"]) - ref_opt.state[q]["exp_avg_sq"]).abs().max().item()
        for p, q in zip(model.parameters(), ref.parameters())
    )
    return {"max_param_diff": params, "max_exp_avg_sq_diff": moments, **opt.comm_stats}


def time_steps(opt: torch.optim.Optimizer, model: torch.nn.Module, steps: int, device: torch.device) -> float:
    synthetic_grads(model, 0)
    times = []
    for _ in range(steps + 2):
        if device.type == "cuda":
            torch.cuda.synchronize()
        dist.barrier()
        start = time.perf_counter()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times[2:]) * 1e3


def main() -> None:
    args = parse_args()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local_rank) if args.backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(args.backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    if rank == 0:
        print(f"world_size={world} backend={args.backend} device={device.type} torch={torch.__version__}")
    if args.check:
        result = check(args, device)
        if rank == 0:
            print("check vs single process:", ", ".join(f"{k}={v:.3g}" for k, v in result.items()))

    from slimadam_hf import build_slimadam

    model = shard(build_model(args, torch.float32, device), args.offload)
    numel = sum(p.numel() for p in model.parameters())
    rows = []
    for name, opt in (
        ("AdamW (torch, foreach)", torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=True)),
        ("SlimAdamW", build_slimadam(model, lr=1e-3)),
    ):
        ms = time_steps(opt, model, args.steps, device)
        comm = getattr(opt, "comm_stats", {"all_reduce_calls": 0, "all_reduce_bytes": 0})
        rows.append((name, ms, comm["all_reduce_calls"], comm["all_reduce_bytes"]))
        del opt
    if rank == 0:
        print(f"\nmodel: llama hidden={args.hidden} layers={args.layers} vocab={args.vocab}, {numel:,} params, "
              f"fp32, {world} ranks{', CPU offload' if args.offload else ''}; median of {args.steps} optimizer steps")
        print("| optimizer | step ms | all-reduces/step | all-reduce bytes/step | bytes vs param bytes/rank |")
        print("|---|---|---|---|---|")
        for name, ms, calls, nbytes in rows:
            print(f"| {name} | {ms:.2f} | {calls} | {nbytes:,} | {nbytes / (numel * 4 / world):.4%} |")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
