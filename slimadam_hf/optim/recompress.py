"""Compress a live SlimAdamW in place: switch full second moments to compress specs mid-run."""

from __future__ import annotations

import difflib
from typing import Any, Mapping

from ..core import factored
from ..core.compress_spec import CompressSpec, cached_segments, compress_second_moment, normalize_spec, segments
from ..distributed import zero
from ..distributed.guards import UnsupportedShardingError
from .optimizer import SlimAdamW, unwrap_optimizer


def _slim(optimizer: Any) -> SlimAdamW:
    opt = unwrap_optimizer(optimizer)
    if not isinstance(opt, SlimAdamW):
        raise TypeError(f"expected a SlimAdamW (possibly wrapped by accelerate), got {type(opt).__name__}")
    return opt


def compress_in_place(optimizer: Any, specs_by_name: Mapping[str, CompressSpec]) -> int:
    """Switch uncompressed parameters of a SlimAdamW to compress specs, averaging their state now.

    Each parameter named in ``specs_by_name`` with a non-``None`` spec must be uncompressed (its group
    has no spec for it); its ``exp_avg_sq`` (if the parameter has state) is replaced by its mean over
    the spec's dims (:func:`~slimadam_hf.core.compress_spec.compress_second_moment`; with ``robust`` also
    the mean over the other dims, :func:`~slimadam_hf.core.factored.complement_from_full`) and the old tensor
    is dropped. The groups' ``compress`` lists are updated (plain Python types; the key is left out when
    nothing in a group is compressed). The next steps are exactly those of a SlimAdamW built with these
    specs from the start whose state was averaged at this point. Everything is checked before anything
    changes. Groups must carry ``param_names`` (build the optimizer from ``(name, tensor)`` pairs).

    Returns:
        the bytes of second-moment state freed.
    """
    opt = _slim(optimizer)
    if zero.is_flattened(opt):
        raise UnsupportedShardingError(
            "compress_in_place (and auto-snr) cannot run under DeepSpeed ZeRO, whose flat partitions hold the "
            "state; measure SNR on a run without ZeRO (single process or DDP) and train with the rules it wrote"
        )
    located: dict[str, tuple[dict[str, Any], int]] = {}
    for group in opt.param_groups:
        names = group.get("param_names")
        if not names:
            raise ValueError(
                "compress_in_place needs parameter names in the param groups; build the SlimAdamW from "
                "(name, tensor) pairs (build_slimadam / build_auto_snr do)"
            )
        for i, name in enumerate(names):
            located[name] = (group, i)
    unknown = [n for n in specs_by_name if n not in located]
    if unknown:
        close = difflib.get_close_matches(unknown[0], list(located), n=3)
        raise KeyError(
            f"compress_in_place: parameter {unknown[0]!r} is not in this optimizer"
            + (f"; did you mean {', '.join(map(repr, close))}?" if close else "")
        )
    changes: list[tuple[dict[str, Any], int, str, CompressSpec]] = []
    for name, spec in specs_by_name.items():
        spec = normalize_spec(spec, name)
        if spec is None:
            continue
        group, i = located[name]
        p = group["params"][i]
        current = opt._group_specs(group)[i]
        if current is not None:
            raise ValueError(
                f"compress_in_place: parameter {name!r} is already compressed (spec {current!r}); only "
                "parameters with a full second moment can be switched"
            )
        if p.dim() < 2:
            raise ValueError(
                f"compress_in_place: parameter {name!r} is {p.dim()}-D; 1-D tensors are never compressed, "
                "give None for it"
            )
        segments(spec, p.shape, name)
        v = opt.state.get(p, {}).get("exp_avg_sq")
        if v is not None and tuple(v.shape) != tuple(p.shape):
            raise ValueError(
                f"compress_in_place: exp_avg_sq of {name!r} has shape {list(v.shape)}, not the parameter's "
                f"{list(p.shape)} (sharded optimizer state is not supported)"
            )
        changes.append((group, i, name, spec))
    freed = 0
    for group, i, name, spec in changes:
        p = group["params"][i]
        state = opt.state.get(p)
        if state and "exp_avg_sq" in state:
            old = state.pop("exp_avg_sq")
            state["exp_avg_sq"] = compress_second_moment(old, spec, name)
            freed += old.numel() * old.element_size() - state["exp_avg_sq"].numel() * state["exp_avg_sq"].element_size()
            if group["robust"]:  # the factored second moment's other mean, from the same full moment
                complement = factored.complement_from_full(old, cached_segments(spec, p.shape, name))
                if complement is not None:
                    state[factored.STATE_KEY] = complement
                    freed -= complement.numel() * complement.element_size()
            del old
        specs = list(opt._group_specs(group))
        specs[i] = spec
        group["compress"] = specs
    for group in opt.param_groups:
        if "compress" in group and all(s is None for s in group["compress"]):
            del group["compress"]
    return freed
