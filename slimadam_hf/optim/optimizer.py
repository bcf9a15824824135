"""``SlimAdamW``: AdamW whose second moment is averaged over chosen dims of each parameter."""

from __future__ import annotations

import logging
from typing import Any, Callable, Iterable, Optional

import torch
from torch import Tensor
from torch.optim import Optimizer

from ..core.compress_spec import (
    CompressSpec,
    CompressSpecError,
    cached_segments,
    normalize_spec,
    second_moment_dtype,
    second_moment_shape,
    segments,
)
from ..core.functional import UpdateBatch, slimadamw
from ..core.fused import fused_available
from ..core.triton_step import triton_available
from ..core import factored, quant
from ..core.options import (
    SlimAdamConfig,
    check_momentum_dtype,
    momentum_dtype_for,
    momentum_dtype_name,
    retire_implementation,
)
from ..distributed import dtensor, dtensor_int8, zero
from ..distributed.guards import (
    check_before_step,
    check_param_group,
    is_dtensor,
    logical_shape,
)

logger = logging.getLogger(__name__)


def _flat_momentum_dtype(group: dict[str, Any], flat: Tensor) -> torch.dtype:
    """The first moment's dtype on a DeepSpeed ZeRO flat partition (int8: its codes)."""
    return torch.int8 if group["momentum_dtype"] == "int8" else momentum_dtype_for(group["momentum_dtype"], flat)


def unwrap_optimizer(optimizer: Any) -> Any:
    """The innermost optimizer inside wrappers that hold it as ``.optimizer`` (accelerate, DeepSpeed)."""
    for _ in range(5):
        inner = getattr(optimizer, "optimizer", None)
        if not isinstance(inner, Optimizer) and not callable(getattr(inner, "step", None)):
            break  # DeepSpeed's ZeRO wrappers are not torch Optimizers but hold ours as .optimizer
        optimizer = inner
    return optimizer


def _as_float(value: float | Tensor) -> float:
    return value.item() if isinstance(value, Tensor) else float(value)


def _implementation(group: dict[str, Any]) -> str:
    """The group's implementation; by default the device's fast path: the Triton kernels where it has CUDA
    parameters and Triton imports, the fused CPU kernel where it has float32 CPU parameters and the kernel
    builds, else foreach (the same update)."""
    if group["implementation"] is not None:
        return group["implementation"]
    if group["foreach"] is not None:
        return "foreach" if group["foreach"] else "reference"
    devices = {p.device for p in group["params"]}
    if any(d.type == "cuda" for d in devices) and triton_available(next(d for d in devices if d.type == "cuda")):
        return "triton"
    if any(p.device.type == "cpu" and p.dtype == torch.float32 for p in group["params"]) and fused_available():
        return "fused"
    return "foreach"


def _first_moment(state: dict[str, Any], param: Tensor) -> Any:
    """The state's first moment as the update takes it: a tensor, or int8 codes with their scales."""
    if "exp_avg_absmax" in state:
        return quant.QuantizedMomentum(state["exp_avg"], state["exp_avg_absmax"], param.shape)
    return state["exp_avg"]


class SlimAdamW(Optimizer):
    """AdamW with compressed second moments (SlimAdam, Kalra et al. 2025).

    Args:
        params: tensors, ``(name, tensor)`` pairs, or param groups (dicts). A group may carry
            ``compress``: a list aligned with its ``params`` whose entries are ``None`` (full second
            moment), a tuple of dims to average the second moment over, or a split spec dict for fused
            weights (see :mod:`slimadam_hf.core.compress_spec`). Groups without ``compress`` are not
            compressed. :func:`slimadam_hf.build_slimadam` fills this in from a model.
        lr: learning rate (a float or a 0-D tensor).
        betas: coefficients of the running averages of the gradient and its square.
        eps: added to the denominator, outside the square root, as in AdamW.
        weight_decay: decoupled weight decay, as in AdamW.
        foreach: ``True`` is ``implementation="foreach"``, ``False`` ``"reference"`` (kept for
            compatibility; ``implementation`` says more).
        implementation: ``None`` (the default): ``"triton"`` for CUDA parameters, ``"fused"`` for float32 CPU
            parameters when its kernel builds, else ``"foreach"``. ``"fused"``: a C++ kernel for float32 CPU parameters, one pass per
            row (built on first use, about 3 s, cached per machine; needs a C++ compiler); other parameters
            take the foreach path. ``"foreach"``: eager, batched ``torch._foreach_*`` kernels, any device.
            ``"triton"``: Triton kernels for CUDA parameters, a handful of launches per step (the default on
            CUDA where Triton imports; other parameters take the foreach path). ``"reference"``: plain
            per-tensor loop. ``"compiled"`` is retired: it is read as the default, with a notice.
        momentum_dtype: storage of the first moment ``exp_avg``: ``None`` (the parameter's dtype),
            ``torch.bfloat16`` / ``"bfloat16"`` (half the first-moment memory; updated in float32 and
            rounded) or ``"int8"`` (block-quantized codes and scales, :mod:`slimadam_hf.core.quant`).
        momentum_rounding: ``"nearest"`` or ``"stochastic"`` (unbiased rounding of a bfloat16 first moment,
            reproducible under a fixed seed; :mod:`slimadam_hf.core.rounding`).
        robust: a factored second moment for compressed weights (:mod:`slimadam_hf.core.factored`): each
            also keeps the mean of ``g**2`` over the dims its rule keeps, and the denominator uses
            ``v_rule * v_complement / mean(v_rule)``, so a weight keeps a row and a column scale. It holds
            AdamW's loss at high learning rates where the paper's update falls behind; it costs one entry
            per row plus one per column (``exp_avg_sq_complement``). ``False`` is the paper's algorithm.
            (``build_slimadam`` and ``--optim_args`` take a preset's default: on for bert.)
            Every engine: one process, DDP, FSDP2 (the complement is replicated) and DeepSpeed ZeRO 1/2/3.

    With no compression the update is exactly ``torch.optim.AdamW`` (``amsgrad=False``).
    State per parameter: ``step``, ``exp_avg`` (parameter shape; parameter dtype or ``momentum_dtype``) and ``exp_avg_sq``
    (compressed; float32, or float64 for float64 parameters), with ``robust`` also ``exp_avg_sq_complement``,
    created lazily on the first ``step()``.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float | Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        foreach: Optional[bool] = None,
        implementation: Optional[str] = None,
        momentum_dtype: Optional[torch.dtype | str] = None,
        momentum_rounding: str = "nearest",
        robust: bool = False,
    ) -> None:
        config = SlimAdamConfig(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, foreach=foreach,
            implementation=implementation, momentum_dtype=momentum_dtype, momentum_rounding=momentum_rounding,
            robust=robust,
        )
        # the stochastic rounding's noise follows the run's seed, and the checkpoint keeps it
        super().__init__(params, {**config.optimizer_defaults(), "rounding_seed": torch.initial_seed() % (1 << 31)})

    @classmethod
    def from_config(cls, params: Iterable[Any], config: SlimAdamConfig) -> "SlimAdamW":
        """A SlimAdamW with the update options of ``config`` (its preset and auto-SNR fields are not used here)."""
        return cls(params, **config.optimizer_defaults())

    # -- param groups -----------------------------------------------------------------------------

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        compress = param_group.get("compress")
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        check_param_group(group)
        zero.remember_params(self, group)  # DeepSpeed ZeRO later swaps them for flat partitions
        # a group may set its own options: check them as the constructor's
        group["momentum_dtype"] = momentum_dtype_name(group["momentum_dtype"])
        group["implementation"] = SlimAdamConfig(implementation=group["implementation"],
                                                 foreach=group["foreach"]).implementation
        names = group.get("param_names") or [f"params[{i}]" for i in range(len(group["params"]))]
        for p, name in zip(group["params"], names):
            check_momentum_dtype(group["momentum_dtype"], p, f"parameter {name!r}")
        n = len(group["params"])
        if compress is None:
            group.pop("compress", None)
            return
        compress = list(compress)
        if len(compress) != n:
            raise ValueError(
                f"param group 'compress' has {len(compress)} entries but the group has {n} params; "
                "give one spec (None, dims or split dict) per parameter"
            )
        names = group.get("param_names") or [f"params[{i}]" for i in range(n)]
        specs = [normalize_spec(spec, name) for spec, name in zip(compress, names)]
        for p, spec, name in zip(group["params"], specs, names):
            shape = logical_shape(p)  # ZeRO-3 zero.Init partitions: the weight's shape
            if spec is not None and len(shape) < 2:
                raise CompressSpecError(
                    f"parameter {name!r} is {len(shape)}-D; 1-D tensors (norms, biases) are never "
                    "compressed, give None for it"
                )
            segments(spec, shape, name)
        if any(spec is not None for spec in specs):
            group["compress"] = specs
        else:
            group.pop("compress", None)

    def _group_specs(self, group: dict[str, Any]) -> list[CompressSpec]:
        return group.get("compress") or [None] * len(group["params"])

    def _param_name(self, group: dict[str, Any], index: int) -> str:
        names = group.get("param_names")
        return names[index] if names else f"params[{index}] of group {self.param_groups.index(group)}"

    # -- step -------------------------------------------------------------------------------------

    def _init_state(
        self, p: Tensor, spec: CompressSpec, name: str, group: Optional[dict[str, Any]] = None
    ) -> dict[str, Tensor]:
        state = self.state[p]
        if not state:
            if group is None:
                group = next(g for g in self.param_groups if any(q is p for q in g["params"]))
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
            if group["momentum_dtype"] == "int8":
                check_momentum_dtype("int8", p, f"parameter {name!r}")
                state["exp_avg"], state["exp_avg_absmax"] = quant.empty_state(p)
            else:
                state["exp_avg"] = torch.zeros_like(
                    p, dtype=momentum_dtype_for(group["momentum_dtype"], p), memory_format=torch.preserve_format
                )
            state["exp_avg_sq"] = torch.zeros(
                second_moment_shape(spec, p.shape, name), dtype=second_moment_dtype(p.dtype), device=p.device
            )
            shape = factored.complement_shape(cached_segments(spec, p.shape, name), p.shape) if group["robust"] else None
            if shape is not None:
                state[factored.STATE_KEY] = torch.zeros(shape, dtype=second_moment_dtype(p.dtype), device=p.device)
        return state

    def _batch(self, group: dict[str, Any], sharded: bool) -> tuple[UpdateBatch, list[dtensor.LocalInputs]]:
        """The group's update inputs; DTensor parameters come as local shards with partial statistics."""
        batch, shards = UpdateBatch(), []
        for i, (p, spec) in enumerate(zip(group["params"], self._group_specs(group))):
            if p.grad is None:
                continue
            name = self._param_name(group, i)
            if p.grad.is_sparse:
                raise RuntimeError(
                    f"SlimAdamW does not support sparse gradients (parameter {name!r}); "
                    "use dense gradients, e.g. nn.Embedding(sparse=False)"
                )
            if sharded and is_dtensor(p):
                local = dtensor.local_inputs(
                    self, self.state[p], p, spec, name, momentum_dtype_for(group["momentum_dtype"], p), group["robust"]
                )
                shards.append(local)
                batch.add(local.param, local.grad, local.exp_avg, local.exp_avg_sq, local.step, local.segments,
                          local.stats, local.complement)
                if group["momentum_rounding"] == "stochastic":
                    batch.noise_offsets[-1] = dtensor.noise_offset(p, name)
                continue
            state = self._init_state(p, spec, name, group)
            segs = cached_segments(spec, p.shape, name)
            complement = state.get(factored.STATE_KEY)
            batch.add(p, p.grad, _first_moment(state, p), state["exp_avg_sq"], state["step"], segs,
                      complement=None if complement is None else factored.Complement.of(complement, segs, p.shape))
        return batch, shards

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None) -> Optional[float]:
        """Perform one optimization step.

        DTensor parameters (FSDP2, tensor parallel) are updated on their local shards after one batched
        all-reduce of their statistics (``optimizer.comm_stats`` records it; see
        :mod:`slimadam_hf.distributed.dtensor`); every parameter then takes the same update.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        # DeepSpeed ZeRO 1/2/3 flat partitions: statistics all-reduced (see slimadam_hf.distributed.zero)
        flat = zero.prepare_step(self, _flat_momentum_dtype)
        sharded = check_before_step(self) if flat is None else False
        batches = [self._batch(group, sharded) for group in self.param_groups] if flat is None else [
            (batch, []) for batch in flat.batches]
        if sharded:
            calls, nbytes = dtensor.all_reduce_statistics([s for _, shards in batches for s in shards])
            self.comm_stats = {"all_reduce_calls": calls, "all_reduce_bytes": nbytes}
        elif flat is not None:
            self.comm_stats = flat.comm_stats
        for group, (batch, shards) in zip(self.param_groups, batches):
            beta1, beta2 = group["betas"]
            shared = [item for local in shards for item in local.shared_blocks]
            if shared:  # int8 moments of 1-D weights cut by FSDP2: every block's scale over all ranks
                dtensor_int8.share_block_maxima(shared, _as_float(beta1))
            if not batch.params:
                continue
            slimadamw(
                batch.params,
                batch.grads,
                batch.exp_avgs,
                batch.exp_avg_sqs,
                batch.steps,
                batch.segments,
                second_moment_stats=batch.stats,
                rounding_seed=group["rounding_seed"] if group["momentum_rounding"] == "stochastic" else None,
                noise_offsets=batch.noise_offsets,
                exp_avg_sq_complements=batch.complements,
                implementation=_implementation(group),
                lr=_as_float(group["lr"]),
                beta1=_as_float(beta1),
                beta2=_as_float(beta2),
                eps=group["eps"],
                weight_decay=group["weight_decay"],
            )
        return loss

    # -- checkpoints ------------------------------------------------------------------------------

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a SlimAdamW (or torch AdamW) state dict; see :func:`slimadam_hf.optim.checkpoint.load_into`.

        The saved compress specs must match the live ones (a mismatch names the parameter); an AdamW
        second moment is averaged over the live dims; the first moment is converted to the live
        ``momentum_dtype`` (int8 codes are quantized or dequantized as needed).
        """
        from .checkpoint import load_into

        load_into(self, state_dict, super().load_state_dict)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("foreach", None)
            group["implementation"] = retire_implementation(group.get("implementation"))
            group.setdefault("momentum_dtype", None)
            group.setdefault("momentum_rounding", "nearest")
            group.setdefault("robust", False)
            group.setdefault("rounding_seed", 0)
