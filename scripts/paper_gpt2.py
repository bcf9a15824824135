#!/usr/bin/env python
"""The SlimAdam paper's headline on one GPU: GPT-2 124M from its config, AdamW against SlimAdam.

The paper trains GPT-2 124M for 5,000 steps of 1.3M tokens (warm-up then cosine to lr/10, AdamW betas
(0.9, 0.95), weight decay 0.1, clipping 1.0, bf16 autocast) at lr 3e-3 and 3e-4, and SlimAdam with the
static Table-1 rules ends within 0.4% of AdamW's validation loss (``../shared/paper-notes.md``). This
script keeps the model and the recipe and scales the data to fit a few minutes: a byte-level BPE tokenizer
trained here on local text (the Shakespeare plays under ``scripts/data`` and CPython's pydoc topics, no
download; about 325k tokens), sequences of ``--seq`` tokens, ``--steps`` steps (about 2.7 epochs by
default), 3 seeds. Optimizers: torch AdamW, SlimAdam (gpt2 preset), SlimAdam ``robust=True`` and SlimAdam
with int8 momentum, at the paper's LR and at 3x it.

Outputs in ``--out``: ``paper_gpt2.md`` (final validation loss per LR and optimizer, mean ± sd over the
seeds, ratio to AdamW's mean), ``paper_gpt2.png`` (mean validation loss vs step, one panel per LR) and
``paper_gpt2.json`` (every curve).

    bash scripts/paper_gpt2.sh                 # one CUDA GPU, about 5 minutes on an H100/H200
    bash scripts/paper_gpt2.sh --smoke         # a tiny GPT-2 for a few steps on CPU (CI)
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_quality import Batches, lr_at, make_optimizer, set_lr, tokenize  # noqa: E402

PLAYS = Path(__file__).resolve().parent / "data" / "shakespeare"
PAPER_LR = 3e-3
OPTIMIZERS = ("AdamW", "SlimAdam", "SlimAdam robust", "SlimAdam int8 m")


def corpus() -> tuple[str, str]:
    """Local English text: the plays shipped in the repo and CPython's documentation topics."""
    from pydoc_data.topics import topics

    plays = [p.read_text(encoding="utf-8") for p in sorted(PLAYS.glob("*.txt"))]
    text = "\n\n".join(plays + [topics[k] for k in sorted(topics)])
    return text, f"{len(plays)} plays under scripts/data/shakespeare + CPython pydoc_data.topics"


def gpt2(vocab: int, cfg: argparse.Namespace, seed: int) -> torch.nn.Module:
    import transformers

    transformers.logging.set_verbosity_error()
    config = transformers.GPT2Config(vocab_size=vocab, n_positions=cfg.seq, n_embd=cfg.width, n_layer=cfg.layers,
                                     n_head=cfg.heads, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(seed)
    return transformers.GPT2LMHeadModel(config)


@torch.no_grad()
def evaluate(model: torch.nn.Module, val: list[torch.Tensor], autocast: Any) -> float:
    model.eval()
    with autocast():
        losses = [model(input_ids=x, labels=x).loss.float().item() for x in val]
    model.train()
    return sum(losses) / len(losses)


def train(name: str, lr: float, seed: int, data: dict[str, Any], cfg: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(cfg.device)
    model = gpt2(data["vocab"], cfg, seed).to(device)
    opt = make_optimizer(name, model, lr, None)
    batches = Batches(data["train"], cfg.batch, cfg.seq, seed)
    val = [x.to(device) for x in data["val"]]

    def autocast() -> Any:
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    curve, start, diverged = [], time.time(), False
    for step in range(cfg.steps):
        set_lr(opt, lr_at(step, cfg.steps, lr))
        x = batches.next().to(device, non_blocking=True)
        with autocast():
            loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            curve.append((step + 1, evaluate(model, val, autocast)))
            if not math.isfinite(curve[-1][1]):
                diverged = True
                break
    if device.type == "cuda":
        torch.cuda.synchronize()
    return dict(optimizer=name, lr=lr, seed=seed, curve=curve, final_val=curve[-1][1] if curve else float("nan"),
                diverged=diverged, seconds=time.time() - start)


def _finals(runs: list[dict[str, Any]], lr: float, name: str) -> list[float]:
    return [r["final_val"] for r in runs if r["lr"] == lr and r["optimizer"] == name]


def table(runs: list[dict[str, Any]], lrs: list[float], names: list[str]) -> str:
    lines = ["| lr | optimizer | final val loss (mean ± sd) | vs AdamW | seconds per run |", "|---|---|---:|---:|---:|"]
    for lr in lrs:
        base = statistics.fmean(_finals(runs, lr, "AdamW")) if "AdamW" in names else float("nan")
        for name in names:
            finals = _finals(runs, lr, name)
            mean, sd = statistics.fmean(finals), statistics.stdev(finals) if len(finals) > 1 else 0.0
            seconds = statistics.fmean(r["seconds"] for r in runs if r["lr"] == lr and r["optimizer"] == name)
            lines.append(f"| {lr:g} | {name} | {mean:.4f} ± {sd:.4f} | {mean / base:.4f}x | {seconds:.0f} |")
    return "\n".join(lines)


def plot(runs: list[dict[str, Any]], lrs: list[float], names: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(lrs), figsize=(5.5 * len(lrs), 4), squeeze=False)
    for ax, lr in zip(axes[0], lrs):
        for name in names:
            curves = [r["curve"] for r in runs if r["lr"] == lr and r["optimizer"] == name]
            points = min(map(len, curves))  # a diverged run stops early
            ax.plot([s for s, _ in curves[0][:points]],
                    [statistics.fmean(c[i][1] for c in curves) for i in range(points)], label=name)
        ax.set(xlabel="step", ylabel="validation loss", title=f"GPT-2, lr {lr:g}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="paper_gpt2_out")
    parser.add_argument("--lrs", nargs="+", type=float, default=[PAPER_LR, 3 * PAPER_LR])
    parser.add_argument("--optimizers", nargs="+", default=list(OPTIMIZERS), choices=OPTIMIZERS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--width", type=int, default=768)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--eval-every", type=int, default=25)
    parser.add_argument("--val-batches", type=int, default=8)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--smoke", action="store_true", help="a tiny GPT-2 for a few steps (CPU, seconds; CI)")
    cfg = parser.parse_args(argv)
    text, source = corpus()
    if cfg.smoke:
        text = text[:100_000]
        cfg.steps, cfg.batch, cfg.seq, cfg.width, cfg.layers, cfg.heads = 4, 4, 32, 32, 1, 2
        cfg.vocab, cfg.eval_every, cfg.val_batches, cfg.seeds = 300, 2, 2, cfg.seeds[:1]
    elif cfg.device == "cpu":
        print("no CUDA device: GPT-2 124M on CPU takes hours; use --smoke, or a GPU", file=sys.stderr)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)

    started = time.time()
    tokens = tokenize(text, cfg.vocab)
    cut = int(0.95 * len(tokens))
    val_batches = Batches(tokens[cut:], cfg.batch, cfg.seq, seed=12345)
    data = dict(train=tokens[:cut], val=[val_batches.next() for _ in range(cfg.val_batches)], vocab=cfg.vocab)
    params = sum(p.numel() for p in gpt2(cfg.vocab, cfg, 0).parameters())
    header = (f"GPT-2 ({params / 1e6:.1f}M parameters, {cfg.layers} layers, width {cfg.width}) on {cfg.device}; "
              f"corpus: {source}, {len(tokens):,} tokens (BPE vocab {cfg.vocab}), 95/5 split; {cfg.steps} steps of "
              f"{cfg.batch} x {cfg.seq} tokens ({cfg.steps * cfg.batch * cfg.seq / cut:.1f} epochs), warm-up 10% then cosine to lr/10, betas (0.9, 0.95), "
              f"weight decay 0.1, clip 1.0{', bf16 autocast' if cfg.device.startswith('cuda') else ''}; "
              f"seeds {cfg.seeds}")
    print(header, flush=True)

    runs = []
    for lr in cfg.lrs:
        for seed in cfg.seeds:
            for name in cfg.optimizers:
                runs.append(train(name, lr, seed, data, cfg))
                r = runs[-1]
                print(f"lr {lr:g} seed {seed} {name:16s} final val {r['final_val']:.4f} ({r['seconds']:.0f} s)",
                      flush=True)
    md = table(runs, cfg.lrs, cfg.optimizers)
    (out / "paper_gpt2.md").write_text(f"{header}\n\n{md}\n\ntotal {time.time() - started:.0f} s\n")
    (out / "paper_gpt2.json").write_text(json.dumps(dict(config=vars(cfg), runs=runs), indent=1))
    plot(runs, cfg.lrs, cfg.optimizers, out / "paper_gpt2.png")
    print(md)
    print(f"total {time.time() - started:.0f} s; wrote {out / 'paper_gpt2.md'} and {out / 'paper_gpt2.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
