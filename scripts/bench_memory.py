#!/usr/bin/env python
"""Peak process memory of a short real Trainer run, per optimizer: what a user sees.

Each case runs in a fresh process: a model built from its config (random init), the HF ``Trainer`` on CPU
for ``--steps`` steps of batch ``--batch`` x ``--seq`` random tokens, no evaluation or checkpoints. The table
reports the process's peak RSS (``ru_maxrss``), the optimizer state bytes measured from its tensors, state
bytes per parameter, and for SlimAdam the check of issue #14: peak minus (AdamW's peak minus the state
bytes saved), i.e. what the step costs beyond its state (goal: at most 40 MiB).

From the measured bytes per parameter it also prints the largest model each optimizer trains in a given
memory (``--budgets``), as ``(budget - fixed) / (weights + grads + state)`` bytes per parameter, where
``fixed`` is the GPT-2 run's peak minus its parameters, gradients and state (activations, libraries).

    python scripts/bench_memory.py                         # GPT-2 124M and a 2-layer Llama-1B shape
    python scripts/bench_memory.py --models gpt2-124m --optimizers adamw_torch_fused slimadam-int8
    python scripts/bench_memory.py --check-largest slimadam-int8 --budget-gib 20   # one run near the limit
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from typing import Any, Optional

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

OPTIMIZERS = {  # name -> (TrainingArguments.optim, optim_args)
    "adamw_torch_fused": ("adamw_torch_fused", None),
    "bnb-adamw-8bit": ("adamw_bnb_8bit", None),
    "slimadam": ("slimadam", None),
    "slimadam-bf16": ("slimadam", "momentum_dtype=bfloat16"),
    "slimadam-bf16-stochastic": ("slimadam", "momentum_dtype=bfloat16,momentum_rounding=stochastic"),
    "slimadam-int8": ("slimadam", "momentum_dtype=int8"),
    "slimadam-robust": ("slimadam", "robust=true"),
}

MODELS = {
    "gpt2-124m": ("gpt2", {}),
    "gpt2-tiny": ("gpt2", dict(n_layer=1, n_embd=32, n_head=2, vocab_size=256, n_positions=64)),  # --smoke
    "llama-1b-2l": ("llama", dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=2,
                                  num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                                  tie_word_embeddings=True)),
}


def _config(model: str, layers: Optional[int] = None) -> Any:
    from transformers import AutoConfig

    if model.startswith("llama-layers-"):  # a Llama-1B-wide model with N layers, for --check-largest
        model_type, kwargs = MODELS["llama-1b-2l"]
        kwargs = dict(kwargs, num_hidden_layers=int(model.rsplit("-", 1)[1]))
    else:
        model_type, kwargs = MODELS[model]
    return AutoConfig.for_model(model_type, **kwargs)


def child(model_name: str, optimizer: str, steps: int, batch: int, seq: int) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    import slimadam_hf

    slimadam_hf.register()
    torch.manual_seed(0)
    config = _config(model_name)
    model = AutoModelForCausalLM.from_config(config)
    n_params = sum(p.numel() for p in model.parameters())
    ids = torch.randint(0, config.vocab_size, (steps * batch, seq))
    data = [{"input_ids": row, "labels": row} for row in ids]
    optim, optim_args = OPTIMIZERS[optimizer]
    args = TrainingArguments(
        output_dir=f"/tmp/bench_memory_{os.getpid()}", optim=optim, optim_args=optim_args, max_steps=steps,
        per_device_train_batch_size=batch, learning_rate=1e-4, use_cpu=True, report_to=[], save_strategy="no",
        logging_strategy="no", disable_tqdm=True, dataloader_num_workers=0,
    )
    trainer = Trainer(model=model, args=args, train_dataset=data)
    start = time.perf_counter()
    trainer.train()
    inner = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    state = sum(t.numel() * t.element_size() for s in inner.state.values() for t in s.values()
                if isinstance(t, torch.Tensor) and t.dim() > 0)
    return {"model": model_name, "optimizer": optimizer, "params": n_params, "state_bytes": state,
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "train_s": round(time.perf_counter() - start, 1)}


def run_case(model: str, optimizer: str, steps: int, batch: int, seq: int) -> Optional[dict[str, Any]]:
    cmd = [sys.executable, __file__, "--child", model, optimizer, "--steps", str(steps), "--batch", str(batch),
           "--seq", str(seq)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    if out.returncode != 0 or not lines:
        print(f"  {model} / {optimizer}: failed ({out.stderr.strip().splitlines()[-1:]})", file=sys.stderr)
        return None
    result = json.loads(lines[-1])
    print(f"  {model} / {optimizer}: peak {result['peak_rss_bytes'] / 2**20:,.0f} MiB", file=sys.stderr, flush=True)
    return result


def _mib(n: float) -> str:
    return f"{n / 2**20:,.0f}"


def table(results: list[dict[str, Any]]) -> str:
    lines = ["| model | optimizer | peak RSS MiB | state MiB | state bytes/param | state vs AdamW | "
             "peak - (AdamW peak - state saved) MiB |", "|---|---|---:|---:|---:|---:|---:|"]
    for model in dict.fromkeys(r["model"] for r in results):
        rows = [r for r in results if r["model"] == model]
        adamw = next((r for r in rows if r["optimizer"] == "adamw_torch_fused"), None)
        for r in rows:
            extra = "-"
            if adamw is not None and r["optimizer"].startswith("slimadam"):
                saved = adamw["state_bytes"] - r["state_bytes"]
                extra = f"{(r['peak_rss_bytes'] - (adamw['peak_rss_bytes'] - saved)) / 2**20:+,.0f}"
            ratio = f"{r['state_bytes'] / adamw['state_bytes']:.3f}" if adamw else "-"
            lines.append(f"| {model} | {r['optimizer']} | {_mib(r['peak_rss_bytes'])} | {_mib(r['state_bytes'])} | "
                         f"{r['state_bytes'] / r['params']:.2f} | {ratio} | {extra} |")
    return "\n".join(lines)


def largest_models(results: list[dict[str, Any]], budgets: list[float]) -> str:
    """Largest fp32 model (parameters) each optimizer trains in each budget, from the GPT-2 runs."""
    rows = [r for r in results if r["model"] == results[0]["model"]]
    lines = ["| optimizer | bytes/param (weights + grads + state) | " + " | ".join(f"{b:g} GiB" for b in budgets)
             + " |", "|---|---:|" + "---:|" * len(budgets)]
    for r in rows:
        per_param = 8 + r["state_bytes"] / r["params"]
        fixed = r["peak_rss_bytes"] - per_param * r["params"]
        sizes = [max(0.0, (b * 2**30 - fixed) / per_param) for b in budgets]
        lines.append(f"| {r['optimizer']} | {per_param:.2f} | " + " | ".join(f"{s / 1e9:.2f}B" for s in sizes) + " |")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--optimizers", nargs="+", default=list(OPTIMIZERS))
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--budgets", nargs="+", type=float, default=[8, 16, 24])
    parser.add_argument("--check-largest", metavar="OPTIMIZER", help="train a Llama-1B-wide model sized to fill "
                        "--budget-gib by this optimizer's measured bytes (needs a gpt2-124m run in --results)")
    parser.add_argument("--budget-gib", type=float, default=20.0)
    parser.add_argument("--results", help="JSON of an earlier run (skips measuring again)")
    parser.add_argument("--output", help="also write the markdown here; the raw results go to OUTPUT.json")
    parser.add_argument("--smoke", action="store_true", help="a tiny GPT-2, one step, three optimizers (CI)")
    parser.add_argument("--child", nargs=2, metavar=("MODEL", "OPTIMIZER"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.smoke:
        args.models, args.optimizers, args.steps, args.seq = ["gpt2-tiny"], ["adamw_torch_fused", "slimadam",
                                                                             "slimadam-int8"], 1, 16
    if args.child:
        print(json.dumps(child(*args.child, args.steps, args.batch, args.seq)))
        return 0
    if args.results:
        results = json.load(open(args.results))
    else:
        results = [r for m in args.models for o in args.optimizers
                   if (r := run_case(m, o, args.steps, args.batch, args.seq)) is not None]
    text = [f"Peak memory of {args.steps} Trainer steps, batch {args.batch} x {args.seq} tokens, CPU, fp32 weights",
            "", table(results), "", f"Largest fp32 model trained (weights + grads + state + the {results[0]['model']} run's fixed "
            "overhead):", "", largest_models(results, args.budgets)]
    if args.check_largest:
        text += ["", check_largest(results, args.check_largest, args.budget_gib, args)]
    report = "\n".join(text)
    print(report)
    if args.output:
        with open(args.output, "w") as fh:
            fh.write(report + "\n")
        with open(args.output + ".json", "w") as fh:
            json.dump(results, fh, indent=1)
    return 0


def check_largest(results: list[dict[str, Any]], optimizer: str, budget_gib: float, args: Any) -> str:
    """Train the deepest Llama-1B-wide model the measured bytes say fits ``budget_gib``; report its peak."""
    from transformers import AutoModelForCausalLM
    import torch

    ref = next(r for r in results if r["model"] == "gpt2-124m" and r["optimizer"] == optimizer)
    per_param = 8 + ref["state_bytes"] / ref["params"]
    fixed = ref["peak_rss_bytes"] - per_param * ref["params"]
    target = (budget_gib * 2**30 - fixed) / per_param
    layers = 1
    while True:  # parameters of the model with one more layer, on the meta device
        with torch.device("meta"):
            n = sum(p.numel() for p in AutoModelForCausalLM.from_config(_config(f"llama-layers-{layers + 1}")).parameters())
        if n > target:
            break
        layers += 1
    r = run_case(f"llama-layers-{layers}", optimizer, args.steps, args.batch, args.seq)
    if r is None:
        return f"Check: llama-layers-{layers} with {optimizer} failed to run."
    return (f"Check: a Llama-1B-wide model with {layers} layers ({r['params'] / 1e9:.2f}B parameters, predicted to "
            f"fit {budget_gib:g} GiB with {optimizer}) trained with a peak of {r['peak_rss_bytes'] / 2**30:.2f} GiB.")


if __name__ == "__main__":
    sys.exit(main())
