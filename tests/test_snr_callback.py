"""SNR measurement during training (recorder, Trainer callback), CLI, and role rules proxy -> full model."""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import pytest
import torch
import yaml
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from slimadam_hf import SlimAdamW, build_slimadam, plan_compression
from slimadam_hf.cli import main as snr_cli
from slimadam_hf.snr.stats import snr_table
from slimadam_hf.hf.snr_callbacks import SNRCallback
from slimadam_hf.snr.recorder import SNRRecorder
from slimadam_hf.snr.targets import SNRSchedule, measure_snr, snr_targets
from slimadam_hf.snr.rules import read_snr_csv, summarize_snr

VOCAB = 96


def gpt2(n_layer: int = 2, width: int = 32) -> GPT2LMHeadModel:
    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=n_layer, n_embd=width, n_head=4, vocab_size=VOCAB, n_positions=16,
                     bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg)


def llama(n_layer: int = 2, width: int = 32) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(num_hidden_layers=n_layer, hidden_size=width, intermediate_size=2 * width,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                      max_position_embeddings=16, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return LlamaForCausalLM(cfg)


def train(model, opt, steps: int, recorder: SNRRecorder | None = None) -> None:
    g = torch.Generator().manual_seed(1)
    for step in range(1, steps + 1):
        x = torch.randint(0, VOCAB, (4, 12), generator=g)
        model(x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
        if recorder is not None:
            recorder.maybe_measure(opt, step)


def test_targets_split_gpt2_per_part_and_skip_norms():
    keys = {t.key: t for t in snr_targets(gpt2())}
    assert "transformer.h.0.attn.c_attn.weight[query]" in keys
    part = keys["transformer.h.0.attn.c_attn.weight[value]"]
    assert (part.role, part.split_dim, part.offset, part.size) == ("value", 1, 64, 32)
    assert part.fan_in == (0,) and part.fan_out == (1,)  # Conv1D (in, out)
    assert not any("ln_" in k or k.endswith("bias") for k in keys)
    assert keys["transformer.wte.weight"].role == "token_embedding"
    lkeys = {t.key: t for t in snr_targets(llama())}
    assert lkeys["model.layers.0.self_attn.q_proj.weight"].fan_in == (1,)
    assert not any("norm" in k for k in lkeys)


def test_measure_matches_direct_computation_and_schedule(tmp_path):
    model = gpt2()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    rec = SNRRecorder(model, tmp_path / "snr.csv", SNRSchedule(every=2))
    train(model, opt, 4, rec)
    rows = read_snr_csv(tmp_path / "snr.csv")
    assert sorted({r["step"] for r in rows}) == [1, 2, 4]
    assert len(rec.timings) == 3
    c_attn = dict(model.named_parameters())["transformer.h.1.attn.c_attn.weight"]
    v = opt.state[c_attn]["exp_avg_sq"].narrow(1, 32, 32)  # the key part
    direct = snr_table(v)
    got = {r["compress_dims"]: r for r in rows if r["step"] == 4 and r["key"].endswith("h.1.attn.c_attn.weight[key]")}
    assert set(got) == set(direct)
    for dims, stat in direct.items():
        assert got[dims]["snr"] == pytest.approx(stat.snr, rel=1e-6)
        assert got[dims]["shape"] == (32, 32)
    roles = (tmp_path / "snr.csv.roles.json").read_text()
    assert '"mlp_down"' in roles


def test_slimadam_uncompressed_equals_adamw_and_compressed_is_skipped(tmp_path, caplog):
    none_rules = {"rules": {r: "none" for r in ("token_embedding", "position_embedding", "query", "key", "value",
                                                "attention_output", "mlp_up", "mlp_down")}}
    results = []
    for make in (lambda m: torch.optim.AdamW(m.parameters(), lr=1e-3, weight_decay=0.0),
                 lambda m: build_slimadam(m, overrides=none_rules, lr=1e-3, weight_decay=0.0)):
        model = gpt2()
        opt = make(model)
        train(model, opt, 2)
        results.append(measure_snr(opt, snr_targets(model), step=2))
    assert len(results[0]) == len(results[1]) > 0
    for a, b in zip(*results):
        assert (a["key"], a["compress_dims"]) == (b["key"], b["compress_dims"])
        assert a["snr"] == pytest.approx(b["snr"], rel=1e-4)

    model = gpt2()
    opt = build_slimadam(model, lr=1e-3)  # Table-1 rules: everything compressed
    train(model, opt, 1)
    with caplog.at_level(logging.WARNING, logger="slimadam_hf.snr.targets"):
        assert measure_snr(opt, snr_targets(model), step=1) == []
    assert "compressed second moment" in caplog.text and "full-Adam" in caplog.text


def test_resume_drops_rows_after_checkpoint(tmp_path):
    model = gpt2()
    opt = torch.optim.AdamW(model.parameters())
    rec = SNRRecorder(model, tmp_path / "snr.csv", SNRSchedule(every=1))
    train(model, opt, 3, rec)
    rec2 = SNRRecorder(model, tmp_path / "snr.csv", SNRSchedule(every=1), resume_step=2)
    assert sorted({r["step"] for r in read_snr_csv(rec2.path)}) == [1, 2]


def test_trainer_callback(tmp_path):
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    model = gpt2()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB, (32, 12), generator=g).tolist()
    ds = Dataset.from_dict({"input_ids": ids, "labels": ids})
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=5, per_device_train_batch_size=4,
                             optim="adamw_torch", report_to=[], save_strategy="no", logging_steps=100,
                             use_cpu=True, disable_tqdm=True)
    cb = SNRCallback(every=2)
    Trainer(model=model, args=args, train_dataset=ds, callbacks=[cb]).train()
    rows = read_snr_csv(tmp_path / "snr.csv")
    assert sorted({r["step"] for r in rows}) == [1, 2, 4]
    assert len({r["key"] for r in rows}) == len(cb.recorder.targets) == 2 + 2 * 6


def _role_rules_by_hand(csv_path, cutoff):
    """Independent reference for `rules --by-role` (mean aggregate): per role, each candidate's SNR averaged
    over steps, then over the role's tensors; the highest mean above the cutoff wins, else none."""
    import json
    from collections import defaultdict

    info = json.loads(Path(str(csv_path) + ".roles.json").read_text())
    per_key = defaultdict(list)  # (role, key, label) -> SNR at each step
    for row in csv.DictReader(open(csv_path)):
        key = row["key"]
        dims = sorted(int(d) for d in row["compress_dims"].strip("()").split(",") if d.strip())
        ndim = row["shape"].count(",") + 1 if row["shape"].strip("()").strip(", ") else 0
        label = ("both" if dims == list(range(ndim)) else "fan_in" if dims == info[key]["fan_in"]
                 else "fan_out" if dims == info[key]["fan_out"] else str(dims))
        snr = float(row["snr"]) if row["snr"] else float("nan")
        per_key[(info[key]["role"], key, label)].extend([] if snr != snr else [snr])  # NaN: no measurement
    per_role = defaultdict(list)
    for (role, _, label), values in per_key.items():
        per_role[(role, label)].extend([sum(values) / len(values)] if values else [])
    best: dict = {}
    for (role, label), means in per_role.items():
        mean = sum(means) / len(means) if means else float("nan")
        if mean > cutoff and mean > best.get(role, ("none", -1.0))[1]:
            best[role] = (label, mean)
    roles = {role for role, _ in per_role if role not in ("norm", "bias", "other")}
    return {role: best.get(role, ("none",))[0] for role in roles}


@pytest.mark.parametrize("family", [gpt2, llama])
def test_role_rules_from_2_layer_proxy_apply_to_4_layer_model(tmp_path, family):
    proxy = family(n_layer=2, width=32)
    opt = torch.optim.AdamW(proxy.parameters(), lr=1e-3)
    csv_path = tmp_path / "snr.csv"
    train(proxy, opt, 6, SNRRecorder(proxy, csv_path, SNRSchedule(every=2)))
    out = tmp_path / "roles.yaml"
    assert snr_cli(["rules", "--snr", str(csv_path), "--by-role", "--output", str(out)]) == 0
    override = yaml.safe_load(out.read_text())
    rules = override["rules"]
    expected_roles = {"token_embedding", "query", "key", "value", "attention_output", "mlp_up", "mlp_down"}
    assert expected_roles <= set(rules)
    assert rules == _role_rules_by_hand(csv_path, cutoff=1.0)

    full = family(n_layer=4, width=64)  # deeper and wider, same family
    plan = plan_compression(full, overrides=str(out))
    seen = set()
    for entry in plan.entries:
        for role, rule, _, _ in entry.pieces():
            if role in rules:
                assert rule == rules[role], (entry.name, role)
                seen.add(role)
    assert seen == set(rules) - ({"position_embedding"} if family is llama else set())
    opt = build_slimadam(full, overrides=str(out), lr=1e-3)
    train(full, opt, 1)


def test_cli_rules_yaml_params_and_plot(tmp_path):
    model = llama()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    csv_path = tmp_path / "snr.csv"
    train(model, opt, 2, SNRRecorder(model, csv_path, SNRSchedule(every=1)))
    out = tmp_path / "params.yaml"
    assert snr_cli(["rules", "--snr", str(csv_path), "--cutoff", "0.5", "--select", "most-compressive",
                    "--output", str(out)]) == 0
    params = yaml.safe_load(out.read_text())["params"]
    assert set(params) == set(summarize_snr(read_snr_csv(csv_path)))
    plan_compression(llama(), overrides=str(out))  # usable as config= override
    assert snr_cli(["plot", "--snr", str(csv_path), "-o", str(tmp_path / "fig")]) == 0
    assert (tmp_path / "fig" / "snr_heatmap.png").stat().st_size > 5000
    assert snr_cli(["rules", "--snr", str(csv_path), "--output", str(tmp_path / "x.txt")]) == 2


def test_cli_rules_yaml_writes_per_part_keys_for_split_weights(tmp_path, capsys):
    model = gpt2()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    csv_path = tmp_path / "snr.csv"
    train(model, opt, 2, SNRRecorder(model, csv_path, SNRSchedule(every=1)))
    out = tmp_path / "params.yaml"
    assert snr_cli(["rules", "--snr", str(csv_path), "--cutoff", "0.5", "--output", str(out)]) == 0
    assert "warning" not in capsys.readouterr().err
    params = yaml.safe_load(out.read_text())["params"]
    part = "transformer.h.0.attn.c_attn.weight[key]"
    assert part in params and "transformer.h.0.attn.c_attn.weight" not in params
    plan = plan_compression(gpt2(), overrides=str(out))
    entry = plan["transformer.h.0.attn.c_attn.weight"]
    for p in entry.parts:  # each part gets exactly its SNR-derived dims
        dims = params[f"transformer.h.0.attn.c_attn.weight[{p.role}]"]
        assert (None if p.dims is None else list(p.dims)) == dims, p.role
