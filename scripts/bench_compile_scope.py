#!/usr/bin/env python
"""How much one ``torch.compile`` graph per param group buys (horizontal fusion), and what it costs.

Issue #11 asks for a compiled step that traces all parameters of a group into one graph. This script
measures that design against what ships, on the same parameters, each scope in fresh processes:

* ``per-signature graphs``: ``SlimAdamW(implementation="compiled")`` as shipped, one graph per
  parameter signature, called once per parameter;
* ``one graph per group``: every parameter of a param group traced into one graph (the same per-parameter
  update, :func:`slimadam_hf.core.compiled._update`, unrolled over the group);
* ``one graph per bucket``: one graph per group of parameters with the same signature (shape, strides,
  dtypes, segments), called once per bucket;
* ``torch AdamW compiled``: torch's own compiled optimizer, ``torch.compile(AdamW(foreach=True,
  capturable=True, lr=tensor).step)``, the horizontal fusion torch ships;
* ``SlimAdamW default``: the C++ kernel (no torch.compile), for reference.

Per scope: the first step of a process with an empty inductor cache (cold) and again with the cache it
left (warm), then step time as the median of interleaved steps against ``torch.optim.AdamW(fused=True)`` in
the same process. The grouped scopes are experiments that live in this script only.

Examples::

    python scripts/bench_compile_scope.py --model gpt2-124m --repeats 11
    python scripts/bench_compile_scope.py --smoke
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from typing import Callable, Optional

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_step import BETAS, EPS, LR, WD, _adamw, _slim, build_model, machine  # noqa: E402

Step = Callable[[], None]


def _group_update(params, grads, exp_avgs, exp_avg_sqs, scalars, plan):  # noqa: ANN001
    """Every parameter's update in one traced function; ``plan`` holds each parameter's segments."""
    from slimadam_hf.core.compiled import _update

    for param, grad, exp_avg, exp_avg_sq, segs in zip(params, grads, exp_avgs, exp_avg_sqs, plan):
        _update(param, grad, exp_avg, None, exp_avg_sq, segs, scalars, None, True, None, (None,) * len(segs), None)


def _slim_grouped(model: nn.Module, by_signature: bool) -> Step:
    """SlimAdamW's state and segments, stepped by one compiled graph per group (or per signature bucket).

    Covers float32 parameters with a float32 first moment and the plain (not robust) second moment, the
    default configuration.
    """
    from slimadam_hf.core.compiled import _signature, compile_copy
    from slimadam_hf.core.step_scalars import step_scalars

    opt = _slim("foreach")(model)
    batches = [opt._batch(group, False)[0] for group in opt.param_groups]
    calls: list[tuple[dict, list, list[int], Callable[..., None]]] = []
    graphs: dict[tuple, Callable[..., None]] = {}
    for group, batch in zip(opt.param_groups, batches):
        buckets: dict[tuple, list[int]] = defaultdict(list)
        for i, (p, m, v, segs) in enumerate(zip(batch.params, batch.exp_avgs, batch.exp_avg_sqs, batch.segments)):
            key = (_signature(p), _signature(m), _signature(v), tuple(segs)) if by_signature else id(group)
            buckets[key].append(i)
        for key, indices in buckets.items():
            if key not in graphs:
                graphs[key] = compile_copy(_group_update, str(len(graphs)))
            calls.append((group, batch, indices, graphs[key]))

    @torch.no_grad()
    def step() -> None:
        for batch in batches:
            torch._foreach_add_(batch.steps, 1)
        for group, batch, indices, fn in calls:
            steps = {batch.steps[i].item() for i in indices}
            assert len(steps) == 1, "this experiment takes one step count per call"
            values = step_scalars(steps.pop(), lr=group["lr"], beta1=BETAS[0], beta2=BETAS[1], eps=EPS,
                                  weight_decay=group["weight_decay"])
            pick = lambda seq: [seq[i] for i in indices]  # noqa: E731
            fn(pick(batch.params), pick(batch.grads), pick(batch.exp_avgs), pick(batch.exp_avg_sqs),
               torch.tensor(values, dtype=torch.float32), tuple(tuple(s) for s in pick(batch.segments)))

    return step


def _torch_compiled_adamw(model: nn.Module) -> Step:
    opt = torch.optim.AdamW(model.parameters(), lr=torch.tensor(LR), betas=BETAS, eps=EPS, weight_decay=WD,
                            foreach=True, capturable=True)
    return torch.compile(opt.step)


SCOPES: dict[str, Callable[[nn.Module], Step]] = {
    "SlimAdamW compiled, per-signature graphs (shipped)": lambda m: _slim("compiled")(m).step,
    "SlimAdamW compiled, one graph per group": lambda m: _slim_grouped(m, by_signature=False),
    "SlimAdamW compiled, one graph per bucket": lambda m: _slim_grouped(m, by_signature=True),
    "torch AdamW compiled (foreach, capturable)": _torch_compiled_adamw,
    "SlimAdamW default (C++ kernel)": lambda m: _slim(None)(m).step,
}


def child(model_name: str, scope: str, repeats: int) -> dict[str, float]:
    """One fresh process: the first step of ``scope``, then interleaved steps against fused AdamW."""
    import torch._dynamo.utils

    model = build_model(model_name, 2, "cpu")
    fused = _adamw(fused=True)(model).step
    step = SCOPES[scope](model)
    start = time.perf_counter()
    step()
    first = time.perf_counter() - start
    fused()
    times: dict[str, list[float]] = {"fused": [], "scope": []}
    for r in range(repeats):
        order = (("fused", fused), ("scope", step)) if r % 2 else (("scope", step), ("fused", fused))
        for name, fn in order:
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    inductor = sum(torch._dynamo.utils.compilation_time_metrics.get("compile_fx_inner", []))
    return {"first": first, "fused_ms": statistics.median(times["fused"]) * 1e3,
            "step_ms": statistics.median(times["scope"]) * 1e3, "inductor_s": inductor}


def run_scope(model_name: str, scope: str, repeats: int, warm: bool = True) -> list[dict[str, float]]:
    """The cold run (empty caches) and the warm run (the caches the cold one left), fresh processes."""
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "SLIMADAM_HF_KERNEL_DIR": os.path.join(cache, "kernels"),
               "TORCHINDUCTOR_CACHE_DIR": os.path.join(cache, "inductor")}
        cmd = [sys.executable, __file__, "--child", model_name, scope, "--repeats", str(repeats)]
        runs = []
        for _ in range(2 if warm else 1):
            done = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if done.returncode != 0:
                raise RuntimeError(f"{scope}: child failed\n{done.stderr[-3000:]}")
            runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
    return runs


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="gpt2-124m", choices=["gpt2-124m", "llama-1b", "tiny"])
    parser.add_argument("--scopes", nargs="+", default=list(SCOPES), choices=list(SCOPES))
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--smoke", action="store_true", help="tiny model, 2 repeats, the grouped scope, cold only (CI)")
    parser.add_argument("--output", default=None, help="also write the markdown to this file")
    parser.add_argument("--child", nargs=2, metavar=("MODEL", "SCOPE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(*args.child, args.repeats)))
        return 0
    if args.smoke:
        args.model, args.repeats, args.scopes = "tiny", 2, ["SlimAdamW compiled, one graph per group"]
    lines = [f"Machine: {machine()}", "", f"### torch.compile scope on {args.model}", "",
             "| scope | cold first step s | of which inductor s | warm first step s | step ms | "
             "fused AdamW ms, same process | step vs fused AdamW |", "|---|---:|---:|---:|---:|---:|---:|"]
    print(lines[0], flush=True)
    for scope in args.scopes:
        runs = run_scope(args.model, scope, args.repeats, warm=not args.smoke)
        cold, warm = runs[0], runs[-1]
        row = (f"| {scope} | {cold['first']:.1f} | {cold['inductor_s']:.1f} | {warm['first']:.1f} | "
               f"{warm['step_ms']:.1f} | {warm['fused_ms']:.1f} | {warm['step_ms'] / warm['fused_ms']:.2f} |")
        print(row, flush=True)
        lines.append(row)
    lines += ["", f"- Step times: medians of {args.repeats} interleaved steps in the warm process, against "
              "torch.optim.AdamW(fused=True) on the same parameters in that process.",
              "- Cold: empty inductor and kernel caches; warm: a fresh process with the caches the cold one left. "
              "Inductor s: time in inductor's compile_fx_inner (lowering, scheduling, C++ codegen and build) in the cold "
              "process."]
    if args.smoke:
        lines.append("- --smoke: the cold process only; its warm columns repeat the cold one.")
    if args.output:
        with open(args.output, "w") as f:
            f.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
