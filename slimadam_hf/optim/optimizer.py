"""``SlimAdamW``: AdamW whose second moment is averaged over chosen dims of each parameter."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional

import torch
from torch import Tensor
from torch.optim import Optimizer

from ..core.compress_spec import (
    CompressSpec,
    CompressSpecError,
    Segment,
    cached_segments,
    compress_second_moment,
    normalize_spec,
    second_moment_dtype,
    second_moment_shape,
    segments,
)
from ..core.functional import slimadamw
from ..core.options import SlimAdamConfig, momentum_dtype_for, momentum_dtype_name
from ..distributed import dtensor, zero
from ..distributed.guards import check_before_step, check_param_group, is_dtensor, logical_shape

logger = logging.getLogger(__name__)


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
    if group["implementation"] is not None:
        return group["implementation"]
    return "reference" if group["foreach"] is False else "foreach"


# group options the live optimizer keeps when loading a checkpoint
_LIVE_OPTIONS = ("implementation", "momentum_dtype", "foreach")


@dataclass
class _Batch:
    """The inputs of one param group's update, aligned lists (see :func:`slimadamw`)."""

    params: list[Tensor] = field(default_factory=list)
    grads: list[Tensor] = field(default_factory=list)
    exp_avgs: list[Tensor] = field(default_factory=list)
    exp_avg_sqs: list[Tensor] = field(default_factory=list)
    steps: list[Tensor] = field(default_factory=list)
    segments: list[tuple[Segment, ...]] = field(default_factory=list)
    stats: list[Optional[list[Tensor]]] = field(default_factory=list)

    def add(self, param, grad, exp_avg, exp_avg_sq, step, segs, stats=None) -> None:  # noqa: ANN001
        for seq, value in zip(
            (self.params, self.grads, self.exp_avgs, self.exp_avg_sqs, self.steps, self.segments, self.stats),
            (param, grad, exp_avg, exp_avg_sq, step, segs, stats),
        ):
            seq.append(value)


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
        foreach: ``True``/``None`` use the batched multi-tensor implementation, ``False`` the plain
            per-tensor reference (kept for compatibility; ``implementation`` says more).
        implementation: ``"foreach"`` (eager, batched ``torch._foreach_*`` kernels; the default),
            ``"compiled"`` (``torch.compile``-d fused kernels, fastest, compiles on first step; needs a
            C++ compiler on CPU or Triton on GPU) or ``"reference"`` (plain per-tensor loop).
        momentum_dtype: dtype of the first moment ``exp_avg``: ``None`` (the parameter's dtype) or e.g.
            ``torch.bfloat16`` / ``"bfloat16"`` (half the first-moment memory; updated in float32
            and rounded to nearest).

    With no compression the update is exactly ``torch.optim.AdamW`` (``amsgrad=False``).
    State per parameter: ``step``, ``exp_avg`` (parameter shape; parameter dtype or ``momentum_dtype``) and ``exp_avg_sq``
    (compressed; float32, or float64 for float64 parameters), created lazily on the first ``step()``.
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
    ) -> None:
        config = SlimAdamConfig(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, foreach=foreach,
            implementation=implementation, momentum_dtype=momentum_dtype,
        )
        super().__init__(params, config.optimizer_defaults())

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
        SlimAdamConfig(implementation=group["implementation"], foreach=group["foreach"])
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
            state["exp_avg"] = torch.zeros_like(
                p, dtype=momentum_dtype_for(group["momentum_dtype"], p), memory_format=torch.preserve_format
            )
            state["exp_avg_sq"] = torch.zeros(
                second_moment_shape(spec, p.shape, name), dtype=second_moment_dtype(p.dtype), device=p.device
            )
        return state

    def _batch(self, group: dict[str, Any], sharded: bool) -> tuple[_Batch, list[dtensor.LocalInputs]]:
        """The group's update inputs; DTensor parameters come as local shards with partial statistics."""
        batch, shards = _Batch(), []
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
                    self, self.state[p], p, spec, name, momentum_dtype_for(group["momentum_dtype"], p)
                )
                shards.append(local)
                batch.add(local.param, local.grad, local.exp_avg, local.exp_avg_sq, local.step, local.segments,
                          local.stats)
                continue
            state = self._init_state(p, spec, name, group)
            batch.add(p, p.grad, state["exp_avg"], state["exp_avg_sq"], state["step"],
                      cached_segments(spec, p.shape, name))
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
        flat = zero.prepare_step(self, lambda group, p: momentum_dtype_for(group["momentum_dtype"], p))
        sharded = check_before_step(self) if flat is None else False
        batches = [self._batch(group, sharded) for group in self.param_groups] if flat is None else [
            (batch, []) for batch in flat.batches]
        if sharded:
            calls, nbytes = dtensor.all_reduce_statistics([s for _, shards in batches for s in shards])
            self.comm_stats = {"all_reduce_calls": calls, "all_reduce_bytes": nbytes}
        elif flat is not None:
            self.comm_stats = flat.comm_stats
        for group, (batch, _) in zip(self.param_groups, batches):
            if not batch.params:
                continue
            beta1, beta2 = group["betas"]
            slimadamw(
                batch.params,
                batch.grads,
                batch.exp_avgs,
                batch.exp_avg_sqs,
                batch.steps,
                batch.segments,
                second_moment_stats=batch.stats,
                # compiled kernels are per weight; a flat partition runs the eager batched update
                implementation="foreach" if flat is not None and _implementation(group) == "compiled"
                else _implementation(group),
                lr=_as_float(group["lr"]),
                beta1=_as_float(beta1),
                beta2=_as_float(beta2),
                eps=group["eps"],
                weight_decay=group["weight_decay"],
            )
        return loss

    # -- checkpoints ------------------------------------------------------------------------------

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a SlimAdamW (or AdamW) state dict.

        The saved compress specs must match the live ones; a mismatch raises an error naming the
        parameter. ``implementation`` and ``momentum_dtype`` stay the live optimizer's; ``exp_avg`` is
        cast to the live ``momentum_dtype``. An AdamW state dict (no ``compress`` in its groups, full ``exp_avg_sq``) is converted
        by averaging each second moment over the live spec's dims. Second moments keep their float32 (or wider) dtype.
        """
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(
                f"loaded state dict has {len(saved_groups)} param groups, this SlimAdamW has "
                f"{len(self.param_groups)}"
            )
        second_moments: dict[Any, Tensor] = {}
        state = {k: dict(v) for k, v in state_dict["state"].items()}
        converted = 0
        for live, saved in zip(self.param_groups, saved_groups):
            live_specs = self._group_specs(live)
            from_adamw = "amsgrad" in saved  # a torch.optim.AdamW group
            saved_specs = saved.get("compress") or [None] * len(saved["params"])
            if len(saved["params"]) != len(live["params"]):
                raise ValueError(
                    f"loaded param group has {len(saved['params'])} params, the live one has "
                    f"{len(live['params'])}"
                )
            for i, (key, p) in enumerate(zip(saved["params"], live["params"])):
                name = self._param_name(live, i)
                live_spec = normalize_spec(live_specs[i], name)
                saved_spec = normalize_spec(saved_specs[i], name)
                v = state.get(key, {}).pop("exp_avg_sq", None)
                if v is None:
                    continue
                if live_spec != saved_spec:
                    if from_adamw and tuple(v.shape) == tuple(p.shape):
                        v = compress_second_moment(v, live_spec, name)
                        converted += 1
                    else:
                        raise ValueError(
                            f"checkpoint does not match the compression plan for parameter {name!r}: "
                            f"saved compress spec {saved_spec!r}, live spec {live_spec!r}. Load it with "
                            "the preset/overrides it was trained with, or start the optimizer fresh."
                        )
                expected = second_moment_shape(live_spec, p.shape, name)
                if tuple(v.shape) != tuple(expected):
                    raise ValueError(
                        f"checkpoint exp_avg_sq for parameter {name!r} has shape {list(v.shape)}, "
                        f"expected {list(expected)} for compress spec {live_spec!r}"
                    )
                second_moments[key] = v
        if converted:
            logger.info(
                "SlimAdamW: converted %d full AdamW second moments by averaging over the plan's dims",
                converted,
            )
        groups = []
        # torch casts floating state to the parameter dtype: set the moments aside and re-cast them after.
        first_moments: dict[Any, Tensor] = {}
        live_param_of: dict[Any, tuple[dict[str, Any], Tensor]] = {}
        for live, saved in zip(self.param_groups, saved_groups):
            group = {k: v for k, v in saved.items() if k in live and k != "compress"}
            if "compress" in live:
                group["compress"] = live["compress"]
            # compute choices belong to the live optimizer, not to the checkpoint
            for key in _LIVE_OPTIONS:
                group[key] = live[key]
            groups.append(group)
            for key, p in zip(saved["params"], live["params"]):
                live_param_of[key] = (live, p)
                m = state.get(key, {}).pop("exp_avg", None) if live["momentum_dtype"] is not None else None
                if m is not None:
                    first_moments[key] = m
        super().load_state_dict({"state": state, "param_groups": groups})
        for key, v in second_moments.items():
            _, p = live_param_of[key]
            self.state[p]["exp_avg_sq"] = v.to(dtype=second_moment_dtype(p.dtype), device=p.device)
        for key, m in first_moments.items():
            live, p = live_param_of[key]
            self.state[p]["exp_avg"] = m.to(dtype=momentum_dtype_for(live["momentum_dtype"], p), device=p.device)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("foreach", None)
            group.setdefault("implementation", None)
            group.setdefault("momentum_dtype", None)
