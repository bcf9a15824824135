"""``slimadam rules`` and ``slimadam plot``: SNR CSV -> compression rules / figures.

Wire into the main parser with :func:`add_subcommands`; each subcommand sets ``func`` (called with the
parsed namespace, returns an exit code).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

__all__ = ["add_subcommands", "run_rules", "run_plot"]


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--snr", required=True, metavar="CSV", help="SNR CSV (step,key,shape,compress_dims,snr,...)")
    p.add_argument("--cutoff", type=float, default=1.0, help="SNR threshold (default 1.0, as the authors)")
    p.add_argument("--skip-before", type=int, default=None, metavar="STEP",
                   help="ignore measurements before this step (the paper drops an early window)")


def _roles_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--roles", default=None, metavar="JSON",
                   help="key -> {role, fan_in, fan_out} (default: <CSV>.roles.json when it exists)")
    p.add_argument("--preset", default=None,
                   help="preset name or YAML whose role patterns name the CSV keys (for CSVs without roles.json)")
    p.add_argument("--torch-layout", action="store_true",
                   help="assume nn.Embedding/nn.Linear layouts where none is recorded (e.g. the authors' nanoGPT CSVs)")


def add_subcommands(subparsers: Any) -> None:
    """Add ``rules`` and ``plot`` to an ``argparse`` subparsers object."""
    p = subparsers.add_parser(
        "rules",
        help="derive compression rules from an SNR CSV",
        description="Time-average each candidate's SNR; per parameter take the highest-SNR candidate above "
        "the cutoff (none above: no compression; norms never). .json writes the authors' "
        "{param: [dims] | null}; .yaml a preset override for --optim_args config=PATH.",
    )
    _common(p)
    p.add_argument("--output", "-o", required=True, metavar="OUT.json|OUT.yaml")
    p.add_argument("--select", choices=("max-snr", "most-compressive"), default="max-snr",
                   help="among candidates above the cutoff: highest SNR (authors) or smallest second moment")
    p.add_argument("--by-role", action="store_true",
                   help="one rule per role (aggregated over depth) instead of per parameter, for transfer "
                   "from a small proxy model to the full one")
    p.add_argument("--aggregate", choices=("mean", "majority"), default="mean",
                   help="--by-role: mean SNR across the role's parameters, or majority of their own rules")
    p.add_argument("--norm-name", action="append", default=[], metavar="NAME",
                   help="extra exact parameter name to treat as a norm (never compressed); repeatable")
    _roles_args(p)
    p.set_defaults(func=run_rules)

    p = subparsers.add_parser(
        "plot",
        help="SNR figures (PNG): heatmap and SNR over steps per role",
        description="Draw an SNR CSV: a heatmap of the time-mean SNR of every parameter and candidate dims, "
        "and the SNR over steps for each role, as PNG files in --output.",
    )
    _common(p)
    p.add_argument("--output", "-o", required=True, metavar="DIR", help="directory for the PNG files")
    p.add_argument("--prefix", default="", help="file name prefix")
    _roles_args(p)
    p.set_defaults(func=run_plot)


def _roles_file(args: argparse.Namespace) -> Path | None:
    if args.roles:
        return Path(args.roles)
    side = Path(args.snr + ".roles.json")
    return side if side.exists() else None


def _dump(data: Any, out: Path) -> None:
    if out.suffix == ".json":
        out.write_text(json.dumps(data, indent=4) + "\n")
    else:
        import yaml

        out.write_text(yaml.safe_dump(data, sort_keys=False, default_flow_style=False, width=100))


def run_rules(args: argparse.Namespace) -> int:
    from ..snr.rules import (
        compressed_fraction,
        key_infos,
        param_rules_override,
        read_snr_csv,
        role_rules,
        role_rules_override,
        select_rules,
        summarize_snr,
        write_rules_json,
    )

    out = Path(args.output)
    if out.suffix not in (".json", ".yaml", ".yml"):
        print(f"error: --output {out}: use a .json (authors' format) or .yaml (preset override) file", file=sys.stderr)
        return 2
    summaries = summarize_snr(read_snr_csv(args.snr), args.skip_before)
    out.parent.mkdir(parents=True, exist_ok=True)
    source = f"{Path(args.snr).name}, cutoff {args.cutoff:g}, {args.select}" + (
        f", steps >= {args.skip_before}" if args.skip_before else ""
    )
    if args.by_role:
        infos = key_infos(summaries, _roles_file(args), args.preset, args.torch_layout)
        chosen = role_rules(summaries, infos, args.cutoff, args.select, args.aggregate)
        if not chosen:
            print("error: no key has a known role; pass --roles JSON or --preset for these names", file=sys.stderr)
            return 2
        _dump(role_rules_override(chosen, f"{source}, {args.aggregate} over depth"), out)
        for r in chosen.values():
            snr = ", ".join(f"{k} {v:.2f}" for k, v in sorted(r.mean_snr.items()))
            print(f"{r.role:20s} {str(r.rule):8s} ({len(r.keys)} tensors; mean SNR {snr}; votes {r.votes})")
        print(f"wrote {out}")
        return 0
    rules = select_rules(summaries, args.cutoff, args.select, norm_names=args.norm_name)
    if out.suffix == ".json":
        write_rules_json(rules, out)
    else:
        data, skipped = param_rules_override(rules, source)
        _dump(data, out)
        if skipped:
            print(f"warning: {len(skipped)} split-weight parts (e.g. {skipped[0]}) repeat a role inside their "
                  "weight, so a name[role] key cannot address them; they keep their preset rules (use --by-role "
                  "or a JSON/YAML with explicit split dims)", file=sys.stderr)
    matrices = [k for k, s in summaries.items() if len(s.shape) >= 2]
    full = sum(rules[k] is None for k in matrices)
    print(f"{len(rules)} tensors, {len(matrices)} matrices, {full} kept full; "
          f"{compressed_fraction(summaries, rules):.2%} of their second moments saved; wrote {out}")
    return 0


def run_plot(args: argparse.Namespace) -> int:
    from ..snr.plot import plot_snr_csv
    from ..snr.rules import key_infos, read_snr_csv, summarize_snr

    roles = None
    roles_file = _roles_file(args)
    if roles_file is not None or args.preset is not None:
        summaries = summarize_snr(read_snr_csv(args.snr), args.skip_before)
        infos = key_infos(summaries, roles_file, args.preset)
        roles = {k: i.role for k, i in infos.items() if i.role}
    for path in plot_snr_csv(args.snr, args.output, args.cutoff, args.skip_before, roles, args.prefix):
        print(f"wrote {path}")
    return 0
