"""``momentum_rounding="stochastic"`` for a bfloat16 first moment: unbiased, reproducible, equal on every path."""

from __future__ import annotations

import copy

import pytest
import torch

from slimadam_hf import SlimAdamW, build_slimadam
from slimadam_hf.core.options import OptionsError
from slimadam_hf.core.rounding import lerp_low_precision_, noise_bases, noise_key
from tiny_models import tiny_model

from test_perf_fastpath import HYPER, SPECS, _params, _run


def test_stochastic_rounding_is_unbiased_where_nearest_is_stuck():
    # an update far below half a bf16 ulp (2**-8 at 1.0): nearest never moves, stochastic follows on average
    n, steps, weight = 4096, 200, 1e-3
    exact = torch.ones(n, dtype=torch.float64)
    nearest = torch.ones(n, dtype=torch.bfloat16)
    stochastic = torch.ones(n, dtype=torch.bfloat16)
    target = torch.full((n,), 1.5)
    for step in range(steps):
        exact += weight * (target.double() - exact)
        lerp_low_precision_(nearest, target, weight)
        lerp_low_precision_(stochastic, target, weight, key=step)
    assert torch.equal(nearest, torch.ones(n, dtype=torch.bfloat16))
    error = stochastic.double().mean() - exact.mean()
    # each rounding adds zero-mean noise of sd at most half an ulp (2**-7 in [1, 2)); over the steps and
    # averaged over the n lanes that is sd = 2**-8 * sqrt(steps / n): allow four of them
    sd = 2**-8 * (steps / n) ** 0.5
    assert abs(error) < 4 * sd
    assert (exact.mean() - 1) > 10 * 4 * sd  # while the drift it tracks is far larger


def _slim(params, **kw):
    return SlimAdamW([{"params": params, "compress": SPECS}], momentum_dtype="bfloat16",
                     momentum_rounding="stochastic", **HYPER, **kw)


def test_same_seed_same_run_other_seed_other_run():
    runs = []
    for seed in (0, 0, 1):
        torch.manual_seed(seed)
        params = _params(torch.float32)
        _run(_slim(params), params, 6)
        runs.append(params)
    assert all(torch.equal(a, b) for a, b in zip(runs[0], runs[1]))
    assert not all(torch.equal(a, b) for a, b in zip(runs[0], runs[2]))


@pytest.mark.parametrize("implementation", ["foreach", "triton"])
def test_every_path_draws_the_same_noise_as_the_reference(implementation, request):
    if implementation == "triton":
        request.getfixturevalue("triton_interpreter")
    runs = []
    for impl in (implementation, "reference"):
        torch.manual_seed(0)
        params = _params(torch.float32)
        opt = SlimAdamW([{"params": params, "compress": SPECS}], implementation=impl, momentum_dtype="bfloat16",
                        momentum_rounding="stochastic", **HYPER)
        _run(opt, params, 6)
        runs.append((params, opt))
    for a, b in zip(runs[0][0], runs[1][0]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        assert torch.equal(runs[0][1].state[a]["exp_avg"], runs[1][1].state[b]["exp_avg"])


def test_resume_with_stochastic_rounding_is_exact():
    torch.manual_seed(0)
    model = tiny_model("gpt2")
    opt = build_slimadam(model, lr=1e-3, momentum_dtype="bfloat16", momentum_rounding="stochastic")
    x = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(3))

    def step(m, o):
        m(input_ids=x, labels=x).loss.backward()
        o.step()
        o.zero_grad()

    for _ in range(2):
        step(model, opt)
    clone = copy.deepcopy(model)
    torch.manual_seed(123)  # another process's seed: the checkpoint's rounding seed wins
    resumed = build_slimadam(clone, lr=1e-3, momentum_dtype="bfloat16", momentum_rounding="stochastic")
    resumed.load_state_dict(copy.deepcopy(opt.state_dict()))
    for m, o in ((model, opt), (clone, resumed)):
        step(m, o)
        step(m, o)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), clone.parameters()))


def test_stochastic_rounding_needs_a_bfloat16_moment():
    with pytest.raises(OptionsError, match=r"momentum_rounding='stochastic' rounds a bfloat16 first moment"):
        SlimAdamW([torch.nn.Parameter(torch.randn(2, 2))], momentum_dtype="int8", momentum_rounding="stochastic")
    with pytest.raises(OptionsError, match="momentum_rounding='up'"):
        SlimAdamW([torch.nn.Parameter(torch.randn(2, 2))], momentum_rounding="up")


def test_stochastic_rounding_leaves_a_float32_moment_exact():
    # momentum_dtype=None on float32 parameters: the moment is float32, so "stochastic" must change nothing
    runs = []
    for rounding in ("stochastic", "nearest"):
        params = _params(torch.float32)
        opt = SlimAdamW([{"params": params, "compress": SPECS}], momentum_rounding=rounding, **HYPER)
        _run(opt, params, 4)
        runs.append(params)
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def test_a_partition_of_several_weights_draws_each_weights_noise():
    # a DeepSpeed ZeRO partition: the tail of weight 0, weight 1 whole, the head of weight 2, then padding;
    # each range rounds with its weight's noise at its positions, as one process rounding the whole weights
    seed, step, weight = 1234, 3, 0.1
    shapes = [(5, 300), (257,), (4, 70)]
    moments = [torch.randn(s).bfloat16() for s in shapes]
    grads = [torch.randn(s) for s in shapes]
    expected = [m.clone() for m in moments]
    for j, (m, g) in enumerate(zip(expected, grads)):
        lerp_low_precision_(m, g, weight, noise_key(noise_bases(seed, 3)[j], step, m))

    tail, head, pad = 1000, 111, 9  # held: weight 0 from 500, weight 1, weight 2 up to 111, padding
    flat_m = torch.cat([moments[0].view(-1)[500:], moments[1], moments[2].view(-1)[:head], torch.zeros(pad).bfloat16()])
    flat_g = torch.cat([grads[0].view(-1)[500:], grads[1], grads[2].view(-1)[:head], torch.zeros(pad)])
    pieces = ((0, tail, 0, 500), (tail, 257, 1, 0), (tail + 257, head, 2, 0))
    (base,) = noise_bases(seed, 1, [pieces])
    lerp_low_precision_(flat_m, flat_g, weight, noise_key(base, step, flat_m))

    want = torch.cat([expected[0].view(-1)[500:], expected[1], expected[2].view(-1)[:head]])
    assert torch.equal(flat_m[: tail + 257 + head], want)
    assert torch.equal(flat_m[-pad:], torch.zeros(pad).bfloat16().float().lerp(torch.zeros(pad), weight).bfloat16())
