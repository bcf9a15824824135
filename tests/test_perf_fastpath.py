"""The foreach SlimAdamW path against the reference path; the momentum_dtype and implementation options."""

from __future__ import annotations

import io

import pytest
import torch

from slimadam_hf import SlimAdamW, build_slimadam
from slimadam_hf.core.reductions import sum_of_squares as _sum_of_squares
from tiny_models import tiny_model

HYPER = dict(lr=3e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
# bf16 parameters: the paths round p at different points (foreach may round m / denom before scaling it),
# so each step can differ by one bf16 ulp (up to 2**-7 relative): the tolerance is one ulp per step. Small
# parameters and a large lr make every step move p by many ulps, so a skipped update fails by far.
BF16_HYPER = dict(HYPER, lr=1e-1)
BF16_SCALE = 0.1
BF16_STEPS = 6
BF16_RTOL, BF16_ATOL = BF16_STEPS * 2**-7, BF16_STEPS * 2**-9  # atol: one ulp per step while |p| < 0.5
SHAPES = [(6, 5), (4, 3, 2), (7,), (9, 8), (40, 3)]
# row-compressed, two dims, uncompressed 1-D, a split with row / full / column parts, and a column
# reduction long enough to take the streamed path
SPECS = [(1,), (0, 2), None, {"split_dim": 0, "sizes": [2, 3, 4], "dims": [[1], None, [0]]}, (0,)]

def _params(dtype, seed=0, which=None):
    g = torch.Generator().manual_seed(seed)
    scale = BF16_SCALE if dtype == torch.bfloat16 else 1.0
    params = [torch.nn.Parameter((scale * torch.randn(s, generator=g, dtype=torch.float64)).to(dtype)) for s in SHAPES]
    return params if which is None else [params[i] for i in which]


def _specs(which=None):
    return SPECS if which is None else [SPECS[i] for i in which]


def _run(opt, params, steps, seed=1):
    for step in range(steps):
        g = torch.Generator().manual_seed(seed * 1000 + step)
        for i, p in enumerate(params):
            grad = torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype)
            p.grad = None if (p.dim() == 1 and step % 4 == 3) else grad  # a parameter that sometimes has no grad
        opt.step()


def _compare(implementation, dtype, momentum_dtype=None, steps=12, rtol=1e-5, atol=1e-6, which=None):
    hyper = BF16_HYPER if dtype == torch.bfloat16 else HYPER
    fast, ref = _params(dtype, which=which), _params(dtype, which=which)
    start = [p.detach().clone() for p in ref]
    opt_fast = SlimAdamW([{"params": fast, "compress": _specs(which)}], implementation=implementation,
                         momentum_dtype=momentum_dtype, **hyper)
    opt_ref = SlimAdamW([{"params": ref, "compress": _specs(which)}], implementation="reference",
                        momentum_dtype=momentum_dtype, **hyper)
    _run(opt_fast, fast, steps)
    _run(opt_ref, ref, steps)
    for b, b0 in zip(ref, start):  # the tolerance must be well below what the steps moved
        moved = (b.detach().double() - b0.double()).abs()
        assert (moved > 3 * (atol + rtol * b0.double().abs())).float().mean() > 0.5
    for i, (a, b) in enumerate(zip(fast, ref)):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=rtol, atol=atol, msg=lambda m: f"param {i}: {m}")
        sa, sb = opt_fast.state[a], opt_ref.state[b]
        assert sa["exp_avg"].dtype == sb["exp_avg"].dtype
        torch.testing.assert_close(sa["exp_avg"].float(), sb["exp_avg"].float(), rtol=rtol, atol=atol)
        torch.testing.assert_close(sa["exp_avg_sq"], sb["exp_avg_sq"], rtol=rtol, atol=atol)
        assert sa["step"].item() == sb["step"].item()


@pytest.mark.parametrize(
    "dtype,rtol,atol", [(torch.float32, 1e-5, 1e-6), (torch.float64, 1e-12, 1e-13)]
)
def test_foreach_equals_reference(dtype, rtol, atol):
    _compare("foreach", dtype, rtol=rtol, atol=atol)


def test_foreach_equals_reference_bf16_params():
    _compare("foreach", torch.bfloat16, rtol=BF16_RTOL, atol=BF16_ATOL, steps=BF16_STEPS)


@pytest.mark.parametrize("implementation", ["foreach", "reference"])
def test_bf16_momentum_state_and_update(implementation):
    params = _params(torch.float32)
    opt = SlimAdamW([{"params": params, "compress": SPECS}], implementation=implementation,
                    momentum_dtype=torch.bfloat16, **HYPER)
    _run(opt, params, 3)
    for p in params:
        assert opt.state[p]["exp_avg"].dtype == torch.bfloat16
        assert opt.state[p]["exp_avg_sq"].dtype == torch.float32
    if implementation == "foreach":
        _compare("foreach", torch.float32, momentum_dtype="bfloat16", rtol=1e-5, atol=1e-6)


def test_bf16_momentum_tracks_float32_momentum():
    """Quality proxy: bf16 first moment stays within bf16 rounding of the float32 run."""
    a, b = _params(torch.float32), _params(torch.float32)
    opt_a = SlimAdamW([{"params": a, "compress": SPECS}], **HYPER)
    opt_b = SlimAdamW([{"params": b, "compress": SPECS}], momentum_dtype="bf16", **HYPER)
    _run(opt_a, a, 20)
    _run(opt_b, b, 20)
    for x, y in zip(a, b):
        torch.testing.assert_close(x.detach(), y.detach(), rtol=0, atol=2e-3 * x.abs().max().item())


@pytest.mark.parametrize("rows,cols", [(300, 7), (5, 3), (1000, 300)])
def test_streamed_column_sum_of_squares(rows, cols):
    g = torch.randn(rows, cols, dtype=torch.float64)
    torch.testing.assert_close(_sum_of_squares(g, (0,), torch.float64), (g * g).sum(0, keepdim=True))
    # a float32 sum of `rows` positive terms is within rows * 2**-24 (relative) of the exact sum, in any order
    rtol = 2 * rows * 2**-24
    narrow = torch.randn(rows, 3 * cols).narrow(1, cols, cols)  # a split part: strided rows
    exact = (narrow.double() ** 2).sum(0, keepdim=True)
    torch.testing.assert_close(_sum_of_squares(narrow, (0,), torch.float32).double(), exact, rtol=rtol, atol=0)
    bf = torch.randn(rows, cols).bfloat16()
    exact = (bf.double() ** 2).sum(0, keepdim=True)
    torch.testing.assert_close(_sum_of_squares(bf, (0,), torch.float32).double(), exact, rtol=rtol, atol=0)


def test_implementation_option_validation_and_compat():
    p = [torch.nn.Parameter(torch.randn(3, 3))]
    with pytest.raises(ValueError, match="implementation"):
        SlimAdamW(p, implementation="fast")
    with pytest.raises(ValueError, match="contradicts"):
        SlimAdamW(p, foreach=False, implementation="foreach")
    with pytest.raises(ValueError, match="momentum_dtype"):
        SlimAdamW(p, momentum_dtype=torch.int16)  # int8 is a supported (block-quantized) storage now
    with pytest.raises(ValueError, match="momentum_dtype"):
        SlimAdamW(p, momentum_dtype="float8")
    opt = SlimAdamW(p, foreach=False)  # the old spelling still works
    assert opt.param_groups[0]["implementation"] is None
    assert SlimAdamW(p, momentum_dtype="bf16").param_groups[0]["momentum_dtype"] == "bfloat16"
    assert SlimAdamW(p, momentum_dtype=torch.bfloat16).param_groups[0]["momentum_dtype"] == "bfloat16"


@pytest.mark.parametrize(
    "param_dtype,momentum_dtype", [(torch.float32, "bfloat16"), (torch.bfloat16, "float32")]
)
def test_momentum_dtype_state_dict_round_trip(param_dtype, momentum_dtype):
    """torch casts floating state to the parameter dtype on load; exp_avg keeps momentum_dtype, losslessly."""
    def make():
        params = _params(param_dtype)
        return params, SlimAdamW([{"params": params, "compress": SPECS}], momentum_dtype=momentum_dtype, **HYPER)

    params, opt = make()
    _run(opt, params, 5)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    params2, opt2 = make()
    with torch.no_grad():
        for a, b in zip(params2, params):
            a.copy_(b)
    opt2.load_state_dict(torch.load(buf, weights_only=True))
    for a, b in zip(params, params2):
        sa, sb = opt.state[a], opt2.state[b]
        assert sb["exp_avg"].dtype == sa["exp_avg"].dtype == getattr(torch, momentum_dtype)
        assert torch.equal(sa["exp_avg"], sb["exp_avg"])
        assert torch.equal(sa["exp_avg_sq"], sb["exp_avg_sq"])
    _run(opt, params, 3, seed=7)
    _run(opt2, params2, 3, seed=7)
    for a, b in zip(params, params2):
        assert torch.equal(a, b)


def test_bf16_momentum_state_is_a_quarter_of_adamw_on_gpt2_shapes():
    model = tiny_model("gpt2", n_embd=64, n_layer=2, vocab_size=512)
    opt = build_slimadam(model, momentum_dtype=torch.bfloat16, lr=1e-3)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    state = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values())
    adamw = sum(8 * p.numel() + 4 for p in model.parameters())
    assert state / adamw <= 0.27  # tiny model: 1-D tensors weigh more; GPT-2 124M is 0.25 (bench_step.py)
