"""``momentum_dtype="int8"``: the quantizer's error bound, every path equal to the reference, checkpoints,
conversions, memory, and the refusals."""

from __future__ import annotations

import copy
import io

import pytest
import torch

from slimadam_hf import SlimAdamW, build_slimadam, plan_compression
from slimadam_hf.core import quant
from slimadam_hf.core.options import OptionsError
from tiny_models import tiny_model

from test_perf_fastpath import HYPER, SPECS, _compare, _params, _run


def test_quantizer_error_is_within_the_companded_half_step():
    x = torch.randn(5, 300, dtype=torch.float64) * torch.logspace(-4, 0, 300, dtype=torch.float64)
    codes, absmax = quant.quantize(x)
    back = quant.dequantize(codes, absmax, x.shape).double()
    scale = quant._blocked(x.abs()).amax(1, keepdim=True)  # rows of 300: blocks of 256 and 44 (+ padding)
    scale = scale.expand(-1, quant.BLOCK).reshape(5, -1)[:, :300]
    u = x.abs() / scale
    half = 0.5 / 127
    bound = scale * half * (2 * u.sqrt() + half)  # |u - u'| <= |sqrt(u) - c/127| * (sqrt(u) + c/127)
    assert ((back - x).abs() <= bound * (1 + 1e-5) + 1e-12).all()
    assert (back - x).abs().max() > 0.1 * bound.max()  # the bound is tight, not vacuous
    assert codes.dtype == torch.int8 and codes.shape == (quant.num_blocks(x.shape), quant.BLOCK) == (10, quant.BLOCK)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_foreach_int8_equals_reference(dtype):
    from test_perf_fastpath import BF16_ATOL, BF16_RTOL, BF16_STEPS

    if dtype == torch.float32:
        _compare("foreach", dtype, momentum_dtype="int8", rtol=1e-5, atol=1e-6)
    else:
        _compare("foreach", dtype, momentum_dtype="int8", rtol=BF16_RTOL, atol=BF16_ATOL, steps=BF16_STEPS)


CHUNKED = [  # shape, spec: rows, columns, splits along dim 0 (cut by chunks) and dim 1, 1-D, 3-D
    ((64, 48), (1,)),
    ((64, 48), (0,)),
    ((64, 48), {"split_dim": 0, "sizes": [20, 44], "dims": [[1], None]}),
    ((64, 48), {"split_dim": 1, "sizes": [16, 32], "dims": [[0], [1]]}),
    ((1000,), None),
    ((80, 4, 8), (1, 2)),
]


def test_foreach_int8_chunks_large_parameters_like_the_reference(monkeypatch):
    from slimadam_hf.core import chunked

    monkeypatch.setattr(chunked, "_CHUNK_ELEMS", 2 * quant.BLOCK)  # every parameter takes several chunks
    assert all(len(chunked.row_chunks(torch.empty(shape))) >= 2 for shape, _ in CHUNKED if len(shape) > 1)
    runs = []
    for implementation in ("foreach", "reference"):
        g = torch.Generator().manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(shape, generator=g)) for shape, _ in CHUNKED]
        opt = SlimAdamW([{"params": params, "compress": [spec for _, spec in CHUNKED]}],
                        implementation=implementation, momentum_dtype="int8", **HYPER)
        _run(opt, params, 6)
        runs.append((params, opt))
    (fast, opt_fast), (ref, opt_ref) = runs
    for a, b in zip(fast, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        assert torch.equal(opt_fast.state[a]["exp_avg"], opt_ref.state[b]["exp_avg"])


def test_int8_state_is_codes_and_scales_and_tracks_float32_momentum():
    a, b = _params(torch.float32), _params(torch.float32)
    opt_a = SlimAdamW([{"params": a, "compress": SPECS}], **HYPER)
    opt_b = SlimAdamW([{"params": b, "compress": SPECS}], momentum_dtype="int8", **HYPER)
    _run(opt_a, a, 20)
    _run(opt_b, b, 20)
    for x, y in zip(a, b):
        state = opt_b.state[y]
        assert state["exp_avg"].dtype == torch.int8 and state["exp_avg_absmax"].dtype == torch.float32
        assert state["exp_avg"].shape == (quant.num_blocks(y.shape), quant.BLOCK)
        # 20 steps of at most lr each; the 8-bit moment stays within 5% of that path
        torch.testing.assert_close(y, x, rtol=0, atol=0.05 * HYPER["lr"] * 20)


def _trained(momentum_dtype, steps=3):
    model = tiny_model("gpt2")
    opt = build_slimadam(model, lr=1e-3, momentum_dtype=momentum_dtype)
    x = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(3))
    for _ in range(steps):
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
    return model, opt, x


def _continue(model, opt, x):
    model(input_ids=x, labels=x).loss.backward()
    opt.step()
    opt.zero_grad()


def test_int8_checkpoint_loads_weights_only_and_resumes_exactly():
    model, opt, x = _trained("int8")
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    clone = copy.deepcopy(model)
    opt2 = build_slimadam(clone, lr=1e-3, momentum_dtype="int8")
    opt2.load_state_dict(torch.load(buffer, weights_only=True))
    for m, o in ((model, opt), (clone, opt2)):
        _continue(m, o, x)
    for a, b in zip(model.parameters(), clone.parameters()):
        assert torch.equal(a, b)


def test_float32_momentum_checkpoint_converts_to_int8_and_back():
    model, opt, _ = _trained(None)
    int8 = build_slimadam(copy.deepcopy(model), lr=1e-3, momentum_dtype="int8")
    int8.load_state_dict(copy.deepcopy(opt.state_dict()))
    wte = dict(model.named_parameters())["transformer.wte.weight"]
    saved_m = opt.state[wte]["exp_avg"]
    p8 = next(p for g in int8.param_groups for p in g["params"] if p.shape == wte.shape)
    codes, absmax = quant.quantize(saved_m)
    assert torch.equal(int8.state[p8]["exp_avg"], codes) and torch.equal(int8.state[p8]["exp_avg_absmax"], absmax)
    back = build_slimadam(copy.deepcopy(model), lr=1e-3)
    back.load_state_dict(copy.deepcopy(int8.state_dict()))
    p32 = next(p for g in back.param_groups for p in g["params"] if p.shape == wte.shape)
    assert back.state[p32]["exp_avg"].dtype == torch.float32
    torch.testing.assert_close(back.state[p32]["exp_avg"], quant.dequantize(codes, absmax, wte.shape))


def test_int8_checkpoint_of_another_layout_is_refused():
    model, opt, _ = _trained("int8")
    state = copy.deepcopy(opt.state_dict())
    key = next(iter(state["state"]))
    state["state"][key]["exp_avg"] = state["state"][key]["exp_avg"][:, :128].contiguous()
    with pytest.raises(ValueError, match=r"int8 codes of shape .* cannot be converted"):
        build_slimadam(copy.deepcopy(model), lr=1e-3, momentum_dtype="int8").load_state_dict(state)


def test_wrong_momentum_input_is_refused():
    p64 = [torch.nn.Parameter(torch.randn(4, 3, dtype=torch.float64))]
    with pytest.raises(OptionsError, match=r"parameter 'params\[0\]': momentum_dtype='int8' on a float64 parameter"):
        SlimAdamW(p64, momentum_dtype="int8")
    with pytest.raises(OptionsError, match=r"momentum_dtype='int4' is not supported.*int8"):
        SlimAdamW([torch.nn.Parameter(torch.randn(2, 2))], momentum_dtype="int4")


def test_int8_state_bytes_match_the_plan_and_stay_under_an_eighth_of_adamw():
    model, opt, _ = _trained("int8", steps=1)
    measured = sum(t.numel() * t.element_size() for s in opt.state.values() for k, t in s.items() if k != "step")
    assert measured == opt.plan.slimadam_state_bytes
    from slimadam_hf.cli.inspect import build_meta_model
    from transformers import AutoConfig

    gpt2 = plan_compression(build_meta_model(AutoConfig.for_model("gpt2")))  # GPT-2 124M
    import dataclasses

    assert dataclasses.replace(gpt2, momentum_dtype="int8").state_bytes_ratio <= 0.14
