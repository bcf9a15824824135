"""``robust=True``: the factored second moment, against a float64 oracle and torch AdamW; off, the paper's update."""

from __future__ import annotations

import dataclasses
import logging

import pytest
import torch

from slimadam_hf import SlimAdamW, build_slimadam, plan_compression
from slimadam_hf.core.factored import STATE_KEY
from tiny_models import tiny_model

HYPER = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)
IMPLEMENTATIONS = ["foreach", "reference", "fused", "triton"]
# a fused weight: rows 0-15 averaged over columns, rows 16-31 over rows, rows 32-47 full
SPLIT = {"split_dim": 0, "sizes": [16, 16, 16], "dims": [[1], [0], None]}


def _skewed_grads(steps: int, shape=(16, 64)) -> list[torch.Tensor]:
    """Gradients whose columns have very different scales (1 to 30): a mean over each row misses them."""
    g = torch.Generator().manual_seed(0)
    scale = torch.linspace(1.0, 30.0, shape[1], dtype=torch.float64)
    return [(torch.randn(shape, generator=g, dtype=torch.float64) * scale).float() for _ in range(steps)]


def _oracle(p0: torch.Tensor, grads: list[torch.Tensor], factored: bool) -> torch.Tensor:
    """Rows averaged (dims (1,)), in float64, plainly; ``factored``: times the column means over their mean."""
    p, m = p0.double().clone(), torch.zeros_like(p0, dtype=torch.float64)
    v = torch.zeros(p0.shape[0], 1, dtype=torch.float64)
    w = torch.zeros(1, p0.shape[1], dtype=torch.float64)
    beta1, beta2 = HYPER["betas"]
    for t, g in enumerate(grads, start=1):
        g = g.double()
        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * (g * g).mean(dim=1, keepdim=True)
        w = beta2 * w + (1 - beta2) * (g * g).mean(dim=0, keepdim=True)
        v_hat = v * w / w.mean() if factored else v  # mean(w) == mean(v): both are the mean of g**2
        p = p - HYPER["lr"] * (m / (1 - beta1**t)) / ((v_hat / (1 - beta2**t)).sqrt() + HYPER["eps"])
    return p


def _train(implementation: str, robust: bool, grads, p0, spec=(1,), momentum_dtype=None, **hyper) -> SlimAdamW:
    p = torch.nn.Parameter(p0.clone())
    opt = SlimAdamW([{"params": [p], "compress": [spec]}], implementation=implementation, robust=robust,
                    momentum_dtype=momentum_dtype, **{**HYPER, **hyper})
    for g in grads:
        p.grad = g.clone()
        opt.step()
    return opt


def _param(opt: SlimAdamW) -> torch.Tensor:
    return opt.param_groups[0]["params"][0].detach()


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_robust_follows_the_float64_factored_oracle(implementation, request):
    if implementation == "triton":
        request.getfixturevalue("triton_interpreter")
    grads, p0 = _skewed_grads(6), torch.randn(16, 64, generator=torch.Generator().manual_seed(1))
    robust = _param(_train(implementation, True, grads, p0)).double()
    plain = _param(_train(implementation, False, grads, p0)).double()
    torch.testing.assert_close(robust, _oracle(p0, grads, True), rtol=1e-5, atol=1e-6)  # float32 vs float64
    torch.testing.assert_close(plain, _oracle(p0, grads, False), rtol=1e-5, atol=1e-6)
    assert (robust - plain).abs().max() > 5 * HYPER["lr"]  # the factoring changes the steps, visibly


@pytest.mark.parametrize("spec", [(1,), (0,), SPLIT], ids=["rows", "columns", "split"])
def test_robust_equals_torch_adamw_when_the_second_moment_is_a_row_times_a_column_scale(spec):
    # g = r_i * c_j * (+-1): AdamW's v is exactly r_i**2 c_j**2 (1 - beta2**t), which the factored estimate
    # recovers from its two means; the paper's mean over one dim does not
    gen = torch.Generator().manual_seed(2)
    r, c = torch.rand(48, 1, generator=gen) + 0.1, torch.rand(1, 32, generator=gen) * 10 + 0.1
    grads = [r * c * (torch.randint(0, 2, (48, 32), generator=gen) * 2 - 1) for _ in range(5)]
    p0 = torch.randn(48, 32, generator=gen)
    hyper = dict(HYPER, weight_decay=0.1)
    q = torch.nn.Parameter(p0.clone())
    adamw = torch.optim.AdamW([q], **hyper)
    for g in grads:
        q.grad = g.clone()
        adamw.step()
    full_rows = 16 if isinstance(spec, dict) else 0  # the split's last part keeps a full second moment
    robust = _param(_train("foreach", True, grads, p0, spec, **hyper))
    plain = _param(_train("foreach", False, grads, p0, spec, **hyper))
    torch.testing.assert_close(robust, q.detach(), rtol=1e-5, atol=1e-6)
    assert (plain - q).abs()[: 48 - full_rows].max() > 10 * 1e-6 * 5  # far outside the rounding
    torch.testing.assert_close(_param(_train("reference", True, grads, p0, spec, **hyper)), q.detach(),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("implementation", ["foreach", "triton"])
@pytest.mark.parametrize("momentum_dtype", [None, "int8"])
def test_robust_fast_paths_equal_the_reference_on_a_split_weight(implementation, momentum_dtype, request):
    if implementation == "triton":
        request.getfixturevalue("triton_interpreter")
    grads = [g.repeat(3, 1)[:48, :32] for g in _skewed_grads(5, (16, 64))]
    p0 = torch.randn(48, 32, generator=torch.Generator().manual_seed(3))
    fast = _train(implementation, True, grads, p0, SPLIT, momentum_dtype)
    ref = _train("reference", True, grads, p0, SPLIT, momentum_dtype)
    # float32: the paths differ only in the order of the reductions and of sqrt(a) * sqrt(b) vs sqrt(a * b)
    torch.testing.assert_close(_param(fast), _param(ref), rtol=1e-5, atol=1e-6)
    (p,) = ref.state
    assert tuple(ref.state[p][STATE_KEY].shape) == (32 + 16,)  # part 0: column means; part 1: row means


@pytest.mark.parametrize("implementation", ["foreach", "fused"])
def test_robust_resumes_bitwise_and_converts_other_checkpoints(tmp_path, implementation, caplog):
    grads, p0 = _skewed_grads(5), torch.randn(16, 64, generator=torch.Generator().manual_seed(1))
    whole = _train(implementation, True, grads, p0)
    first = _train(implementation, True, grads[:3], p0)
    torch.save(first.state_dict(), tmp_path / "opt.pt")
    p = torch.nn.Parameter(_param(first).clone())
    resumed = SlimAdamW([{"params": [p], "compress": [(1,)]}], robust=True, implementation=implementation, **HYPER)
    resumed.load_state_dict(torch.load(tmp_path / "opt.pt", weights_only=True))
    for g in grads[3:]:
        p.grad = g.clone()
        resumed.step()
    assert torch.equal(p.detach(), _param(whole))
    assert "robust=False" not in caplog.text

    # a paper (robust=False) checkpoint: the complement starts at v's mean, so v_hat == v at first
    plain = _train("foreach", False, grads[:3], p0)
    live = SlimAdamW([{"params": [torch.nn.Parameter(p0.clone())], "compress": [(1,)]}], robust=True, **HYPER)
    with caplog.at_level(logging.WARNING, logger="slimadam_hf"):
        live.load_state_dict(plain.state_dict())
    assert "saved with robust=False; resuming with robust=True" in caplog.text  # the update changes: say so
    (state,) = live.state.values()
    assert torch.equal(state[STATE_KEY], state["exp_avg_sq"].mean().expand(1, 64))
    # a torch AdamW checkpoint: both means come from its full second moment
    q = torch.nn.Parameter(p0.clone())
    adamw = torch.optim.AdamW([q], **HYPER)
    for g in grads[:3]:
        q.grad = g.clone()
        adamw.step()
    live = SlimAdamW([{"params": [torch.nn.Parameter(p0.clone())], "compress": [(1,)]}], robust=True, **HYPER)
    live.load_state_dict(adamw.state_dict())
    (state,) = live.state.values()
    full = adamw.state[q]["exp_avg_sq"]
    torch.testing.assert_close(state[STATE_KEY], full.mean(0, keepdim=True), rtol=0, atol=0)
    torch.testing.assert_close(state["exp_avg_sq"], full.mean(1, keepdim=True), rtol=0, atol=0)
    # and back: a live robust=False drops the complement
    live = SlimAdamW([{"params": [torch.nn.Parameter(p0.clone())], "compress": [(1,)]}], **HYPER)
    live.load_state_dict(whole.state_dict())
    assert STATE_KEY not in next(iter(live.state.values()))


def test_robust_state_bytes_match_the_plan_and_stay_near_half_of_adamw():
    model = tiny_model("gpt2")
    opt = build_slimadam(model, robust=True)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    measured = sum(t.numel() * t.element_size() for s in opt.state.values() for k, t in s.items() if k != "step")
    assert opt.plan.robust and measured == opt.plan.slimadam_state_bytes
    assert any(STATE_KEY in s for s in opt.state.values())
    from slimadam_hf.cli.inspect import build_meta_model
    from transformers import AutoConfig

    gpt2 = plan_compression(build_meta_model(AutoConfig.for_model("gpt2")))  # GPT-2 124M
    assert dataclasses.replace(gpt2, robust=True).state_bytes_ratio <= 0.502


def test_robust_compress_in_place_takes_both_means_from_the_full_moment():
    from slimadam_hf.optim.recompress import compress_in_place

    p = torch.nn.Parameter(torch.randn(16, 64))
    opt = SlimAdamW([("w", p)], robust=True, **HYPER)
    for g in _skewed_grads(2):
        p.grad = g
        opt.step()
    full = opt.state[p]["exp_avg_sq"].clone()
    compress_in_place(opt, {"w": (1,)})
    assert torch.equal(opt.state[p][STATE_KEY], full.mean(0, keepdim=True))
    assert torch.equal(opt.state[p]["exp_avg_sq"], full.mean(1, keepdim=True))


def test_robust_reaches_the_optimizer_from_optim_args_and_build_slimadam():
    from slimadam_hf.hf.optim_args import parse_optim_args

    assert parse_optim_args("robust=true") == {"robust": True}
    opt = build_slimadam(tiny_model("gpt2"), robust=True)
    assert all(group["robust"] for group in opt.param_groups)
    assert opt.state_dict()["param_groups"][0]["robust"] is True
