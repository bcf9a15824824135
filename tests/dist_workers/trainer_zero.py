"""Trainer + DeepSpeed ZeRO (``--deepspeed`` config) + ``--optim slimadam`` on two gloo CPU processes.

DeepSpeed's CPU accelerator runs the real ZeRO code paths; each run trains 4 steps with a checkpoint at
step 2 (DeepSpeed's own per-rank ``zero_pp_rank_*_optim_states.pt``), then a second Trainer resumes
from that checkpoint and must end where the uninterrupted run ended.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from . import trainer_fsdp2


def ds_config(stage: int) -> dict:
    return {
        "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto", "zero_optimization": {"stage": stage},
    }


def _deepspeed_state() -> None:
    """accelerate's DeepSpeed state over the harness's gloo group.

    Test only: without GPUs, ``TrainingArguments(deepspeed=...)`` builds a state with no backend, which
    counts one process (every rank would then read the same batches and write the same rng file);
    naming the backend, as ``--ddp_backend gloo`` does under ``accelerate launch``, counts them all.
    """
    from accelerate import PartialState
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()  # a new Trainer gets a new Accelerator (the process state stays)
    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    try:
        PartialState(backend="gloo")
    finally:
        del os.environ["ACCELERATE_USE_DEEPSPEED"]


def _args(out_dir: Path, stage: int, **extra: Any):
    from transformers import TrainingArguments

    import slimadam_hf

    slimadam_hf.register()
    _deepspeed_state()
    kwargs = dict(
        output_dir=str(out_dir), optim="slimadam", optim_args="preset=gpt2", learning_rate=1e-2,
        per_device_train_batch_size=2, max_steps=4, report_to=[], seed=0, train_sampling_strategy="sequential",
        logging_steps=1, save_strategy="no", disable_tqdm=True, deepspeed=ds_config(stage),
        lr_scheduler_type="constant", max_grad_norm=0.0,
        accelerator_config={"use_configured_state": True},  # the state of _deepspeed_state()
    )
    return TrainingArguments(**{**kwargs, **extra})


def _params(trainer: Any, stage: int) -> dict[str, torch.Tensor]:
    import deepspeed

    params = list(trainer.model_wrapped.module.named_parameters())
    if stage == 3:
        with deepspeed.zero.GatheredParameters([p for _, p in params]):
            return {n: p.detach().clone() for n, p in params}
    return {n: p.detach().clone() for n, p in params}


def resume(rank: int, world_size: int, out_dir: Path, stage: int = 2, optim_args: str = "preset=gpt2") -> dict:
    """4 steps (checkpoint at step 2), then a new Trainer resumed from that checkpoint."""
    from transformers import Trainer

    from slimadam_hf.optim import unwrap_optimizer
    from slimadam_hf.distributed import zero

    warnings.filterwarnings("ignore")
    run_dir = out_dir / "run"
    # before the model: HF's zero.Init
    args = _args(run_dir, stage, save_strategy="steps", save_steps=2, optim_args=optim_args)
    trainer = Trainer(model=trainer_fsdp2.tiny_gpt2(), args=args, train_dataset=trainer_fsdp2.dataset())
    trainer.train()
    opt = unwrap_optimizer(trainer.optimizer)  # accelerate's wrapper > DeepSpeed's ZeRO wrapper > SlimAdamW
    wrapper = trainer.model_wrapped.optimizer
    params = _params(trainer, stage)
    moments = zero.second_moments(opt)
    result = {
        "optimizer": type(opt).__name__,
        "wrapper": type(wrapper).__name__,
        "c_attn_v": [list(v.shape) for n, (v, local) in moments.items() if n.endswith("h.0.attn.c_attn.weight")],
        "comm": getattr(opt, "comm_stats", None),
        "complements": sorted(zero.complements(opt)),
        "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
        "checkpoints": sorted(p.name for p in run_dir.glob("checkpoint-*")),
        "zero_files": sorted(p.name for p in (run_dir / "checkpoint-2").rglob("*optim_states.pt")),
        "rng_files": sorted(p.name for p in (run_dir / "checkpoint-2").glob("rng_state*.pth")),
        "trainer_world_size": args.world_size,
    }
    resumed = Trainer(model=trainer_fsdp2.tiny_gpt2(), args=_args(out_dir / "resumed", stage, optim_args=optim_args),
                      train_dataset=trainer_fsdp2.dataset())
    resumed.train(resume_from_checkpoint=str(run_dir / "checkpoint-2"))
    resumed_params = _params(resumed, stage)
    diff = max((params[k] - resumed_params[k]).abs().max().item() for k in params)
    if rank == 0:
        torch.save(params, out_dir / "zero_params.pt")
    initial = trainer_fsdp2.tiny_gpt2().state_dict()
    result["moved"] = max((params[k] - initial[k]).abs().max().item() for k in params)
    t = torch.tensor([diff], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    result["resume_max_diff"] = t.item()
    result["resumed_losses"] = [h["loss"] for h in resumed.state.log_history if "loss" in h]
    return result


def resume_at_other_world_size(rank: int, world_size: int, out_dir: Path, checkpoint: str, stage: int = 2) -> dict:
    """Resume a checkpoint saved by 2 ranks with ``world_size`` ranks: the error, one line."""
    from transformers import Trainer

    warnings.filterwarnings("ignore")
    args = _args(out_dir / "other", stage, per_device_train_batch_size=4)
    trainer = Trainer(model=trainer_fsdp2.tiny_gpt2(), args=args, train_dataset=trainer_fsdp2.dataset())
    try:
        trainer.train(resume_from_checkpoint=checkpoint)
    except Exception as exc:  # noqa: BLE001 - the message is the result
        return {"error": f"{type(exc).__name__}: {exc}"}
    return {"error": None}


def single_process_params(out_dir: Path) -> dict[str, torch.Tensor]:
    """The same 4 steps in one process (no DeepSpeed) on the global batch (2 ranks x 2)."""
    from transformers import Trainer, TrainingArguments

    import slimadam_hf

    slimadam_hf.register()
    args = TrainingArguments(
        output_dir=str(out_dir), optim="slimadam", optim_args="preset=gpt2", learning_rate=1e-2,
        per_device_train_batch_size=4, max_steps=4, use_cpu=True, report_to=[], seed=0,
        train_sampling_strategy="sequential", save_strategy="no", disable_tqdm=True,
        lr_scheduler_type="constant", max_grad_norm=0.0,
    )
    trainer = Trainer(model=trainer_fsdp2.tiny_gpt2(), args=args, train_dataset=trainer_fsdp2.dataset())
    trainer.train()
    return {k: v.detach().clone() for k, v in trainer.model.named_parameters()}
