"""Real DeepSpeed ZeRO 1/2/3 (CPU accelerator, gloo) with SlimAdamW against one process on the global batch.

Sizes are odd on purpose: every weight's numel is cut by the 2-rank partition boundary in the middle of
a row (ZeRO-1/2 with one param group per weight, ZeRO-3 always, since it partitions each weight), and
GPT-2's fused ``c_attn`` (split q|k|v along dim 1) is cut inside its k part.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from slimadam_hf import SlimAdamW, build_slimadam

STEPS = 3
LR, WD = 1e-2, 0.1


def tiny(preset: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if preset == "gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel

        return GPT2LMHeadModel(GPT2Config(n_embd=15, n_layer=1, n_head=3, vocab_size=37, n_positions=16,
                                          resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0,
                                          eos_token_id=0))
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(hidden_size=15, num_attention_heads=3, num_key_value_heads=1, head_dim=6,
                                        intermediate_size=21, num_hidden_layers=1, vocab_size=37,
                                        max_position_embeddings=16, bos_token_id=0, eos_token_id=0))


def batch(step: int, rank: int | None = None, world_size: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(100 + step)
    ids = torch.randint(0, 37, (4, 8), generator=g)
    return ids if rank is None else ids.chunk(world_size)[rank]


def optimizer(model: torch.nn.Module, preset: str, kind: str, per_weight: bool, robust: bool = False,
              momentum_dtype: str | None = None, eps: float = 1e-8, rounding: str = "nearest") -> torch.optim.Optimizer:
    """SlimAdamW from the preset (``robust``: its factored second moment; ``momentum_dtype`` and ``rounding``:
    the first moment's storage), or torch AdamW with the same two (or per-weight) param groups."""
    groups = build_slimadam(model, preset=preset, lr=LR, weight_decay=WD).param_groups
    if per_weight:  # one group per weight: the ZeRO-1/2 partition boundary cuts every weight
        groups = [
            {"params": [(n, p)], "compress": [c], "weight_decay": g["weight_decay"]}
            for g in groups
            for n, p, c in zip(g["param_names"], g["params"], g.get("compress") or [None] * len(g["params"]))
        ]
    else:
        groups = [{"params": list(zip(g["param_names"], g["params"])), "compress": g.get("compress"),
                   "weight_decay": g["weight_decay"]} for g in groups]
    if kind == "adamw":
        return torch.optim.AdamW([{"params": [p for _, p in g["params"]], "weight_decay": g["weight_decay"]}
                                  for g in groups], lr=LR, eps=eps)
    for g in groups:
        if g["compress"] is None:
            g.pop("compress")
    return SlimAdamW(groups, lr=LR, eps=eps, robust=robust, momentum_dtype=momentum_dtype, momentum_rounding=rounding)


def ds_config(stage: int, **extra: Any) -> dict:
    zero = {"stage": stage, **extra.pop("zero", {})}
    return {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "zero_optimization": zero,
            "zero_allow_untested_optimizer": True, "gradient_clipping": 0.0, **extra}


def _loss(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, labels=ids).loss


def _full_params(engine: Any, stage: int) -> dict[str, torch.Tensor]:
    import deepspeed

    params = list(engine.module.named_parameters())
    if stage == 3:
        with deepspeed.zero.GatheredParameters([p for _, p in params]):
            return {n: p.detach().clone().float() for n, p in params}
    return {n: p.detach().clone().float() for n, p in params}


def _max_all_ranks(value: float) -> float:
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def run(preset: str, kind: str, stage: int, rank: int, world_size: int, per_weight: bool, zero_init: bool = False,
        robust: bool = False, momentum_dtype: str | None = None, eps: float = 1e-8, rounding: str = "nearest",
        **config: Any) -> dict:
    """``STEPS`` ZeRO steps vs one process: worst relative parameter difference, and second moments."""
    import deepspeed

    config = ds_config(stage, **config)
    ref = tiny(preset)  # first: zero.Init patches tensor creation, lazy imports inside it fail
    if zero_init:  # parameters partitioned as they are created (HF from_pretrained/from_config under ZeRO-3)
        with deepspeed.zero.Init(config_dict_or_path=config):
            model = tiny(preset)
        with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=0), torch.no_grad():
            for p, q in zip(model.parameters(), ref.parameters()):  # HF's init differs on partitions
                p.copy_(q)
    else:
        model = tiny(preset)
    initial = {n: p.detach().clone() for n, p in ref.named_parameters()}
    opt, ref_opt = (optimizer(m, preset, kind, per_weight, robust, momentum_dtype, eps, rounding)
                    for m in (model, ref))
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=config)
    for step in range(STEPS):
        engine.backward(_loss(engine, batch(step, rank, world_size)))
        engine.step()
        _loss(ref, batch(step)).backward()
        ref_opt.step()
        ref_opt.zero_grad()
    params = _full_params(engine, stage)
    plan = build_slimadam(ref, preset=preset).param_groups
    compressed = {n for g in plan if g.get("compress") for n, c in zip(g["param_names"], g["compress"]) if c}
    rel, rel_compressed, moved = 0.0, 0.0, 0.0
    for n, q in ref.named_parameters():
        diff = ((params[n] - q).abs().max() / q.abs().max()).item()
        rel = max(rel, diff)
        rel_compressed = max(rel_compressed, diff if n in compressed else 0.0)
        moved = max(moved, (q - initial[n]).abs().max().item())
    result = {"rel_diff": _max_all_ranks(rel), "rel_diff_compressed": _max_all_ranks(rel_compressed),
              "moved": moved, "wrapper": type(engine.optimizer).__name__,
              "offload": bool(getattr(engine.optimizer, "cpu_offload", False)
                              or getattr(engine.optimizer, "offload_optimizer", False))}
    if kind == "slimadam":
        result.update(_second_moments(opt, ref, ref_opt))
        if momentum_dtype is not None:
            result.update(_first_moments(opt, ref, ref_opt))
        if robust:
            result["complement_rel_diff"], result["complements_on_rank"] = _complements(opt, ref, ref_opt)
        result["comm"] = getattr(opt, "comm_stats", None)
    else:  # AdamW's full second moments, gathered by DeepSpeed's own API
        from deepspeed.utils import safe_get_full_optimizer_state

        if stage in (1, 2):  # DeepSpeed links state fragments after the first group's step only: relink
            engine.optimizer._hp_optimizer_states_linked = False
            engine.optimizer._lazy_init_hp_params_optimizer_state()
        worst = 0.0
        for (n, p), q in zip(engine.module.named_parameters(), ref.parameters()):
            v, expected = safe_get_full_optimizer_state(p, "exp_avg_sq"), ref_opt.state[q]["exp_avg_sq"]
            worst = max(worst, ((v.float() - expected).abs().max() / expected.abs().max()).item())
        result["v_rel_diff"] = worst
    return result


def _second_moments(opt: SlimAdamW, ref: torch.nn.Module, ref_opt: SlimAdamW) -> dict:
    """This rank's second moments against the single process's (compressed: whole; full: the local slice)."""
    from slimadam_hf.distributed import zero

    moments = zero.second_moments(opt)
    ref_v = {n: ref_opt.state[p]["exp_avg_sq"] for n, p in ref.named_parameters()}
    worst, compressed, names = 0.0, 0, set()
    for name, (v, local) in moments.items():
        expected = ref_v[name].reshape(-1)
        if local is None:
            compressed += 1
        else:
            expected = expected.narrow(0, local[0], local[1])
        worst = max(worst, ((v - expected).abs().max() / expected.abs().max()).item())
        names.add(name)
    counts = [None] * dist.get_world_size()
    dist.all_gather_object(counts, sorted(names))
    covered = set().union(*map(set, counts))
    return {"v_rel_diff": _max_all_ranks(worst), "v_compressed_on_rank": compressed,
            "v_names_missing": sorted(set(ref_v) - covered)}


def _first_moments(opt: SlimAdamW, ref: torch.nn.Module, ref_opt: SlimAdamW) -> dict:
    """int8 or bfloat16: this rank's first moments (int8 codes read back) against the single process's: how many
    elements differ (of how many), and the worst difference relative to the weight's largest moment."""
    from slimadam_hf.core import quant
    from slimadam_hf.distributed import zero

    params = dict(ref.named_parameters())
    differing, held, worst = 0, 0, 0.0
    for name, (m, (start, numel)) in zero.first_moments(opt).items():
        state = ref_opt.state[params[name]]
        if state["exp_avg"].dtype == torch.int8:
            whole = quant.dequantize(state["exp_avg"], state["exp_avg_absmax"], params[name].shape).reshape(-1)
        else:
            whole = state["exp_avg"].float().reshape(-1)
        expected = whole.narrow(0, start, numel)
        differing += int((m != expected).sum())
        held += numel
        worst = max(worst, ((m - expected).abs().max() / whole.abs().max()).item())
    return {"m_differing": int(_max_all_ranks(differing)), "m_held": held, "m_rel_diff": _max_all_ranks(worst)}


def _complements(opt: SlimAdamW, ref: torch.nn.Module, ref_opt: SlimAdamW) -> tuple[float, int]:
    """robust=True: this rank's complements against the single process's (worst relative difference, count)."""
    from slimadam_hf.core.factored import STATE_KEY
    from slimadam_hf.distributed import zero

    ref_w = {n: ref_opt.state[p].get(STATE_KEY) for n, p in ref.named_parameters()}
    held = zero.complements(opt)
    worst = 0.0
    for name, w in held.items():
        expected = ref_w[name].reshape(-1)
        worst = max(worst, ((w - expected).abs().max() / expected.abs().max()).item())
    return _max_all_ranks(worst), len(held)


def accuracy(rank: int, world_size: int, out_dir: Path, cases: list, config: dict | None = None,
             robust: bool = False, momentum_dtype: str | None = None, eps: float = 1e-8,
             rounding: str = "nearest") -> dict:
    """Per case ``(preset, stage, per_weight[, zero_init])``: torch AdamW and SlimAdamW vs one process."""
    warnings.filterwarnings("ignore")
    result = {}
    for preset, stage, per_weight, *init in cases:
        for kind in ("adamw", "slimadam"):
            key = f"{preset}:stage{stage}:{'per_weight' if per_weight else 'two_groups'}"
            key += f"{':zero_init' if init else ''}:{kind}"
            try:
                result[key] = run(preset, kind, stage, rank, world_size, per_weight, zero_init=bool(init),
                                  robust=robust, momentum_dtype=momentum_dtype, eps=eps, rounding=rounding,
                                  **(config or {}))
            except Exception:  # noqa: BLE001 - reported per case
                import traceback

                result[key] = {"traceback": traceback.format_exc()}
    return result
    return result


def int8_probe(rank: int, world_size: int, out_dir: Path) -> dict:
    """momentum_dtype="int8": AdamW and SlimAdamW vs one process (blocks cut by partition boundaries). eps 1e-3:
    with 1e-8, GPT-2's near-zero gradients make even AdamW differ by 1e-4 from one process, enough to move
    an int8 code across a rounding boundary."""
    return accuracy(rank, world_size, out_dir, INT8_CASES, momentum_dtype="int8", eps=1e-3)


def stochastic_probe(rank: int, world_size: int, out_dir: Path) -> dict:
    """bfloat16 first moments rounded stochastically, each element's noise keyed by its position in its weight."""
    return accuracy(rank, world_size, out_dir, STOCHASTIC_CASES, momentum_dtype="bfloat16", eps=1e-3,
                    rounding="stochastic")


# (preset, stage, one group per weight?[, built under zero.Init]); see the module doc for the cuts
FP32_CASES = [("gpt2", 1, True), ("gpt2", 2, False), ("gpt2", 3, False, True), ("llama", 1, False),
              ("llama", 2, True), ("llama", 3, False)]
OFFLOAD_CASES = [("gpt2", 2, True), ("llama", 3, False)]
OFFLOAD = {"zero": {"offload_optimizer": {"device": "cpu"}}, "zero_force_ds_cpu_optimizer": False}
BF16_CASES = [("llama", 1, False), ("gpt2", 2, False), ("llama", 3, False)]
ROBUST_CASES = [("gpt2", 1, True), ("llama", 2, True), ("gpt2", 3, False)]  # robust=True
INT8_CASES = [("gpt2", 1, True), ("llama", 1, False), ("gpt2", 2, False), ("llama", 2, True), ("gpt2", 3, False),
              ("llama", 3, False)]  # momentum_dtype="int8", eps 1e-3
STOCHASTIC_CASES = [("gpt2", 1, True), ("llama", 2, False), ("gpt2", 3, False)]  # bfloat16 m, stochastic, eps 1e-3
BF16 = {"bf16": {"enabled": True}}


def suite(rank: int, world_size: int, out_dir: Path) -> dict:
    """Every accuracy check and the refusals in one spawn (process start-up dominates their cost)."""
    import traceback

    from . import refusals

    checks = {
        "fp32": lambda: accuracy(rank, world_size, out_dir, FP32_CASES),
        "offload": lambda: accuracy(rank, world_size, out_dir, OFFLOAD_CASES, OFFLOAD),
        "bf16": lambda: accuracy(rank, world_size, out_dir, BF16_CASES, BF16),
        "robust": lambda: accuracy(rank, world_size, out_dir, ROBUST_CASES, robust=True),
        "int8": lambda: int8_probe(rank, world_size, out_dir),
        "stochastic": lambda: stochastic_probe(rank, world_size, out_dir),
        "refusals": lambda: refusals.deepspeed_refusals(rank, world_size, out_dir),
    }
    results = {}
    for name, check in checks.items():
        try:
            results[name] = check()
        except Exception:  # reported per test by tests/test_dist_zero.py
            results[name] = {"traceback": traceback.format_exc()}
    return results
