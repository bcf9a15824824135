"""Loading a checkpoint into a live ``SlimAdamW``: plan checks and conversions of both moments.

* Second moments: the saved compress spec must equal the live one (else an error naming the parameter);
  a torch AdamW checkpoint's full second moment is averaged over the live dims.
* First moments follow the live ``momentum_dtype``: float values are cast, int8 codes are dequantized for a
  float live optimizer, and a float moment is quantized for an int8 live optimizer. int8 codes whose block
  layout does not fit the parameter cannot be converted and are refused.
* ``robust`` is the live optimizer's too: a saved ``exp_avg_sq_complement`` is kept (shape checked) or, for
  a live ``robust=False``, dropped; one a checkpoint lacks is made from its second moment
  (:func:`~slimadam_hf.core.factored.complement_from_full` for AdamW's, each segment's mean otherwise).
* ``implementation``, ``momentum_dtype`` and ``foreach`` stay the live optimizer's.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Optional

import torch
from torch import Tensor

from ..core import factored, quant
from ..core.compress_spec import (
    cached_segments,
    compress_second_moment,
    normalize_spec,
    second_moment_dtype,
    second_moment_shape,
)
from ..core.options import check_momentum_dtype, momentum_dtype_for, retire_implementation
from ..distributed.guards import is_dtensor
from ..distributed.zero import LAYOUT_KEY as ZERO_LAYOUT_KEY

logger = logging.getLogger(__name__)

# group options the live optimizer keeps when loading a checkpoint
LIVE_OPTIONS = ("implementation", "momentum_dtype", "momentum_rounding", "robust", "foreach")


def _complement(saved: Optional[Tensor], full: Optional[Tensor], v: Tensor, p: Tensor, spec: Any,
                name: str) -> Optional[Tensor]:
    """The live ``exp_avg_sq_complement`` of a robust optimizer from what the checkpoint holds."""
    segs = cached_segments(spec, p.shape, name)
    expected = factored.complement_shape(segs, p.shape)
    if saved is not None:
        if expected is None or tuple(saved.shape) != tuple(expected):
            raise ValueError(
                f"checkpoint {factored.STATE_KEY} of parameter {name!r} has shape {list(saved.shape)}, expected "
                f"{None if expected is None else list(expected)} for compress spec {spec!r}; it was saved for "
                "another plan: start the optimizer fresh"
            )
        return saved
    if full is not None:
        return factored.complement_from_full(full.to(second_moment_dtype(full.dtype)), segs)
    return factored.complement_from_compressed(v, segs, p.shape)


def _second_moments(
    optimizer: Any, saved_groups: list, state: dict
) -> tuple[dict[Any, Tensor], dict[Any, Tensor]]:
    """Saved second moments (and robust complements) by state key, checked against (or converted to) the
    live plan."""
    moments: dict[Any, Tensor] = {}
    complements: dict[Any, Tensor] = {}
    converted = derived = 0
    for live, saved in zip(optimizer.param_groups, saved_groups):
        live_specs = optimizer._group_specs(live)
        from_adamw = "amsgrad" in saved  # a torch.optim.AdamW group
        saved_specs = saved.get("compress") or [None] * len(saved["params"])
        if len(saved["params"]) != len(live["params"]):
            raise ValueError(
                f"loaded param group has {len(saved['params'])} params, the live one has {len(live['params'])}"
            )
        for i, (key, p) in enumerate(zip(saved["params"], live["params"])):
            name = optimizer._param_name(live, i)
            live_spec = normalize_spec(live_specs[i], name)
            saved_spec = normalize_spec(saved_specs[i], name)
            v = state.get(key, {}).pop("exp_avg_sq", None)
            saved_complement = state.get(key, {}).pop(factored.STATE_KEY, None)
            if v is None:
                continue
            full = None
            if live_spec != saved_spec:
                if not (from_adamw and tuple(v.shape) == tuple(p.shape)):
                    raise ValueError(
                        f"checkpoint does not match the compression plan for parameter {name!r}: "
                        f"saved compress spec {saved_spec!r}, live spec {live_spec!r}. Load it with "
                        "the preset/overrides it was trained with, or start the optimizer fresh."
                    )
                full, v = v, compress_second_moment(v, live_spec, name)
                converted += 1
            expected = second_moment_shape(live_spec, p.shape, name)
            if tuple(v.shape) != tuple(expected):
                raise ValueError(
                    f"checkpoint exp_avg_sq for parameter {name!r} has shape {list(v.shape)}, "
                    f"expected {list(expected)} for compress spec {live_spec!r}"
                )
            moments[key] = v
            if live["robust"]:
                complement = _complement(saved_complement, full, v, p, live_spec, name)
                if complement is not None:
                    complements[key] = complement
                    if saved_complement is None and full is None:  # a robust=False SlimAdamW checkpoint
                        derived += 1
    if converted:
        logger.info("SlimAdamW: converted %d full AdamW second moments by averaging over the plan's dims", converted)
    if derived:
        logger.warning(
            "SlimAdamW: the checkpoint was saved with robust=False; resuming with robust=True (given, or the "
            "preset's default, as for bert) from %d complements made from its second moments. Pass robust=false "
            "to go on with the paper's update", derived)
    return moments, complements


def _first_moment(saved: Tensor, absmax: Optional[Tensor], param: Tensor, live_dtype: Optional[str],
                  name: str) -> dict[str, Tensor]:
    """The live state entries for a saved first moment (``exp_avg`` and, for int8, ``exp_avg_absmax``)."""
    if absmax is not None:  # saved as int8 codes
        blocks = quant.num_blocks(param.shape)
        if live_dtype == "int8" and is_dtensor(saved):  # an FSDP2 sharded state: dtensor_int8 lays it out
            return {"exp_avg": saved, "exp_avg_absmax": absmax}
        laid_out = None if is_dtensor(saved) else quant.row_blocks(saved, absmax, tuple(param.shape))
        if laid_out is not None:
            saved, scales = laid_out
            if live_dtype == "int8":
                return {"exp_avg": saved.to(param.device), "exp_avg_absmax": scales.to(param.device)}
            saved = quant.dequantize(saved, scales, param.shape)
        elif (saved.dtype == torch.int8 and tuple(saved.shape) == (quant.flat_num_blocks(param.shape), quant.BLOCK)
              and absmax.numel() == saved.shape[0]):  # the earlier flat layout: read, then stored anew
            saved = quant.dequantize_flat(saved, absmax.float().view(-1, 1), param.shape)
        else:
            raise ValueError(
                f"checkpoint exp_avg of parameter {name!r} is int8 codes of shape {list(saved.shape)} with "
                f"{absmax.numel()} scales, which cannot hold this parameter ({param.numel()} values need "
                f"{blocks} blocks of {quant.BLOCK}); it was saved for another model or version and cannot be "
                "converted: start the optimizer fresh"
            )
    if tuple(saved.shape) != tuple(param.shape):
        raise ValueError(
            f"checkpoint exp_avg of parameter {name!r} has shape {list(saved.shape)}, the parameter "
            f"{list(param.shape)}; it cannot be converted"
        )
    if live_dtype == "int8":
        check_momentum_dtype("int8", param, f"parameter {name!r}")
        codes, scales = quant.empty_state(param)
        quant.QuantizedMomentum(codes, scales, param.shape).store_(saved.float().clone())
        return {"exp_avg": codes.to(param.device), "exp_avg_absmax": scales.to(param.device)}
    return {"exp_avg": saved.to(dtype=momentum_dtype_for(live_dtype, param), device=param.device)}


def load_into(optimizer: Any, state_dict: dict[str, Any], load: Callable[[dict[str, Any]], None]) -> None:
    """Load ``state_dict`` into the live ``optimizer``; ``load`` is ``torch.optim.Optimizer.load_state_dict``."""
    saved_groups = state_dict["param_groups"]
    if len(saved_groups) != len(optimizer.param_groups):
        raise ValueError(
            f"loaded state dict has {len(saved_groups)} param groups, this SlimAdamW has "
            f"{len(optimizer.param_groups)}"
        )
    state = {k: dict(v) for k, v in state_dict["state"].items()}
    second_moments, complements = _second_moments(optimizer, saved_groups, state)
    # torch casts floating state to the parameter dtype: set the first moments aside and convert them after.
    first_moments: dict[Any, tuple[Tensor, Optional[Tensor]]] = {}
    as_saved: dict[Any, dict[str, Optional[Tensor]]] = {}  # a ZeRO partition's int8 codes and scales
    live_of: dict[Any, tuple[dict[str, Any], Tensor, str]] = {}
    groups = []
    for live, saved in zip(optimizer.param_groups, saved_groups):
        group = {k: v for k, v in saved.items() if k in live and k != "compress"}
        if "compress" in live:
            group["compress"] = live["compress"]
        retire_implementation(saved.get("implementation"))  # a notice for a checkpoint of a retired path
        for key in LIVE_OPTIONS:  # compute choices belong to the live optimizer, not to the checkpoint
            group[key] = live[key]
        groups.append(group)
        for i, (key, p) in enumerate(zip(saved["params"], live["params"])):
            live_of[key] = (live, p, optimizer._param_name(live, i))
            entry = state.get(key, {})
            m = entry.pop("exp_avg", None)
            absmax = entry.pop("exp_avg_absmax", None)
            if ZERO_LAYOUT_KEY in entry and (absmax is not None or live["momentum_dtype"] == "int8"):
                as_saved[key] = {"exp_avg": m, "exp_avg_absmax": absmax}  # distributed/zero.py checks them
            elif m is not None:
                first_moments[key] = (m, absmax)
    load({"state": state, "param_groups": groups})
    for key, v in second_moments.items():
        _, p, _ = live_of[key]
        optimizer.state[p]["exp_avg_sq"] = v.to(dtype=second_moment_dtype(p.dtype), device=p.device)
    for key, w in complements.items():
        _, p, _ = live_of[key]
        optimizer.state[p][factored.STATE_KEY] = w.to(dtype=second_moment_dtype(p.dtype), device=p.device)
    for key, (m, absmax) in first_moments.items():
        live, p, name = live_of[key]
        optimizer.state[p].update(_first_moment(m, absmax, p, live["momentum_dtype"], name))
    for key, entries in as_saved.items():
        p = live_of[key][1]
        optimizer.state[p].update({k: t.to(p.device) for k, t in entries.items() if t is not None})
