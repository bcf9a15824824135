"""register(): OptimizerNames, HfArgumentParser, configs, pickles, optim_args, the handler and its fallback."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from transformers import HfArgumentParser, Trainer, TrainingArguments
from transformers import trainer as trainer_module
from transformers import trainer_optimizer
from transformers.training_args import OptimizerNames

import slimadam_hf
from slimadam_hf.rules.builder import decay_parameter_names
from slimadam_hf.hf.callbacks import SlimAdamCallback
from slimadam_hf.hf.register import SUPPORTED_TRANSFORMERS, register
from slimadam_hf.hf.optim_args import OptimArgsError, optim_args_specs, parse_optim_args

sys.path.insert(0, str(Path(__file__).parent / "scripts"))
from tiny_assets import REPO, RandomTokens, tiny_gpt2, training_args  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _registered():
    register()


def test_register_is_idempotent():
    assert register() == register() == "handler_table"
    assert [m.value for m in OptimizerNames].count("slimadam") == 1
    assert trainer_module.DEFAULT_CALLBACKS.count(SlimAdamCallback) == 1
    assert trainer_optimizer._OPTIMIZER_HANDLERS[OptimizerNames.SLIMADAM] is not None
    assert OptimizerNames("slimadam") is OptimizerNames.SLIMADAM


def test_training_arguments_parser_and_config_files(tmp_path):
    assert TrainingArguments(output_dir=str(tmp_path), optim="slimadam").optim is OptimizerNames.SLIMADAM
    parser = HfArgumentParser(TrainingArguments)
    (args,) = parser.parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--optim", "slimadam", "--optim_args", "preset=gpt2"]
    )
    assert args.optim is OptimizerNames.SLIMADAM and args.optim_args == "preset=gpt2"
    config = {"output_dir": str(tmp_path), "optim": "slimadam", "optim_args": "foreach=false"}
    (tmp_path / "a.json").write_text(json.dumps(config))
    (tmp_path / "a.yaml").write_text(yaml.safe_dump(config))
    (from_json,) = parser.parse_json_file(str(tmp_path / "a.json"))
    (from_yaml,) = parser.parse_yaml_file(str(tmp_path / "a.yaml"))
    assert from_json.optim is from_yaml.optim is OptimizerNames.SLIMADAM
    assert json.loads(args.to_json_string())["optim"] == "slimadam"


def test_training_args_bin_unpickles_after_register_only(tmp_path):
    path = tmp_path / "training_args.bin"
    torch.save(TrainingArguments(output_dir=str(tmp_path), optim="slimadam"), path)
    assert pickle.loads(pickle.dumps(torch.load(path, weights_only=False))).optim is OptimizerNames.SLIMADAM
    code = (
        "import sys, torch\n"
        "try:\n"
        f"    torch.load({str(path)!r}, weights_only=False)\n"
        "except ValueError as e:\n"
        "    print('BEFORE', 'slimadam is not a valid OptimizerNames' in str(e))\n"
        "import slimadam_hf; slimadam_hf.register()\n"
        f"print('AFTER', torch.load({str(path)!r}, weights_only=False).optim.value)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "BEFORE True" in out.stdout and "AFTER slimadam" in out.stdout


def test_supported_range_matches_pyproject():
    pyproject = (REPO / "pyproject.toml").read_text()
    assert f'"transformers{",".join(SUPPORTED_TRANSFORMERS)}"' in pyproject


def test_optim_args_keys_and_errors(tmp_path):
    keys = optim_args_specs()
    assert {"preset", "config", "foreach"} <= set(keys)
    override = tmp_path / "o.yaml"
    override.write_text("rules: {query: none}\n")
    parsed = parse_optim_args({"preset": "gpt2", "config": str(override), "foreach": "False"})
    assert parsed == {"preset": "gpt2", "overrides": str(override), "foreach": False}
    assert parse_optim_args("preset=auto") == {"preset": "auto"}
    with pytest.raises(OptimArgsError, match=r"'lr_decay' is not known.*valid keys: preset .*config .*foreach"):
        parse_optim_args("lr_decay=1")
    with pytest.raises(OptimArgsError, match=r"foreach='maybe' cannot be read.*valid keys"):
        parse_optim_args("foreach=maybe")
    with pytest.raises(OptimArgsError, match=r"preset='gtp2' cannot be read.*gpt2"):
        parse_optim_args("preset=gtp2")
    with pytest.raises(OptimArgsError, match=r"config=.*does not exist"):
        parse_optim_args(f"config={tmp_path / 'missing.yaml'}")
    with pytest.raises(OptimArgsError, match=r"'foreach' is not key=value.*valid keys"):
        parse_optim_args("preset=gpt2,foreach")


def _check_handler_optimizer(trainer, model, args):
    optimizer = trainer.create_optimizer()
    assert isinstance(optimizer, slimadam_hf.SlimAdamW)
    plan = optimizer.plan
    decay = decay_parameter_names(model)
    seen = {}
    for group in optimizer.param_groups:
        assert group["lr"] == args.learning_rate and group["eps"] == args.adam_epsilon
        assert tuple(group["betas"]) == (args.adam_beta1, args.adam_beta2)
        assert group["foreach"] is False  # from optim_args
        for name, p, spec in zip(group["param_names"], group["params"], group.get("compress") or [None] * 99):
            assert group["weight_decay"] == (args.weight_decay if name in decay else 0.0)
            seen[name] = spec
    assert seen == {name: spec for name, spec in plan.specs().items()}
    assert seen.keys() == {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(spec is not None for spec in seen.values())


def test_handler_builds_named_groups_with_plan_specs_and_trainer_decay(tmp_path):
    model = tiny_gpt2()
    args = training_args(tmp_path, optim_args="preset=gpt2,foreach=false", adam_beta1=0.8, adam_epsilon=1e-7)
    _check_handler_optimizer(Trainer(model=model, args=args, train_dataset=RandomTokens()), model, args)


def test_unknown_optim_arg_fails_early_and_again_when_the_trainer_creates_the_optimizer(tmp_path):
    with pytest.raises(OptimArgsError, match="'presets' is not known.*preset"):
        training_args(tmp_path, optim_args="presets=gpt2")  # at argument parsing, before any data or model
    args = training_args(tmp_path)
    args.optim_args = "presets=gpt2"  # changed after creation, e.g. in a loaded training_args.bin
    trainer = Trainer(model=tiny_gpt2(), args=args)
    with pytest.raises(OptimArgsError, match="'presets' is not known.*preset"):
        trainer.create_optimizer()


def test_fallback_wraps_get_optimizer_cls_and_kwargs(tmp_path, monkeypatch):
    monkeypatch.setattr(Trainer, "get_optimizer_cls_and_kwargs", Trainer.__dict__["get_optimizer_cls_and_kwargs"])
    monkeypatch.delitem(trainer_optimizer._OPTIMIZER_HANDLERS, OptimizerNames.SLIMADAM)
    assert register(use_handler_table=False) == "wrapped_get_optimizer_cls_and_kwargs"
    assert register(use_handler_table=False) == "wrapped_get_optimizer_cls_and_kwargs"  # idempotent
    model = tiny_gpt2()
    args = training_args(tmp_path, optim_args="foreach=false")
    _check_handler_optimizer(Trainer(model=model, args=args, train_dataset=RandomTokens()), model, args)
    # other optimizers still go through the original
    adamw_args = training_args(tmp_path, optim="adamw_torch")
    cls, _ = Trainer.get_optimizer_cls_and_kwargs(adamw_args, model)
    assert cls is torch.optim.AdamW


def test_optimizer_options_from_the_signature_reach_the_optimizer(tmp_path):
    assert {"implementation", "momentum_dtype"} <= optim_args_specs().keys()
    args = training_args(tmp_path, optim_args="implementation=reference,momentum_dtype=bfloat16")
    optimizer = Trainer(model=tiny_gpt2(), args=args, train_dataset=RandomTokens()).create_optimizer()
    for group in optimizer.param_groups:
        assert group["implementation"] == "reference"
        assert group["momentum_dtype"] in (torch.bfloat16, "bfloat16")
    with pytest.raises(OptimArgsError, match=r"implementation='fast' cannot be read.*foreach.*reference"):
        parse_optim_args("implementation=fast")


def test_run_wrapper_usage_errors_and_module_mode(monkeypatch, capsys, tmp_path):
    from slimadam_hf import run

    monkeypatch.setattr(sys, "argv", ["slimadam-run"])
    for argv, code in (([], 2), (["--help"], 0), ([str(tmp_path / "missing.py")], 2), (["-m"], 2)):
        with pytest.raises(SystemExit) as exit_info:
            run.main(argv)
        assert exit_info.value.code == code, argv
    assert "not found" in capsys.readouterr().err
    script = tmp_path / "show_argv.py"
    script.write_text("import sys\nprint('ARGV', sys.argv[1:], __name__)\n")
    run.main([str(script), "--optim", "slimadam"])
    assert "ARGV ['--optim', 'slimadam'] __main__" in capsys.readouterr().out
    monkeypatch.syspath_prepend(str(tmp_path))
    run.main(["-m", "show_argv", "x"])
    assert "ARGV ['x'] __main__" in capsys.readouterr().out
