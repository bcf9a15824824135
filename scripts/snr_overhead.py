"""Time one SNR measurement against one training step (AdamW, random-init model, random tokens).

    python scripts/snr_overhead.py --model gpt2 --layers 12 --width 768 --device cpu
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from slimadam_hf.snr.targets import measure_snr, snr_targets


def build(kind: str, layers: int, width: int, vocab: int):
    if kind == "gpt2":
        return GPT2LMHeadModel(GPT2Config(n_layer=layers, n_embd=width, n_head=max(1, width // 64), vocab_size=vocab,
                                          n_positions=1024, bos_token_id=0, eos_token_id=0))
    return LlamaForCausalLM(LlamaConfig(num_hidden_layers=layers, hidden_size=width, intermediate_size=int(width * 8 / 3),
                                        num_attention_heads=max(1, width // 64), vocab_size=vocab,
                                        bos_token_id=0, eos_token_id=0, pad_token_id=0))


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=("gpt2", "llama"), default="gpt2")
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--width", type=int, default=768)
    ap.add_argument("--vocab", type=int, default=50304)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    torch.manual_seed(0)
    model = build(args.model, args.layers, args.width, args.vocab).to(args.device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randint(0, args.vocab, (args.batch, args.seq), device=args.device)
    step_times = []
    for _ in range(args.repeats + 1):
        sync(args.device)
        t0 = time.perf_counter()
        model(x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
        sync(args.device)
        step_times.append(time.perf_counter() - t0)
    targets = snr_targets(model)
    measure_times = []
    for i in range(args.repeats + 1):
        t0 = time.perf_counter()
        rows = measure_snr(opt, targets, step=i)  # ends with one device -> host copy
        measure_times.append(time.perf_counter() - t0)
    n_params = sum(p.numel() for p in model.parameters())
    step, meas = statistics.median(step_times[1:]), statistics.median(measure_times[1:])
    print(f"{args.model} {args.layers}L d{args.width} ({n_params / 1e6:.1f}M params) on {args.device}: "
          f"{len(targets)} tensors, {len(rows)} SNR rows per measurement; "
          f"measurement {1000 * meas:.0f} ms, train step (batch {args.batch}x{args.seq}) {1000 * step:.0f} ms; "
          f"every 100 steps -> {meas / (100 * step + meas):.2%} of training time")


if __name__ == "__main__":
    main()
