"""Which tensor dims are fan-in and fan-out, by the kind of module that owns a weight.

| owner                         | weight shape       | fan_in      | fan_out |
|-------------------------------|--------------------|-------------|---------|
| ``nn.Linear``                 | (out, in)          | (1,)        | (0,)    |
| transformers ``Conv1D``       | (in, out)          | (0,)        | (1,)    |
| ``nn.Embedding`` (one-hot in) | (num, dim)         | (0,)        | (1,)    |
| ``nn.ConvNd``                 | (out, in, *k)      | (1, 2, ..)  | (0,)    |
| ``nn.ConvTransposeNd``        | (in, out, *k)      | (0, 2, ..)  | (1,)    |

A bare ``nn.Parameter`` (ViT ``cls_token``, MoE expert stacks) has no owner layout; its preset entry
gives one. Register layouts for other module kinds with :func:`register_layout`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

from torch import nn
from transformers.pytorch_utils import Conv1D


@dataclass(frozen=True)
class Layout:
    """The dims of a weight that its inputs (fan_in) and outputs (fan_out) run along."""

    fan_in: tuple[int, ...]
    fan_out: tuple[int, ...]

    @property
    def split_dim(self) -> int:
        """Fused weights (Q|K|V, gate|up) are concatenated along the output dim."""
        if len(self.fan_out) != 1:
            raise ValueError(f"layout {self} has no single output dim to split along")
        return self.fan_out[0]


LayoutFn = Callable[[nn.Module, int], Layout]
_LAYOUTS: list[tuple[type, LayoutFn]] = []


def register_layout(module_type: type, layout_fn: LayoutFn) -> None:
    """Teach the planner the weight layout of ``module_type`` (``layout_fn(module, ndim) -> Layout``).

    Later registrations take precedence, so a subclass can refine its base class.
    """
    _LAYOUTS.insert(0, (module_type, layout_fn))


def weight_layout(module: nn.Module, param_leaf: str, ndim: int) -> Optional[Layout]:
    """The layout of ``module.<param_leaf>``, or ``None`` when the module kind is unknown."""
    if param_leaf != "weight":
        return None
    for module_type, layout_fn in _LAYOUTS:
        if isinstance(module, module_type):
            return layout_fn(module, ndim)
    return None


def _kernel_dims(ndim: int) -> tuple[int, ...]:
    return tuple(range(2, ndim))


register_layout(nn.Linear, lambda m, ndim: Layout(fan_in=(1,), fan_out=(0,)))
register_layout(nn.Embedding, lambda m, ndim: Layout(fan_in=(0,), fan_out=(1,)))
register_layout(nn.modules.conv._ConvNd, lambda m, ndim: Layout(fan_in=(1, *_kernel_dims(ndim)), fan_out=(0,)))
register_layout(
    nn.modules.conv._ConvTransposeNd, lambda m, ndim: Layout(fan_in=(0, *_kernel_dims(ndim)), fan_out=(1,))
)
register_layout(Conv1D, lambda m, ndim: Layout(fan_in=(0,), fan_out=(1,)))
