"""The benchmark scripts' --smoke modes run end to end (numbers are not checked: benchmarks are scripts)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _run(script: str, *args: str) -> str:
    out = subprocess.run(
        [sys.executable, str(REPO / "scripts" / script), *args],
        capture_output=True, text=True, timeout=600, cwd=REPO,
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    return out.stdout


def test_bench_step_smoke(tmp_path):
    md = tmp_path / "step.md"
    stdout = _run("bench_step.py", "--smoke", "--output", str(md))
    text = md.read_text()
    assert "| torch AdamW fused |" in text and "| SlimAdamW foreach |" in text and "| SlimAdamW reference |" in text
    assert "| SlimAdamW default |" in text and "| SlimAdamW default, robust |" in text
    row = next(l for l in text.splitlines() if l.startswith("| SlimAdamW foreach, bf16 m |"))
    state_ratio = float(row.split("|")[6])
    assert state_ratio < 0.3  # bf16 first moment + compressed second moment
    assert "Machine:" in stdout


def test_bench_step_first_step_child_times_a_fresh_process():
    first = json.loads(_run("bench_step.py", "--first-step-child", "tiny", "fused").strip().splitlines()[-1])
    assert first["first"] > 0 and first["second"] > 0


def test_bench_quality_smoke(tmp_path):
    _run("bench_quality.py", "--smoke", "--out", str(tmp_path), "--archs", "gpt2", "bert", "--no-vit",
         "--optimizers", "AdamW", "SlimAdam", "SlimAdam robust", "SlimAdam paper", "SlimAdam SNR", "Adalayer")
    data = json.loads((tmp_path / "quality.json").read_text())
    names = {r["optimizer"] for r in data["lm"]}
    assert {"AdamW", "SlimAdam", "SlimAdam robust", "SlimAdam paper", "Adalayer"} <= names
    final = {(r["arch"], r["optimizer"], r["lr"], r["seed"]): r["final_val"] for r in data["lm"]}
    for arch, lr, seed in {(a, lr, s) for a, _, lr, s in final}:  # "SlimAdam" is the preset's default
        default_is = "SlimAdam robust" if arch == "bert" else "SlimAdam paper"
        other = "SlimAdam paper" if arch == "bert" else "SlimAdam robust"
        assert final[arch, "SlimAdam", lr, seed] == final[arch, default_is, lr, seed], (arch, lr, seed)
        assert final[arch, "SlimAdam", lr, seed] != final[arch, other, lr, seed], (arch, lr, seed)
    assert {r["arch"] for r in data["lm"]} == {"gpt2", "bert"}
    assert all(r["curve"] for r in data["lm"])
    assert (tmp_path / "quality_lr.png").stat().st_size > 0 and (tmp_path / "quality_steps.png").stat().st_size > 0
    assert "Final validation loss" in (tmp_path / "quality.md").read_text()


def test_bench_quality_snr_proxy_lr(tmp_path):
    _run("bench_quality.py", "--smoke", "--out", str(tmp_path), "--archs", "bert", "--no-vit",
         "--optimizers", "SlimAdam SNR", "--snr-proxy-lr", "0.0005")
    assert "(proxy AdamW at lr 0.0005)" in (tmp_path / "quality.md").read_text()


def test_ablate_roles_variants(tmp_path):
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import ablate_roles
    finally:
        sys.path.remove(str(REPO / "scripts"))
    assert ablate_roles._variant_rules("token_embedding=fan_in+query") == {"token_embedding": "fan_in", "query": "none"}
    assert ablate_roles._variant_name("key") == "full key"
    _run("ablate_roles.py", "--arch", "bert", "--seeds", "0", "--steps", "3", "--baselines", "SlimAdam",
         "--roles", "key", "token_embedding=fan_in+query", "--out", str(tmp_path), "--", "--smoke")
    data = json.loads((tmp_path / "quality.json").read_text())
    assert {r["optimizer"] for r in data["lm"]} == {"SlimAdam", "full key", "token_embedding=fan_in+query"}
    bad = subprocess.run([sys.executable, str(REPO / "scripts" / "ablate_roles.py"), "--arch", "bert", "--roles",
                          "querry", "--out", str(tmp_path)], capture_output=True, text=True, cwd=REPO)
    assert bad.returncode == 2 and "--roles: ['querry'] are not bert roles" in bad.stderr


def test_bench_memory_smoke(tmp_path):
    md = tmp_path / "memory.md"
    stdout = _run("bench_memory.py", "--smoke", "--output", str(md))
    for name in ("adamw_torch_fused", "slimadam", "slimadam-int8"):
        assert f"| gpt2-tiny | {name} |" in stdout
    assert "Largest fp32 model trained" in stdout and md.is_file()


def test_second_moment_fit_smoke():
    out = _run("second_moment_fit.py", "--arch", "llama", "--corpus", "pydoc", "--steps", "3")
    rows = [line for line in out.splitlines() if line.startswith("| mlp_gate")]
    assert len(rows) == 1
    median_rule, p99_rule, median_factored, p99_factored = (float(x) for x in rows[0].strip(" |").split("|")[1:])
    # a factor of AdamW's step per coordinate: positive, finite, and the 99th percentile above the median
    assert 0 < median_rule <= p99_rule < 100 and 0 < median_factored <= p99_factored < 100


def test_paper_gpt2_smoke(tmp_path):
    # the one-command GPU headline (scripts/paper_gpt2.sh) in its CPU smoke mode: every optimizer at both LRs
    out = subprocess.run(["bash", str(REPO / "scripts" / "paper_gpt2.sh"), "--smoke", "--out", str(tmp_path)],
                         env={**os.environ, "PYTHON": sys.executable}, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    table = (tmp_path / "paper_gpt2.md").read_text()
    for name in ("AdamW", "SlimAdam", "SlimAdam robust", "SlimAdam int8 m"):
        assert table.count(f"| {name} |") == 2, table
    assert (tmp_path / "paper_gpt2.png").stat().st_size > 0
