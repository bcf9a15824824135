"""``robust=True``: each update coordinate clamped, against a float64 oracle; off, the paper's update."""

from __future__ import annotations

import pytest
import torch

from slimadam_hf import SlimAdamW, build_slimadam
from tiny_models import tiny_model

from test_perf_fastpath import needs_compiler

HYPER = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)


def _skewed_grads(steps: int, dtype: torch.dtype) -> list[torch.Tensor]:
    """Row-averaged (dims (1,)) gradients whose first column is 30x the rest: that column's g**2 is far
    above its row's mean, so its update coordinates are about sqrt(64 / 15), past the clamp at 1."""
    g = torch.Generator().manual_seed(0)
    grads = []
    for _ in range(steps):
        x = torch.randn(16, 64, generator=g, dtype=torch.float64)
        x[:, 0] *= 30
        grads.append(x.to(dtype))
    return grads


def _oracle(p0: torch.Tensor, grads: list[torch.Tensor], clip: float) -> torch.Tensor:
    """SlimAdam with rows averaged and every update coordinate clamped to ``clip``, in float64, plainly."""
    p, m = p0.double().clone(), torch.zeros_like(p0, dtype=torch.float64)
    v = torch.zeros(p0.shape[0], 1, dtype=torch.float64)
    beta1, beta2 = HYPER["betas"]
    for t, g in enumerate(grads, start=1):
        g = g.double()
        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * (g * g).mean(dim=1, keepdim=True)
        update = (m / (1 - beta1**t)) / ((v / (1 - beta2**t)).sqrt() + HYPER["eps"])
        p = p - HYPER["lr"] * update.clamp(-clip, clip)
    return p


def _train(implementation: str, robust: bool, momentum_dtype=None) -> tuple[torch.Tensor, torch.Tensor]:
    grads = _skewed_grads(6, torch.float32)
    p0 = torch.randn(16, 64, generator=torch.Generator().manual_seed(1))
    p = torch.nn.Parameter(p0.clone())
    opt = SlimAdamW([{"params": [p], "compress": [(1,)]}], implementation=implementation, robust=robust,
                    momentum_dtype=momentum_dtype, **HYPER)
    for g in grads:
        p.grad = g.clone()
        opt.step()
    return p.detach().double(), _oracle(p0, grads, 1.0 if robust else float("inf"))


@pytest.mark.parametrize("implementation", ["foreach", "reference", pytest.param("compiled", marks=needs_compiler)])
def test_robust_clamps_each_update_coordinate_like_the_float64_oracle(implementation):
    clamped, oracle = _train(implementation, robust=True)
    torch.testing.assert_close(clamped, oracle, rtol=1e-5, atol=1e-6)  # float32 state against float64
    plain, plain_oracle = _train(implementation, robust=False)
    torch.testing.assert_close(plain, plain_oracle, rtol=1e-5, atol=1e-6)
    assert (clamped - plain).abs().max() > 5 * HYPER["lr"]  # the clamp was active, and it matters


def test_robust_with_int8_momentum_equals_its_reference():
    fast, _ = _train("foreach", robust=True, momentum_dtype="int8")
    ref, _ = _train("reference", robust=True, momentum_dtype="int8")
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-6)


def test_robust_reaches_the_optimizer_from_optim_args_and_build_slimadam():
    from slimadam_hf.hf.optim_args import parse_optim_args

    assert parse_optim_args("robust=true") == {"robust": True}
    opt = build_slimadam(tiny_model("gpt2"), robust=True)
    assert all(group["robust"] for group in opt.param_groups)
    assert opt.state_dict()["param_groups"][0]["robust"] is True  # no extra state: a group flag
