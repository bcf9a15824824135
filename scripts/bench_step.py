#!/usr/bin/env python
"""Optimizer step time, state bytes and peak RSS: SlimAdamW implementations vs. common baselines.

Parameter sets (random gradients, float32 parameters):

* ``gpt2-124m``: Hugging Face GPT-2 small (124M parameters, tied LM head);
* ``llama-1b``: Llama-3.2-1B shapes (hidden 2048, MLP 8192, 32 query / 8 KV heads, vocab 128256, tied
  head) with ``--llama-layers`` decoder layers (default 2 of the real 16, to fit a 24 GiB machine);
* ``tiny``: a 2-layer toy GPT-2 for ``--smoke``.

Timing: every optimizer steps the same parameters; each repeat steps every optimizer once, in a
rotating order (interleaved), and the table reports medians and ratios to the first optimizer
(torch's fused AdamW). State bytes are the tensors the optimizer keeps. Peak RSS is measured in a
fresh subprocess per optimizer: the growth of the process's high-water mark over the parameters and
gradients while building the optimizer and taking three steps (state plus temporaries).

Optional baselines are skipped with a note when their package is missing: Adam-mini (``adam-mini``),
bitsandbytes 8-bit AdamW (``bitsandbytes``), torchao 8-bit AdamW (``torchao``).

Examples::

    python scripts/bench_step.py --models gpt2-124m --repeats 15
    python scripts/bench_step.py --models llama-1b --llama-layers 2 --repeats 7
    python scripts/bench_step.py --smoke
    python scripts/bench_step.py --models gpt2-124m --optimizers "torch AdamW fused" --trainer   # end to end
    python scripts/bench_step.py --models gpt2-124m --optimizers "torch AdamW fused" --first-steps  # kernel build
    python scripts/bench_step.py --device cuda --models llama-1b --llama-layers 16 --no-rss   # GPU (Triton path)
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch import nn

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

LR, BETAS, EPS, WD = 1e-3, (0.9, 0.999), 1e-8, 0.1


# -- parameter sets ---------------------------------------------------------------------------------


def build_model(name: str, llama_layers: int, device: str) -> nn.Module:
    import transformers

    transformers.logging.set_verbosity_error()
    if name == "gpt2-124m":
        config = transformers.GPT2Config()
    elif name == "tiny":
        config = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=512, n_positions=64)
    elif name == "llama-1b":
        config = transformers.LlamaConfig(
            hidden_size=2048,
            intermediate_size=8192,
            num_hidden_layers=llama_layers,
            num_attention_heads=32,
            num_key_value_heads=8,
            vocab_size=128256,
            tie_word_embeddings=True,
        )
    else:
        raise ValueError(f"unknown parameter set {name!r}; choose gpt2-124m, llama-1b or tiny")
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    model = model.to_empty(device=device)
    model.tie_weights()  # to_empty() unties the LM head from the token embedding
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02, generator=gen)
            p.grad = torch.empty_like(p).normal_(0.0, 1e-3, generator=gen)
    return model


def model_meta(model: nn.Module) -> dict[str, int]:
    config = model.config
    if config.model_type == "gpt2":
        return dict(dim=config.n_embd, n_heads=config.n_head, n_kv_heads=config.n_head)
    return dict(dim=config.hidden_size, n_heads=config.num_attention_heads, n_kv_heads=config.num_key_value_heads)


# -- optimizers -------------------------------------------------------------------------------------


class Skip(Exception):
    """An optional baseline that cannot run here (package missing or unsupported device)."""


def _slim(impl: Optional[str], momentum_dtype: Optional[torch.dtype | str] = None,
          robust: bool = False, rounding: str = "nearest") -> Callable[[nn.Module], torch.optim.Optimizer]:
    def make(model: nn.Module) -> torch.optim.Optimizer:
        from slimadam_hf import build_slimadam

        return build_slimadam(
            model, "auto", lr=LR, betas=BETAS, eps=EPS, weight_decay=WD, implementation=impl,
            momentum_dtype=momentum_dtype, robust=robust, momentum_rounding=rounding,
        )

    return make


def _adamw(**kw: Any) -> Callable[[nn.Module], torch.optim.Optimizer]:
    return lambda model: torch.optim.AdamW(model.parameters(), lr=LR, betas=BETAS, eps=EPS, weight_decay=WD, **kw)


def _adafactor(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.Adafactor(model.parameters(), lr=LR, weight_decay=WD, foreach=True)


def _adam_mini(model: nn.Module) -> torch.optim.Optimizer:
    try:
        from adam_mini import Adam_mini
    except ImportError as exc:
        raise Skip("package adam-mini not installed") from exc
    with contextlib.redirect_stdout(io.StringIO()):
        return Adam_mini(
            named_parameters=model.named_parameters(), lr=LR, betas=BETAS, eps=EPS, weight_decay=WD,
            **model_meta(model),
        )


def _bnb8(model: nn.Module) -> torch.optim.Optimizer:
    try:
        import bitsandbytes as bnb
    except Exception as exc:  # noqa: BLE001 - import errors vary by platform
        raise Skip(f"bitsandbytes unavailable ({type(exc).__name__})") from exc
    return bnb.optim.AdamW8bit(model.parameters(), lr=LR, betas=BETAS, eps=EPS, weight_decay=WD)


def _torchao8(model: nn.Module) -> torch.optim.Optimizer:
    try:
        from torchao.optim import AdamW8bit
    except Exception as exc:  # noqa: BLE001
        raise Skip(f"torchao unavailable ({type(exc).__name__})") from exc
    return AdamW8bit(model.parameters(), lr=LR, betas=BETAS, eps=EPS, weight_decay=WD)


OPTIMIZERS: dict[str, Callable[[nn.Module], torch.optim.Optimizer]] = {
    "torch AdamW fused": _adamw(fused=True),
    "torch AdamW foreach": _adamw(foreach=True),
    "SlimAdamW default": _slim(None),
    "SlimAdamW default, int8 m": _slim(None, "int8"),
    "SlimAdamW default, bf16 m stochastic": _slim(None, "bfloat16", rounding="stochastic"),
    "SlimAdamW fused": _slim("fused"),
    "SlimAdamW default, bf16 m": _slim(None, torch.bfloat16),
    "SlimAdamW default, robust": _slim(None, robust=True),
    "SlimAdamW foreach, robust": _slim("foreach", robust=True),
    "SlimAdamW foreach": _slim("foreach"),
    "SlimAdamW foreach, bf16 m": _slim("foreach", torch.bfloat16),
    "SlimAdamW foreach, int8 m": _slim("foreach", "int8"),
    "SlimAdamW reference": _slim("reference"),
    "torch Adafactor": _adafactor,
    "Adam-mini": _adam_mini,
    "bnb AdamW8bit": _bnb8,
    "torchao AdamW8bit": _torchao8,
}


def state_bytes(opt: torch.optim.Optimizer) -> int:
    seen: set[int] = set()
    total = 0

    def visit(obj: Any) -> None:
        nonlocal total
        if isinstance(obj, torch.Tensor):
            inner = getattr(obj, "__tensor_flatten__", None)
            if inner is not None and type(obj) is not torch.Tensor:  # tensor subclasses (torchao)
                names, _ = obj.__tensor_flatten__()
                for n in names:
                    visit(getattr(obj, n))
                return
            key = obj.untyped_storage().data_ptr() if obj.device.type != "meta" else id(obj)
            if key not in seen:
                seen.add(key)
                total += obj.untyped_storage().nbytes()
        elif isinstance(obj, dict):
            for v in obj.values():
                visit(v)
        elif isinstance(obj, (list, tuple)):
            for v in obj:
                visit(v)

    for s in opt.state.values():
        visit(s)
    return total


# -- timing -----------------------------------------------------------------------------------------


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


@dataclass
class Result:
    name: str
    times: list[float]
    cpu_times: list[float]
    state: int
    first_step: float
    peak_rss: Optional[int] = None
    note: str = ""


def time_interleaved(
    model: nn.Module, names: list[str], repeats: int, warmup: int, device: str
) -> tuple[list[Result], list[str]]:
    opts: dict[str, torch.optim.Optimizer] = {}
    results: dict[str, Result] = {}
    skipped: list[str] = []
    for name in names:
        try:
            with contextlib.redirect_stdout(sys.stderr):  # Adam-mini prints what it found
                opt = OPTIMIZERS[name](model)
                _sync(device)
                start = time.perf_counter()
                opt.step()
                _sync(device)
                first = time.perf_counter() - start
            for _ in range(warmup):
                opt.step()
            _sync(device)
        except Skip as exc:
            skipped.append(f"{name}: skipped, {exc}")
            continue
        except Exception as exc:  # noqa: BLE001 - an optional baseline that does not run here
            if name.startswith(("torch AdamW", "SlimAdamW")):
                raise
            skipped.append(f"{name}: skipped, fails on {device} ({type(exc).__name__}: {str(exc)[:120]})")
            continue
        opts[name] = opt
        results[name] = Result(name, [], [], state_bytes(opt), first)
        print(f"  ready: {name} (first step {first:.2f} s)", file=sys.stderr, flush=True)
    order = list(opts)
    for r in range(repeats):
        rotated = order[r % len(order):] + order[: r % len(order)]
        for name in rotated:
            _sync(device)
            start, cpu = time.perf_counter(), time.process_time()
            opts[name].step()
            _sync(device)
            results[name].times.append(time.perf_counter() - start)
            results[name].cpu_times.append(time.process_time() - cpu)
    return [results[n] for n in order], skipped


# -- peak RSS (one subprocess per optimizer) ---------------------------------------------------------


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def rss_child(model_name: str, opt_name: str, llama_layers: int) -> None:
    from transformers import Trainer  # noqa: F401 - imported before the baseline: build_slimadam uses it

    import slimadam_hf  # noqa: F401

    model = build_model(model_name, llama_layers, "cpu")
    gc.collect()
    base = _rss_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:  # reset the high-water mark (VmHWM)
        f.write("5")
    try:
        opt = OPTIMIZERS[opt_name](model)
        for _ in range(3):
            opt.step()
    except Skip as exc:
        print(json.dumps({"skip": str(exc)}))
        return
    print(json.dumps({"peak_kib": _rss_kib("VmHWM") - base}))


def peak_rss(model_name: str, opt_name: str, llama_layers: int) -> Optional[int]:
    cmd = [sys.executable, __file__, "--rss-child", model_name, opt_name, "--llama-layers", str(llama_layers)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    lines = [l for l in out.stdout.splitlines() if l.startswith("{")]
    if out.returncode != 0 or not lines:
        return None
    data = json.loads(lines[-1])
    return data.get("peak_kib", 0) * 1024 if "peak_kib" in data else None


# -- end to end: tokens per second through the real Trainer ------------------------------------------

TRAINER_OPTIMS = {"adamw_torch_fused": ("adamw_torch_fused", None), "slimadam": ("slimadam", None),
                  "slimadam foreach": ("slimadam", "implementation=foreach"),
                  "slimadam int8 m": ("slimadam", "momentum_dtype=int8"),
                  "slimadam bf16 m": ("slimadam", "momentum_dtype=bfloat16"),
                  "slimadam robust": ("slimadam", "robust=true"),
                  "adamw_bnb_8bit": ("adamw_bnb_8bit", None),
                  "adamw_torch_8bit": ("adamw_torch_8bit", None)}


def trainer_child(model_name: str, optim_name: str, steps: int, batch: int, seq: int, device: str = "cpu",
                  llama_layers: int = 2) -> None:
    """Train ``steps`` steps with the HF Trainer (bf16 autocast on CUDA); print the steady-state tokens/s
    (steps after the first 2) and, on CUDA, the peak allocated memory."""
    import transformers
    from transformers import Trainer, TrainerCallback, TrainingArguments

    import slimadam_hf

    slimadam_hf.register()
    model = build_model(model_name, llama_layers, device)
    for p in model.parameters():
        p.grad = None
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    rows = [torch.randint(0, vocab, (seq,), generator=gen) for _ in range(steps * batch)]
    data = [{"input_ids": r, "labels": r} for r in rows]
    ends: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):  # noqa: D102
            ends.append(time.perf_counter())

    optim, optim_args = TRAINER_OPTIMS[optim_name]
    args = TrainingArguments(
        output_dir="/tmp/bench_step_trainer", optim=optim, optim_args=optim_args, max_steps=steps,
        per_device_train_batch_size=batch, learning_rate=1e-4, use_cpu=device == "cpu", bf16=device == "cuda",
        report_to=[], save_strategy="no", logging_strategy="no", disable_tqdm=True, dataloader_num_workers=0,
    )
    transformers.logging.set_verbosity_error()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    Trainer(model=model, args=args, train_dataset=data, callbacks=[Clock()]).train()
    steady = ends[2:]
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else None
    print(json.dumps({"tokens_per_s": (len(steady) - 1) * batch * seq / (steady[-1] - steady[0]), "peak": peak}))


def trainer_throughput(model_name: str, steps: int, batch: int, seq: int, repeats: int, names: list[str],
                       device: str = "cpu", llama_layers: int = 2) -> str:
    """Median tokens/s per ``--optim`` in ``names`` over ``repeats`` fresh processes, run in rotating order."""
    results: dict[str, list[float]] = {n: [] for n in names}
    peaks: dict[str, Optional[int]] = {}
    failed: list[str] = []
    for r in range(repeats):
        for name in names[r % len(names):] + names[: r % len(names)]:
            cmd = [sys.executable, __file__, "--trainer-child", model_name, name, "--trainer-steps", str(steps),
                   "--trainer-batch", str(batch), "--trainer-seq", str(seq), "--device", device,
                   "--llama-layers", str(llama_layers)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=name == names[0])
            lines = [l for l in out.stdout.splitlines() if l.startswith("{")]
            if out.returncode != 0 or not lines:  # an optional baseline (bitsandbytes, torchao) not installed
                failed.append(f"- {name}: did not run ({(out.stderr.strip().splitlines() or ['?'])[-1][:160]})")
                continue
            data = json.loads(lines[-1])
            results[name].append(data["tokens_per_s"])
            peaks[name] = data.get("peak")
    base = statistics.median(results[names[0]])
    lines = [f"### End to end: Trainer on {model_name} ({device}{', bf16 autocast' if device == 'cuda' else ''}), "
             f"batch {batch} x {seq} tokens, {steps} steps (tokens/s over steps 3..{steps}, median of {repeats} "
             "fresh processes)", "", f"| --optim | tokens/s | vs {names[0]} | peak allocated GiB |",
             "|---|---:|---:|---:|"]
    for name in names:
        if results[name]:
            med = statistics.median(results[name])
            peak = peaks.get(name)
            lines.append(f"| {name} | {med:,.0f} | {med / base:.3f} | "
                         f"{'n/a' if peak is None else f'{peak / 2**30:.1f}'} |")
    return "\n".join(lines + [""] + sorted(set(failed)))


# -- cold and warm first steps (kernel build) ----------------------------------------

FIRST_STEP_IMPLEMENTATIONS = ("fused",)


def first_step_child(model_name: str, implementation: str) -> None:
    """Time the first SlimAdamW step of a fresh process (kernel build included)."""
    model = build_model(model_name, 2, "cpu")
    opt = _slim(implementation)(model)
    start = time.perf_counter()
    opt.step()
    first = time.perf_counter() - start
    start = time.perf_counter()
    opt.step()
    print(json.dumps({"first": first, "second": time.perf_counter() - start}))


def first_step_times(model_name: str) -> str:
    """Cold (empty kernel cache) and warm (the same cache again) first steps, fresh processes."""
    import tempfile

    lines = [f"### First step of a fresh process on {model_name}: kernel build", "",
             "| implementation | cold first step s | warm first step s | second step s |", "|---|---:|---:|---:|"]
    for impl in FIRST_STEP_IMPLEMENTATIONS:
        with tempfile.TemporaryDirectory() as cache:
            env = {**os.environ, "SLIMADAM_HF_KERNEL_DIR": os.path.join(cache, "kernels")}
            cmd = [sys.executable, __file__, "--first-step-child", model_name, impl]
            runs = [json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
                               .stdout.strip().splitlines()[-1]) for _ in range(2)]
        lines.append(f"| {impl} | {runs[0]['first']:.1f} | {runs[1]['first']:.1f} | {runs[1]['second']:.3f} |")
    return "\n".join(lines)


# -- report -----------------------------------------------------------------------------------------


def fmt_mib(n: Optional[int]) -> str:
    return "n/a" if n is None else f"{n / 2**20:,.0f}"


def table(model_name: str, nparams: int, results: list[Result], adamw_state: int) -> str:
    base = statistics.median(results[0].times)
    base_cpu = statistics.median(results[0].cpu_times)
    lines = [
        f"### {model_name} ({nparams / 1e6:,.1f}M parameters)",
        "",
        "| optimizer | step ms (median) | step vs fused AdamW | CPU-time vs fused AdamW | state MiB | "
        "state vs AdamW | peak RSS growth MiB | first step s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        med = statistics.median(r.times)
        cpu = statistics.median(r.cpu_times)
        lines.append(
            f"| {r.name} | {med * 1e3:,.1f} | {med / base:.2f} | {cpu / base_cpu:.2f} | {fmt_mib(r.state)} | "
            f"{r.state / adamw_state:.3f} | {fmt_mib(r.peak_rss)} | {r.first_step:.1f} |"
        )
    return "\n".join(lines)


def machine() -> str:
    load = os.getloadavg()
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (
        f"torch {torch.__version__}, {cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} threads, "
        f"load average at start {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f}"
    )


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["gpt2-124m", "llama-1b"])
    parser.add_argument("--optimizers", nargs="+", default=None, help="names from the table (default: all)")
    parser.add_argument("--skip", nargs="*", default=[], help="optimizer names to leave out")
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--llama-layers", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--no-rss", action="store_true", help="skip the per-optimizer peak RSS subprocesses")
    parser.add_argument("--smoke", action="store_true", help="tiny model, 2 repeats (CI)")
    parser.add_argument("--output", default=None, help="also write the markdown to this file")
    parser.add_argument("--trainer", action="store_true",
                        help="also measure end-to-end Trainer tokens/s: adamw_torch_fused vs --optim slimadam")
    parser.add_argument("--trainer-steps", type=int, default=12)
    parser.add_argument("--trainer-batch", type=int, default=2)
    parser.add_argument("--trainer-seq", type=int, default=128)
    parser.add_argument("--trainer-repeats", type=int, default=3)
    parser.add_argument("--trainer-optims", nargs="+", default=list(TRAINER_OPTIMS), choices=list(TRAINER_OPTIMS),
                        help="which --optim settings to run end to end (the first is the baseline)")
    parser.add_argument("--first-steps", action="store_true",
                        help="also time the first step of fresh processes, cold and warm kernel caches (fused)")
    parser.add_argument("--first-step-child", nargs=2, metavar=("MODEL", "IMPLEMENTATION"), help=argparse.SUPPRESS)
    parser.add_argument("--rss-child", nargs=2, metavar=("MODEL", "OPTIMIZER"), help=argparse.SUPPRESS)
    parser.add_argument("--trainer-child", nargs=2, metavar=("MODEL", "OPTIM"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.trainer_child:
        trainer_child(*args.trainer_child, args.trainer_steps, args.trainer_batch, args.trainer_seq, args.device,
                      args.llama_layers)
        return 0
    if args.first_step_child:
        first_step_child(*args.first_step_child)
        return 0

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.rss_child:
        rss_child(*args.rss_child, args.llama_layers)
        return 0
    names = args.optimizers or list(OPTIMIZERS)
    unknown = [n for n in names + args.skip if n not in OPTIMIZERS]
    if unknown:
        parser.error(f"unknown optimizer(s) {unknown}; choose from {list(OPTIMIZERS)}")
    if args.smoke:
        args.models, args.repeats, args.warmup = ["tiny"], 2, 0
        smoke = {"torch AdamW fused", "SlimAdamW default", "SlimAdamW default, robust", "SlimAdamW foreach",
                 "SlimAdamW foreach, bf16 m", "SlimAdamW foreach, int8 m", "SlimAdamW reference", "torch Adafactor"}
        names = [n for n in names if n in smoke]
    names = [n for n in names if n not in args.skip]
    if names[0] != "torch AdamW fused" and "torch AdamW fused" not in args.skip:
        names = ["torch AdamW fused"] + [n for n in names if n != "torch AdamW fused"]

    out = [f"Machine: {machine()}", ""]
    print(out[0], flush=True)
    for model_name in args.models:
        model = build_model(model_name, args.llama_layers, args.device)
        nparams = sum(p.numel() for p in model.parameters())
        results, skipped = time_interleaved(model, names, args.repeats, args.warmup, args.device)
        adamw_state = next(
            (r.state for r in results if r.name == "torch AdamW fused"),
            8 * nparams + 4 * sum(1 for _ in model.parameters()),
        )
        del model
        gc.collect()
        if not args.no_rss and args.device == "cpu":
            for r in results if not args.smoke else results[1:2]:
                r.peak_rss = peak_rss(model_name, r.name, args.llama_layers)
        text = table(model_name, nparams, results, adamw_state)
        notes = [f"- {s}" for s in skipped]
        notes.append(
            f"- {args.repeats} interleaved repeats (rotating order) after {args.warmup} warm-up steps; medians. "
            "CPU time = process CPU seconds per step (all threads), less sensitive to other load than wall time. "
            "Peak RSS growth: high-water mark over parameters + gradients, fresh process per optimizer, "
            "3 steps (state + temporaries)."
        )
        if model_name == "llama-1b":
            notes.append(f"- Llama-3.2-1B shapes with {args.llama_layers} of its 16 decoder layers.")
        block = text + "\n\n" + "\n".join(notes) + "\n"
        print(block, flush=True)
        out.append(block)
    if args.first_steps and args.device == "cpu":
        for model_name in args.models:
            block = first_step_times(model_name)
            print(block, flush=True)
            out.append(block)
    if args.trainer:
        for model_name in args.models:
            block = trainer_throughput(model_name, args.trainer_steps, args.trainer_batch, args.trainer_seq,
                                       args.trainer_repeats, args.trainer_optims, args.device, args.llama_layers)
            print(block, flush=True)
            out.append(block)
    if args.output:
        with open(args.output, "w") as f:
            f.write("\n".join(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
