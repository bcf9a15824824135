"""SlimAdamW under real DeepSpeed ZeRO 1, 2 and 3: 2 gloo CPU processes (DeepSpeed's CPU accelerator).

* accuracy: tiny GPT-2 (fused ``c_attn`` split q|k|v) and Llama presets, each rank half of the global
  batch, against ONE process running the same optimizer on the whole batch; torch AdamW in the same
  harness sets the bar (SlimAdamW's worst relative difference within 10x of AdamW's);
* the compressed second moments equal the single process's;
* Trainer ``--deepspeed`` + ``--optim slimadam``: checkpoint and exact resume, stages 2 and 3 (and 3 with
  ``robust=true``); another world size is refused;
* ``accelerate launch`` with a DeepSpeed (ZeRO-3, zero3_init) accelerate config and an unmodified HF script;
* ``robust=True``: the complements and the weights equal the single process's;
* ``momentum_dtype="int8"`` and stochastic bfloat16: the first moments equal the single process's;
* refused settings, each with a one-line error.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent / "scripts"))

from dist_workers import harness, trainer_zero, zero  # noqa: E402

deepspeed = pytest.importorskip("deepspeed", reason="the ZeRO tests run real DeepSpeed (pip install deepspeed)")
pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")

BAR = 10.0  # SlimAdamW's worst relative parameter difference may be at most 10x AdamW's
FLOAT32_ROUNDING = 1e-5  # float32 sums in another order: measured 2e-7 .. 6e-7
COMPRESSED = {"gpt2": 6, "llama": 9}  # weights with a compressed (or split) second moment


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    return harness.spawn(zero.suite, 2, tmp_path_factory.mktemp("zero"))


def _key(case: tuple) -> str:
    preset, stage, per_weight, *init = case
    return f"{preset}:stage{stage}:{'per_weight' if per_weight else 'two_groups'}{':zero_init' if init else ''}"


def _expected_all_reduces(case: tuple) -> int:
    # one batched all-reduce per base-optimizer step() call that holds a weight cut by a partition
    # boundary: per weight with one group per weight (stages 1/2), once per step otherwise
    preset, stage, per_weight, *_ = case
    return zero.STEPS * (COMPRESSED[preset] if per_weight else 1)


def _assert_follows_single_process(r: dict, case: tuple) -> tuple[float, float]:
    slim, adamw = r[_key(case) + ":slimadam"], r[_key(case) + ":adamw"]
    wrapper = "DeepSpeedZeroOptimizer_Stage3" if case[1] == 3 else "DeepSpeedZeroOptimizer"
    assert slim["wrapper"] == adamw["wrapper"] == wrapper
    assert slim["moved"] > 1e-2  # the run really moved the weights
    assert slim["rel_diff"] <= BAR * adamw["rel_diff"], (slim["rel_diff"], adamw["rel_diff"])
    assert slim["comm"]["total_all_reduce_calls"] == _expected_all_reduces(case), slim["comm"]
    assert slim["v_names_missing"] == []  # every weight's second moment lives on some rank
    assert slim["v_compressed_on_rank"] >= 1
    return slim["rel_diff"], adamw["rel_diff"]


@pytest.mark.parametrize("case", zero.FP32_CASES, ids=_key)
def test_zero_float32_follows_single_process(results, case):
    r = harness.worker_result(results, "fp32")
    _assert_follows_single_process(r, case)
    slim = r[_key(case) + ":slimadam"]
    # the compressed weights (boundaries cut their rows and GPT-2's k part) to float32 rounding
    assert slim["rel_diff_compressed"] < FLOAT32_ROUNDING
    # the second moments, gathered from the ranks, are the single process's
    assert slim["v_rel_diff"] < FLOAT32_ROUNDING


@pytest.mark.parametrize("case", zero.OFFLOAD_CASES, ids=_key)
def test_zero_offload_optimizer_cpu_follows_single_process(results, case):
    r = harness.worker_result(results, "offload")
    _assert_follows_single_process(r, case)
    slim = r[_key(case) + ":slimadam"]
    assert slim["offload"]
    assert slim["rel_diff_compressed"] < FLOAT32_ROUNDING and slim["v_rel_diff"] < FLOAT32_ROUNDING


@pytest.mark.parametrize("case", zero.ROBUST_CASES, ids=_key)
def test_zero_robust_follows_single_process(results, case):
    # robust=True: each weight's complement (its mean over the other dims) is reduced across the ranks
    # like its second moment, and kept whole on every rank that holds part of the weight
    r = harness.worker_result(results, "robust")
    _assert_follows_single_process(r, case)
    slim = r[_key(case) + ":slimadam"]
    assert slim["rel_diff_compressed"] < FLOAT32_ROUNDING and slim["v_rel_diff"] < FLOAT32_ROUNDING
    assert slim["complements_on_rank"] >= 1
    assert slim["complement_rel_diff"] < FLOAT32_ROUNDING


@pytest.mark.parametrize("case", zero.INT8_CASES, ids=_key)
def test_zero_int8_momentum_follows_single_process(results, case):
    # int8 blocks lie inside rows; a block a partition boundary cuts gets its largest magnitude over the ranks
    # (one all-reduce, max), so every rank stores the codes one process stores for the whole weight
    r = harness.worker_result(results, "int8")
    slim, adamw = r[_key(case) + ":slimadam"], r[_key(case) + ":adamw"]
    assert slim["wrapper"] == adamw["wrapper"] and slim["moved"] > 1e-2
    assert slim["rel_diff"] <= max(BAR * adamw["rel_diff"], FLOAT32_ROUNDING), (slim["rel_diff"], adamw["rel_diff"])
    assert slim["m_rel_diff"] < FLOAT32_ROUNDING  # the moments read back: no code moved
    assert slim["v_rel_diff"] < FLOAT32_ROUNDING and slim["v_names_missing"] == []
    assert slim["comm"]["max_all_reduce_calls"] == 1  # one per process group and base-optimizer step() call


@pytest.mark.parametrize("case", zero.STOCHASTIC_CASES, ids=_key)
def test_zero_stochastic_bf16_momentum_draws_the_single_process_noise(results, case):
    # each element's noise is keyed by its weight and its position in it, not by the flat partition: the bf16
    # moments equal one process's except where the float32 rounding of the gradient sum moves a value across a
    # rounding threshold, and what follows from it (measured: 1, 8 and 17 elements of ~1,900, as many as
    # round-to-nearest; the parameters 1.9e-6 .. 3.7e-4 away). Partition-keyed noise: 59% differ, 4e-3 .. 9e-3
    r = harness.worker_result(results, "stochastic")
    slim = r[_key(case) + ":slimadam"]
    assert slim["moved"] > 1e-2
    assert slim["m_differing"] <= 0.05 * slim["m_held"], (slim["m_differing"], slim["m_held"])
    assert slim["rel_diff"] < 1e-3, slim["rel_diff"]


@pytest.mark.parametrize("case", zero.BF16_CASES, ids=_key)
def test_zero_bf16_follows_single_process_as_closely_as_adamw(results, case):
    # bf16 forward/backward against a float32 single process: both optimizers differ at bf16 rounding
    r = harness.worker_result(results, "bf16")
    _assert_follows_single_process(r, case)
    slim, adamw = r[_key(case) + ":slimadam"], r[_key(case) + ":adamw"]
    assert slim["v_rel_diff"] <= BAR * adamw["v_rel_diff"], (slim["v_rel_diff"], adamw["v_rel_diff"])


def test_refused_settings_give_one_line_errors(results):
    r = harness.worker_result(results, "refusals")
    for key, message in r.items():
        assert "\n" not in message and message != "NO ERROR", (key, message)
    assert r["bf16_optimizer"].startswith(
        "SlimAdamW does not support DeepSpeed's BF16_Optimizer (bf16 with ZeRO stage 1"
    )
    assert "drop data_types.grad_accum_dtype or use zero_optimization stage 2" in r["bf16_optimizer"]
    assert r["elastic_checkpoint"].startswith("SlimAdamW does not support zero_optimization.elastic_checkpoint")
    # a state dict of another rank (or layout) is refused at the next step instead of being misread
    assert r["other_rank_state"].startswith(
        "SlimAdamW: the optimizer state of this DeepSpeed ZeRO partition was saved for data-parallel world size 2, rank"
    )
    assert "resume a ZeRO checkpoint with the same world size" in r["other_rank_state"]
    assert r["auto_snr"].startswith("auto-snr cannot probe under DeepSpeed ZeRO")
    assert r["plain_state_robust"].startswith(
        "SlimAdamW: this DeepSpeed ZeRO checkpoint has no robust=True complement (slim_exp_avg_sq_complement)")
    assert r["float_state_int8"].startswith(
        "SlimAdamW: this DeepSpeed ZeRO checkpoint holds a torch.float32 first moment and the live optimizer stores "
        "it as torch.int8")


# -- Trainer --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trainer_stage2(tmp_path_factory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("trainer_zero2")
    return harness.spawn(trainer_zero.resume, 2, out, stage=2), out


def _assert_trainer(r: dict, wrapper: str) -> None:
    assert r["optimizer"] == "SlimAdamW" and r["wrapper"] == wrapper
    assert r["c_attn_v"] == [[48]]  # GPT-2 c_attn (split q|k|v): 16 + 16 + 16, whole on the ranks holding it
    assert r["comm"]["total_all_reduce_calls"] >= 4  # at least one per step
    assert r["checkpoints"] == ["checkpoint-2", "checkpoint-4"]
    assert r["trainer_world_size"] == 2 and r["rng_files"] == ["rng_state_0.pth", "rng_state_1.pth"]
    assert r["zero_files"] == ["zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    assert r["moved"] > 1e-2
    assert r["resume_max_diff"] == 0.0  # same world size: bitwise the uninterrupted run
    assert r["resumed_losses"] == r["losses"]


def test_trainer_deepspeed_zero2_checkpoint_resumes_exactly(trainer_stage2):
    _assert_trainer(trainer_stage2[0], "DeepSpeedZeroOptimizer")


def test_trainer_deepspeed_zero2_matches_single_process(trainer_stage2, tmp_path):
    zero_params = torch.load(trainer_stage2[1] / "zero_params.pt")
    single = trainer_zero.single_process_params(tmp_path)
    initial = trainer_zero.trainer_fsdp2.tiny_gpt2().state_dict()
    assert max((single[k] - initial[k]).abs().max().item() for k in single) > 1e-2
    # float32, summed in another order; Adam amplifies it where gradients are near zero: measured
    # 1.2e-5 (the FSDP2 Trainer test uses the same bound; test_zero_* compare against AdamW's own error)
    assert max((single[k] - zero_params[k]).abs().max().item() for k in single) < 1e-4


def test_trainer_deepspeed_zero3_checkpoint_resumes_exactly(tmp_path):
    _assert_trainer(harness.spawn(trainer_zero.resume, 2, tmp_path, stage=3), "DeepSpeedZeroOptimizer_Stage3")


def test_trainer_deepspeed_zero3_robust_checkpoint_resumes_exactly(tmp_path):
    # robust=True through optim_args: the per-rank ZeRO checkpoint carries the complements too
    r = harness.spawn(trainer_zero.resume, 2, tmp_path, stage=3, optim_args="preset=gpt2,robust=true")
    _assert_trainer(r, "DeepSpeedZeroOptimizer_Stage3")
    assert "transformer.h.0.attn.c_attn.weight" in r["complements"]


@pytest.mark.parametrize("stage", [2, 3])
def test_trainer_deepspeed_int8_momentum_checkpoint_resumes_exactly(tmp_path, stage):
    # the partition's int8 codes and block scales are saved per rank and resumed bitwise
    r = harness.spawn(trainer_zero.resume, 2, tmp_path, stage=stage, optim_args="preset=gpt2,momentum_dtype=int8")
    _assert_trainer(r, "DeepSpeedZeroOptimizer_Stage3" if stage == 3 else "DeepSpeedZeroOptimizer")


def test_trainer_resume_at_another_world_size_is_refused(trainer_stage2, tmp_path):
    checkpoint = str(trainer_stage2[1] / "run" / "checkpoint-2")
    r = harness.spawn(trainer_zero.resume_at_other_world_size, 1, tmp_path, checkpoint=checkpoint)
    assert r["error"] == (
        "ZeRORuntimeException: The checkpoint being loaded used a DP world size of 2 but the current world size is 1. "
        "Automatic adjustment of ZeRO's optimizer state partitioning with a new world size is not currently supported."
    )


# -- accelerate launch ----------------------------------------------------------------------------

ACCELERATE_ZERO3 = """\
compute_environment: LOCAL_MACHINE
distributed_type: DEEPSPEED
deepspeed_config:
  zero_stage: 3
  zero3_init_flag: true
  gradient_accumulation_steps: 1
  offload_optimizer_device: none
  offload_param_device: none
mixed_precision: 'no'
machine_rank: 0
num_machines: 1
num_processes: 2
main_training_function: main
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_accelerate_launch_deepspeed_zero3_unmodified_script(tmp_path):
    from tiny_assets import HF_CLM_SCRIPT, train_tokenizer, write_text_files

    bin_dir = Path(sys.executable).parent
    if shutil.which("accelerate", path=str(bin_dir)) is None:
        pytest.skip("accelerate CLI not installed")
    train, valid = write_text_files(tmp_path / "data")
    train_tokenizer(tmp_path / "tokenizer", [train])
    config = tmp_path / "deepspeed_zero3.yaml"
    config.write_text(ACCELERATE_ZERO3)
    out = tmp_path / "out"
    cmd = [
        str(bin_dir / "accelerate"), "launch", "--config_file", str(config), "--main_process_port", str(_free_port()),
        "-m", "slimadam_hf.run", str(HF_CLM_SCRIPT),
        "--tokenizer_name", str(tmp_path / "tokenizer"), "--train_file", str(train), "--validation_file", str(valid),
        "--config_overrides", "n_embd=16,n_layer=2,n_head=2,n_positions=32,resid_pdrop=0,embd_pdrop=0,attn_pdrop=0",
        "--output_dir", str(out), "--do_train", "true", "--do_eval", "true", "--max_steps", "4",
        "--per_device_train_batch_size", "4", "--logging_steps", "2", "--report_to", "none", "--disable_tqdm", "true",
        "--optim", "slimadam", "--optim_args", "preset=gpt2",
        "--ddp_backend", "gloo",  # without GPUs accelerate's DeepSpeed state needs the backend named
    ]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("OPTIMIZER SlimAdamW") == 2  # both ranks stepped SlimAdamW inside DeepSpeed's wrapper
    text = proc.stdout + proc.stderr
    assert text.count("SlimAdam plan: preset gpt2") == 1
    assert "12,224 parameters" in text  # planned from ds_shape: the model was built partitioned (zero3_init)
    files = sorted((out / "checkpoint-4").rglob("zero_pp_rank_*_optim_states.pt"))
    assert len(files) == 2
    for rank, path in enumerate(files):
        base = torch.load(path, weights_only=False)["optimizer_state_dict"]["optimizer_state_dict"]
        layouts = [s["slim_zero_layout"] for s in base["state"].values()]
        assert layouts and all(lay["stage"] == 3 and lay["world_size"] == 2 and lay["rank"] == rank for lay in layouts)
