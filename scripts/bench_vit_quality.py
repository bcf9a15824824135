#!/usr/bin/env python
"""Does SlimAdam train a ViT as well as AdamW? Small HF ``ViTForImageClassification`` from a config
(random init) on a real image task, a custom loop with the images pre-loaded as tensors, one thread.

Tasks (``--vit-task``):

* ``fashion``: Fashion-MNIST, 28x28 grey, 60k train / 10k test (Debian ``dataset-fashion-mnist``,
  IDX files under /usr/share/datasets/fashion-mnist; ``apt-get install dataset-fashion-mnist``);
* ``letters``: 26 letters rendered with Pillow's built-in font (``scripts/letters_task.py``: random case,
  size, rotation, shear, stroke and noise; 60k train / 10k test, 28x28); no download, a held-out task;
* ``digits``: scikit-learn's 8x8 digits (1,797 images, 80/20 split, seed 0), upsampled bilinearly to
  ``--image-size`` (default 16).

Optimizers (names of ``scripts/bench_quality.py``'s ``make_optimizer``): ``AdamW``, ``SlimAdam`` (the
shipped preset, ``preset="auto"`` = vit), ``SlimAdam robust`` (``robust=True``), ``SlimAdam SNR``
(role rules from SNR measured along an AdamW proxy run at ``lr / 10``, pooled per role, cutoff 1.0:
the paper's recipe), ``SlimAdam table1`` (the paper's Table 1 rules for every role, whatever the vit
preset says) and ``full ROLE`` (the vit preset with one role's second moment kept full: ablation).

Schedule as in bench_quality: linear warm-up over 10 % of the steps, cosine to 10 %, clipping at 1.0,
weight decay 0.1 on the decayed parameters, betas (0.9, 0.95). Accuracy on the whole test split.

    python scripts/bench_vit_quality.py --vit-task fashion --vit-steps 2000 --vit-lrs 3e-4 1e-3 3e-3 \\
        --seeds 0 --optimizers AdamW --out /tmp/vit_grid
    python scripts/bench_vit_quality.py --smoke --optimizers AdamW SlimAdam "SlimAdam SNR" --out /tmp/v  # CI

The commands and results behind docs/quality.md are listed there.

Prints a markdown table (mean ± sd over seeds, accuracy in points, difference to AdamW at the same
LR) and writes ``vit_quality.json`` / ``vit_quality.md`` under ``--out``.
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
from torch import nn  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_quality as bq  # noqa: E402

FASHION = Path("/usr/share/datasets/fashion-mnist")
ROLES = ["token_embedding", "position_embedding", "patch_embedding", "query", "key", "value",
         "attention_output", "mlp_up", "mlp_down", "classifier"]
TABLE1 = {  # the paper's Table 1 (slimadam_hf.rules.roles.DEFAULT_RULES)
    "token_embedding": "fan_out", "position_embedding": "fan_out", "patch_embedding": "fan_in",
    "query": "fan_in", "key": "fan_in", "value": "fan_out", "attention_output": "fan_out",
    "mlp_up": "fan_out", "mlp_down": "fan_out", "classifier": "fan_in",
}
BASE_OPTIMIZERS = ["AdamW", "SlimAdam", "SlimAdam robust", "SlimAdam SNR", "SlimAdam table1"]


# -- data -------------------------------------------------------------------------------------------


def _idx(path: Path) -> torch.Tensor:
    raw = gzip.open(path, "rb").read()
    ndim = raw[3]
    shape = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return torch.frombuffer(bytearray(raw[4 + 4 * ndim :]), dtype=torch.uint8).reshape(shape)


def load_task(task: str, image_size: int, smoke: bool = False) -> tuple[torch.Tensor, ...]:
    """(x_train, y_train, x_test, y_test, n_classes, description); x as float (N, 1, H, W), normalised
    (``smoke``: the generated letters task renders only as many images as the smoke run uses)."""
    if task == "fashion":
        if not FASHION.is_dir():
            raise SystemExit(f"{FASHION} missing: apt-get install dataset-fashion-mnist")
        xtr = _idx(FASHION / "train-images-idx3-ubyte.gz").float().unsqueeze(1) / 255.0
        ytr = _idx(FASHION / "train-labels-idx1-ubyte.gz").long()
        xte = _idx(FASHION / "t10k-images-idx3-ubyte.gz").float().unsqueeze(1) / 255.0
        yte = _idx(FASHION / "t10k-labels-idx1-ubyte.gz").long()
        desc = f"Fashion-MNIST ({FASHION}), {len(xtr)} train / {len(xte)} test, 28x28"
    elif task == "letters":
        from letters_task import render

        xtr, ytr = render(512 if smoke else 60000, seed=0)
        xte, yte = render(256 if smoke else 10000, seed=1)
        xtr, xte = xtr.float().unsqueeze(1) / 255.0, xte.float().unsqueeze(1) / 255.0
        desc = f"letters (Pillow's built-in font, scripts/letters_task.py), {len(xtr)} train / {len(xte)} test, 28x28"
    elif task == "digits":
        digits = bq.load_digits()
        if digits is None:
            raise SystemExit("--vit-task digits needs scikit-learn")
        xtr, ytr, xte, yte = digits
        if image_size != 8:
            up = lambda x: nn.functional.interpolate(x, size=(image_size, image_size), mode="bilinear",  # noqa: E731
                                                     align_corners=False)
            xtr, xte = up(xtr), up(xte)
        desc = f"sklearn digits, {len(xtr)} train / {len(xte)} test, 8x8 upsampled to {image_size}x{image_size}"
    else:
        raise SystemExit(f"unknown --vit-task {task!r}")
    mean, std = xtr.mean(), xtr.std()
    return (xtr - mean) / std, ytr, (xte - mean) / std, yte, int(ytr.max()) + 1, desc


# -- model / optimizers -----------------------------------------------------------------------------


def build_vit(cfg: argparse.Namespace, n_classes: int, seed: int) -> nn.Module:
    import transformers

    transformers.logging.set_verbosity_error()
    config = transformers.ViTConfig(
        image_size=cfg.image_size, patch_size=cfg.patch, num_channels=1, hidden_size=cfg.width,
        num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads, intermediate_size=cfg.mlp_ratio * cfg.width,
        num_labels=n_classes, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    torch.manual_seed(seed)
    return transformers.ViTForImageClassification(config)


def make_optimizer(name: str, model: nn.Module, lr: float, overrides: Optional[dict], preset: str):
    from slimadam_hf import build_slimadam

    kw = dict(lr=lr, betas=bq.BETAS, weight_decay=bq.WEIGHT_DECAY)
    if name == "AdamW":
        return bq.make_optimizer(name, model, lr, None)
    if name == "SlimAdam":
        return build_slimadam(model, preset, **kw)
    if name == "SlimAdam robust":
        return build_slimadam(model, preset, robust=True, **kw)
    if name == "SlimAdam SNR":
        return build_slimadam(model, preset, overrides, **kw)
    if name == "SlimAdam table1":
        return build_slimadam(model, preset, {"rules": dict(TABLE1)}, **kw)
    if name.startswith("full "):
        return build_slimadam(model, preset, {"rules": {name[5:]: "none"}}, **kw)
    raise ValueError(f"unknown optimizer {name!r}")


# -- training ---------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 1000) -> tuple[float, float]:
    model.eval()
    loss, correct = 0.0, 0
    for i in range(0, len(x), batch):
        out = model(pixel_values=x[i : i + batch], labels=y[i : i + batch])
        loss += out.loss.item() * len(y[i : i + batch])
        correct += (out.logits.argmax(-1) == y[i : i + batch]).sum().item()
    model.train()
    return loss / len(x), 100.0 * correct / len(x)


def train(name: str, lr: float, seed: int, cfg: argparse.Namespace, data: tuple, overrides: Optional[dict] = None,
          recorder_path: Optional[Path] = None) -> dict[str, Any]:
    xtr, ytr, xte, yte, n_classes, _ = data
    model = build_vit(cfg, n_classes, seed)
    opt = make_optimizer(name, model, lr, overrides, cfg.preset)
    recorder = None
    if recorder_path is not None:
        from slimadam_hf.snr.recorder import SNRRecorder
        from slimadam_hf.snr.targets import SNRSchedule

        recorder = SNRRecorder(model, recorder_path, SNRSchedule(every=max(1, cfg.vit_steps // 20), first=1))
    gen = torch.Generator().manual_seed(seed)
    t0 = time.time()
    diverged = False
    for step in range(cfg.vit_steps):
        bq.set_lr(opt, bq.lr_at(step, cfg.vit_steps, lr))
        idx = torch.randint(0, len(xtr), (cfg.vit_batch,), generator=gen)
        loss = model(pixel_values=xtr[idx], labels=ytr[idx]).loss
        if not torch.isfinite(loss):
            diverged = True
            break
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if recorder is not None:
            recorder.maybe_measure(opt, step + 1)
    seconds = time.time() - t0
    val_loss, acc = evaluate(model, xte, yte) if not diverged else (float("nan"), float("nan"))
    return dict(optimizer=name, lr=lr, seed=seed, final_val=val_loss, accuracy=acc, train_loss=loss.item(),
                seconds=seconds, diverged=diverged)


def snr_rules(lr: float, cfg: argparse.Namespace, data: tuple, workdir: Path) -> tuple[dict, str, dict]:
    """Role rules from SNR along an AdamW proxy at ``lr / 10`` (seed 0), pooled per role (mean), cutoff 1."""
    from slimadam_hf.snr.rules import key_infos, read_snr_csv, role_rules, role_rules_override, summarize_snr

    workdir.mkdir(parents=True, exist_ok=True)
    csv = workdir / "snr_vit.csv"
    t0 = time.time()
    proxy = train("AdamW", lr / 10, 0, cfg, data, recorder_path=csv)
    summaries = summarize_snr(read_snr_csv(csv), None)
    infos = key_infos(summaries, csv.with_name(csv.name + ".roles.json"), "vit")
    rules = role_rules(summaries, infos, cutoff=1.0)
    override = role_rules_override(rules, source=f"ViT proxy AdamW at lr {lr / 10:g}")
    evidence = {r.role: {"rule": r.rule, "mean_snr": r.mean_snr, "votes": r.votes} for r in rules.values()}
    note = (f"SlimAdam SNR: role rules {override['rules']} from an AdamW proxy at lr {lr / 10:g} "
            f"(seed 0, {cfg.vit_steps} steps, acc {proxy['accuracy']:.2f}, {time.time() - t0:.0f} s)")
    return override, note, evidence


# -- report -----------------------------------------------------------------------------------------


def _ms(values: list[float], digits: int = 2) -> str:
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return "diverged"
    if len(finite) == 1:
        return f"{finite[0]:.{digits}f}" + (f" ({len(values) - 1} div.)" if len(values) > 1 else "")
    s = f"{statistics.fmean(finite):.{digits}f} ± {statistics.stdev(finite):.{digits}f}"
    return s + (f" ({len(values) - len(finite)} div.)" if len(finite) < len(values) else "")


def table(runs: list[dict]) -> str:
    lines = ["| optimizer | lr | seeds | test accuracy (%) | Δ vs AdamW (points) | test loss | s / run |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    keys = list(dict.fromkeys((r["optimizer"], r["lr"]) for r in runs))
    for name, lr in keys:
        rs = [r for r in runs if r["optimizer"] == name and r["lr"] == lr]
        base = [r["accuracy"] for r in runs if r["optimizer"] == "AdamW" and r["lr"] == lr and math.isfinite(r["accuracy"])]
        acc = [r["accuracy"] for r in rs]
        delta = "-"
        if name != "AdamW" and base and all(math.isfinite(a) for a in acc):
            delta = f"{statistics.fmean(acc) - statistics.fmean(base):+.2f}"
        lines.append(f"| {name} | {lr:g} | {len(rs)} | {_ms(acc)} | {delta} | {_ms([r['final_val'] for r in rs], 3)} | "
                     f"{statistics.fmean(r['seconds'] for r in rs):.0f} |")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vit-task", choices=["fashion", "letters", "digits"], default="fashion")
    p.add_argument("--vit-steps", type=int, default=2000)
    p.add_argument("--vit-lrs", nargs="+", type=float, default=[1e-3])
    p.add_argument("--vit-batch", type=int, default=64)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--optimizers", nargs="+", default=["AdamW", "SlimAdam", "SlimAdam robust"],
                   help=f"{BASE_OPTIMIZERS} or 'full ROLE' (roles: {ROLES})")
    p.add_argument("--image-size", type=int, default=None, help="default: 28 (fashion, letters), 16 (digits)")
    p.add_argument("--patch", type=int, default=4)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--mlp-ratio", type=int, default=2)
    p.add_argument("--preset", default="auto", help="preset for the SlimAdam variants (default auto = vit)")
    p.add_argument("--snr-rules", metavar="JSON", help="reuse the 'snr_override' of an earlier vit_quality.json")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="bench_vit_out")
    p.add_argument("--smoke", action="store_true", help="tiny model, 4 steps, 512 train / 256 test images (CI)")
    cfg = p.parse_args(argv)
    if cfg.smoke:
        cfg.vit_steps, cfg.vit_batch, cfg.seeds, cfg.width, cfg.layers, cfg.heads = 4, 16, cfg.seeds[:1], 16, 1, 2
    if cfg.image_size is None:
        cfg.image_size = 16 if cfg.vit_task == "digits" else 28
    torch.set_num_threads(cfg.threads)
    for n in cfg.optimizers:
        if n not in BASE_OPTIMIZERS and not (n.startswith("full ") and n[5:] in ROLES):
            p.error(f"unknown optimizer {n!r}")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    data = load_task(cfg.vit_task, cfg.image_size, cfg.smoke)
    if cfg.smoke:
        data = (data[0][:512], data[1][:512], data[2][:256], data[3][:256], *data[4:])
    notes = [f"task: {data[5]}, {data[4]} classes"]
    start = time.time()
    runs: list[dict] = []
    snr_override, evidence = None, None
    if "SlimAdam SNR" in cfg.optimizers:
        if cfg.snr_rules:
            saved = json.loads(Path(cfg.snr_rules).read_text())
            snr_override = saved["snr_override"]
            notes.append(f"SlimAdam SNR: role rules {snr_override['rules']} read from {cfg.snr_rules}")
        else:
            with tempfile.TemporaryDirectory() as tmp:
                snr_override, note, evidence = snr_rules(cfg.vit_lrs[0], cfg, data, Path(tmp))
            notes.append(note)
        print(notes[-1], flush=True)
    json_path = out / "vit_quality.json"
    for lr in cfg.vit_lrs:
        for seed in cfg.seeds:
            for name in cfg.optimizers:
                run = train(name, lr, seed, cfg, data, overrides=snr_override if name == "SlimAdam SNR" else None)
                runs.append(run)
                print(f"{name:18s} lr {lr:<7g} seed {seed}: acc {run['accuracy']:.2f} loss {run['final_val']:.4f} "
                      f"({run['seconds']:.0f} s)", flush=True)
                json_path.write_text(json.dumps(dict(runs=runs, notes=notes, config=vars(cfg), snr_override=snr_override,
                                                     snr_evidence=evidence), indent=1))
    notes.append(
        f"model: ViT patch {cfg.patch} on {cfg.image_size}x{cfg.image_size}, width {cfg.width}, {cfg.layers} layers, "
        f"{cfg.heads} heads, mlp {cfg.mlp_ratio}x; batch {cfg.vit_batch}, {cfg.vit_steps} steps; seeds {cfg.seeds}; "
        f"lrs {cfg.vit_lrs}; wall {(time.time() - start) / 60:.1f} min, torch {torch.__version__}, "
        f"{torch.get_num_threads()} thread(s)")
    json_path.write_text(json.dumps(dict(runs=runs, notes=notes, config=vars(cfg), snr_override=snr_override,
                                         snr_evidence=evidence), indent=1))
    md = [table(runs), ""] + [f"- {n}" for n in notes]
    (out / "vit_quality.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
