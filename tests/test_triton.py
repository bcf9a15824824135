"""``implementation="triton"``: the CUDA kernels, run on CPU tensors under Triton's interpreter, against the
reference (float64 where the option allows it, else float32 with the stored first moment compared exactly)."""

from __future__ import annotations

import io
import logging

import pytest
import torch

from slimadam_hf import SlimAdamW, build_slimadam
from slimadam_hf.core.compress_spec import Segment
from slimadam_hf.core.functional import slimadamw
from slimadam_hf.hf.optim_args import parse_optim_args
from tiny_models import tiny_model

pytestmark = pytest.mark.usefixtures("triton_interpreter")

HYPER = dict(lr=3e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
# odd widths, rows longer than one block of the update (1024) and of the int8 codes (256), unequal split parts
# along both dims with an empty one, 1-D, 3-D rows (dims (1, 2)) and trailing rows (dims (2,)), per-expert
# columns (dims (1,) of a 3-D stack), a single mean, and dims (0, 2) that no 2-D window expresses (foreach)
CASES = [
    ((6, 5), (1,)),
    ((3, 1100), (1,)),
    ((40, 3), (0,)),
    ((9, 300), {"split_dim": 0, "sizes": [2, 3, 4], "dims": [[1], None, [0]]}),
    ((5, 768), {"split_dim": 1, "sizes": [256, 0, 512], "dims": [[0], [0], [1]]}),
    ((7,), None),
    ((1300,), None),
    ((4, 3, 5), (1, 2)),
    ((2, 3, 5), (2,)),
    ((2, 3, 5), (1,)),
    ((5, 7), (0, 1)),
    ((4, 3, 2), (0, 2)),
]
OPTIONS = {
    "default": {},
    "robust": {"robust": True},
    "bf16-m": {"momentum_dtype": "bfloat16"},
    "bf16-m-stochastic": {"momentum_dtype": "bfloat16", "momentum_rounding": "stochastic"},
    "int8-m": {"momentum_dtype": "int8"},
}


def _params(dtype, cases=CASES, seed=0):
    """Small weights (0.1 * randn): float32's rounding of p stays far below what 6 steps of lr 3e-3 move it."""
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter((0.1 * torch.randn(shape, generator=g, dtype=torch.float64)).to(dtype))
            for shape, _ in cases]


def _train(implementation, dtype=torch.float32, steps=6, cases=CASES, opt=None, params=None, first=0, **options):
    if params is None:
        params = _params(dtype, cases)
    if opt is None:
        opt = SlimAdamW([{"params": params, "compress": [spec for _, spec in cases]}], implementation=implementation,
                        **HYPER, **options)
    for step in range(first, first + steps):
        g = torch.Generator().manual_seed(1000 + step)
        for p in params:
            p.grad = torch.randn(p.shape, generator=g, dtype=torch.float64).to(dtype)
        opt.step()
    return params, opt


def _close_to_movement(fast, ref, bound):
    """Each parameter's movement within ``bound`` (relative) of the reference's, element by element."""
    for i, (a, a0, b, b0) in enumerate(zip(fast, _params(torch.float32), ref, _params(torch.float64))):
        moved = b.detach().double() - b0.double()
        diff = ((a.detach().double() - a0.double()) - moved).abs().max().item()
        assert moved.abs().max() > 5e-3  # every parameter took real steps
        assert diff <= bound * moved.abs().max().item(), f"param {i} {tuple(a.shape)}: {diff:.3g}"


@pytest.mark.parametrize("option", ["default", "robust"])
def test_every_spec_kind_follows_the_float64_reference(option, triton_interpreter):
    fast, opt = _train("triton", **OPTIONS[option])
    ref, _ = _train("reference", torch.float64, **OPTIONS[option])
    _close_to_movement(fast, ref, 1e-5)  # the bar on CUDA: 1e-5 of the movement over 6 steps
    plan = next(reversed(triton_interpreter._plans.values()))  # the triton run's
    # all but dims (0, 2), which take the foreach path; with robust=True also per-expert columns, whose
    # complement averages over the experts (dims (0, 2) again)
    uncovered = {11} if option == "default" else {9, 11}
    assert plan.covered == [i for i in range(len(CASES)) if i not in uncovered]


@pytest.mark.parametrize("option", ["bf16-m", "bf16-m-stochastic", "int8-m"])
def test_momentum_storage_equals_the_float32_reference(option):
    fast, opt_fast = _train("triton", **OPTIONS[option])
    ref, opt_ref = _train("reference", **OPTIONS[option])
    for a, b in zip(fast, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        sa, sb = opt_fast.state[a], opt_ref.state[b]
        assert torch.equal(sa["exp_avg"], sb["exp_avg"])  # the same codes / bf16 values: the same rounding
        torch.testing.assert_close(sa["exp_avg_sq"], sb["exp_avg_sq"], rtol=1e-5, atol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("option", ["default", "robust"])
def test_half_precision_parameters_take_float32_math(dtype, option):
    cases = CASES[:7]
    fast, _ = _train("triton", dtype, steps=4, cases=cases, **OPTIONS[option])
    ref, _ = _train("reference", dtype, steps=4, cases=cases, **OPTIONS[option])
    ulp = 2**-7 if dtype == torch.bfloat16 else 2**-10
    for a, b in zip(fast, ref):  # both round p once per step: at most an ulp apart per step
        torch.testing.assert_close(a.float(), b.float(), rtol=4 * ulp, atol=4 * ulp)


@pytest.mark.parametrize("option", ["default", "int8-m", "bf16-m-stochastic", "robust"])
def test_resume_is_bitwise(option):
    whole, opt_whole = _train("triton", steps=5, **OPTIONS[option])
    first, opt_first = _train("triton", steps=3, **OPTIONS[option])
    buf = io.BytesIO()
    torch.save(opt_first.state_dict(), buf)
    buf.seek(0)
    params = [torch.nn.Parameter(p.detach().clone()) for p in first]
    opt = SlimAdamW([{"params": params, "compress": [s for _, s in CASES]}], implementation="triton", **HYPER,
                    **OPTIONS[option])
    opt.load_state_dict(torch.load(buf, weights_only=True))
    _train("triton", opt=opt, params=params, steps=2, first=3)
    for a, b in zip(params, whole):
        assert torch.equal(a, b)


@pytest.mark.parametrize("option", ["default", "int8-m", "robust"])
def test_state_moves_between_the_cpu_paths_and_the_kernels(option):
    """A checkpoint of the kernels resumes on the CPU paths and the other way round (the same state layout,
    int8 codes included), as a run moved between a GPU and a CPU machine would."""
    whole, _ = _train("foreach", steps=6, **OPTIONS[option])
    for there, back in (("triton", "foreach"), ("foreach", "triton")):
        first, opt_first = _train(there, steps=3, **OPTIONS[option])
        params = [torch.nn.Parameter(p.detach().clone()) for p in first]
        opt = SlimAdamW([{"params": params, "compress": [s for _, s in CASES]}], implementation=back, **HYPER,
                        **OPTIONS[option])
        opt.load_state_dict(opt_first.state_dict())
        _train(back, opt=opt, params=params, steps=3, first=3)
        for a, b in zip(params, whole):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_a_gpt2_step_is_four_launches_and_a_schedule_builds_nothing_new(triton_interpreter):
    model = tiny_model("gpt2", n_embd=8, n_layer=12, n_head=2, vocab_size=32, n_positions=16)
    assert len(list(model.parameters())) == 148  # GPT-2 124M's tensors, tiny
    reference = tiny_model("gpt2", n_embd=8, n_layer=12, n_head=2, vocab_size=32, n_positions=16)
    reference.load_state_dict(model.state_dict())
    opts = [build_slimadam(m, implementation=impl, **HYPER) for m, impl in ((model, "triton"), (reference, "reference"))]
    schedules = [torch.optim.lr_scheduler.LambdaLR(o, lambda step: 1.0 / (1 + step)) for o in opts]
    x = torch.randint(0, 32, (2, 8), generator=torch.Generator().manual_seed(0))
    plans = []
    for step in range(3):
        for m, o, s in zip((model, reference), opts, schedules):
            m(input_ids=x, labels=x).loss.backward()
            before = triton_interpreter.launches
            o.step()
            if m is model:
                # decayed weights: statistics, their fold, the update; biases and norms (no decay): one update
                assert triton_interpreter.launches - before == 4
                plans.append(next(reversed(triton_interpreter._plans.values())))
            o.zero_grad()
            s.step()
    assert plans[0] is plans[1] is plans[2]  # new gradients and learning rates reuse the tables
    for (name, a), b in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("robust", [False, True])
def test_statistics_handed_in_by_a_shard(robust):
    """What an FSDP2 shard of a fused weight hands the update: parts cut along dim 1, one of them empty (its
    columns live on another rank), and each part's statistic reduced across ranks."""
    segs = (Segment(1, 0, 3, (1,), 0, (5, 1)), Segment(1, 3, 0, (0,), 5, (1, 0)), Segment(1, 3, 6, (0,), 5, (1, 6)))
    gen = torch.Generator().manual_seed(0)
    p0 = torch.randn(5, 9, generator=gen)
    grads = [torch.randn(5, 9, generator=gen) for _ in range(3)]
    result = {}
    for impl in ("triton", "reference"):
        p, m, v, step = p0.clone(), torch.zeros(5, 9), torch.zeros(11), torch.tensor(0.0)
        for g in grads:
            stats = [(g[:, :3] ** 2).mean(1, keepdim=True), torch.zeros(1, 0), (g[:, 3:] ** 2).mean(0, keepdim=True)]
            stats = [s * 1.5 for s in stats]  # as if other ranks' shares were added: not what g alone gives
            slimadamw([p], [g], [m], [v], [step], [segs], second_moment_stats=[stats], implementation=impl, lr=1e-2,
                      beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.1)
        result[impl] = (p, v)
    torch.testing.assert_close(result["triton"], result["reference"], rtol=1e-6, atol=1e-7)
    assert (result["reference"][0] - p0).abs().amax(dim=0).min() > 1e-3  # every column took steps


def test_parameters_the_kernels_do_not_cover_take_foreach_in_the_same_step():
    params = [torch.nn.Parameter(torch.randn(6, 5, dtype=torch.float64)), torch.nn.Parameter(torch.randn(6, 5))]
    ref = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opts = [SlimAdamW([{"params": ps, "compress": [(1,), (1,)]}], implementation=impl, **HYPER)
            for ps, impl in ((params, "triton"), (ref, "reference"))]
    for _ in range(3):
        for ps, o in zip((params, ref), opts):
            for p in ps:
                p.grad = torch.ones_like(p)
            o.step()
    torch.testing.assert_close(params, ref, rtol=1e-5, atol=1e-6)


def test_the_retired_compiled_implementation_still_loads_with_a_notice(caplog):
    p = [torch.nn.Parameter(torch.randn(3, 3))]
    with caplog.at_level(logging.WARNING, logger="slimadam_hf"):
        opt = SlimAdamW(p, implementation="compiled")
    assert opt.param_groups[0]["implementation"] is None
    assert "retired" in caplog.text and len(caplog.records) == 1
    saved = opt.state_dict()
    saved["param_groups"][0]["implementation"] = "compiled"  # a checkpoint written by an older version
    SlimAdamW(p).load_state_dict(saved)
    assert parse_optim_args("implementation=compiled")["implementation"] == "compiled"


@pytest.mark.parametrize("implementation", ["triton", "foreach", "reference"])
def test_stochastic_rounding_of_a_shard_draws_the_whole_weights_noise(implementation):
    """Rows 0-2 and 3-6 of a weight stepped as two shards, each with its flat offset, round their first
    moment exactly as the whole weight does."""
    gen = torch.Generator().manual_seed(0)
    p0, grads = torch.randn(7, 300, generator=gen), [torch.randn(7, 300, generator=gen) for _ in range(3)]
    hyper = dict(lr=1e-2, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.1, rounding_seed=5)

    def run(rows: slice, offset: int):
        n = rows.stop - rows.start
        p, m, v, step = p0[rows].clone(), torch.zeros(n, 300, dtype=torch.bfloat16), torch.zeros(n, 1), torch.tensor(0.)
        s = Segment(None, 0, n, (1,), 0, (n, 1))
        for g in grads:
            slimadamw([p], [g[rows]], [m], [v], [step], [(s,)], implementation=implementation, noise_offsets=[offset],
                      **hyper)
        return p, m

    whole = run(slice(0, 7), 0)
    shards = [run(slice(0, 3), 0), run(slice(3, 7), 3 * 300)]
    assert torch.equal(torch.cat([m for _, m in shards]), whole[1])
    torch.testing.assert_close(torch.cat([p for p, _ in shards]), whole[0], rtol=0, atol=0)
    unkeyed = run(slice(3, 7), 0)[1]  # the shard's own positions draw other noise
    assert not torch.equal(unkeyed, whole[1][3:])
