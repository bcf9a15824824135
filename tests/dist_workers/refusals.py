"""FSDP1 and the DeepSpeed settings SlimAdamW cannot follow exactly are refused with a clear error, never run
silently; DeepSpeed ZeRO 1/2/3 themselves run (checked against one process here and in ``zero.py``)."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from slimadam_hf import SlimAdamW, build_slimadam
from slimadam_hf.distributed.guards import UnsupportedShardingError

from . import models


def _error(fn) -> str:
    try:
        fn()
    except UnsupportedShardingError as exc:
        return str(exc)
    return "NO ERROR"


def _tiny_gpt2() -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=32, n_positions=16))


def fsdp1(rank: int, world_size: int, out_dir: Path) -> dict:
    """Real FSDP1 on gloo CPU: flat params (use_orig_params=False) and 1-D original-param views (True)."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    warnings.filterwarnings("ignore")
    result = {}
    for use_orig in (False, True):
        model = FSDP(_tiny_gpt2(), use_orig_params=use_orig, device_id=torch.device("cpu"))
        key = f"use_orig_params={use_orig}"
        result[key + ":build_slimadam"] = _error(lambda: build_slimadam(model, preset="gpt2"))
        result[key + ":plain_params"] = _error(lambda: SlimAdamW(model.parameters()))
        result[key + ":names"] = [n for n, _ in model.named_parameters()][:2]
    # A plan made on the unwrapped model, with its specs, handed FSDP1's 1-D views without names.
    model = models.make_model()
    groups = models.param_groups(model)
    wrapped = FSDP(model, use_orig_params=True, device_id=torch.device("cpu"))
    by_name = dict(wrapped.named_parameters())
    for group in groups:
        group["params"] = [by_name["_fsdp_wrapped_module." + n] for n, _ in group["params"]]
    result["orig_params_unnamed"] = _error(lambda: SlimAdamW(groups))
    return result


def fsdp2_options(rank: int, world_size: int, out_dir: Path) -> dict:
    """Options SlimAdamW cannot follow on DTensor parameters: refused at the first step, one line each."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world_size,))
    result = {}
    # int8 blocks lie inside rows: a weight cut along dim 1 (tensor parallel) would split them across ranks
    for key, options in {"int8_dim1": dict(momentum_dtype="int8")}.items():
        model = models.make_model().float()
        for name, p in list(model.named_parameters()):
            prefix, _, leaf = name.rpartition(".")
            placement = Shard(1) if p.dim() >= 2 else Replicate()
            module = model.get_submodule(prefix) if prefix else model
            setattr(module, leaf, torch.nn.Parameter(distribute_tensor(p.detach(), mesh, [placement])))
        opt = SlimAdamW(models.param_groups(model), lr=1e-2, **options)
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        result[key] = _error(opt.step)
    return result


def deepspeed_zero(rank: int, world_size: int, out_dir: Path, stages: tuple = (0, 1, 2, 3)) -> dict:
    """Real DeepSpeed (CPU accelerator, gloo): two steps per ZeRO stage of the exotic-spec model vs one process."""
    import deepspeed

    warnings.filterwarnings("ignore")
    result = {}
    for stage in stages:
        # float32: DeepSpeed reduces no float64 gradients
        model = models.make_model().float()
        ref = models.make_model().float()
        opt = SlimAdamW(models.param_groups(model), lr=1e-2, weight_decay=0.1)
        ref_opt = SlimAdamW(models.param_groups(ref), lr=1e-2, weight_decay=0.1, foreach=False)
        config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
                  "zero_optimization": {"stage": stage}, "zero_allow_untested_optimizer": True,
                  "gradient_clipping": 0.0}  # DeepSpeed clips at 1.0 by default
        engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=config)
        for step in range(2):
            loss = engine(models.batch(step, rank, world_size))
            engine.backward(loss)
            engine.step()
            ref(models.batch(step)).backward()
            ref_opt.step()
            ref_opt.zero_grad()
        params, initial = list(engine.module.parameters()), models.make_model().float().parameters()
        with deepspeed.zero.GatheredParameters(params, enabled=stage == 3):
            diff = max((p - q).abs().max().item() for p, q in zip(params, ref.parameters()))
        moved = max((q - r).abs().max().item() for q, r in zip(ref.parameters(), initial))
        result[f"stage{stage}"] = {"max_param_diff": diff, "moved": moved, "wrapper": type(engine.optimizer).__name__}
    return result


def _zero_error(rank: int, world_size: int, stage: int, steps: int = 1, swap_state: bool = False,
                options: dict | None = None, then: dict | None = None, **config) -> str:
    """One real DeepSpeed ZeRO run of the tiny model; the UnsupportedShardingError it raises, or 'NO ERROR'.

    ``then``: after the steps, go on with these group options (e.g. robust=True), as a run that resumes a
    checkpoint saved without them (the live group's options win on load)."""
    import deepspeed
    import torch.distributed as dist

    model = models.make_model().float()
    opt = SlimAdamW(models.param_groups(model), lr=1e-2, **(options or {}))
    zero = {"stage": stage, **config.pop("zero", {})}
    config = {"train_micro_batch_size_per_gpu": 2, "zero_optimization": zero, "zero_allow_untested_optimizer": True,
              "zero_force_ds_cpu_optimizer": False, "gradient_clipping": 0.0, **config}
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=config)

    def train() -> None:
        for step in range(steps):
            engine.backward(engine(models.batch(step, rank, world_size)))
            engine.step()
        if swap_state:  # each rank loads the other rank's optimizer state (same world size, other layout)
            states = [None] * world_size
            dist.all_gather_object(states, opt.state_dict())
            opt.load_state_dict(states[(rank + 1) % world_size])
            engine.backward(engine(models.batch(steps, rank, world_size)))
            engine.step()
        if then:
            for group in opt.param_groups:
                group.update(then)
            engine.backward(engine(models.batch(steps, rank, world_size)))
            engine.step()

    return _error(train)


def deepspeed_refusals(rank: int, world_size: int, out_dir: Path) -> dict:
    """DeepSpeed settings that SlimAdamW refuses at the first step, each with its one-line error."""
    warnings.filterwarnings("ignore")
    return {
        "bf16_optimizer": _zero_error(rank, world_size, 1, bf16={"enabled": True},
                                      data_types={"grad_accum_dtype": "fp32"}),
        "elastic_checkpoint": _zero_error(rank, world_size, 2, zero={"elastic_checkpoint": True}),
        "other_rank_state": _zero_error(rank, world_size, 2, swap_state=True),
        "plain_state_robust": _zero_error(rank, world_size, 2, then=dict(robust=True)),
        "float_state_int8": _zero_error(rank, world_size, 2, then=dict(momentum_dtype="int8")),
        "auto_snr": _auto_snr_error(rank, world_size),
    }


def _auto_snr_error(rank: int, world_size: int) -> str:
    """auto-snr (full Adam for a probe, then compress in place) under ZeRO-2."""
    import deepspeed

    from slimadam_hf import build_auto_snr

    from .zero import batch, ds_config, tiny

    model = tiny("gpt2")
    opt = build_auto_snr(model, preset="gpt2", probe_steps=2, lr=1e-2)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=ds_config(2))

    def train() -> None:
        ids = batch(0, rank, world_size)
        engine.backward(engine(input_ids=ids, labels=ids).loss)
        engine.step()

    return _error(train)
