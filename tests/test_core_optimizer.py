"""SlimAdamW against independent references: torch.optim.AdamW and float64 math."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch

from slimadam_hf import SlimAdamW, build_slimadam, plan_compression, slimadam_param_groups
from slimadam_hf.core.compress_spec import CompressSpecError
from tiny_models import tiny_model

HYPER = dict(lr=3e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)


def _params(dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(6, 5), (4, 3, 2), (7,), (9, 8)]
    return [torch.nn.Parameter(torch.randn(s, generator=g, dtype=dtype)) for s in shapes]


def _grads(params, step, seed=1):
    g = torch.Generator().manual_seed(seed * 1000 + step)
    return [torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype) for p in params]


def _run(opt, params, steps=60, zero_every=0):
    for step in range(steps):
        for p, g in zip(params, _grads(params, step)):
            p.grad = None if zero_every and step % zero_every == 0 and p.dim() == 1 else g
        opt.step()
    return params


@pytest.mark.parametrize("implementation", ["fused", "foreach", "reference"])
@pytest.mark.parametrize("dtype,rtol", [(torch.float32, 1e-6), (torch.float64, 1e-12)])
def test_uncompressed_matches_torch_adamw(implementation, dtype, rtol):
    ours, ref = _params(dtype), _params(dtype)
    _run(SlimAdamW(ours, implementation=implementation, **HYPER), ours, zero_every=7)
    _run(torch.optim.AdamW(ref, foreach=False, **HYPER), ref, zero_every=7)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=rtol, atol=rtol * 1e-2)


def _reference_float64(params, specs, steps, lr, betas, eps, weight_decay):
    """Plain float64 SlimAdam written from the paper's update rule, one tensor at a time."""
    b1, b2 = betas
    params = [p.detach().double().clone() for p in params]
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    for step in range(steps):
        t = step + 1
        for i, (p, g) in enumerate(zip(params, _grads(params, step))):
            spec = specs[i]
            p.mul_(1 - lr * weight_decay)
            m[i] = b1 * m[i] + (1 - b1) * g
            if isinstance(spec, dict):
                chunks = torch.split(g, spec["sizes"], dim=spec["split_dim"])
                sq = [c.pow(2) if d is None else c.pow(2).mean(dim=tuple(d), keepdim=True).expand_as(c)
                      for c, d in zip(chunks, spec["dims"])]
                sq = torch.cat(sq, dim=spec["split_dim"])
            elif spec is None:
                sq = g.pow(2)
            else:
                sq = g.pow(2).mean(dim=spec, keepdim=True).expand_as(g)
            v[i] = b2 * v[i] + (1 - b2) * sq
            p.sub_(lr / (1 - b1**t) * m[i] / ((v[i] / (1 - b2**t)).sqrt() + eps))
    return params


SPECS = [(1,), (0, 2), None, {"split_dim": 0, "sizes": [2, 3, 4], "dims": [[1], None, [0]]}]


@pytest.mark.parametrize("foreach", [True, False])
def test_compressed_matches_float64_reference(foreach):
    params = _params(torch.float64)
    expected = _reference_float64(params, SPECS, 50, **HYPER)
    opt = SlimAdamW([{"params": params, "compress": SPECS}], foreach=foreach, **HYPER)
    _run(opt, params, steps=50)
    for p, e in zip(params, expected):
        torch.testing.assert_close(p.detach(), e, rtol=1e-12, atol=1e-14)
    # compressed second moments really are small
    assert [tuple(opt.state[p]["exp_avg_sq"].shape) for p in params] == [(6, 1), (1, 3, 1), (7,), (2 + 24 + 8,)]


def test_fast_path_equals_reference_path_in_float32():
    fast, ref = _params(), _params()
    _run(SlimAdamW([{"params": fast, "compress": SPECS}], foreach=True, **HYPER), fast, steps=50)
    _run(SlimAdamW([{"params": ref, "compress": SPECS}], foreach=False, **HYPER), ref, steps=50)
    for a, b in zip(fast, ref):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_fast_path_equals_reference_path_on_a_real_model():
    """Through a model, rounding differences feed back into the gradients, hence the looser atol."""
    models = [tiny_model("gpt2"), tiny_model("gpt2")]
    opts = [build_slimadam(m, foreach=f, lr=1e-3, weight_decay=0.1) for m, f in zip(models, (True, False))]
    x = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(0))
    for _ in range(5):
        for m, o in zip(models, opts):
            m(input_ids=x, labels=x).loss.backward()
            o.step()
            o.zero_grad()
    for (n, a), b in zip(models[0].named_parameters(), models[1].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=2e-6)


def test_bf16_params_keep_float32_second_moment_and_train():
    model = tiny_model("llama", dtype=torch.bfloat16)
    opt = build_slimadam(model, lr=1e-2)
    x = torch.randint(0, 64, (2, 8))
    losses = []
    for _ in range(8):
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    for p, state in opt.state.items():
        assert state["exp_avg_sq"].dtype == torch.float32
        assert state["exp_avg"].dtype == torch.bfloat16


def test_zero_grad_step_at_lr_zero_changes_nothing():
    params = _params()
    before = [p.detach().clone() for p in params]
    opt = SlimAdamW([{"params": params, "compress": SPECS}], lr=0.0, weight_decay=0.1)
    for p in params:
        p.grad = torch.zeros_like(p)
    opt.step()
    for p, b in zip(params, before):
        assert torch.equal(p, b)
        assert not opt.state[p]["exp_avg"].any() and not opt.state[p]["exp_avg_sq"].any()


def test_tensor_lr_is_accepted():
    a, b = _params(), _params()
    _run(SlimAdamW(a, **{**HYPER, "lr": torch.tensor(HYPER["lr"])}), a, steps=5)
    _run(SlimAdamW(b, **HYPER), b, steps=5)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def test_state_is_created_lazily():
    params = _params()
    opt = SlimAdamW(params)
    assert len(opt.state) == 0
    params[0].grad = torch.ones_like(params[0])
    opt.step()
    assert list(opt.state) == [params[0]]
    assert set(opt.state[params[0]]) == {"step", "exp_avg", "exp_avg_sq"}


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(lr=-1.0), "learning rate"),
        (dict(betas=(1.0, 0.9)), r"betas\[0\]"),
        (dict(betas=(0.9, -0.1)), r"betas\[1\]"),
        (dict(eps=-1e-8), "eps"),
        (dict(weight_decay=-0.1), "weight_decay"),
    ],
)
def test_invalid_hyperparameters_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SlimAdamW(_params(), **kwargs)


def test_sparse_gradients_raise_naming_the_parameter():
    emb = torch.nn.Embedding(10, 4, sparse=True)
    opt = SlimAdamW(list(emb.named_parameters()))
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse gradients.*'weight'"):
        opt.step()


@pytest.mark.parametrize(
    "spec,match",
    [
        ((2,), r"'w'.*out of range"),
        ({"split_dim": 0, "sizes": [2, 2], "dims": [[1], [1]]}, r"'w'.*add up to 4.*has 6"),
        ([], "must not be empty"),
    ],
)
def test_bad_specs_raise_naming_the_parameter(spec, match):
    w = torch.nn.Parameter(torch.zeros(6, 5))
    with pytest.raises(CompressSpecError, match=match):
        SlimAdamW([{"params": [("w", w)], "compress": [spec]}])


def test_one_dimensional_tensors_cannot_be_compressed():
    b = torch.nn.Parameter(torch.zeros(5))
    with pytest.raises(CompressSpecError, match="never compressed"):
        SlimAdamW([{"params": [("b", b)], "compress": [(0,)]}])


def _trained_opt(foreach=None):
    model = tiny_model("gpt2")
    opt = build_slimadam(model, lr=1e-3, foreach=foreach)
    x = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(3))
    for _ in range(3):
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
    return model, opt, x


def test_state_dict_round_trip_through_weights_only_load_continues_exactly():
    model, opt, x = _trained_opt()
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)

    clone = tiny_model("gpt2")
    clone.load_state_dict(model.state_dict())
    opt2 = build_slimadam(clone, lr=1e-3)
    opt2.load_state_dict(loaded)
    for m, o in ((model, opt), (clone, opt2)):
        m(input_ids=x, labels=x).loss.backward()
        o.step()
    for a, b in zip(model.parameters(), clone.parameters()):
        assert torch.equal(a, b)


def test_load_accepts_lists_for_tuples_like_accelerate_produces():
    model, opt, x = _trained_opt()
    state = copy.deepcopy(opt.state_dict())
    listed = 0
    for group in state["param_groups"]:
        if "compress" in group:
            listed += sum(isinstance(s, tuple) for s in group["compress"])
            group["compress"] = [list(s) if isinstance(s, tuple) else s for s in group["compress"]]
    assert listed > 0  # the round trip below really sees lists
    clone = tiny_model("gpt2")
    clone.load_state_dict(model.state_dict())
    loaded = build_slimadam(clone, lr=1e-3)
    loaded.load_state_dict(state)
    for live, restored in zip(opt.param_groups, loaded.param_groups):
        assert restored.get("compress") == live.get("compress")  # the live (tuple) specs are kept
    for m, o in ((model, opt), (clone, loaded)):
        m(input_ids=x, labels=x).loss.backward()
        o.step()
    for a, b in zip(model.parameters(), clone.parameters()):
        assert torch.equal(a, b)


def test_load_with_a_different_plan_names_the_parameter():
    model, opt, _ = _trained_opt()
    state = opt.state_dict()
    other = build_slimadam(model, overrides={"rules": {"mlp_up": "fan_in"}})
    with pytest.raises(ValueError, match=r"'transformer\.h\.0\.mlp\.c_fc\.weight'.*saved compress spec \(1,\).*live spec \(0,\)"):
        other.load_state_dict(state)


def test_adamw_state_converts_by_averaging_over_the_plan_dims():
    model = tiny_model("gpt2")
    groups = slimadam_param_groups(model, plan_compression(model), weight_decay=0.1)
    adamw = torch.optim.AdamW([{k: v for k, v in g.items() if k != "compress"} for g in groups], lr=1e-3)
    x = torch.randint(0, 64, (2, 8))
    model(input_ids=x, labels=x).loss.backward()
    adamw.step()
    slim = build_slimadam(model, lr=1e-3)
    slim.load_state_dict(adamw.state_dict())
    wte = model.transformer.wte.weight
    expected = adamw.state[wte]["exp_avg_sq"].mean(dim=1, keepdim=True)
    torch.testing.assert_close(slim.state[wte]["exp_avg_sq"], expected)
    torch.testing.assert_close(slim.state[wte]["exp_avg"], adamw.state[wte]["exp_avg"])
    c_attn = model.transformer.h[0].attn.c_attn.weight
    full = adamw.state[c_attn]["exp_avg_sq"]
    q, k, v = full.split(16, dim=1)
    expected = torch.cat([q.mean(0).reshape(-1), k.mean(0).reshape(-1), v.mean(1).reshape(-1)])
    torch.testing.assert_close(slim.state[c_attn]["exp_avg_sq"], expected)


def test_compression_saves_memory_on_a_real_model():
    model, opt, _ = _trained_opt()
    plan = plan_compression(model)
    v_numel = sum(s["exp_avg_sq"].numel() for s in opt.state.values())
    assert v_numel == plan.second_moment_numel
    assert math.isclose(1 - v_numel / sum(p.numel() for p in model.parameters()), plan.second_moment_savings)
