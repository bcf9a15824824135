#!/usr/bin/env python
"""Which role's compressed second moment costs loss? SlimAdam with one role kept full, one run per role.

Each variant is SlimAdam (the preset's rules) with ``rules: {ROLE: none}`` for one role (or for a few
roles joined by ``+``), trained with ``scripts/bench_quality.py``'s data, models and schedule. Options
after ``--`` go to bench_quality:

    python scripts/ablate_roles.py --arch llama --lr 1e-2 --out docs/benchmarks/ablation/llama
    python scripts/ablate_roles.py --arch bert --lr 1e-3 --seeds 1 --steps 3000 --roles query key \\
        --out /tmp/bert_ablation -- --corpus pydoc --batch 32 --width 128 --init-range 0.05
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_quality as bq  # noqa: E402

from slimadam_hf import build_slimadam  # noqa: E402

ROLES = {
    "gpt2": ["token_embedding", "position_embedding", "query", "key", "value", "attention_output", "mlp_up",
             "mlp_down"],
    "llama": ["token_embedding", "query", "key", "value", "attention_output", "mlp_gate", "mlp_up", "mlp_down",
              "lm_head"],
    # the tied MLM decoder is planned as token_embedding; the MLM transform dense is a classifier
    "bert": ["token_embedding", "position_embedding", "query", "key", "value", "attention_output", "mlp_up",
             "mlp_down", "classifier"],
}


def _variant_rules(item: str) -> dict[str, str]:
    """``token_embedding+query=fan_out`` -> {token_embedding: none, query: fan_out}."""
    rules = {}
    for part in item.split("+"):
        role, _, rule = part.partition("=")
        rules[role] = rule or "none"
    return rules


def _variant_name(item: str) -> str:
    return item if "=" in item else f"full {item}"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    cut = argv.index("--") if "--" in argv else len(argv)
    own, forwarded = argv[:cut], argv[cut + 1:]
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", choices=sorted(ROLES), required=True)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--seeds", nargs="+", default=["0", "1", "2"])
    parser.add_argument("--steps", default="500")
    parser.add_argument("--roles", nargs="+",
                        help="only these roles (default: every role of --arch); ROLE+ROLE keeps several full at "
                             "once, ROLE=RULE gives a role another rule instead (fan_in, fan_out, both)")
    parser.add_argument("--baselines", nargs="*", default=["AdamW", "SlimAdam"],
                        help="bench_quality optimizers to run beside the variants")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(own)
    variants = {_variant_name(item): _variant_rules(item) for item in args.roles or ROLES[args.arch]}
    unknown = sorted({role for rules in variants.values() for role in rules} - set(ROLES[args.arch]))
    if unknown:
        parser.error(f"--roles: {unknown} are not {args.arch} roles; choose from {ROLES[args.arch]}")
    default = bq.make_optimizer

    def make(name, model, lr, snr):  # type: ignore[no-untyped-def]
        if name in variants:
            return build_slimadam(model, "auto", {"rules": variants[name]}, lr=lr, betas=bq.BETAS,
                                  weight_decay=bq.WEIGHT_DECAY)
        return default(name, model, lr, snr)

    bq.make_optimizer = make
    bq.ALL_OPTIMIZERS = bq.ALL_OPTIMIZERS + list(variants)
    return bq.main(["--out", args.out, "--archs", args.arch, "--optimizers", *args.baselines, *variants,
                    "--lrs", str(args.lr), "--seeds", *args.seeds, "--steps", args.steps, "--no-vit",
                    "--threads", "1", *forwarded])


if __name__ == "__main__":
    sys.exit(main())
