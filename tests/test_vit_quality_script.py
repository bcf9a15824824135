"""scripts/bench_vit_quality.py --smoke runs end to end (numbers are not checked): on the generated letters task,
which needs no download, and on Fashion-MNIST where Debian's dataset-fashion-mnist is installed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FASHION = Path("/usr/share/datasets/fashion-mnist")


TASKS = ["letters"] + (["fashion"] if FASHION.is_dir() else [])  # CI has no Fashion-MNIST: letters always runs


@pytest.mark.parametrize("task", TASKS)
def test_bench_vit_quality_smoke(tmp_path, task):
    out = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "bench_vit_quality.py"), "--smoke", "--vit-task", task, "--out", str(tmp_path),
         "--optimizers", "AdamW", "SlimAdam", "SlimAdam robust", "SlimAdam SNR", "full classifier"],
        capture_output=True, text=True, timeout=600, cwd=REPO,
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    saved = json.loads((tmp_path / "vit_quality.json").read_text())
    assert {r["optimizer"] for r in saved["runs"]} == {"AdamW", "SlimAdam", "SlimAdam robust", "SlimAdam SNR",
                                                       "full classifier"}
    assert set(saved["snr_override"]["rules"]) >= {"query", "key", "value", "mlp_up", "mlp_down"}
    assert "| SlimAdam SNR |" in (tmp_path / "vit_quality.md").read_text()
