"""One-run SNR auto mode: exact in-place compression, rules as the offline pipeline, Trainer resume."""

from __future__ import annotations

import gc
import json
import sys
import weakref
from pathlib import Path

import pytest
import torch
from transformers import Trainer

import slimadam_hf
from slimadam_hf import SlimAdamFactory, SlimAdamW, build_slimadam, plan_compression
from slimadam_hf import AutoSNRSlimAdamW, build_auto_snr, compress_in_place
from slimadam_hf.snr.auto import RULES_FILENAME
from slimadam_hf.core.compress_spec import compress_second_moment, segments, specs_equal
from slimadam_hf.snr.recorder import SNRRecorder
from slimadam_hf.snr.targets import SNRSchedule
from slimadam_hf.snr.rules import rules_from_csv

sys.path.insert(0, str(Path(__file__).parent / "scripts"))
from tiny_assets import RandomTokens, tiny_gpt2, tiny_llama, training_args  # noqa: E402

LR, BETAS, EPS, WD = 1e-2, (0.9, 0.99), 1e-8, 0.1
SPLIT = {"split_dim": 0, "sizes": [4, 4, 4], "dims": [[1], None, [0]]}
SPECS = {"w1": (1,), "w2": SPLIT, "w3": None, "b": None}


def _named_params(seed: int = 0) -> list[tuple[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    shapes = {"w1": (8, 6), "w2": (12, 5), "w3": (6, 4), "b": (6,)}
    return [(n, torch.randn(s, generator=g).requires_grad_()) for n, s in shapes.items()]


def _grads(steps: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    shapes = {n: p.shape for n, p in _named_params()}
    return [{n: torch.randn(s, generator=g) * (1 + i) for n, s in shapes.items()} for i in range(steps)]


def _step(opt, params, grads) -> None:
    for n, p in params:
        p.grad = grads[n].clone()
    opt.step()


def _reference(grads: list[dict[str, torch.Tensor]], switch: int) -> dict[str, torch.Tensor]:
    """float64 AdamW for ``switch`` steps, then v averaged over each spec's dims, then SlimAdam."""
    out = {}
    b1, b2 = BETAS
    for name, p0 in _named_params():
        p = p0.detach().double().clone()
        m = torch.zeros_like(p)
        v = torch.zeros_like(p)
        segs = segments(None, p.shape)
        for t, grad in enumerate(grads, start=1):
            if t == switch + 1:
                segs = segments(SPECS[name], p.shape, name)
                v = compress_second_moment(v, SPECS[name], name)
            g = grad[name].double()
            p *= 1 - LR * WD
            m = b1 * m + (1 - b1) * g
            for seg in segs:
                vs = seg.second_moment_view(v)
                gs = seg.view(g)
                vs.copy_(b2 * vs + (1 - b2) * (gs * gs if seg.dims is None else (gs * gs).mean(seg.dims, keepdim=True)))
                denom = vs.sqrt() / (1 - b2**t) ** 0.5 + EPS
                seg.view(p).sub_(LR / (1 - b1**t) * seg.view(m) / denom)
        out[name] = p
    return out


def _plain(x):
    """Whether ``x`` holds only plain Python types and no empty container."""
    if isinstance(x, (list, tuple, dict)):
        items = list(x.values()) if isinstance(x, dict) else list(x)
        return bool(items) and all(_plain(i) for i in items) and (
            not isinstance(x, dict) or all(isinstance(k, str) for k in x)
        )
    return x is None or isinstance(x, (int, float, str))


def test_compress_in_place_is_exact():
    grads = _grads(6)
    params = _named_params()
    opt = SlimAdamW([{"params": params}], lr=LR, betas=BETAS, eps=EPS, weight_decay=WD)
    for g in grads[:3]:
        _step(opt, params, g)

    # the same run, rebuilt compressed from the start with the state averaged at the switch
    twin_params = [(n, p.detach().clone().requires_grad_()) for n, p in params]
    twin = SlimAdamW([{"params": twin_params, "compress": [SPECS[n] for n, _ in params]}],
                     lr=LR, betas=BETAS, eps=EPS, weight_decay=WD)
    for (n, p), (_, q) in zip(params, twin_params):
        s = opt.state[p]
        twin.state[q] = {"step": s["step"].clone(), "exp_avg": s["exp_avg"].clone(),
                         "exp_avg_sq": compress_second_moment(s["exp_avg_sq"], SPECS[n], n)}

    old_v = weakref.ref(opt.state[params[0][1]]["exp_avg_sq"])
    freed = compress_in_place(opt, SPECS)
    gc.collect()
    assert old_v() is None  # the full second moment is gone
    assert freed == 4 * (48 - 8) + 4 * (60 - (4 + 20 + 5))
    group = opt.param_groups[0]
    assert _plain(group["compress"]) and specs_equal(group["compress"][1], SPLIT)
    assert group["compress"][2] is None and group["compress"][3] is None

    for g in grads[3:]:
        _step(opt, params, g)
        _step(twin, twin_params, g)
    reference = _reference(grads, switch=3)
    for (n, p), (_, q) in zip(params, twin_params):
        assert torch.equal(p, q), n  # bitwise: same as compressed from the start
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(opt.state[p][key], twin.state[q][key]), (n, key)
        torch.testing.assert_close(p.detach().double(), reference[n], rtol=1e-5, atol=1e-6)

    # everything switched back to None: no 'compress' key at all
    params2 = _named_params()
    opt2 = SlimAdamW([{"params": params2}])
    compress_in_place(opt2, {"w1": None, "b": None})
    assert "compress" not in opt2.param_groups[0]


def test_compress_in_place_errors():
    params = _named_params()
    opt = SlimAdamW([{"params": params}])
    with pytest.raises(KeyError, match="'w1x'.*did you mean 'w1'"):
        compress_in_place(opt, {"w1x": (1,)})
    with pytest.raises(ValueError, match="'b' is 1-D"):
        compress_in_place(opt, {"w1": (1,), "b": (0,)})
    assert "compress" not in opt.param_groups[0]  # nothing changed on error
    compress_in_place(opt, {"w1": (1,)})
    with pytest.raises(ValueError, match="'w1' is already compressed"):
        compress_in_place(opt, {"w1": (0,)})
    with pytest.raises(ValueError, match="param_names|names"):
        compress_in_place(SlimAdamW([p for _, p in _named_params()]), {"w1": (1,)})


def _train(model, opt, steps, recorder=None, seed=1):
    g = torch.Generator().manual_seed(seed)
    for step in range(1, steps + 1):
        x = torch.randint(0, 96, (4, 12), generator=g)
        model(x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
        if recorder is not None:
            recorder.maybe_measure(opt, step)


@pytest.mark.parametrize("family", [tiny_gpt2, tiny_llama])
def test_rules_match_offline_snr_pipeline(tmp_path, family):
    model = family()
    opt = build_auto_snr(model, probe_steps=4, probe_every=2, lr=1e-2, betas=BETAS, weight_decay=0.0)
    _train(model, opt, 3)
    assert opt.switched_at is None and "compress" not in opt.param_groups[0]
    v_full = sum(s["exp_avg_sq"].nbytes for s in opt.state.values())
    _train(model, opt, 1, seed=2)
    assert opt.switched_at == 4 and {r[0] for r in opt.snr_rows} == {2, 4}
    v_slim = sum(s["exp_avg_sq"].nbytes for s in opt.state.values())
    assert v_slim < v_full / 2 and opt.freed_bytes == v_full - v_slim

    # the same run with torch AdamW, SNR recorded to CSV at steps 2 and 4, then `slimadam rules`
    ref_model = family()
    adamw = torch.optim.AdamW(ref_model.parameters(), lr=1e-2, betas=BETAS, weight_decay=0.0)
    rec = SNRRecorder(ref_model, tmp_path / "snr.csv", SNRSchedule(every=2, first=2))
    g = torch.Generator().manual_seed(1)
    for step in range(1, 5):
        if step == 4:
            g = torch.Generator().manual_seed(2)
        x = torch.randint(0, 96, (4, 12), generator=g)
        ref_model(x, labels=x).loss.backward()
        adamw.step()
        adamw.zero_grad()
        rec.maybe_measure(adamw, step)
    expected = {k: (None if d is None else list(d)) for k, d in rules_from_csv(tmp_path / "snr.csv").items()}
    assert opt.rules == expected
    assert any(d is not None for d in expected.values())

    # the saved rules file is a config= override that reproduces the switched optimizer's specs
    path = opt.save_rules(tmp_path / "rules.json")
    saved = json.loads(path.read_text())
    assert list(saved)[0] == next(iter(dict(model.named_parameters())))  # model order
    plan = plan_compression(family(), overrides=str(path))
    live = {n: s for g in opt.param_groups for n, s in zip(g["param_names"], opt._group_specs(g))}
    assert all(specs_equal(plan.specs()[n], live[n]) for n in live)
    assert opt.plan.second_moment_savings == pytest.approx(plan.second_moment_savings)
    _train(model, opt, 1)


def _state_bytes(opt) -> int:
    return sum(t.numel() * t.element_size() for s in opt.state.values() for k, t in s.items() if k != "step")


@pytest.mark.parametrize("momentum_dtype,robust", [("bfloat16", False), ("int8", False), ("int8", True)])
def test_auto_snr_plan_counts_state_bytes_as_plan_compression(tmp_path, momentum_dtype, robust):
    """The probe's and the switched plan's state bytes are the optimizer's, and plan_compression's for the
    same rules and options: int8 codes and block scales, a bf16 first moment, robust's complements."""
    options = dict(momentum_dtype=momentum_dtype, robust=robust, lr=1e-2)
    model = tiny_gpt2()
    opt = build_auto_snr(model, probe_steps=2, **options)
    _train(model, opt, 1)
    assert opt.switched_at is None and opt.plan.slimadam_state_bytes == _state_bytes(opt)
    _train(model, opt, 1, seed=2)
    assert opt.switched_at == 2 and (opt.plan.momentum_dtype, opt.plan.robust) == (momentum_dtype, robust)
    static = build_slimadam(tiny_gpt2(), overrides=str(opt.save_rules(tmp_path / "rules.json")), **options).plan
    assert opt.plan.second_moment_savings > 0  # something was compressed
    assert opt.plan.totals() == static.totals()
    assert opt.plan.slimadam_state_bytes == static.slimadam_state_bytes == _state_bytes(opt)


def test_by_role_gives_one_rule_per_role():
    model = tiny_gpt2(n_layer=3)
    opt = build_auto_snr(model, probe_steps=3, by_role=True, cutoff=0.5, lr=1e-2)
    _train(model, opt, 3)
    by_role: dict[str, set] = {}
    for entry in opt.plan.entries:
        for role, rule, _, _ in entry.pieces():
            by_role.setdefault(role, set()).add(str(rule))
    assert all(len(rules) == 1 for rules in by_role.values()), by_role


def test_checkpoint_roundtrip_and_mismatches(tmp_path):
    model = tiny_llama()
    opt = build_auto_snr(model, probe_steps=2, lr=1e-2)
    _train(model, opt, 1)
    torch.save(opt.state_dict(), tmp_path / "pre.pt")
    _train(model, opt, 2)
    torch.save(opt.state_dict(), tmp_path / "post.pt")
    post = torch.load(tmp_path / "post.pt", weights_only=True)
    assert post["auto_snr"]["switched_at"] == 2 and all(_plain(g.get("compress", [1])) for g in post["param_groups"])

    fresh = build_auto_snr(tiny_llama(), probe_steps=2, lr=1e-2)
    fresh.load_state_dict(post)  # adopts the saved specs, then loads
    assert fresh.switched_at == 2 and fresh.rules == opt.rules
    for p, q in zip(opt.param_groups[0]["params"], fresh.param_groups[0]["params"]):
        assert torch.equal(opt.state[p]["exp_avg_sq"], fresh.state[q]["exp_avg_sq"])

    with pytest.raises(ValueError, match="probe step 1.*probe_steps=1"):
        build_auto_snr(tiny_llama(), probe_steps=1).load_state_dict(torch.load(tmp_path / "pre.pt", weights_only=True))
    static = build_slimadam(tiny_llama())
    fixed = static.state_dict()
    with pytest.raises(ValueError, match="fixed rules"):
        build_auto_snr(tiny_llama(), probe_steps=2).load_state_dict(fixed)


def test_optim_args_errors():
    factory = SlimAdamFactory()
    with pytest.raises(ValueError, match="needs probe_steps"):
        factory(tiny_gpt2(), preset="auto-snr", lr=1e-3)
    with pytest.raises(ValueError, match="only apply to preset=auto-snr"):
        factory(tiny_gpt2(), preset="gpt2", probe_steps=3, lr=1e-3)
    with pytest.raises(ValueError, match="config="):
        factory(tiny_gpt2(), preset="auto-snr", probe_steps=3, config="x.yaml", lr=1e-3)
    with pytest.raises(ValueError, match="probe_steps=0"):
        factory(tiny_gpt2(), preset="auto-snr", probe_steps=0, lr=1e-3)
    opt = factory(tiny_gpt2(), preset="auto-snr", probe_steps=3, cutoff=2.0, select="most-compressive", lr=1e-3)
    assert isinstance(opt, AutoSNRSlimAdamW) and (opt.cutoff, opt.select, opt.probe_every) == (2.0, "most-compressive", 1)


# -- Trainer: switch, rules files, resume before and after the switch ---------------------------------


def _trainer(output_dir, model, **overrides):
    kwargs = dict(max_steps=8, save_strategy="steps", save_steps=2,
                  optim_args="preset=auto-snr,probe_steps=4,probe_every=2")
    kwargs.update(overrides)
    return Trainer(model=model, args=training_args(output_dir, **kwargs), train_dataset=RandomTokens())


def _optimizer_state(trainer):
    slim = trainer.optimizer.optimizer
    return {n: slim.state[p] for g in slim.param_groups for n, p in zip(g["param_names"], g["params"])}


@pytest.mark.parametrize("family", [tiny_gpt2, tiny_llama])
def test_trainer_auto_snr_resume_before_and_after_switch(tmp_path, family):
    slimadam_hf.register()
    make = (lambda seed=0: tiny_gpt2(resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1, seed=seed)) \
        if family is tiny_gpt2 else (lambda seed=0: tiny_llama(seed=seed))
    straight = _trainer(tmp_path / "run", make())
    straight.train()
    opt = straight.optimizer.optimizer
    assert isinstance(opt, AutoSNRSlimAdamW) and opt.switched_at == 4
    rules_text = (tmp_path / "run" / RULES_FILENAME).read_text()
    assert json.loads(rules_text) == json.loads(opt.rules_json())
    assert not (tmp_path / "run" / "checkpoint-2" / RULES_FILENAME).exists()
    assert (tmp_path / "run" / "checkpoint-6" / RULES_FILENAME).read_text() == rules_text
    pre = torch.load(tmp_path / "run" / "checkpoint-2" / "optimizer.pt", weights_only=True)
    assert pre["auto_snr"]["probe_step"] == 2 and "switched_at" not in pre["auto_snr"]
    assert not any("compress" in g for g in pre["param_groups"])
    assert any("compress" in g for g in torch.load(tmp_path / "run" / "checkpoint-6" / "optimizer.pt",
                                                   weights_only=True)["param_groups"])
    logged = [h for h in straight.state.log_history if "slimadam/second_moment_savings" in h]
    assert logged[0]["slimadam/second_moment_savings"] == 0.0  # the probe plan
    assert logged[-1]["slimadam/second_moment_savings"] > 0.5  # after the switch

    final = {n: p.detach().clone() for n, p in straight.model.named_parameters()}
    for checkpoint in ("checkpoint-2", "checkpoint-6"):
        resumed = _trainer(tmp_path / f"from-{checkpoint}", make(seed=1))
        resumed.train(resume_from_checkpoint=str(tmp_path / "run" / checkpoint))
        assert resumed.state.global_step == 8
        ropt = resumed.optimizer.optimizer
        assert ropt.switched_at == 4 and ropt.rules == opt.rules
        for n, p in resumed.model.named_parameters():
            assert torch.equal(p, final[n]), (checkpoint, n)
        a, b = _optimizer_state(straight), _optimizer_state(resumed)
        for n in a:
            for key in ("step", "exp_avg", "exp_avg_sq"):
                assert torch.equal(a[n][key], b[n][key]), (checkpoint, n, key)
        assert (tmp_path / f"from-{checkpoint}" / RULES_FILENAME).read_text() == rules_text
