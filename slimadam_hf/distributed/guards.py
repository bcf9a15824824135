"""Refusal of flat-shard backends SlimAdamW cannot map back to whole weights.

FSDP1 gives the optimizer flat 1-D shards that mix many weights with no record of where each weight
sits; the second moment of a weight cannot be averaged over its rows or columns there.
:func:`check_param_group` (at creation) and :func:`check_before_step` (each step) raise
:class:`UnsupportedShardingError` naming the backend and the supported alternatives instead of running
uncompressed or wrong. DeepSpeed ZeRO 1/2/3 flat partitions are mapped back to their weights by
:mod:`slimadam_hf.distributed.zero` before these checks run; what still reaches them is refused.
"""

from __future__ import annotations

import sys
import weakref
from typing import Any, Optional

from torch import Tensor

# Per-optimizer cache, kept off the optimizer so that pickling or deep-copying it is unaffected.
_CHECKED_GROUPS: "weakref.WeakKeyDictionary[Any, tuple]" = weakref.WeakKeyDictionary()

SUPPORTED_ALTERNATIVES = (
    "Use FSDP2 instead (torch.distributed.fsdp.fully_shard; accelerate/Trainer fsdp_version: 2), "
    "DeepSpeed ZeRO 1/2/3, or DDP; see docs/distributed.md"
)


_UNKNOWN_FLATTENER = (
    "a wrapper that flattens parameters (FSDP1, or DeepSpeed ZeRO with step() called outside engine.step())"
)


class UnsupportedShardingError(RuntimeError):
    """SlimAdamW was handed flat parameter shards (FSDP1, an unsupported DeepSpeed setting) it cannot compress."""


# -- detection of flat-shard backends ------------------------------------------------------------


def _dtensor_type() -> Optional[type]:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed
        return None
    return DTensor


def is_dtensor(tensor: Any) -> bool:
    """Whether ``tensor`` is a ``torch.distributed.tensor.DTensor`` (FSDP2 / tensor parallel)."""
    cls = _dtensor_type()
    return cls is not None and isinstance(tensor, cls)


def logical_shape(param: Tensor) -> tuple[int, ...]:
    """The shape of the weight ``param`` stands for: ``ds_shape`` for a DeepSpeed ZeRO-3 partitioned
    parameter (built under ``deepspeed.zero.Init``; its local tensor is empty), else its own shape."""
    ds_shape = getattr(param, "ds_shape", None)
    return tuple(int(s) for s in (ds_shape if ds_shape is not None else param.shape))


def flat_backend(param: Tensor, name: Optional[str] = None) -> Optional[str]:
    """The backend that turned ``param`` into a flat shard, or ``None`` for a per-tensor parameter.

    Recognizes FSDP1 ``FlatParameter`` s (``use_orig_params=False``) and FSDP1 original-parameter views
    (``use_orig_params=True``: flattened 1-D shards, ``_fsdp_wrapped_module`` in their names).
    DeepSpeed ZeRO-3 partitioned parameters (``ds_shape`` / ``ds_id``) are per-tensor: they keep their
    shape in ``ds_shape`` (:func:`logical_shape`).
    """
    if getattr(param, "_is_flat_param", False) or (name is not None and name.endswith("_flat_param")):
        return "FSDP1 (FullyShardedDataParallel)"
    if not is_dtensor(param) and (
        getattr(param, "_fsdp_flattened", False) or (name is not None and "_fsdp_wrapped_module" in name)
    ):
        return "FSDP1 (FullyShardedDataParallel)"
    return None


def _flattening_caller() -> Optional[str]:
    """Name the DeepSpeed optimizer wrapper that called ``step()``, if any (it swaps in flat tensors)."""
    frame = sys._getframe(1)
    while frame is not None:
        owner = frame.f_locals.get("self")
        module = type(owner).__module__ if owner is not None else ""
        if module.startswith("deepspeed."):
            cls = type(owner).__name__
            if "Stage3" in cls:
                return "DeepSpeed ZeRO stage 3"
            if cls == "DeepSpeedZeroOptimizer":
                return f"DeepSpeed ZeRO stage {2 if getattr(owner, 'partition_gradients', False) else 1}"
            if "Optimizer" in cls:
                return f"DeepSpeed ({cls}, flat master weights)"
        frame = frame.f_back
    return None


def _flat_error(backend: str, what: str) -> UnsupportedShardingError:
    return UnsupportedShardingError(
        f"SlimAdamW cannot run under {backend}: {what}. SlimAdam averages each weight's second moment "
        "over that weight's rows or columns, which is impossible on flat shards that mix many weights "
        f"(it would silently run uncompressed or wrong). {SUPPORTED_ALTERNATIVES}."
    )


def check_param_group(group: dict[str, Any]) -> None:
    """Raise :class:`UnsupportedShardingError` if a new param group holds FSDP1 flat shards."""
    names = group.get("param_names")
    for i, p in enumerate(group["params"]):
        name = names[i] if names else None
        backend = flat_backend(p, name)
        if backend is not None:
            label = repr(name) if name else f"params[{i}]"
            raise _flat_error(backend, f"parameter {label} is a flat shard of shape {list(p.shape)}")


def check_before_step(optimizer: Any) -> bool:
    """Raise if a wrapper swapped the param groups' tensors for flat shards; whether any is a DTensor.

    DeepSpeed ZeRO 1/2/3 replace every group's ``params`` with one flat partition after the optimizer
    was built (handled by :mod:`slimadam_hf.distributed.zero` before this check; what reaches it, e.g.
    a flattening wrapper that is not DeepSpeed, is refused); accelerate swaps in FSDP2's DTensors. The
    check reruns only when a group's params list changed.
    """
    key = tuple((id(g["params"]), len(g["params"])) for g in optimizer.param_groups)
    cached = _CHECKED_GROUPS.get(optimizer)
    if cached is not None and cached[0] == key:
        return cached[1]
    for index, group in enumerate(optimizer.param_groups):
        params, names, compress = group["params"], group.get("param_names"), group.get("compress")
        expected = len(compress) if compress is not None else len(names) if names else len(params)
        if len(params) != expected:
            backend = _flattening_caller() or _UNKNOWN_FLATTENER
            shapes = [list(p.shape) for p in params]
            raise _flat_error(
                backend,
                f"param group {index} was built with {expected} per-tensor parameters, but now holds "
                f"{len(params)} flat tensor(s) of shape(s) {shapes}",
            )
        check_param_group(group)
        for i, (p, spec) in enumerate(zip(params, compress or ())):
            if spec is not None and p.dim() < 2:
                backend = _flattening_caller() or _UNKNOWN_FLATTENER
                label = repr(names[i]) if names else f"params[{i}]"
                raise _flat_error(
                    backend, f"parameter {label} of group {index} is now a flat shard of shape {list(p.shape)}"
                )
    sharded = has_dtensor_params(optimizer)
    _CHECKED_GROUPS[optimizer] = (key, sharded)
    return sharded


def has_dtensor_params(optimizer: Any) -> bool:
    """Whether any param group holds a DTensor (FSDP2 / tensor parallel) parameter."""
    return any(is_dtensor(p) for group in optimizer.param_groups for p in group["params"])
