"""scripts/run_clm.py end to end with tiny settings: from scratch (own tokenizer), then LoRA on that checkpoint."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent / "scripts"))
from tiny_assets import REPO, write_text_files  # noqa: E402

RUN_CLM = REPO / "scripts" / "run_clm.py"
TINY = ["--config_overrides", "n_layer=1,n_embd=16,n_head=2,n_positions=32", "--block_size", "32",
        "--tokenizer_vocab_size", "300", "--max_steps", "3", "--per_device_train_batch_size", "4",
        "--logging_steps", "1", "--disable_tqdm", "true", "--max_eval_blocks", "4"]


def _run(args: list[str], cwd: Path) -> str:
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}  # a pipe: each statement stays one line
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, str(RUN_CLM), *args], cwd=cwd, capture_output=True, text=True,
                         timeout=300, env=env)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout + out.stderr


def test_run_clm_from_scratch_then_lora_from_the_checkpoint(tmp_path):
    train, valid = write_text_files(tmp_path / "data")
    files = ["--train_file", str(train), "--validation_file", str(valid)]
    scratch = tmp_path / "scratch"
    text = _run([*files, *TINY, "--output_dir", str(scratch)], tmp_path)
    assert "SlimAdam plan: preset gpt2" in text
    assert "== final eval loss" in text and "vs AdamW" in text and "second moments saved" in text
    summary = json.loads((scratch / "run_summary.json").read_text())
    assert summary["optimizer"] == "SlimAdamW" and summary["steps"] == 3
    assert summary["optimizer_state_bytes"] < summary["adamw_state_bytes"]
    assert (scratch / "tokenizer" / "tokenizer.json").is_file() and (scratch / "slimadam_plan.json").is_file()

    lora = tmp_path / "lora"
    text = _run([*files, "--model_name_or_path", str(scratch), "--lora_r", "2", "--use_dora", "true",
                 "--max_steps", "2", "--disable_tqdm", "true", "--max_eval_blocks", "4", "--block_size", "32",
                 "--output_dir", str(lora)], tmp_path)
    assert "DoRA:" in text and "fan_in_fan_out=True" in text
    plan = json.loads((lora / "slimadam_plan.json").read_text())
    roles = {p["role"] for p in plan["parameters"]}
    assert roles == {"adapter"}  # only the adapter factors train; the frozen base is not planned


def _write_idx(path: Path, array) -> None:
    import gzip

    import numpy as np

    array = np.asarray(array, dtype=np.uint8)
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.tobytes())


def test_run_image_classification_on_idx_files(tmp_path, monkeypatch, capsys):
    import runpy

    import numpy as np

    rng = np.random.default_rng(0)
    for prefix, n in (("train", 32), ("t10k", 16)):
        _write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        _write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", rng.integers(0, 10, n))
    args = ["--data_dir", str(tmp_path), "--output_dir", str(tmp_path / "out"), "--max_steps", "2",
            "--per_device_train_batch_size", "8", "--hidden_size", "16", "--num_hidden_layers", "1",
            "--num_attention_heads", "2", "--intermediate_size", "32", "--disable_tqdm", "true"]
    monkeypatch.setattr(sys, "argv", ["run_image_classification.py", *args])
    runpy.run_path(str(REPO / "scripts" / "run_image_classification.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert "== final eval accuracy" in out and "vs AdamW" in out
    plan = json.loads((tmp_path / "out" / "slimadam_plan.json").read_text())
    assert plan["preset"] == "vit" and not plan["warnings"]


def test_run_clm_compare_adamw_prints_both_losses_and_one_savings_statement(tmp_path):
    train, valid = write_text_files(tmp_path / "data")
    out_dir = tmp_path / "cmp"
    text = _run(["--train_file", str(train), "--validation_file", str(valid), *TINY, "--compare", "adamw",
                 "--output_dir", str(out_dir)], tmp_path)
    summary = json.loads((out_dir / "run_summary.json").read_text())
    adamw = json.loads((out_dir / "adamw" / "eval_results.json").read_text())["eval_loss"]
    assert summary["adamw_eval_loss"] == adamw and summary["optimizer"] == "SlimAdamW"
    assert f"AdamW (adamw_torch_fused) on the same run: eval loss {adamw:.4f}" in text
    assert re.search(r"SlimAdamW is [+-]\d+\.\d% vs AdamW", text)
    # the plan summary at the start and the last line state the savings the same way
    statements = re.findall(r"second moments saved: [\d.]+% \([\d,]+ of [\d,]+ kept\); optimizer state: AdamW "
                            r"[\d.,]+ [KMG]?i?B -> SlimAdamW [\d.,]+ [KMG]?i?B \([\d.]+% of AdamW\)", text)
    assert len(statements) == 2 and statements[0] == statements[1]
