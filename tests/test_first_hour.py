"""A new user's first hour: the README's examples run as written, and each mistake gets one line, early."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap

import pytest

from conftest import REPO_ROOT

ENV = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")


def _python(code: str, *args: str, cwd=None, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=timeout,
                          env=ENV, cwd=cwd)


def _readme_python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", (REPO_ROOT / "README.md").read_text(), flags=re.S)


def test_readme_python_examples_run_as_written_in_under_2_gib(tmp_path):
    blocks = _readme_python_blocks()
    assert len(blocks) >= 3 and "build_slimadam" in blocks[0]
    script = tmp_path / "readme_examples.py"
    script.write_text("\n".join(blocks))
    measure = textwrap.dedent(f"""
        import resource, runpy, sys
        runpy.run_path({str(script)!r}, run_name="__main__")
        print("PEAK_KIB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    """)
    out = _python(measure, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "second moments saved: " in out.stdout  # print(optimizer.plan)
    peak_gib = int(re.search(r"PEAK_KIB (\d+)", out.stdout)[1]) / 2**20
    assert peak_gib < 2.0


def _slimadam(*args: str) -> subprocess.CompletedProcess:
    return _python("import sys; from slimadam_hf.cli import main; sys.exit(main(sys.argv[1:]))", *args)


@pytest.mark.parametrize(
    "args,message",
    [
        (["--model-type", "llama", "--config-overrides", "hidden_sise=64"],
         r"LlamaConfig has no field 'hidden_sise'; did you mean 'hidden_size'"),
        (["--model-type", "llama", "--config-overrides", "hidden_size=abc"],
         r"hidden_size='abc': LlamaConfig\.hidden_size is an int"),
        (["--model-type", "nosuchmodel"], r"unknown --model-type 'nosuchmodel'"),
        (["--model-type", "lama"], r"unknown --model-type 'lama'; did you mean 'llama'"),
    ],
)
def test_inspect_mistakes_get_one_line(args, message):
    out = _slimadam("inspect", *args)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    lines = [line for line in out.stderr.splitlines() if line.startswith("slimadam inspect:")]
    assert len(lines) == 1 and len(lines[0]) < 300, out.stderr
    assert re.search(message, lines[0]) and out.stdout == ""


def test_inspect_table_fits_an_80_column_terminal(capsys):
    from slimadam_hf.cli import main

    assert main(["inspect", "--model-type", "gpt2", "--width", "80"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) > 10 and max(len(line) for line in out) <= 80  # the table, the header and the savings
    assert any("query|key|value" in line for line in out)


def test_cli_help_needs_no_torch_and_every_subcommand_has_a_description():
    code = textwrap.dedent("""
        import contextlib, io, sys
        from slimadam_hf.cli.parser import build_parser
        for argv in (["--help"], ["inspect", "--help"], ["rules", "--help"], ["plot", "--help"]):
            text = io.StringIO()
            with contextlib.redirect_stdout(text), contextlib.suppress(SystemExit):
                build_parser().parse_args(argv)
            assert "usage:" in text.getvalue()
            if argv[0] != "--help":
                assert len(text.getvalue().split("\\n\\n")[1].strip()) > 40, argv  # a description paragraph
        print("TORCH_LOADED", "torch" in sys.modules)
    """)
    out = _python(code)
    assert out.returncode == 0, out.stderr
    assert "TORCH_LOADED False" in out.stdout


SCRIPT = "import sys\nprint('SCRIPT RAN', sys.argv[1:])\n"


@pytest.mark.parametrize(
    "optim_args,message",
    [
        ("preset=nosuch", r"preset='nosuch' cannot be read: expected auto, auto-snr, bert"),
        ("presett=gpt2", r"key 'presett' is not known to --optim slimadam \(did you mean 'preset'\?\)"),
        ("config=missing.yaml", r"config='missing.yaml' cannot be read: file 'missing.yaml' does not exist"),
        ("preset=auto-snr", r"preset=auto-snr needs probe_steps=N"),
        ("preset=gpt2,probe_steps=3", r"probe_steps only apply to preset=auto-snr"),
    ],
)
def test_run_wrapper_refuses_bad_optim_args_before_the_script_runs(tmp_path, optim_args, message):
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    out = subprocess.run([sys.executable, "-m", "slimadam_hf.run", str(script), "--optim", "slimadam",
                          "--optim_args", optim_args], capture_output=True, text=True, env=ENV, timeout=120,
                         cwd=tmp_path)
    assert out.returncode == 2
    assert "SCRIPT RAN" not in out.stdout and "Traceback" not in out.stderr
    # one line of ours (optional packages such as bitsandbytes may print their own import notices)
    ours = [line for line in out.stderr.splitlines() if line.startswith("slimadam-run:")]
    assert len(ours) == 1 and re.search(message, ours[0]), out.stderr


def test_run_wrapper_reads_optim_args_from_a_json_config(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    config = tmp_path / "args.json"
    config.write_text('{"output_dir": "out", "optim": "slimadam", "optim_args": "preset=lama"}')
    out = subprocess.run([sys.executable, "-m", "slimadam_hf.run", str(script), str(config)],
                         capture_output=True, text=True, env=ENV, timeout=120, cwd=tmp_path)
    assert out.returncode == 2 and "preset='lama' cannot be read" in out.stderr


def test_script_help_lists_the_optim_args_keys(tmp_path):
    script = tmp_path / "hf_script.py"
    script.write_text(textwrap.dedent("""
        from transformers import HfArgumentParser, TrainingArguments
        HfArgumentParser(TrainingArguments).parse_args_into_dataclasses()
    """))
    out = subprocess.run([sys.executable, "-m", "slimadam_hf.run", str(script), "--help"],
                         capture_output=True, text=True, env=ENV, timeout=120, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    help_text = " ".join(out.stdout.split())
    for key in ("With --optim slimadam: preset", "momentum_dtype", "implementation", "probe_steps"):
        assert key in help_text


def test_training_arguments_check_optim_args_when_created(tmp_path):
    import slimadam_hf
    from slimadam_hf.hf.optim_args import OptimArgsError
    from transformers import TrainingArguments

    slimadam_hf.register()
    with pytest.raises(OptimArgsError, match="preset='nosuch'"):
        TrainingArguments(output_dir=str(tmp_path), optim="slimadam", optim_args="preset=nosuch")
    TrainingArguments(output_dir=str(tmp_path), optim="adamw_torch", optim_args="anything=1")  # not ours
