#!/usr/bin/env python
"""Does SlimAdam train as well as AdamW? Small GPT-2 / Llama LMs from scratch, and a small ViT.

Language models: a byte-level BPE tokenizer (``tokenizers``, trained here) on a real English corpus,
tiny GPT-2 and Llama models from configs with random init, learning rates spanning the U-shaped
loss-vs-LR curve, several seeds. Optimizers:

* ``AdamW``: ``torch.optim.AdamW``;
* ``SlimAdam``: the shipped preset as it trains by default (paper Table 1 rules; the bert preset adds
  ``robust=True``);
* ``SlimAdam bf16 m``: the same with ``momentum_dtype=torch.bfloat16`` (rounded to nearest);
* ``SlimAdam bf16 m stochastic``: ``momentum_dtype="bfloat16", momentum_rounding="stochastic"``;
* ``SlimAdam int8 m``: ``momentum_dtype="int8"`` (block-quantized first moment);
* ``SlimAdam robust``: ``robust=True`` (factored second moment: the rule's mean times the other dims' mean);
* ``SlimAdam paper``: ``robust=False``, the paper's update whatever the preset's default;
* ``SlimAdam SNR``: rules derived by :mod:`slimadam_hf.snr.recorder` / :mod:`slimadam_hf.snr.rules`
  from an AdamW proxy run at a 10x lower LR (the paper's recipe; ``--snr-proxy-lr`` sets another), pooled by role;
* ``Adalayer``: SlimAdamW with every >= 2-D tensor averaged over all its dims (one v per tensor);
* ``Adafactor``: ``torch.optim.Adafactor`` (no momentum);
* ``Adam-mini``: the ``adam-mini`` package, when installed.

Every run uses the same data order per seed, linear warm-up then cosine decay to 10 %, gradient
clipping at 1.0, weight decay 0.1 on the parameters the HF Trainer decays, betas (0.9, 0.95).

ViT: a small ViT on scikit-learn's 8x8 digits at one LR (skipped when scikit-learn is missing).

Outputs (``--out``): ``quality.json`` (every curve), ``quality.md`` (tables), ``quality_lr.png``
(final validation loss vs LR), ``quality_steps.png`` (validation loss vs step at the middle LR).

Corpora (``--corpus``): ``fortunes`` (Debian's ``fortunes`` package, /usr/share/games/fortunes, about
2.5 MB of quotations, literature and jokes), ``pydoc`` (the Python documentation topics shipped with
CPython, ``pydoc_data.topics``; always present) or a path to a text file or folder.

    python scripts/bench_quality.py --out docs/bench                # full run (about 10 min, 1 thread)
    python scripts/bench_quality.py --smoke --out /tmp/q            # seconds, for CI
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import nn

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

FORTUNES = Path("/usr/share/games/fortunes")
BETAS = (0.9, 0.95)
WEIGHT_DECAY = 0.1


# -- data -------------------------------------------------------------------------------------------


def load_corpus(name: str) -> tuple[str, str]:
    """The corpus text and a one-line description of where it came from."""
    if name == "fortunes":
        if not FORTUNES.is_dir():
            raise SystemExit(
                f"--corpus fortunes: {FORTUNES} does not exist; install it (apt-get install fortunes) or "
                "use --corpus pydoc or --corpus PATH"
            )
        files = sorted(p for p in FORTUNES.iterdir() if p.is_file() and not p.suffix and not p.is_symlink())
        text = "\n".join(p.read_text(encoding="utf-8", errors="replace").replace("\n%\n", "\n\n") for p in files)
        return text, f"Debian fortunes ({len(files)} files under {FORTUNES})"
    if name == "pydoc":
        from pydoc_data.topics import topics

        return "\n\n".join(topics[k] for k in sorted(topics)), "CPython pydoc_data.topics"
    path = Path(name)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file())
        return "\n".join(p.read_text(encoding="utf-8", errors="replace") for p in files), f"{len(files)} files under {path}"
    if path.is_file():
        return path.read_text(encoding="utf-8", errors="replace"), str(path)
    raise SystemExit(f"--corpus {name!r}: not 'fortunes', 'pydoc' or an existing file/folder")


def tokenize(text: str, vocab_size: int) -> torch.Tensor:
    from tokenizers import ByteLevelBPETokenizer

    paragraphs = [p + "\n\n" for p in text.split("\n\n") if p.strip()]
    tok = ByteLevelBPETokenizer()
    tok.train_from_iterator(paragraphs, vocab_size=vocab_size, min_frequency=2, show_progress=False)
    return torch.tensor([i for enc in tok.encode_batch(paragraphs) for i in enc.ids], dtype=torch.long)


class Batches:
    """Random windows of a token stream; the same sequence of batches for a given seed."""

    def __init__(self, tokens: torch.Tensor, batch: int, seq: int, seed: int) -> None:
        self.tokens, self.batch, self.seq = tokens, batch, seq
        self.gen = torch.Generator().manual_seed(seed)

    def next(self) -> torch.Tensor:
        starts = torch.randint(0, len(self.tokens) - self.seq - 1, (self.batch,), generator=self.gen)
        return torch.stack([self.tokens[s : s + self.seq] for s in starts.tolist()])


# -- models -----------------------------------------------------------------------------------------


def build_lm(
    arch: str, vocab: int, width: int, layers: int, seq: int, seed: int, init_range: Optional[float] = None
) -> nn.Module:
    """A tiny LM from a config with random init; ``init_range`` overrides the config's ``initializer_range``."""
    import transformers

    transformers.logging.set_verbosity_error()
    init = {} if init_range is None else {"initializer_range": init_range}
    if arch == "gpt2":
        config = transformers.GPT2Config(
            vocab_size=vocab, n_positions=seq, n_embd=width, n_layer=layers, n_head=4,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **init,
        )
    elif arch == "bert":  # masked LM; one extra token id, vocab, is [MASK]
        config = transformers.BertConfig(
            vocab_size=vocab + 1, hidden_size=width, num_hidden_layers=layers, num_attention_heads=4,
            intermediate_size=4 * width, max_position_embeddings=seq, hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0, **init,
        )
        torch.manual_seed(seed)
        return transformers.BertForMaskedLM(config)
    else:
        config = transformers.LlamaConfig(
            vocab_size=vocab, hidden_size=width, intermediate_size=int(width * 8 / 3) // 8 * 8,
            num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=seq, tie_word_embeddings=False, **init,
        )
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(config)


MASK_FRACTION = 0.15


def lm_inputs(model: nn.Module, x: torch.Tensor, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Causal LMs predict every next token; BERT predicts 15% of the tokens, replaced by [MASK] (id vocab)."""
    if model.config.model_type != "bert":
        return dict(input_ids=x, labels=x)
    masked = torch.rand(x.shape, generator=gen) < MASK_FRACTION
    return dict(input_ids=x.masked_fill(masked, model.config.vocab_size - 1), labels=x.masked_fill(~masked, -100))


def build_vit(seed: int) -> nn.Module:
    import transformers

    transformers.logging.set_verbosity_error()
    config = transformers.ViTConfig(
        image_size=8, patch_size=2, num_channels=1, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
        intermediate_size=128, num_labels=10, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    torch.manual_seed(seed)
    return transformers.ViTForImageClassification(config)


# -- optimizers -------------------------------------------------------------------------------------


def _decay_groups(model: nn.Module) -> list[dict[str, Any]]:
    from slimadam_hf import decay_parameter_names

    decay = decay_parameter_names(model)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [
        {"params": [p for n, p in named if n in decay], "weight_decay": WEIGHT_DECAY},
        {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0},
    ]


def _adalayer(model: nn.Module, lr: float) -> torch.optim.Optimizer:
    from slimadam_hf import SlimAdamW, decay_parameter_names

    decay = decay_parameter_names(model)
    groups = []
    for wants in (True, False):
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad and (n in decay) == wants]
        groups.append(
            {
                "params": named,
                "compress": [tuple(range(p.dim())) if p.dim() >= 2 else None for _, p in named],
                "weight_decay": WEIGHT_DECAY if wants else 0.0,
            }
        )
    return SlimAdamW(groups, lr=lr, betas=BETAS)


def _adam_mini(model: nn.Module, lr: float) -> torch.optim.Optimizer:
    from adam_mini import Adam_mini

    c = model.config
    if c.model_type == "gpt2":
        meta = dict(dim=c.n_embd, n_heads=c.n_head, n_kv_heads=c.n_head)
    else:
        meta = dict(dim=c.hidden_size, n_heads=c.num_attention_heads, n_kv_heads=getattr(c, "num_key_value_heads", None) or c.num_attention_heads)
    with contextlib.redirect_stdout(io.StringIO()):
        return Adam_mini(named_parameters=model.named_parameters(), lr=lr, betas=BETAS, weight_decay=WEIGHT_DECAY, **meta)


def make_optimizer(name: str, model: nn.Module, lr: float, snr_overrides: Optional[dict]) -> torch.optim.Optimizer:
    from slimadam_hf import build_slimadam

    if name == "AdamW":
        return torch.optim.AdamW(_decay_groups(model), lr=lr, betas=BETAS)
    if name == "SlimAdam":
        return build_slimadam(model, "auto", lr=lr, betas=BETAS, weight_decay=WEIGHT_DECAY)
    if name == "SlimAdam bf16 m":
        return build_slimadam(model, "auto", lr=lr, betas=BETAS, weight_decay=WEIGHT_DECAY, momentum_dtype=torch.bfloat16)
    if name == "SlimAdam bf16 m stochastic":
        return build_slimadam(model, "auto", lr=lr, betas=BETAS, weight_decay=WEIGHT_DECAY, momentum_dtype="bfloat16",
                              momentum_rounding="stochastic")
    if name == "SlimAdam robust":
        return build_slimadam(model, "auto", lr=lr, betas=BETAS, weight_decay=WEIGHT_DECAY, robust=True)
    if name == "SlimAdam paper":
        return build_slimadam(model, "auto", lr=lr, betas=BETAS, weight_decay=WEIGHT_DECAY, robust=False)
    if name == "SlimAdam int8 m":
        return build_slimadam(model, "auto", lr=lr, betas=BETAS, weight_decay=WEIGHT_DECAY, momentum_dtype="int8")
    if name == "SlimAdam SNR":
        return build_slimadam(model, "auto", snr_overrides, lr=lr, betas=BETAS, weight_decay=WEIGHT_DECAY)
    if name == "SlimAdam full emb":
        # Table 1 everywhere except the token embedding and LM head, which keep a full second moment
        full_vocab = {"rules": {"token_embedding": "none", "lm_head": "none"}}
        return build_slimadam(model, "auto", full_vocab, lr=lr, betas=BETAS, weight_decay=WEIGHT_DECAY)
    if name == "Adalayer":
        return _adalayer(model, lr)
    if name == "Adafactor":
        return torch.optim.Adafactor(_decay_groups(model), lr=lr)
    if name == "Adam-mini":
        return _adam_mini(model, lr)
    raise ValueError(f"unknown optimizer {name!r}")


ALL_OPTIMIZERS = [
    "AdamW", "SlimAdam", "SlimAdam robust", "SlimAdam paper", "SlimAdam bf16 m", "SlimAdam bf16 m stochastic",
    "SlimAdam int8 m", "SlimAdam SNR",
    "SlimAdam full emb", "Adalayer", "Adafactor", "Adam-mini",
]
# "SlimAdam paper" differs from "SlimAdam" only where a preset turns robust on (bert): asked for by name
DEFAULT_OPTIMIZERS = [n for n in ALL_OPTIMIZERS if n != "SlimAdam paper"]
# variants of SlimAdam's first-moment storage: their tables also compare with fp32-momentum SlimAdam
MOMENTUM_VARIANTS = ("SlimAdam bf16 m", "SlimAdam bf16 m stochastic", "SlimAdam int8 m")


def available(names: list[str]) -> tuple[list[str], list[str]]:
    notes, keep = [], []
    for name in names:
        if name == "Adam-mini":
            try:
                import adam_mini  # noqa: F401
            except ImportError:
                notes.append("Adam-mini: skipped, package adam-mini not installed")
                continue
        keep.append(name)
    return keep, notes


# -- training ---------------------------------------------------------------------------------------


def lr_at(step: int, total: int, peak: float) -> float:
    warm = max(1, total // 10)
    if step < warm:
        return peak * (step + 1) / warm
    progress = (step - warm) / max(1, total - warm)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for group in opt.param_groups:
        group["lr"] = lr


@torch.no_grad()
def eval_lm(model: nn.Module, val: list[torch.Tensor]) -> float:
    model.eval()
    gen = torch.Generator().manual_seed(54321)  # the same masks at every evaluation
    losses = [model(**lm_inputs(model, x, gen)).loss.item() for x in val]
    model.train()
    return statistics.fmean(losses)


def train_lm(
    arch: str, opt_name: str, lr: float, seed: int, data: dict[str, Any], cfg: argparse.Namespace,
    snr_overrides: Optional[dict] = None, recorder_path: Optional[Path] = None,
) -> dict[str, Any]:
    model = build_lm(arch, data["vocab"], cfg.width, cfg.layers, cfg.seq, seed, cfg.init_range)
    opt = make_optimizer(opt_name, model, lr, snr_overrides)
    recorder = None
    if recorder_path is not None:
        from slimadam_hf.snr.recorder import SNRRecorder
        from slimadam_hf.snr.targets import SNRSchedule

        recorder = SNRRecorder(model, recorder_path, SNRSchedule(every=max(1, cfg.steps // 10), first=1))
    batches = Batches(data["train"], cfg.batch, cfg.seq, seed)
    masks = torch.Generator().manual_seed(seed)
    curve, train_losses = [], []
    diverged = False
    for step in range(cfg.steps):
        set_lr(opt, lr_at(step, cfg.steps, lr))
        loss = model(**lm_inputs(model, batches.next(), masks)).loss
        if not torch.isfinite(loss):
            diverged = True
            break
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        train_losses.append(loss.item())
        if recorder is not None:
            recorder.maybe_measure(opt, step + 1)
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            curve.append((step + 1, eval_lm(model, data["val"])))
    final = curve[-1][1] if curve and not diverged else float("nan")
    if not math.isfinite(final):
        diverged = True
    return dict(arch=arch, optimizer=opt_name, lr=lr, seed=seed, final_val=final, curve=curve,
                train_loss=train_losses[-1] if train_losses else float("nan"), diverged=diverged)


def snr_overrides_for(arch: str, lr: float, data: dict[str, Any], cfg: argparse.Namespace, workdir: Path) -> tuple[Optional[dict], str]:
    """Per-role rules from SNR measured along an AdamW proxy run (seed 0) at ``lr``."""
    try:
        from slimadam_hf.snr.rules import key_infos, read_snr_csv, role_rules, role_rules_override, summarize_snr
    except ImportError as exc:
        return None, f"SlimAdam SNR: skipped, SNR tools not available ({exc})"
    csv = workdir / f"snr_{arch}.csv"
    train_lm(arch, "AdamW", lr, 0, data, cfg, recorder_path=csv)
    summaries = summarize_snr(read_snr_csv(csv), None)
    infos = key_infos(summaries, csv.with_name(csv.name + ".roles.json"), arch)
    rules = role_rules(summaries, infos, cutoff=1.0)
    override = role_rules_override(rules, source=f"{arch} proxy at lr {lr:g}")
    return override, f"SlimAdam SNR ({arch}): role rules {override['rules']} (proxy AdamW at lr {lr:g})"


def train_vit(opt_name: str, lr: float, seed: int, cfg: argparse.Namespace, digits: tuple) -> dict[str, Any]:
    xtr, ytr, xva, yva = digits
    model = build_vit(seed)
    opt = make_optimizer(opt_name, model, lr, None)
    gen = torch.Generator().manual_seed(seed)
    for step in range(cfg.vit_steps):
        set_lr(opt, lr_at(step, cfg.vit_steps, lr))
        idx = torch.randint(0, len(xtr), (cfg.vit_batch,), generator=gen)
        loss = model(pixel_values=xtr[idx], labels=ytr[idx]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    model.eval()
    with torch.no_grad():
        out = model(pixel_values=xva, labels=yva)
    acc = (out.logits.argmax(-1) == yva).float().mean().item()
    return dict(optimizer=opt_name, lr=lr, seed=seed, final_val=out.loss.item(), accuracy=acc)


def load_digits() -> Optional[tuple]:
    try:
        from sklearn.datasets import load_digits as _load
    except ImportError:
        return None
    d = _load()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target, dtype=torch.long)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    x, y = x[perm], y[perm]
    cut = int(0.8 * len(x))
    return x[:cut], y[:cut], x[cut:], y[cut:]


# -- report -----------------------------------------------------------------------------------------


def _mean_sd(values: list[float]) -> str:
    finite = [v for v in values if math.isfinite(v)]
    if len(finite) < len(values):
        return "diverged" if not finite else f"{statistics.fmean(finite):.3f} ({len(values) - len(finite)} div.)"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.fmean(values):.3f} ± {statistics.stdev(values):.3f}"


def lm_table(runs: list[dict], arch: str, lrs: list[float], optimizers: list[str]) -> str:
    lines = [f"| {arch} optimizer | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " |",
             "|---|" + "---:|" * len(lrs)]
    base = {lr: [r["final_val"] for r in runs if r["arch"] == arch and r["optimizer"] == "AdamW" and r["lr"] == lr] for lr in lrs}
    for name in optimizers:
        cells = []
        for lr in lrs:
            vals = [r["final_val"] for r in runs if r["arch"] == arch and r["optimizer"] == name and r["lr"] == lr]
            cell = _mean_sd(vals) if vals else "-"
            b = [v for v in base[lr] if math.isfinite(v)]
            ok = [v for v in vals if math.isfinite(v)]
            if name != "AdamW" and b and ok and len(ok) == len(vals):
                cell += f" ({100 * (statistics.fmean(ok) / statistics.fmean(b) - 1):+.1f}%"
                slim = [r["final_val"] for r in runs
                        if r["arch"] == arch and r["optimizer"] == "SlimAdam" and r["lr"] == lr]
                if name in MOMENTUM_VARIANTS and slim and all(math.isfinite(v) for v in slim):
                    cell += f"; {100 * (statistics.fmean(ok) / statistics.fmean(slim) - 1):+.1f}% vs SlimAdam"
                cell += ")"
            cells.append(cell)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def vit_table(runs: list[dict]) -> str:
    lines = ["| ViT optimizer | val loss | val accuracy |", "|---|---:|---:|"]
    for name in dict.fromkeys(r["optimizer"] for r in runs):
        rs = [r for r in runs if r["optimizer"] == name]
        lines.append(f"| {name} | {_mean_sd([r['final_val'] for r in rs])} | {_mean_sd([r['accuracy'] for r in rs])} |")
    return "\n".join(lines)


def plots(runs: list[dict], archs: list[str], lrs: list[float], optimizers: list[str], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    fig, axes = plt.subplots(1, len(archs), figsize=(5.5 * len(archs), 4), squeeze=False)
    for ax, arch in zip(axes[0], archs):
        for name in optimizers:
            xs, ys, sds = [], [], []
            for lr in lrs:
                vals = [r["final_val"] for r in runs if r["arch"] == arch and r["optimizer"] == name and r["lr"] == lr]
                vals = [v for v in vals if math.isfinite(v)]
                if vals:
                    xs.append(lr)
                    ys.append(statistics.fmean(vals))
                    sds.append(statistics.stdev(vals) if len(vals) > 1 else 0.0)
            ax.errorbar(xs, ys, yerr=sds, marker="o", capsize=3, label=name)  # error bars: sd over seeds
        ax.set_xscale("log")
        ax.set_xlabel("peak learning rate")
        ax.set_ylabel("final validation loss")
        ax.set_title(arch)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    paths.append(out / "quality_lr.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    mid = lrs[len(lrs) // 2]
    fig, axes = plt.subplots(1, len(archs), figsize=(5.5 * len(archs), 4), squeeze=False)
    for ax, arch in zip(axes[0], archs):
        for name in optimizers:
            rs = [r for r in runs if r["arch"] == arch and r["optimizer"] == name and r["lr"] == mid and r["curve"]]
            if not rs:
                continue
            steps = [s for s, _ in rs[0]["curve"]]
            ys = [statistics.fmean(r["curve"][i][1] for r in rs if len(r["curve"]) > i) for i in range(len(steps))]
            ax.plot(steps, ys, label=name)
        ax.set_xlabel("step")
        ax.set_ylabel("validation loss")
        ax.set_title(f"{arch}, lr {mid:g}")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    paths.append(out / "quality_steps.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench_quality_out")
    parser.add_argument("--corpus", default="fortunes")
    parser.add_argument("--archs", nargs="*", default=["gpt2", "llama"], choices=["gpt2", "llama", "bert"],
                        help="language models to train (none: only the ViT)")
    parser.add_argument("--lrs", nargs="+", type=float, default=[1e-3, 3e-3, 1e-2])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--optimizers", nargs="+", default=DEFAULT_OPTIMIZERS)
    parser.add_argument("--steps", type=int, default=250)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=512)
    parser.add_argument("--init-range", type=float, default=None,
                        help="the LMs' initializer_range (default: the config's, 0.02)")
    parser.add_argument("--snr-proxy-lr", type=float, default=None,
                        help="LR of the AdamW run whose SNR gives 'SlimAdam SNR' its rules (default: the middle "
                             "--lrs value / 10, the paper's proxy)")
    parser.add_argument("--eval-every", type=int, default=25)
    parser.add_argument("--val-batches", type=int, default=4)
    parser.add_argument("--vit-lr", type=float, default=3e-3)
    parser.add_argument("--vit-steps", type=int, default=250)
    parser.add_argument("--vit-batch", type=int, default=64)
    parser.add_argument("--no-vit", action="store_true")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (tiny models: 1 is fastest on shared cores)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, a few steps (seconds; CI)")
    parser.add_argument("--replot", metavar="JSON", help="rewrite quality.md and the plots from a quality.json")
    cfg = parser.parse_args(argv)
    if cfg.replot:
        saved = json.loads(Path(cfg.replot).read_text())
        saved_cfg = argparse.Namespace(**saved["config"])
        out = Path(cfg.out)
        out.mkdir(parents=True, exist_ok=True)
        report(saved["lm"], saved["vit"], saved["notes"], saved_cfg, out)
        return 0
    if cfg.smoke:
        cfg.corpus = "pydoc" if cfg.corpus == "fortunes" else cfg.corpus
        cfg.lrs, cfg.seeds, cfg.steps, cfg.batch, cfg.seq = cfg.lrs[:2], cfg.seeds[:1], 6, 4, 32
        cfg.width, cfg.layers, cfg.vocab, cfg.eval_every, cfg.val_batches = 32, 1, 300, 3, 2
        cfg.vit_steps, cfg.vit_batch = 4, 16
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    unknown = [n for n in cfg.optimizers if n not in ALL_OPTIMIZERS]
    if unknown:
        parser.error(f"unknown optimizer(s) {unknown}; choose from {ALL_OPTIMIZERS}")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    optimizers, notes = available(cfg.optimizers)
    start = time.time()

    text, source = load_corpus(cfg.corpus)
    print(f"corpus {source}: {len(text) / 1e6:.2f} MB; training the tokenizer", flush=True)
    if cfg.smoke:
        text = text[:200_000]
    tokens = tokenize(text, cfg.vocab)
    cut = int(0.9 * len(tokens))
    val_gen = Batches(tokens[cut:], cfg.batch, cfg.seq, seed=12345)
    data = dict(train=tokens[:cut], val=[val_gen.next() for _ in range(cfg.val_batches)], vocab=cfg.vocab)
    notes.append(f"corpus: {source}, {len(text) / 1e6:.2f} MB, {len(tokens):,} BPE tokens (vocab {cfg.vocab}), 90/10 split")

    runs: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        for arch in cfg.archs:
            snr = None
            if "SlimAdam SNR" in optimizers:
                proxy_lr = cfg.snr_proxy_lr or cfg.lrs[len(cfg.lrs) // 2] / 10
                snr, note = snr_overrides_for(arch, proxy_lr, data, cfg, Path(tmp))
                notes.append(note)
            for lr in cfg.lrs:
                for seed in cfg.seeds:
                    for name in optimizers:
                        if name == "SlimAdam SNR" and snr is None:
                            continue
                        t0 = time.time()
                        run = train_lm(arch, name, lr, seed, data, cfg, snr_overrides=snr)
                        runs.append(run)
                        print(f"{arch} {name:16s} lr {lr:<7g} seed {seed}: val {run['final_val']:.4f} "
                              f"({time.time() - t0:.1f} s)", flush=True)

    vit_runs: list[dict] = []
    digits = None if cfg.no_vit else load_digits()
    if cfg.no_vit:
        notes.append("ViT: skipped (--no-vit)")
    elif digits is None:
        notes.append("ViT: skipped, scikit-learn (sklearn.datasets.load_digits) not installed")
    else:
        for seed in cfg.seeds:
            for name in [n for n in optimizers if n != "SlimAdam SNR"]:
                try:
                    vit_runs.append(train_vit(name, cfg.vit_lr, seed, cfg, digits))
                except RuntimeError as exc:
                    if name != "Adam-mini":
                        raise
                    notes.append(f"ViT: Adam-mini fails on HF ViT ({str(exc)[:80]}); left out")
                    optimizers = [n for n in optimizers if n != "Adam-mini"]
                    continue
                print(f"vit {name:16s} seed {seed}: val {vit_runs[-1]['final_val']:.4f} acc {vit_runs[-1]['accuracy']:.3f}", flush=True)

    elapsed = time.time() - start
    notes += [
        f"- models: width {cfg.width}, {cfg.layers} layers, 4 heads, seq {cfg.seq}, batch {cfg.batch}, "
        f"{cfg.steps} steps, eval every {cfg.eval_every} on {cfg.val_batches} fixed validation batches"
        + ("" if cfg.init_range is None else f", initializer_range {cfg.init_range:g}"),
        f"- seeds {cfg.seeds}; learning rates {cfg.lrs}; wall time {elapsed / 60:.1f} min, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, load average at end {os.getloadavg()[0]:.2f}",
    ]
    (out / "quality.json").write_text(json.dumps(dict(lm=runs, vit=vit_runs, notes=notes, config=vars(cfg)), indent=1))
    report(runs, vit_runs, notes, cfg, out)
    return 0


def report(runs: list[dict], vit_runs: list[dict], notes: list[str], cfg: Any, out: Path) -> None:
    """Write quality.md and the plots from the collected runs (also used by --replot)."""
    shown = [n for n in cfg.optimizers if any(r["optimizer"] == n for r in runs)]
    md = ["## Final validation loss (mean ± sd over seeds; % vs AdamW)", ""]
    for arch in cfg.archs:
        md += [lm_table(runs, arch, cfg.lrs, shown), ""]
    if vit_runs:
        md += [f"## ViT on sklearn digits (lr {cfg.vit_lr:g}, {cfg.vit_steps} steps)", "", vit_table(vit_runs), ""]
    md += ["## Setup", ""] + [n if n.startswith("- ") else f"- {n}" for n in notes]
    (out / "quality.md").write_text("\n".join(md) + "\n")
    if runs:
        plots(runs, cfg.archs, cfg.lrs, shown, out)
    print("\n".join(md))


if __name__ == "__main__":
    sys.exit(main())
