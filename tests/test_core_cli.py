"""The `slimadam inspect` command and the packaging of presets."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import zipfile

import pytest

from conftest import REPO_ROOT
from slimadam_hf.cli import main


def test_inspect_gpt2_prints_collapsed_table_and_totals(capsys):
    assert main(["inspect", "--model-type", "gpt2", "--config-overrides", "n_layer=2"]) == 0
    out = capsys.readouterr().out
    assert "transformer.h.N.attn.c_attn.weight" in out and "query|key|value" in out
    assert "transformer.h.0." not in out
    assert "second moments saved: " in out and re.search(r"AdamW [\d.,]+ [KMG]iB -> SlimAdamW [\d.,]+ [KMG]iB", out)


def test_inspect_llama_1b_like_config_on_meta_device(capsys, tmp_path):
    overrides = (
        "hidden_size=2048,intermediate_size=8192,num_hidden_layers=16,num_attention_heads=32,"
        "num_key_value_heads=8,vocab_size=128256,tie_word_embeddings=true"
    )
    out_json = tmp_path / "plan.json"
    assert main(["inspect", "--model-type", "llama", "--config-overrides", overrides, "--dtype", "bfloat16",
                 "--json", str(out_json)]) == 0
    out = capsys.readouterr().out
    assert "1,235,814,400 parameters" in out and "second moments saved: 99.96%" in out
    assert out_json.is_file()


def test_inspect_local_config_dir_with_overrides_file(capsys, tmp_path):
    from transformers import AutoConfig

    AutoConfig.for_model("bert", num_hidden_layers=2).save_pretrained(tmp_path)
    override = tmp_path / "o.yaml"
    override.write_text("rules:\n  query: none\n")
    assert main(["inspect", "--config", str(tmp_path), "--overrides", str(override), "--all-layers"]) == 0
    out = capsys.readouterr().out
    assert "bert.encoder.layer.1.attention.self.query.weight" in out


def test_inspect_reports_bad_input_as_an_error(capsys):
    assert main(["inspect", "--model-type", "gpt2", "--preset", "nope"]) == 2
    assert "unknown preset 'nope'; available presets" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["inspect", "--model-type", "gpt2", "--config-overrides", "n_layer"])


def _copy_checkout(dest):
    """The files git would commit (tracked, and untracked but not ignored), links kept as links."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO_ROOT,
                            capture_output=True, text=True, check=True).stdout.split("\0")
    for rel in filter(None, listed):
        src, dst = REPO_ROOT / rel, dest / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_symlink():
            os.symlink(os.readlink(src), dst)
        elif src.is_file():
            shutil.copy2(src, dst)


def test_wheel_ships_every_module_and_the_presets(tmp_path):
    source, out = tmp_path / "src", tmp_path / "dist"
    _copy_checkout(source)  # build outside the checkout: setuptools writes build/ and *.egg-info/ in place
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(source)],
        check=True,
    )
    (wheel,) = out.glob("slimadam_hf-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for preset in ("gpt2", "llama", "vit", "bert", "generic"):
        assert f"slimadam_hf/preset_files/{preset}.yaml" in names
    modules = {str(p.relative_to(REPO_ROOT)) for p in (REPO_ROOT / "slimadam_hf").rglob("*.py")
               if "preset_files" not in p.parts}
    assert modules <= set(names)
