"""End to end: an HF-style script that knows nothing of SlimAdam, run through the wrapper."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).parent / "scripts"))
from tiny_assets import HF_CLM_SCRIPT, train_tokenizer, write_text_files  # noqa: E402

BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("clm")
    train, valid = write_text_files(root / "data")
    train_tokenizer(root / "tokenizer", [train])
    return root, train, valid


def _script_args(root: Path, train: Path, valid: Path, out: Path) -> dict:
    return {
        "tokenizer_name": str(root / "tokenizer"),
        "train_file": str(train),
        "validation_file": str(valid),
        "config_overrides": "n_embd=16,n_layer=2,n_head=2,n_positions=32,resid_pdrop=0,embd_pdrop=0,attn_pdrop=0",
        "output_dir": str(out),
        "do_train": True,
        "do_eval": True,
        "max_steps": 4,
        "per_device_train_batch_size": 4,
        "logging_steps": 2,
        "report_to": "none",
        "use_cpu": True,
        "disable_tqdm": True,
        "optim": "slimadam",
        "optim_args": "preset=gpt2",
    }


def _as_cli(args: dict) -> list[str]:
    cli = []
    for key, value in args.items():
        cli += [f"--{key}", "true" if value is True else str(value)]
    return cli


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


def _check_run(out: subprocess.CompletedProcess, output_dir: Path) -> None:
    text = out.stdout + out.stderr
    assert "OPTIMIZER SlimAdamW" in out.stdout
    assert text.count("SlimAdam plan: preset gpt2") == 1
    assert "second moments saved" in text
    final = json.loads(out.stdout.split("FINAL ", 1)[1].splitlines()[0])
    assert final["step"] == 4
    assert (output_dir / "slimadam_plan.json").is_file()
    state = json.loads((output_dir / "trainer_state.json").read_text())
    assert sum("slimadam/second_moment_savings" in log for log in state["log_history"]) == 1


def test_unmodified_script_needs_the_wrapper(assets, tmp_path):
    root, train, valid = assets
    cmd = [sys.executable, str(HF_CLM_SCRIPT), *_as_cli(_script_args(root, train, valid, tmp_path / "o"))]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    out = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode != 0 and "invalid choice: 'slimadam'" in out.stderr


def test_python_m_slimadam_hf_run_with_cli_args(assets, tmp_path):
    root, train, valid = assets
    args = _script_args(root, train, valid, tmp_path / "out")
    out = _run([sys.executable, "-m", "slimadam_hf.run", str(HF_CLM_SCRIPT), *_as_cli(args)], tmp_path)
    _check_run(out, tmp_path / "out")


def test_slimadam_run_console_script_with_yaml_config(assets, tmp_path):
    if shutil.which("slimadam-run", path=str(BIN)) is None:
        pytest.skip("slimadam-run is not installed (pip install -e .)")
    root, train, valid = assets
    args = _script_args(root, train, valid, tmp_path / "out")
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(args))
    out = _run([str(BIN / "slimadam-run"), str(HF_CLM_SCRIPT), str(config)], tmp_path)
    _check_run(out, tmp_path / "out")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_accelerate_launch_two_processes(assets, tmp_path):
    if shutil.which("accelerate", path=str(BIN)) is None:
        pytest.skip("accelerate CLI not installed")
    root, train, valid = assets
    args = _script_args(root, train, valid, tmp_path / "out")
    cmd = [
        # --multi_gpu picks accelerate's torch.distributed launcher; --use_cpu makes it gloo on CPU
        str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
        "-m", "slimadam_hf.run", str(HF_CLM_SCRIPT), *_as_cli(args),
    ]
    out = _run(cmd, tmp_path)
    assert out.stdout.count("OPTIMIZER SlimAdamW") == 2  # both ranks built SlimAdamW
    text = out.stdout + out.stderr
    assert text.count("SlimAdam plan: preset gpt2") == 1  # the summary comes from the main process only
    assert (tmp_path / "out" / "slimadam_plan.json").is_file()
