"""The fused CPU kernel (implementation="fused", the default for float32 CPU parameters) against float64
math, torch.optim.AdamW and the foreach path; the default's choice and its fallback when no kernel builds."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from slimadam_hf import SlimAdamW
from slimadam_hf.core import fused
from slimadam_hf.core.compress_spec import cached_segments, second_moment_shape
from slimadam_hf.core.factored import Complement, complement_shape
from slimadam_hf.optim.optimizer import _implementation

HYPER = dict(lr=3e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
# every kind of segment the kernel has, in the layouts a transformer gives it; most sizes above the kernel's
# per-task grain (32768 elements) so the rows are split across threads
CASES = [
    ((300, 257), (1,)),  # one second moment per row
    ((257, 300), (0,)),  # per column
    ((6, 7), (0, 1)),  # one for the whole weight
    ((50_000,), None),  # full (AdamW) on a large 1-D tensor
    ((40, 5, 6), (1, 2)),  # per row of a 3-D weight
    ((96, 3 * 128), {"split_dim": 1, "sizes": [128, 128, 128], "dims": [[0], [0], [1]]}),  # GPT-2's c_attn
    ((3 * 64, 96), {"split_dim": 0, "sizes": [64, 64, 64], "dims": [[1], None, [0]]}),  # a fused qkv by rows
    ((600, 30 + 70), {"split_dim": 1, "sizes": [30, 70], "dims": [None, [0, 1]]}),  # full and whole-part columns
]


def _grads(shapes, steps, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, generator=g, dtype=torch.float64) for s in shapes] for _ in range(steps)]


def _train(cases, implementation, dtype, grads, **options):
    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)) for shape, _ in cases]
    opt = SlimAdamW([{"params": params, "compress": [spec for _, spec in cases]}], implementation=implementation,
                    **{**HYPER, **options})
    for step_grads in grads:
        for p, grad in zip(params, step_grads):
            p.grad = grad.to(dtype)
        opt.step()
    return params, opt


def test_fused_covers_every_case():
    """Guards the tests below: each case must really run in the kernel, not fall back to foreach, with and
    without robust=True's complement (every per-row and per-column segment of CASES is factored)."""
    factored = 0
    for shape, spec in CASES:
        p = torch.zeros(shape)
        v = torch.zeros(second_moment_shape(spec, shape))
        segs = cached_segments(spec, shape)
        assert fused.fused_covers(p, p, p, v, segs, None, None, None), (shape, spec)
        w_shape = complement_shape(segs, shape)
        if w_shape is not None:
            complement = Complement.of(torch.zeros(w_shape), segs, shape)
            assert fused.fused_covers(p, p, p, v, segs, None, None, complement), (shape, spec)
            factored += sum(c is not None for c in complement.segments)
    assert factored == 8


@pytest.mark.parametrize("robust", [False, True], ids=["paper", "robust"])
def test_fused_equals_float64_math(robust):
    steps = 8
    grads = _grads([shape for shape, _ in CASES], steps)
    fast, opt_fast = _train(CASES, "fused", torch.float32, grads, robust=robust)
    exact, opt_exact = _train(CASES, "reference", torch.float64, grads, robust=robust)
    start, _ = _train(CASES, "reference", torch.float64, [], robust=robust)
    for i, (a, b, b0) in enumerate(zip(fast, exact, start)):
        moved = (b - b0).abs()  # the tolerance must be well below what the steps moved
        assert (moved > 3 * (1e-6 + 1e-5 * b0.abs())).double().mean() > 0.5, i
        torch.testing.assert_close(a.detach().double(), b.detach(), rtol=1e-5, atol=1e-6, msg=lambda m: f"case {i}: {m}")
        sa, sb = opt_fast.state[a], opt_exact.state[b]
        torch.testing.assert_close(sa["exp_avg"].double(), sb["exp_avg"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(sa["exp_avg_sq"].double(), sb["exp_avg_sq"], rtol=1e-5, atol=1e-9)
        assert sa["step"].item() == sb["step"].item() == steps
        assert ("exp_avg_sq_complement" in sa) == ("exp_avg_sq_complement" in sb) == (robust and i not in (2, 3, 7))
        if "exp_avg_sq_complement" in sa:
            torch.testing.assert_close(sa["exp_avg_sq_complement"].double(), sb["exp_avg_sq_complement"], rtol=1e-5,
                                       atol=1e-9)


def test_fused_bf16_momentum_equals_the_reference():
    """A bfloat16 first moment (rounded to nearest, the stored value driving the update) in the kernel,
    against the reference path with the same storage; stochastic rounding stays with foreach."""
    steps = 6
    grads = _grads([shape for shape, _ in CASES], steps)
    fast, opt_fast = _train(CASES, "fused", torch.float32, grads, momentum_dtype="bfloat16")
    ref, opt_ref = _train(CASES, "reference", torch.float32, grads, momentum_dtype="bfloat16")
    for i, (a, b) in enumerate(zip(fast, ref)):
        sa, sb = opt_fast.state[a], opt_ref.state[b]
        assert sa["exp_avg"].dtype == torch.bfloat16
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=lambda m: f"case {i}: {m}")
        torch.testing.assert_close(sa["exp_avg"].float(), sb["exp_avg"].float(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(sa["exp_avg_sq"], sb["exp_avg_sq"], rtol=1e-5, atol=1e-9)
    p, v = torch.zeros(4, 4), torch.zeros(4, 1)
    m = torch.zeros(4, 4, dtype=torch.bfloat16)
    assert fused.fused_covers(p, p, m, v, cached_segments((1,), p.shape), None, None, None)
    assert not fused.fused_covers(p, p, m, v, cached_segments((1,), p.shape), None, 12345, None)  # stochastic


def test_fused_uncompressed_matches_torch_adamw():
    shapes = [(300, 257), (50_000,), (3,)]
    grads = _grads(shapes, 6)
    ours, _ = _train([(s, None) for s in shapes], "fused", torch.float32, grads)
    g = torch.Generator().manual_seed(0)
    theirs = [torch.nn.Parameter(torch.randn(s, generator=g, dtype=torch.float64).float()) for s in shapes]
    opt = torch.optim.AdamW(theirs, **HYPER)
    for step_grads in grads:
        for p, grad in zip(theirs, step_grads):
            p.grad = grad.float()
        opt.step()
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_fused_hands_uncovered_parameters_to_foreach():
    """Dims the kernel has no layout for: exactly the foreach path's numbers, in the same step as a covered
    weight. A non-contiguous weight is not covered either."""
    cases = [((300, 257), (1,)), ((4, 3, 2), (0, 2))]
    grads = _grads([shape for shape, _ in cases], 4)
    p = torch.zeros(4, 3, 2)
    assert not fused.fused_covers(p, p, p, p, cached_segments((0, 2), p.shape), None, None, None)
    a, _ = _train(cases, "fused", torch.float32, grads)
    b, _ = _train(cases, "foreach", torch.float32, grads)
    torch.testing.assert_close(a[1], b[1], rtol=0, atol=0)
    t = p.transpose(0, 1)
    assert not fused.fused_covers(t, t, t, torch.zeros(3, 1, 1), cached_segments((1, 2), t.shape), None, None, None)


def test_default_is_fused_for_float32_cpu_and_foreach_otherwise():
    p32, p16 = torch.nn.Parameter(torch.zeros(4, 4)), torch.nn.Parameter(torch.zeros(4, 4, dtype=torch.bfloat16))
    opt = SlimAdamW([{"params": [p32]}, {"params": [p16]}])
    assert [_implementation(group) for group in opt.param_groups] == ["fused", "foreach"]
    assert _implementation(SlimAdamW([p32], foreach=False).param_groups[0]) == "reference"


def test_without_a_compiler_the_default_warns_and_steps_with_foreach(tmp_path):
    """A real failed build (the compiler named by CXX does not exist): the default steps with foreach and
    says why once; asking for "fused" explicitly is an error naming the fix."""
    script = textwrap.dedent("""
        import warnings, torch
        from slimadam_hf import SlimAdamW
        from slimadam_hf.core.fused import FusedUnavailableError
        p = torch.nn.Parameter(torch.ones(3, 4)); p.grad = torch.ones(3, 4)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            opt = SlimAdamW([{"params": [p], "compress": [(1,)]}], lr=0.1)
            opt.step(); opt.step()
        messages = [str(w.message) for w in caught if "implementation='foreach'" in str(w.message)]
        assert len(messages) == 1, messages
        print(messages[0])
        assert not torch.equal(p.detach(), torch.ones(3, 4))
        try:
            SlimAdamW([p], implementation="fused").step()
        except FusedUnavailableError as exc:
            print("explicit:", exc)
        else:
            raise AssertionError("implementation='fused' stepped without a kernel")
    """)
    env = {**os.environ, "CXX": str(tmp_path / "no-such-compiler"), "SLIMADAM_HF_KERNEL_DIR": str(tmp_path / "kernels")}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "building the SlimAdamW CPU kernel failed" in out.stdout and "Install a C++ compiler" in out.stdout
    assert "explicit: implementation='fused'" in out.stdout


@pytest.mark.parametrize("steps", [1, 3])
def test_fused_resumes_from_a_foreach_checkpoint(steps):
    """The state is the same tensors whatever the implementation: stepping on from another path's state
    gives that path's numbers."""
    cases = CASES[:2]
    grads = _grads([shape for shape, _ in cases], steps + 2)
    a, opt_a = _train(cases, "foreach", torch.float32, grads[:steps])
    opt_b = SlimAdamW([{"params": a, "compress": [spec for _, spec in cases]}], implementation="fused", **HYPER)
    opt_b.load_state_dict(opt_a.state_dict())
    for step_grads in grads[steps:]:
        for p, grad in zip(a, step_grads):
            p.grad = grad.float()
        opt_b.step()
    b, _ = _train(cases, "foreach", torch.float32, grads)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)
