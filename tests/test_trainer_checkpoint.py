"""Trainer checkpoints: exact resume, switching an AdamW run to SlimAdam, a plan mismatch."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest
import torch
from transformers import Trainer, TrainerCallback

import slimadam_hf
from slimadam_hf.core.compress_spec import compress_second_moment

sys.path.insert(0, str(Path(__file__).parent / "scripts"))
from tiny_assets import RandomTokens, max_abs_diff, params_of, tiny_gpt2, training_args  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _registered():
    slimadam_hf.register()


def _trainer(output_dir, model=None, callbacks=None, **overrides):
    kwargs = dict(max_steps=8, save_strategy="steps", save_steps=4)
    kwargs.update(overrides)
    model = model if model is not None else tiny_gpt2(resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1)
    return Trainer(model=model, args=training_args(output_dir, **kwargs), train_dataset=RandomTokens(),
                   callbacks=callbacks)


def _state_of(optimizer):
    slim = optimizer.optimizer
    return {name: slim.state[p] for g in slim.param_groups for name, p in zip(g["param_names"], g["params"])}


@pytest.mark.parametrize("optim_args", [None, "robust=true"])
def test_save_and_resume_is_bitwise_exact(tmp_path, optim_args):
    straight = _trainer(tmp_path / "run", optim_args=optim_args)
    straight.train()
    resumed = _trainer(tmp_path / "resumed", model=tiny_gpt2(resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1, seed=1),
                       optim_args=optim_args)
    resumed.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-4"))
    assert resumed.state.global_step == 8
    assert max_abs_diff(params_of(straight.model), params_of(resumed.model)) == 0.0
    a, b = _state_of(straight.optimizer), _state_of(resumed.optimizer)
    keys = ("step", "exp_avg", "exp_avg_sq") + (("exp_avg_sq_complement",) if optim_args else ())
    assert all(keys[-1] in a[name] for name in a if name.endswith("c_fc.weight"))
    for name in a:
        for key in keys:
            if key in a[name] or key != "exp_avg_sq_complement":  # 1-D tensors keep no complement
                assert torch.equal(a[name][key], b[name][key]), (name, key)


class _Snapshot(TrainerCallback):
    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        slim = optimizer.optimizer
        self.state = {
            name: {k: v.clone() for k, v in slim.state[p].items()}
            for g in slim.param_groups for name, p in zip(g["param_names"], g["params"])
        }
        self.specs = slim.plan.specs()


def test_adamw_checkpoint_converts_to_slimadam_through_the_trainer(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="slimadam_hf")
    adamw = _trainer(tmp_path / "adamw", optim="adamw_torch", max_steps=4)
    adamw.train()
    names = [n for n, p in adamw.model.named_parameters() if p.requires_grad]
    checkpoint = tmp_path / "adamw" / "checkpoint-4"
    saved = torch.load(checkpoint / "optimizer.pt", weights_only=True)
    order = [i for g in saved["param_groups"] for i in g["params"]]
    decay = slimadam_hf.decay_parameter_names(adamw.model)
    by_name = dict(zip([n for n in names if n in decay] + [n for n in names if n not in decay], order))

    snapshot = _Snapshot()
    slim = _trainer(tmp_path / "slim", max_steps=6, callbacks=[snapshot])
    slim.train(resume_from_checkpoint=str(checkpoint))
    assert slim.state.global_step == 6
    converted = 0
    for name, state in snapshot.state.items():
        full = saved["state"][by_name[name]]
        assert torch.equal(state["exp_avg"], full["exp_avg"])
        expected = compress_second_moment(full["exp_avg_sq"].float(), snapshot.specs[name], name)
        assert torch.equal(state["exp_avg_sq"], expected), name
        converted += snapshot.specs[name] is not None
    assert converted > 0
    assert any("converted" in r.getMessage() and "AdamW" in r.getMessage() for r in caplog.records)


def test_resume_with_a_different_plan_fails_clearly(tmp_path):
    _trainer(tmp_path / "run", max_steps=4).train()
    override = tmp_path / "other.yaml"
    override.write_text("rules: {query: fan_out}\n")
    other = _trainer(tmp_path / "other", max_steps=6, optim_args=f"config={override}")
    with pytest.raises(ValueError, match=r"checkpoint does not match the compression plan for parameter "
                                         r"'transformer\.h\.0\.attn\.c_attn\.weight'"):
        other.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-4"))
