"""The one renderer fits the terminal (`slimadam inspect`, the Trainer log); where there is none, one line.

Terminals here are real pseudo-terminals (``pty``) with their window size set, as a user's shell gives.
"""

from __future__ import annotations

import fcntl
import logging
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
import time

import pytest

from slimadam_hf import build_slimadam
from slimadam_hf.hf.callbacks import log_plan_summary
from slimadam_hf.rules.render import fold

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "scripts"))
from tiny_assets import tiny_gpt2  # noqa: E402

MODELS = ("gpt2", "llama", "vit", "bert")
INSPECT_EACH = "import sys; from slimadam_hf.cli import main\nfor m in sys.argv[1:]:\n" \
    "    print('=== ' + m, flush=True); main(['inspect', '--model-type', m]); sys.stdout.flush()"


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    return dict(env, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1", **extra)


def _terminal(columns: int) -> tuple[int, int]:
    """A pseudo-terminal (master, slave) whose window is ``columns`` wide."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
    return master, slave


def _read_all(master: int, done, timeout: float = 240) -> str:
    chunks, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        if select.select([master], [], [], 0.5)[0]:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: every writer closed its end
                break
            if not data:
                break
            chunks.append(data)
        elif done():
            break
    return b"".join(chunks).decode().replace("\r\n", "\n")


def _inspect_in_terminal(columns: int, env: dict[str, str]) -> str:
    master, slave = _terminal(columns)
    proc = subprocess.Popen([sys.executable, "-c", INSPECT_EACH, *MODELS], stdin=slave, stdout=slave,
                            stderr=subprocess.PIPE, env=env)
    os.close(slave)
    try:
        out = _read_all(master, lambda: proc.poll() is not None)
    finally:
        os.close(master)
    assert proc.wait(timeout=60) == 0, proc.stderr.read().decode()[-3000:]
    return out


def _by_model(out: str) -> dict[str, list[str]]:
    parts = re.split(r"^=== (\w+)\n", out, flags=re.M)[1:]
    return {model: text.splitlines() for model, text in zip(parts[::2], parts[1::2])}


def _prose(lines: list[str]) -> tuple[str, str]:
    """(header, savings statement), each joined back into one line: lines before the table, lines after."""
    table = next(i for i, line in enumerate(lines) if line.startswith("parameter "))
    savings = next(i for i, line in enumerate(lines) if line.startswith("second moments saved: "))
    assert not any(line.startswith("warning:") for line in lines)
    return " ".join(lines[:table]), " ".join(lines[savings:])


@pytest.fixture(scope="module")
def one_line_outputs(tmp_path_factory) -> dict[str, list[str]]:
    """`slimadam inspect` for each model written to a file, no COLUMNS: where there is no terminal."""
    path = tmp_path_factory.mktemp("log") / "inspect.log"
    with open(path, "w") as log:
        out = subprocess.run([sys.executable, "-c", INSPECT_EACH, *MODELS], stdout=log, stderr=subprocess.PIPE,
                             text=True, env=_env(), timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return _by_model(path.read_text())


def test_a_log_file_keeps_the_header_and_savings_on_one_line_each(one_line_outputs):
    assert set(one_line_outputs) == set(MODELS)
    for model, lines in one_line_outputs.items():
        robust = r", robust=True \(preset bert's default\)" if model == "bert" else ""  # the bert preset's option
        assert re.fullmatch(r"SlimAdam plan: preset \w+ \(model_type \w+\), \d+ trainable tensors, [\d,]+ parameters"
                            + robust, lines[0]), model
        assert re.fullmatch(r"second moments saved: [\d.]+% \([\d,]+ of [\d,]+ kept\); optimizer state: AdamW "
                            r"[\d.,]+ [KMG]iB -> SlimAdamW [\d.,]+ [KMG]iB \([\d.]+% of AdamW\)", lines[-1]), model


@pytest.mark.parametrize("how", ["80-column terminal", "COLUMNS=80, piped"])
def test_every_inspect_line_fits_80_columns_with_the_same_numbers(how, one_line_outputs):
    if how == "80-column terminal":
        out = _inspect_in_terminal(80, _env())
    else:  # the issue's `COLUMNS=80 slimadam inspect ... | awk '{print length}'`: COLUMNS is the width; stderr
        # too (BERT built as BertLMHeadModel logged a 91-character transformers warning)
        out = subprocess.run([sys.executable, "-c", INSPECT_EACH, *MODELS], stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, env=_env(COLUMNS="80"), timeout=300).stdout
    folded = _by_model(out)
    assert set(folded) == set(MODELS)
    for model, lines in folded.items():
        too_long = [line for line in lines if len(line) > 80]
        assert too_long == [], (model, too_long)
        # folded only: the words and numbers are the log file's
        assert _prose(lines) == (one_line_outputs[model][0], one_line_outputs[model][-1]), model
        assert len(lines) > len(one_line_outputs[model])  # the table's long names fold too


def test_fold_breaks_between_clauses_and_inside_one_only_when_it_is_longer_than_a_line():
    clauses = ["second moments saved: 99.79% (255,569 of 124,439,808 kept)",
               "optimizer state: AdamW 949.40 MiB -> SlimAdamW 475.68 MiB (50.1% of AdamW)"]
    one_line = "; ".join(clauses)
    assert fold(clauses, None, prefix="== ") == ["== " + one_line]
    assert fold(clauses, 200) == [one_line]
    assert fold(clauses, 80) == [clauses[0] + ";", clauses[1]]
    assert fold(clauses, 80, prefix="== ") == ["== " + clauses[0] + ";", "   " + clauses[1]]
    for width, lead in ((40, 0), (40, 15), (25, 0)):
        lines = fold(clauses, width, prefix="== ", lead=lead)
        assert lead + len(lines[0]) <= width and max(len(line) for line in lines) <= width
        assert " ".join(line[3:] for line in lines) == one_line
    assert fold(["x" * 50], 24) == ["x" * 24, "x" * 24, "xx"]
    assert fold(clauses, 80, lead=65) == ["", clauses[0] + ";", clauses[1]]  # no room beside the lead
    with pytest.raises(ValueError, match=r"fold\(sep=';'\): use a separator that ends in one space"):
        fold(clauses, 80, sep=";")


HF_SCRIPT_FORMAT = "%(asctime)s - %(levelname)s - %(name)s - %(message)s"  # transformers' example scripts


def _summary(handler: logging.Handler) -> None:
    """What the Trainer logs when SlimAdamW is created, through ``handler`` only, formatted as HF scripts do."""
    handler.setFormatter(logging.Formatter(HF_SCRIPT_FORMAT, datefmt="%H:%M:%S"))
    trainer_logger = logging.getLogger("slimadam_hf.trainer")
    trainer_logger.addHandler(handler)
    trainer_logger.propagate = False  # pytest's capture handler is on the root logger
    try:
        log_plan_summary(build_slimadam(tiny_gpt2(n_embd=32, n_layer=3), lr=1e-3))
    finally:
        trainer_logger.propagate = True
        trainer_logger.removeHandler(handler)
        handler.close()


def test_trainer_log_fits_the_terminal_and_a_log_file_keeps_one_line(tmp_path, monkeypatch):
    monkeypatch.delenv("COLUMNS", raising=False)
    master, slave = _terminal(72)
    _summary(logging.StreamHandler(os.fdopen(slave, "w")))
    shown = _read_all(master, lambda: True, timeout=10).splitlines()
    os.close(master)
    _summary(logging.FileHandler(tmp_path / "train.log"))
    logged = (tmp_path / "train.log").read_text().splitlines()

    prefix = r"\d\d:\d\d:\d\d - INFO - slimadam_hf\.trainer - "
    assert re.match(prefix + "SlimAdam plan: preset gpt2", shown[0]) and len(shown) > len(logged)
    assert max(len(line) for line in shown) <= 72  # the first line with its time and level too
    assert re.fullmatch(prefix + r"SlimAdam plan: .*, \d+ trainable tensors, [\d,]+ parameters", logged[0])
    assert logged[-1].startswith("second moments saved: ") and logged[-1].endswith("of AdamW)")
    assert len(logged[-1]) > 100 and max(len(line) for line in logged[1:-1]) <= 100
