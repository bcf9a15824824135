#!/usr/bin/env python
"""How well does a compressed second moment stand in for AdamW's, role by role?

Trains a small LM with torch AdamW (``scripts/bench_quality.py``'s data, model and schedule), then compares
AdamW's full second moment ``v`` of every compressed weight with the two estimates SlimAdamW can use:

* ``rule``: the mean over the dims of the preset's rule (the paper's SlimAdam);
* ``factored``: that mean times the mean over the other dims, over their common mean (``robust=True``).

A coordinate whose ``v`` is above its estimate takes a step ``sqrt(v / estimate)`` times AdamW's. The table
reports, per role, the median and the 99th percentile of ``sqrt(v / estimate)`` over all coordinates:

    python scripts/second_moment_fit.py --arch gpt2 --lr 1e-2
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_quality as bq  # noqa: E402

from slimadam_hf import plan_compression  # noqa: E402
from slimadam_hf.core.compress_spec import cached_segments  # noqa: E402
from slimadam_hf.core.factored import complement_segments  # noqa: E402


def _ratio(full: torch.Tensor, estimate: torch.Tensor) -> torch.Tensor:
    """``sqrt(full / estimate)``; 1 where both are 0 (a row that never gets a gradient, e.g. the last position)."""
    estimate = estimate.expand_as(full)
    return torch.where(estimate > 0, full / estimate, torch.ones_like(full)).sqrt().flatten()


def step_ratios(v: torch.Tensor, spec, name: str, roles: list[str]) -> dict[str, dict[str, list[torch.Tensor]]]:
    """``sqrt(v / estimate)`` for each compressed segment, by role (of the segment) and estimate."""
    out: dict[str, dict[str, list[torch.Tensor]]] = defaultdict(lambda: defaultdict(list))
    segs = cached_segments(spec, v.shape, name)
    for seg, comp, role in zip(segs, complement_segments(segs, v.shape), roles):
        if seg.dims is None:
            continue
        full = seg.view(v).double()
        rule = full.mean(dim=seg.dims, keepdim=True)
        out[role]["rule"].append(_ratio(full, rule))
        if comp is not None:
            factored = rule * full.mean(dim=comp.dims, keepdim=True) / rule.mean()
            out[role]["factored"].append(_ratio(full, factored))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", choices=["gpt2", "llama", "bert"], default="gpt2")
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--corpus", default="fortunes", help="as in scripts/bench_quality.py (fortunes, pydoc, a path)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    cfg = argparse.Namespace(batch=8, seq=64, width=64, layers=2, init_range=None, steps=args.steps, eval_every=args.steps)
    text, _ = bq.load_corpus(args.corpus)
    tokens = bq.tokenize(text, 512)
    cut = int(0.9 * len(tokens))
    val = bq.Batches(tokens[cut:], cfg.batch, cfg.seq, seed=12345)
    data = dict(train=tokens[:cut], val=[val.next() for _ in range(4)], vocab=512)

    captured = {}
    default = bq.make_optimizer

    def make(name, model, lr, snr):  # type: ignore[no-untyped-def]
        captured["model"], captured["opt"] = model, default(name, model, lr, snr)
        return captured["opt"]

    bq.make_optimizer = make
    run = bq.train_lm(args.arch, "AdamW", args.lr, args.seed, data, cfg)
    model, opt = captured["model"], captured["opt"]
    plan = plan_compression(model)
    by_role: dict[str, dict[str, list[torch.Tensor]]] = defaultdict(lambda: defaultdict(list))
    for name, p in model.named_parameters():
        entry = plan[name]
        if entry.spec is None or p not in opt.state:
            continue
        roles = [entry.role] if entry.parts is None else [part.role for part in entry.parts]
        for role, estimates in step_ratios(opt.state[p]["exp_avg_sq"], entry.spec, name, roles).items():
            for estimate, values in estimates.items():
                by_role[role][estimate] += values
    print(f"{args.arch}, AdamW at lr {args.lr:g}, {args.steps} steps (val {run['final_val']:.3f}); "
          "sqrt(v / estimate): how many times AdamW's step a coordinate takes\n")
    print("| role | rule: median | rule: p99 | factored: median | factored: p99 |")
    print("|---|---:|---:|---:|---:|")
    for role, estimates in by_role.items():
        cells = []
        for estimate in ("rule", "factored"):
            values = torch.cat(estimates[estimate]) if estimates[estimate] else None
            cells += ["-", "-"] if values is None else [
                f"{values.median().item():.2f}", f"{values.quantile(0.99).item():.2f}"
                if values.numel() < 16_000_000 else "-"]
        print(f"| {role} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
