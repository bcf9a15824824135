#!/usr/bin/env python
"""Correctness of the Triton path on CUDA: every variant against the reference, on real model shapes.

For a small GPT-2 and a small Llama (random init, built from configs), each SlimAdamW variant steps a copy with
``implementation="triton"`` and a copy with ``implementation="reference"`` on the same random gradients for 6
steps; the table gives, per variant, the largest difference between the two runs relative to how far the
reference moved that parameter (the bar: 1e-5, and 1e-3 for int8, where one code can flip at a rounding
boundary). It also moves a Triton checkpoint to the CPU, steps on there and compares with CUDA, and counts the
launches of one step. Exit status 1 when a bar is missed.

    python scripts/gpu_check.py
"""

from __future__ import annotations

import copy
import sys

import torch

VARIANTS = {
    "default": {},
    "int8 m": {"momentum_dtype": "int8"},
    "bf16 m": {"momentum_dtype": "bfloat16"},
    "bf16 m stochastic": {"momentum_dtype": "bfloat16", "momentum_rounding": "stochastic"},
    "robust": {"robust": True},
}
HYPER = dict(lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
STEPS = 6


def models() -> dict[str, torch.nn.Module]:
    import transformers

    transformers.logging.set_verbosity_error()
    gpt2 = transformers.GPT2Config(n_embd=384, n_layer=2, n_head=6, vocab_size=5003, n_positions=256)
    llama = transformers.LlamaConfig(hidden_size=320, intermediate_size=864, num_hidden_layers=2,
                                     num_attention_heads=5, num_key_value_heads=1, vocab_size=4099)
    torch.manual_seed(0)
    return {name: transformers.AutoModelForCausalLM.from_config(c) for name, c in (("gpt2", gpt2), ("llama", llama))}


def run(model: torch.nn.Module, implementation: str, options: dict, device: str, steps: int = STEPS,
        optimizer=None, first: int = 0):
    from slimadam_hf import build_slimadam

    model = model.to(device)
    opt = optimizer or build_slimadam(model, implementation=implementation, **HYPER, **options)
    for step in range(first, first + steps):
        gen = torch.Generator().manual_seed(step)
        for p in model.parameters():
            p.grad = (1e-3 * torch.randn(p.shape, generator=gen)).to(device)
        opt.step()
    return opt


def worst_relative(a: torch.nn.Module, b: torch.nn.Module, start: torch.nn.Module) -> float:
    worst = 0.0
    for pa, pb, p0 in zip(a.parameters(), b.parameters(), start.parameters()):
        moved = (pb.detach().double().cpu() - p0.detach().double()).abs().max().item()
        diff = (pa.detach().double().cpu() - pb.detach().double().cpu()).abs().max().item()
        worst = max(worst, diff / max(moved, 1e-30))
    return worst


def main() -> int:
    from slimadam_hf.core import triton_step

    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device", file=sys.stderr)
        return 2
    failures = 0
    print("| model | variant | max |triton - reference| / movement | bar | launches per step |")
    print("|---|---|---:|---:|---:|")
    for model_name, model in models().items():
        for variant, options in VARIANTS.items():
            start = copy.deepcopy(model)
            fast, ref = copy.deepcopy(model), copy.deepcopy(model)
            opt = run(fast, "triton", options, "cuda", steps=STEPS - 1)
            torch.cuda.synchronize()
            before = triton_step.launches
            run(fast, "triton", options, "cuda", steps=1, optimizer=opt, first=STEPS - 1)
            launches = triton_step.launches - before
            run(ref, "reference", options, "cuda")
            worst = worst_relative(fast, ref, start)
            bar = 1e-3 if variant == "int8 m" else 1e-5
            failures += worst > bar
            print(f"| {model_name} | {variant} | {worst:.2e} | {bar:.0e} | {launches} |", flush=True)
    # a CUDA checkpoint resumed on the CPU (foreach / fused) and the same run kept on CUDA
    model = models()["llama"]
    for variant in ("default", "int8 m"):
        cuda_run = copy.deepcopy(model)
        opt = run(cuda_run, "triton", VARIANTS[variant], "cuda", steps=3)
        cpu_model = copy.deepcopy(cuda_run).cpu()
        from slimadam_hf import build_slimadam

        cpu_opt = build_slimadam(cpu_model, **HYPER, **VARIANTS[variant])
        cpu_opt.load_state_dict(copy.deepcopy(opt.state_dict()))
        run(cpu_model, None, {}, "cpu", steps=3, optimizer=cpu_opt, first=3)
        run(cuda_run, None, {}, "cuda", steps=3, optimizer=opt, first=3)
        worst = worst_relative(cpu_model, cuda_run, model)
        bar = 1e-3 if variant == "int8 m" else 1e-5
        failures += worst > bar
        print(f"| llama | {variant}: CUDA checkpoint resumed on CPU vs CUDA | {worst:.2e} | {bar:.0e} | |")
    print("\nall variants within their bars" if not failures else f"\n{failures} check(s) missed their bar")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
