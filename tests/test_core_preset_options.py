"""A preset's ``options:``: optimizer defaults for a model family (the bert preset turns ``robust`` on).

The user's value wins over an override file's, which wins over the preset's; presets without ``options:``
keep the paper's update. Every entry point (``build_slimadam``, auto-snr, ``--optim_args``, ``slimadam
inspect``) resolves them the same way.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from transformers import Trainer

from slimadam_hf import SlimAdamW, build_auto_snr, build_slimadam, plan_compression
from slimadam_hf.cli import main
from slimadam_hf.rules.presets import PresetError, load_overrides
from tiny_models import tiny_model

sys.path.insert(0, str(Path(__file__).parent / "scripts"))
from tiny_assets import RandomTokens, training_args  # noqa: E402

ROBUST_OFF = {"name": "paper", "options": {"robust": False}}
ROBUST_ON = {"name": "factored", "options": {"robust": True}}


def _robust(optimizer: SlimAdamW) -> set:
    return {group["robust"] for group in optimizer.param_groups}


def _param(optimizer: SlimAdamW, suffix: str) -> torch.Tensor:
    group = optimizer.param_groups[0]
    return next(p for n, p in zip(group["param_names"], group["params"]) if n.endswith(suffix))


def _train(model_type: str, steps: int = 3, **options) -> tuple[SlimAdamW, dict[str, torch.Tensor]]:
    model = tiny_model(model_type)
    optimizer = build_slimadam(model, lr=1e-2, **options)
    ids = torch.randint(0, model.config.vocab_size, (4, 8), generator=torch.Generator().manual_seed(1))
    for _ in range(steps):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return optimizer, {n: p.detach().clone() for n, p in model.named_parameters()}


def test_bert_preset_trains_robust_by_default_and_robust_false_gives_the_papers_update():
    default, after_default = _train("bert")
    explicit, after_explicit = _train("bert", robust=True)
    paper, after_paper = _train("bert", robust=False)
    assert _robust(default) == {True} and default.plan.robust and default.plan.preset_options == {"robust": True}
    assert default.plan.to_dict()["preset_options"] == {"robust": True}  # in the Trainer's slimadam_plan.json
    assert _robust(paper) == {False} and not paper.plan.robust
    for name in after_default:
        assert torch.equal(after_default[name], after_explicit[name]), name
    assert "exp_avg_sq_complement" in default.state[_param(default, "word_embeddings.weight")]
    assert "exp_avg_sq_complement" not in paper.state[_param(paper, "word_embeddings.weight")]
    name = "bert.encoder.layer.0.intermediate.dense.weight"
    assert (after_default[name] - after_paper[name]).abs().max() > 1e-4  # the factoring changes the steps


@pytest.mark.parametrize("model_type", ["gpt2", "llama", "vit"])
def test_other_presets_keep_the_papers_update(model_type):
    model = tiny_model(model_type)
    optimizer = build_slimadam(model)
    assert _robust(optimizer) == {False} and optimizer.plan.preset_options == {}
    assert "robust" not in str(optimizer.plan).splitlines()[0]


def test_override_options_win_over_the_preset_and_the_users_over_both():
    bert, gpt2 = tiny_model("bert"), tiny_model("gpt2")
    assert _robust(build_slimadam(bert, overrides=ROBUST_OFF)) == {False}
    assert _robust(build_slimadam(bert, overrides=ROBUST_OFF, robust=True)) == {True}
    assert _robust(build_slimadam(gpt2, overrides=ROBUST_ON)) == {True}
    assert _robust(build_slimadam(gpt2, overrides=ROBUST_ON, robust=False)) == {False}
    plan = plan_compression(bert, "bert", ROBUST_OFF)
    assert plan.preset_options == {"robust": False}
    assert _robust(build_slimadam(bert, plan=plan)) == {False}  # a plan made earlier carries them


def test_auto_snr_takes_the_presets_options():
    assert _robust(build_auto_snr(tiny_model("bert"), probe_steps=2)) == {True}
    assert _robust(build_auto_snr(tiny_model("bert"), probe_steps=2, robust=False)) == {False}
    assert _robust(build_auto_snr(tiny_model("gpt2"), probe_steps=2)) == {False}


@pytest.mark.parametrize(
    "options, message",
    [
        ({"lr": 0.1}, r"options: 'lr' cannot be set by a preset; valid keys: robust"),
        ({"robust": "maybe"}, r"options: robust='maybe'; write true or false"),
        ([{"robust": True}], r"'options' is a mapping of option -> value"),
    ],
)
def test_bad_preset_options_name_the_key_and_the_fix(options, message):
    with pytest.raises(PresetError, match=message):
        load_overrides({"name": "mine", "options": options})


def test_optim_args_robust_false_turns_the_presets_default_off(tmp_path):
    import slimadam_hf

    slimadam_hf.register()
    vocab = tiny_model("bert").config.vocab_size
    for optim_args, robust in (("preset=bert", True), ("preset=bert,robust=false", False), ("robust=default", True)):
        args = training_args(tmp_path, optim_args=optim_args)
        trainer = Trainer(model=tiny_model("bert"), args=args, train_dataset=RandomTokens(vocab_size=vocab))
        assert _robust(trainer.create_optimizer()) == {robust}, optim_args


def test_inspect_counts_the_presets_robust_unless_no_robust(capsys):
    args = ["inspect", "--model-type", "bert", "--config-overrides", "num_hidden_layers=1"]
    assert main(args) == 0
    default = capsys.readouterr().out
    assert main([*args, "--no-robust"]) == 0
    paper = capsys.readouterr().out
    assert "robust=True (preset bert's default)" in default.splitlines()[0]
    assert "robust" not in paper.splitlines()[0]
    kept = [int(out.rsplit("second moments saved: ", 1)[1].split("(")[1].split(" of")[0].replace(",", ""))
            for out in (default, paper)]
    assert kept[0] > kept[1]  # the complements count in the totals
