"""The three ways into the Trainer train identically; what a user sees; accumulation; bf16 autocast."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import pytest
import torch
from transformers import Trainer

import slimadam_hf
from slimadam_hf import SlimAdamCallback, SlimAdamFactory, build_slimadam

sys.path.insert(0, str(Path(__file__).parent / "scripts"))
from tiny_assets import RandomTokens, max_abs_diff, params_of, tiny_gpt2, training_args  # noqa: E402

METRIC_KEYS = {
    "slimadam/second_moment_savings",
    "slimadam/state_bytes",
    "slimadam/adamw_state_bytes",
    "slimadam/state_ratio_vs_adamw",
}


@pytest.fixture(autouse=True, scope="module")
def _registered():
    slimadam_hf.register()


def _train(tmp_path, name, model=None, **trainer_kwargs):
    model = model if model is not None else tiny_gpt2()
    args = trainer_kwargs.pop("args", None) or training_args(tmp_path / name)
    trainer = Trainer(model=model, args=args, train_dataset=RandomTokens(), **trainer_kwargs)
    trainer.train()
    return trainer


def test_three_paths_train_bitwise_identically_and_report_once(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="slimadam_hf")
    hyper = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1)
    by_name = _train(tmp_path, "optim")
    model = tiny_gpt2()
    by_factory = _train(tmp_path, "factory", model, optimizer_cls_and_kwargs=(SlimAdamFactory, dict(hyper)))
    model = tiny_gpt2()
    by_instance = _train(tmp_path, "instance", model, optimizers=(build_slimadam(model, **hyper), None))

    reference = params_of(by_name.model)
    assert max_abs_diff(reference, params_of(by_factory.model)) == 0.0
    assert max_abs_diff(reference, params_of(by_instance.model)) == 0.0
    assert reference.keys() == params_of(tiny_gpt2()).keys()
    assert max_abs_diff(reference, params_of(tiny_gpt2())) > 0  # it trained

    summaries = [r.getMessage() for r in caplog.records if r.getMessage().startswith("SlimAdam plan:")]
    assert len(summaries) == 3  # once per trainer, whichever path built the optimizer
    assert "second moments saved" in summaries[0] and "token_embedding" in summaries[0]
    for trainer in (by_name, by_factory, by_instance):
        plan = trainer.optimizer.optimizer.plan
        with_metrics = [log for log in trainer.state.log_history if METRIC_KEYS <= log.keys()]
        assert len(with_metrics) == 1
        assert with_metrics[0]["slimadam/state_bytes"] == plan.slimadam_state_bytes
        saved = json.loads((Path(trainer.args.output_dir) / "slimadam_plan.json").read_text())
        assert [p["name"] for p in saved["parameters"]] == [e.name for e in plan.entries]
        assert saved["totals"]["slimadam/second_moment_savings"] == pytest.approx(plan.second_moment_savings)


def test_without_register_callback_can_be_passed_explicitly(tmp_path, monkeypatch):
    import transformers.trainer as trainer_module

    monkeypatch.setattr(trainer_module, "DEFAULT_CALLBACKS", [c for c in trainer_module.DEFAULT_CALLBACKS
                                                              if c is not SlimAdamCallback])
    model = tiny_gpt2()
    args = training_args(tmp_path / "a", optim="adamw_torch")
    plain = _train(tmp_path, "a", model, args=args, optimizers=(build_slimadam(model, lr=1e-2), None))
    assert not any("slimadam/state_bytes" in log for log in plain.state.log_history)
    model = tiny_gpt2()
    args = training_args(tmp_path / "b", optim="adamw_torch")
    explicit = _train(tmp_path, "b", model, args=args, optimizers=(build_slimadam(model, lr=1e-2), None),
                      callbacks=[SlimAdamCallback()])
    assert sum("slimadam/state_bytes" in log for log in explicit.state.log_history) == 1


def test_nothing_compressed_matches_torch_adamw_through_the_trainer(tmp_path):
    """Hyperparameters (lr schedule, betas, eps, decay split) reach SlimAdamW as they reach AdamW."""
    roles = ["token_embedding", "position_embedding", "query", "key", "value", "attention_output", "mlp_up",
             "mlp_down", "lm_head"]
    override = tmp_path / "none.yaml"
    override.write_text("rules:\n" + "".join(f"  {r}: none\n" for r in roles))
    common = dict(adam_beta1=0.8, adam_beta2=0.95, adam_epsilon=1e-6, weight_decay=0.3, warmup_steps=1)
    slim = _train(tmp_path, "slim", args=training_args(tmp_path / "slim", optim_args=f"config={override}", **common))
    assert slim.optimizer.optimizer.plan.second_moment_savings == 0.0
    adamw = _train(tmp_path, "adamw", args=training_args(tmp_path / "adamw", optim="adamw_torch", **common))
    assert type(adamw.optimizer.optimizer) is torch.optim.AdamW
    assert max_abs_diff(params_of(slim.model), params_of(adamw.model)) < 1e-6


def test_gradient_accumulation_matches_the_larger_batch(tmp_path):
    big = _train(tmp_path, "big", args=training_args(tmp_path / "big", per_device_train_batch_size=4, max_steps=3))
    accumulated = _train(
        tmp_path, "acc",
        args=training_args(tmp_path / "acc", per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=3),
    )
    optimizer = accumulated.optimizer.optimizer
    assert all(s["step"].item() == 3 for s in optimizer.state.values())
    assert max_abs_diff(params_of(big.model), params_of(accumulated.model)) < 1e-5


def test_bf16_autocast_on_cpu(tmp_path):
    trainer = _train(tmp_path, "bf16", args=training_args(tmp_path / "bf16", bf16=True))
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert losses and all(torch.isfinite(torch.tensor(losses)))
    optimizer = trainer.optimizer.optimizer
    for group in optimizer.param_groups:
        for p, spec in zip(group["params"], group.get("compress") or [None] * len(group["params"])):
            state = optimizer.state[p]
            assert p.dtype == torch.float32 and state["exp_avg_sq"].dtype == torch.float32
            if spec is not None and not isinstance(spec, dict):
                assert all(state["exp_avg_sq"].shape[d] == 1 for d in spec)
