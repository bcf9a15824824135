#!/usr/bin/env python
"""Which role's compressed second moment costs loss? SlimAdam with one role kept full, one run per role.

Each variant is SlimAdam (Table 1 rules) with ``rules: {ROLE: none}`` for one role, trained with
``scripts/bench_quality.py``'s data, models and schedule:

    python scripts/ablate_roles.py --arch llama --lr 1e-2 --out docs/benchmarks/ablation/llama
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
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", choices=sorted(ROLES), required=True)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--seeds", nargs="+", default=["0", "1", "2"])
    parser.add_argument("--steps", default="500")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    variants = {f"full {role}": role for role in ROLES[args.arch]}
    default = bq.make_optimizer

    def make(name, model, lr, snr):  # type: ignore[no-untyped-def]
        if name in variants:
            return build_slimadam(model, "auto", {"rules": {variants[name]: "none"}}, lr=lr, betas=bq.BETAS,
                                  weight_decay=bq.WEIGHT_DECAY)
        return default(name, model, lr, snr)

    bq.make_optimizer = make
    bq.ALL_OPTIMIZERS = bq.ALL_OPTIMIZERS + list(variants)
    return bq.main(["--out", args.out, "--archs", args.arch, "--optimizers", "AdamW", "SlimAdam", *variants,
                    "--lrs", str(args.lr), "--seeds", *args.seeds, "--steps", args.steps, "--no-vit", "--threads", "1"])


if __name__ == "__main__":
    sys.exit(main())
