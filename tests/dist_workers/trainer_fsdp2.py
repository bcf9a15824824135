"""Trainer + FSDP2 + ``--optim slimadam`` on gloo CPU processes.

accelerate enables FSDP only on accelerator devices, and the Trainer builds its Accelerator from
``use_cpu``; :class:`GlooFSDP2Trainer` (test only) switches the accelerator state to FSDP after it is
created, so the real FSDP2 code paths of accelerate and the Trainer run on CPU.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


def trainer_class() -> type:
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
    from transformers import Trainer

    class GlooFSDP2Trainer(Trainer):
        def create_accelerator_and_postprocess(self) -> None:
            super().create_accelerator_and_postprocess()
            if self.args.fsdp_plugin_args is not None and not self.is_fsdp_enabled:
                state = self.accelerator.state
                state.distributed_type = DistributedType.FSDP
                state.fsdp_plugin = FullyShardedDataParallelPlugin(**self.args.fsdp_plugin_args)
                self.is_fsdp_enabled = True

    return GlooFSDP2Trainer


def tiny_gpt2() -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_embd=16, n_layer=2, n_head=2, vocab_size=32, n_positions=16, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
                        tie_word_embeddings=False)
    return GPT2LMHeadModel(config)


def dataset(n: int = 16) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 32, (n, 8), generator=g)
    return [{"input_ids": row, "labels": row.clone()} for row in ids]


def training_args(out_dir: Path, batch_size: int, fsdp: bool, **extra: Any):
    from transformers import TrainingArguments

    import slimadam_hf

    slimadam_hf.register()
    fsdp_kwargs = dict(fsdp="full_shard", fsdp_config={"fsdp_version": 2, "reshard_after_forward": True,
                                                          "state_dict_type": "SHARDED_STATE_DICT"}) if fsdp else {}
    kwargs = dict(
        output_dir=str(out_dir), optim="slimadam", optim_args="preset=gpt2", learning_rate=1e-2,
        per_device_train_batch_size=batch_size, max_steps=4, use_cpu=True, report_to=[], seed=0,
        train_sampling_strategy="sequential", logging_steps=1, save_strategy="no", disable_tqdm=True,
    )
    return TrainingArguments(**{**kwargs, **fsdp_kwargs, **extra})


def full_params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def trainer_fsdp2(rank: int, world_size: int, out_dir: Path, optim_args: str = "preset=gpt2") -> dict:
    """4 steps (checkpoint at step 2), then a run resumed from that checkpoint."""
    from torch.distributed.tensor import DTensor

    cls = trainer_class()
    run_dir = out_dir / "run"
    args = training_args(run_dir, 2, True, save_strategy="steps", save_steps=2, optim_args=optim_args)
    trainer = cls(model=tiny_gpt2(), args=args, train_dataset=dataset())
    trainer.train()
    opt = trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer
    params = full_params(trainer.model)
    c_attn = next(p for n, p in trainer.model.named_parameters() if n.endswith("h.0.attn.c_attn.weight"))
    result = {
        "optimizer": type(opt).__name__,
        "dtensor_params": isinstance(c_attn, DTensor),
        "c_attn_v": [str(opt.state[c_attn]["exp_avg_sq"].placements), list(opt.state[c_attn]["exp_avg_sq"].shape)],
        "comm": getattr(opt, "comm_stats", None),
        "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
        "checkpoints": sorted(p.name for p in run_dir.glob("checkpoint-*")),
    }
    resumed = cls(model=tiny_gpt2(), args=training_args(out_dir / "resumed", 2, True, optim_args=optim_args),
                  train_dataset=dataset())
    resumed.train(resume_from_checkpoint=str(run_dir / "checkpoint-2"))
    resumed_params = full_params(resumed.model)
    if rank == 0:  # full state dicts with cpu_offload live on rank 0 only
        result["resume_max_diff"] = max((params[k] - resumed_params[k]).abs().max().item() for k in params)
        torch.save(params, out_dir / "fsdp2_params.pt")
    return result


def single_process_params(out_dir: Path) -> dict[str, torch.Tensor]:
    """The same 4 steps in one process on the global batch (2 ranks x 2)."""
    from transformers import Trainer

    trainer = Trainer(model=tiny_gpt2(), args=training_args(out_dir, 4, False), train_dataset=dataset())
    trainer.train()
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
