"""Compress specs: how one parameter's second moment is averaged.

A spec is one of

* ``None``: full second moment, exactly AdamW;
* a tuple of dims, e.g. ``(1,)``: ``v`` is averaged over those dims (kept with size 1);
* a split spec for fused weights, a plain dict
  ``{"split_dim": 0, "sizes": [q, k, v], "dims": [[1], [1], [0]]}``: the tensor is cut along
  ``split_dim`` into parts of ``sizes``, and each part has its own dims (a list, or ``None``).

Specs live in optimizer param groups, so they hold only plain Python types and never empty
containers (``torch.load(weights_only=True)`` and FSDP2 full-state-dict loading must round-trip them).
The second moment of a split parameter is one flat float32 tensor holding every part's compressed
moment, one after the other.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence, Union

import torch

Dims = tuple[int, ...]
SplitSpec = dict[str, Any]
CompressSpec = Union[None, Dims, SplitSpec]

SPLIT_KEYS = ("split_dim", "sizes", "dims")


class CompressSpecError(ValueError):
    """A compress spec that does not fit its parameter."""


@dataclass(frozen=True)
class Segment:
    """One independently compressed piece of a parameter: the whole tensor, or one part of a split."""

    split_dim: int | None
    offset: int
    size: int
    dims: Dims | None
    v_offset: int
    v_shape: tuple[int, ...]
    v_box: tuple[tuple[int, int, int], ...] = ()
    """Narrows ``(dim, start, length)`` from the segment's second moment to the entries this tensor's
    slice uses; empty except when a rank holds only part of a segment (sharded or flat-partitioned weights)."""
    window: tuple[int, tuple[int, ...]] | None = None
    """``(start, shape)``: the segment lives in a 1-D tensor (a DeepSpeed ZeRO flat partition) as the
    box ``tensor.narrow(0, start, prod(shape)).view(shape)``, narrowed further by ``split_dim``. Its
    second moment is then always ``exp_avg_sq.narrow(0, v_offset, v_numel).view(v_shape)``."""
    shares_v: bool = False
    """Another segment earlier in the same list already updates this second moment in the step (a
    weight cut into several boxes): this one only reads it for its own slice's denominator."""

    @property
    def v_numel(self) -> int:
        return math.prod(self.v_shape)

    def view(self, tensor: torch.Tensor) -> torch.Tensor:
        """This segment's slice of a parameter-shaped tensor (param, grad or first moment)."""
        if self.window is not None:
            start, shape = self.window
            tensor = tensor.narrow(0, start, math.prod(shape)).view(shape)
        if self.split_dim is None:
            return tensor
        return tensor.narrow(self.split_dim, self.offset, self.size)

    def second_moment_view(self, exp_avg_sq: torch.Tensor) -> torch.Tensor:
        """This segment's compressed second moment, inside the parameter's ``exp_avg_sq``."""
        if self.split_dim is None and self.window is None:
            return exp_avg_sq
        return exp_avg_sq.narrow(0, self.v_offset, self.v_numel).view(self.v_shape)

    def denominator_view(self, second_moment: torch.Tensor) -> torch.Tensor:
        """The entries of this segment's second moment that scale :meth:`view` of the parameter."""
        for dim, start, length in self.v_box:
            second_moment = second_moment.narrow(dim, start, length)
        return second_moment


def parse_dims(
    value: Any, where: str = "dims", *, shape: Sequence[int] | None = None, error: type[ValueError] = CompressSpecError
) -> Dims | None:
    """The one reader of dims: ``None``, an int, a list/tuple of ints, or text such as ``"(0, 1)"``,
    ``"[1]"`` or ``"0,1"`` (the SNR CSV's ``compress_dims``) -> a sorted tuple without repeats.

    With ``shape`` the dims are checked against a tensor of that shape and negative ones resolved.
    Errors are ``error`` (a ``ValueError``) naming ``where`` and the fix.
    """
    if value is None:
        return None
    if isinstance(value, str):
        body = value.strip().strip("()[]").strip()
        try:
            value = [int(part) for part in body.split(",") if part.strip()]
        except ValueError:
            raise error(f"{where}: dims {value!r} are not a list of ints such as '(0,)' or '(0, 1)'") from None
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value,)
    if not isinstance(value, (list, tuple)) or not all(isinstance(d, int) and not isinstance(d, bool) for d in value):
        raise error(f"{where}: dims must be null or a list of ints, got {value!r}")
    if len(value) == 0:
        raise error(f"{where}: dims must not be empty; use null (None) for a full second moment")
    if shape is not None:
        ndim = len(shape)
        bad = [d for d in value if not -ndim <= d < ndim]
        if bad:
            raise error(
                f"{where}: dims {list(value)} out of range for shape {list(shape)} (valid dims are "
                f"0..{ndim - 1}); fix the rule or the explicit dims"
            )
        value = [d % ndim for d in value]
    return tuple(sorted(set(int(d) for d in value)))


def normalize_spec(spec: Any, name: str = "?") -> CompressSpec:
    """Canonical form of a spec: lists become tuples of sorted dims; a split keeps plain lists.

    Accepts what a checkpoint round trip can produce (tuples turned into lists).
    """
    if spec is None:
        return None
    if isinstance(spec, dict):
        unknown = set(spec) - set(SPLIT_KEYS)
        missing = [k for k in SPLIT_KEYS if k not in spec]
        if unknown or missing:
            raise CompressSpecError(
                f"parameter {name!r}: a split spec needs exactly the keys {list(SPLIT_KEYS)}; "
                f"missing {missing}, unknown {sorted(unknown)}"
            )
        sizes = [int(s) for s in spec["sizes"]]
        part_dims = [parse_dims(d, f"parameter {name!r}") for d in spec["dims"]]
        if len(sizes) != len(part_dims) or not sizes:
            raise CompressSpecError(
                f"parameter {name!r}: split spec has {len(sizes)} sizes but {len(part_dims)} dims entries"
            )
        return {
            "split_dim": int(spec["split_dim"]),
            "sizes": sizes,
            "dims": [None if d is None else list(d) for d in part_dims],
        }
    return parse_dims(spec, f"parameter {name!r}")


def specs_equal(a: Any, b: Any) -> bool:
    """Whether two specs mean the same compression (list vs tuple and dim order ignored)."""
    return normalize_spec(a) == normalize_spec(b)


def _reduced_shape(shape: Sequence[int], dims: Dims | None) -> tuple[int, ...]:
    if dims is None:
        return tuple(shape)
    return tuple(1 if i in dims else s for i, s in enumerate(shape))


def segments(spec: CompressSpec, shape: Sequence[int], name: str = "?") -> list[Segment]:
    """Validate ``spec`` against a parameter ``shape`` and cut it into segments."""
    shape = tuple(int(s) for s in shape)
    spec = normalize_spec(spec, name)
    if not isinstance(spec, dict):
        if spec is not None:
            spec = parse_dims(spec, f"parameter {name!r}: compress", shape=shape)
        return [Segment(None, 0, shape[0] if shape else 1, spec, 0, _reduced_shape(shape, spec))]

    split_dim = spec["split_dim"]
    (split_dim,) = parse_dims(split_dim, f"parameter {name!r}: split", shape=shape)
    if sum(spec["sizes"]) != shape[split_dim]:
        raise CompressSpecError(
            f"parameter {name!r}: split sizes {spec['sizes']} add up to {sum(spec['sizes'])}, but dim "
            f"{split_dim} of shape {list(shape)} has {shape[split_dim]}; the part sizes come from the "
            f"model config, check the preset's split for this parameter"
        )
    result, offset, v_offset = [], 0, 0
    for size, dims in zip(spec["sizes"], spec["dims"]):
        dims = parse_dims(dims, f"parameter {name!r}: split part", shape=shape)
        part_shape = shape[:split_dim] + (size,) + shape[split_dim + 1 :]
        v_shape = _reduced_shape(part_shape, dims)
        result.append(Segment(split_dim, offset, size, dims, v_offset, v_shape))
        offset += size
        v_offset += math.prod(v_shape)
    return result


_SEGMENTS_BY_SPEC_AND_SHAPE: dict[tuple, tuple[Segment, ...]] = {}


def _spec_key(spec: CompressSpec) -> Any:
    if isinstance(spec, dict):
        dims = tuple(None if d is None else tuple(d) for d in spec["dims"])
        return ("split", spec["split_dim"], tuple(spec["sizes"]), dims)
    return None if spec is None else tuple(spec)


def cached_segments(spec: CompressSpec, shape: Sequence[int], name: str = "?") -> tuple[Segment, ...]:
    """:func:`segments` memoized by (spec, shape): the optimizer asks for them on every step."""
    key = (_spec_key(spec), tuple(shape))
    segs = _SEGMENTS_BY_SPEC_AND_SHAPE.get(key)
    if segs is None:
        segs = _SEGMENTS_BY_SPEC_AND_SHAPE[key] = tuple(segments(spec, shape, name))
    return segs


def second_moment_dtype(param_dtype: torch.dtype) -> torch.dtype:
    """float32 for half-precision parameters, the parameter's own dtype when it is wider."""
    return torch.promote_types(param_dtype, torch.float32)


def second_moment_shape(spec: CompressSpec, shape: Sequence[int], name: str = "?") -> tuple[int, ...]:
    """Shape of ``exp_avg_sq`` for a parameter of ``shape`` under ``spec``."""
    segs = segments(spec, shape, name)
    if segs[0].split_dim is None:
        return segs[0].v_shape
    return (sum(s.v_numel for s in segs),)


def second_moment_numel(spec: CompressSpec, shape: Sequence[int], name: str = "?") -> int:
    """How many second-moment entries a parameter keeps."""
    return math.prod(second_moment_shape(spec, shape, name))


def compress_second_moment(
    full: torch.Tensor, spec: CompressSpec, name: str = "?"
) -> torch.Tensor:
    """Average a full, parameter-shaped second moment down to ``spec`` (at least float32).

    Used to switch a run from AdamW to SlimAdamW, or to compress in place after an SNR probe.
    """
    full = full.to(second_moment_dtype(full.dtype))
    segs = segments(spec, full.shape, name)
    averaged = [
        seg.view(full) if seg.dims is None else seg.view(full).mean(dim=seg.dims, keepdim=True)
        for seg in segs
    ]
    if segs[0].split_dim is None:
        return averaged[0].clone()
    return torch.cat([piece.reshape(-1) for piece in averaged])
