#!/usr/bin/env python
"""Train a causal language model with the Hugging Face Trainer and ``--optim slimadam``.

An HF-style script (``HfArgumentParser`` over model, data and ``TrainingArguments``) that trains from
scratch or from a local checkpoint on local text files, and trains a byte-level BPE tokenizer on the
training files when no tokenizer is given. With no arguments it trains a small GPT-2 on six
Shakespeare plays shipped in ``scripts/data/shakespeare`` (five for training, *Julius Caesar* for
evaluation) with ``--optim slimadam`` in a few minutes on two CPU cores, then prints the final eval
loss beside what AdamW reaches on the same run (measured for the default run; ``--compare adamw``
measures it for any settings) and the optimizer memory saved::

    python scripts/run_clm.py --optim slimadam --output_dir runs/clm-shakespeare
    python scripts/run_clm.py --compare adamw                  # also train AdamW, print both losses
    python scripts/run_clm.py --train_file my.txt --validation_file val.txt \\
        --model_name_or_path path/to/local/checkpoint --optim_args "preset=gpt2"

Any ``TrainingArguments`` flag works (``--max_steps``, ``--learning_rate``, ``--bf16``, ...); a single
``.json``/``.yaml`` argument is read as a config file.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import sys
import time
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path
from typing import Optional

import datasets
import torch
import transformers
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    HfArgumentParser,
    PreTrainedTokenizerFast,
    Trainer,
    TrainingArguments,
    default_data_collator,
    set_seed,
)

try:
    import slimadam_hf
except ImportError:  # a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import slimadam_hf

logger = logging.getLogger("run_clm")

DATA_DIR = Path(__file__).resolve().parent / "data" / "shakespeare"
TRAIN_PLAYS = ("hamlet", "macbeth", "romeo_and_juliet", "tempest", "midsummer_nights_dream")
EVAL_PLAYS = ("julius_caesar",)
SMALL_GPT2 = "n_layer=4,n_embd=128,n_head=4,n_positions=128,resid_pdrop=0.0,embd_pdrop=0.0,attn_pdrop=0.0"
EOS = "<|endoftext|>"


@dataclass
class ModelArguments:
    model_name_or_path: Optional[str] = field(
        default=None, metadata={"help": "A local model directory to continue from (no hub downloads)."}
    )
    model_type: str = field(default="gpt2", metadata={"help": "Model type when training from scratch."})
    config_overrides: Optional[str] = field(
        default=SMALL_GPT2, metadata={"help": "Config overrides when training from scratch, e.g. n_layer=2,n_embd=64."}
    )
    tokenizer_name: Optional[str] = field(
        default=None, metadata={"help": "A local tokenizer directory; default: the model's, or a new BPE tokenizer."}
    )
    tokenizer_vocab_size: int = field(default=2048, metadata={"help": "Vocabulary size of a newly trained tokenizer."})
    lora_r: int = field(default=0, metadata={"help": "Train a PEFT LoRA adapter of this rank instead of the model."})
    lora_target_modules: str = field(
        default="c_attn,c_proj,q_proj,k_proj,v_proj,o_proj",
        metadata={"help": "Comma-separated module names to adapt (those the model has are used)."},
    )
    lora_modules_to_save: Optional[str] = field(
        default=None, metadata={"help": "Comma-separated modules trained in full next to the adapter."}
    )
    use_dora: bool = field(default=False, metadata={"help": "DoRA instead of plain LoRA."})


@dataclass
class DataArguments:
    train_file: Optional[str] = field(
        default=None, metadata={"help": "Text file(s) to train on, comma separated; default: the embedded plays."}
    )
    validation_file: Optional[str] = field(
        default=None, metadata={"help": "Text file(s) to evaluate on, comma separated; default: Julius Caesar."}
    )
    block_size: int = field(default=128, metadata={"help": "Tokens per training sequence."})
    max_eval_blocks: Optional[int] = field(
        default=96, metadata={"help": "Evaluate on at most this many blocks (the first ones); 0 or less: all."}
    )


@dataclass
class CompareArguments:
    compare: Optional[str] = field(
        default=None,
        metadata={"help": "adamw: after the run, train the same model on the same data with adamw_torch_fused "
                          "and print both eval losses (twice the time)."},
    )


# The eval loss AdamW (adamw_torch_fused) reaches on the default run (no arguments), measured with
# `python scripts/run_clm.py --compare adamw` on a 2-core CPU with torch 2.13 (SlimAdamW: 5.0509, +0.3%).
# Printed beside the default run's own loss so that its last line can be judged; see docs/trainer.md.
DEFAULT_RUN_ADAMW_EVAL_LOSS = 5.0353


def _files(arg: Optional[str], default_plays: tuple[str, ...]) -> list[str]:
    if arg:
        files = [f for f in arg.split(",") if f]
        missing = [f for f in files if not os.path.isfile(f)]
        if missing:
            raise FileNotFoundError(f"text file(s) not found: {', '.join(missing)}")
        return files
    return [str(DATA_DIR / f"{play}_gut.txt") for play in default_plays]


def train_bpe_tokenizer(files: list[str], vocab_size: int, save_dir: Path) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (GPT-2 style) trained on ``files``, saved to ``save_dir``."""
    from tokenizers import ByteLevelBPETokenizer

    bpe = ByteLevelBPETokenizer()
    bpe.train(files, vocab_size=vocab_size, min_frequency=2, special_tokens=[EOS], show_progress=False)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token=EOS, eos_token=EOS, unk_token=EOS)
    tokenizer.save_pretrained(save_dir)
    return tokenizer


def load_tokenizer(model_args: ModelArguments, train_files: list[str], output_dir: str):
    source = model_args.tokenizer_name or model_args.model_name_or_path
    if source:
        return AutoTokenizer.from_pretrained(source)
    logger.info("training a %d-token byte-level BPE tokenizer on %d file(s)", model_args.tokenizer_vocab_size,
                len(train_files))
    return train_bpe_tokenizer(train_files, model_args.tokenizer_vocab_size, Path(output_dir) / "tokenizer")


def load_model(model_args: ModelArguments, tokenizer) -> torch.nn.Module:
    if model_args.model_name_or_path:
        return AutoModelForCausalLM.from_pretrained(model_args.model_name_or_path)
    config = AutoConfig.for_model(model_args.model_type)
    if model_args.config_overrides:
        config.update_from_string(model_args.config_overrides)
    config.vocab_size = len(tokenizer)
    config.bos_token_id = config.eos_token_id = tokenizer.eos_token_id
    return AutoModelForCausalLM.from_config(config)


def wrap_lora(model: torch.nn.Module, model_args: ModelArguments) -> torch.nn.Module:
    """A PEFT LoRA/DoRA model over ``model``; GPT-2's Conv1D layers get ``fan_in_fan_out=True``."""
    from peft import LoraConfig, get_peft_model
    from transformers.pytorch_utils import Conv1D

    wanted = set(model_args.lora_target_modules.split(","))
    targets = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()} & wanted
    if not targets:
        raise ValueError(f"--lora_target_modules {model_args.lora_target_modules!r}: the model has none of them")
    conv1d = any(isinstance(m, Conv1D) for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in targets)
    config = LoraConfig(
        r=model_args.lora_r, lora_alpha=2 * model_args.lora_r, target_modules=sorted(targets),
        fan_in_fan_out=conv1d, use_dora=model_args.use_dora, task_type="CAUSAL_LM",
        modules_to_save=model_args.lora_modules_to_save.split(",") if model_args.lora_modules_to_save else None,
    )
    model = get_peft_model(model, config)
    trainable, total = model.get_nb_trainable_parameters()
    logger.info("%s: %s of %s parameters trainable (targets %s, fan_in_fan_out=%s)",
                "DoRA" if model_args.use_dora else "LoRA", f"{trainable:,}", f"{total:,}", sorted(targets), conv1d)
    return model


def lm_datasets(train_files: list[str], eval_files: list[str], tokenizer, block_size: int):
    """Whole files, each ended by EOS, tokenized and cut into blocks of ``block_size`` tokens."""
    raw = datasets.load_dataset("text", data_files={"train": train_files, "validation": eval_files},
                                sample_by="document")

    def tokenize(batch):
        return tokenizer([text + EOS for text in batch["text"]])

    def group(batch):
        joined = list(chain.from_iterable(batch["input_ids"]))
        total = len(joined) // block_size * block_size
        blocks = [joined[i : i + block_size] for i in range(0, total, block_size)]
        return {"input_ids": blocks, "attention_mask": [[1] * block_size for _ in blocks], "labels": blocks}

    tokenized = raw.map(tokenize, batched=True, remove_columns=["text"])
    return tokenized.map(group, batched=True, remove_columns=tokenized["train"].column_names)


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes held by the optimizer's state tensors (measured, not estimated)."""
    return sum(v.numel() * v.element_size() for s in optimizer.state.values() for v in s.values()
               if isinstance(v, torch.Tensor) and v.dim() > 0)


def train_and_evaluate(
    model_args: ModelArguments, training_args: TrainingArguments, tokenizer, data
) -> tuple[Trainer, dict]:
    """Build the model (seeded), train it on ``data["train"]`` and evaluate on ``data["validation"]``."""
    set_seed(training_args.seed)
    model = load_model(model_args, tokenizer)
    if model_args.lora_r > 0:
        model = wrap_lora(model, model_args)
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=data["train"] if training_args.do_train else None,
        eval_dataset=data["validation"] if training_args.do_eval else None,
        processing_class=tokenizer,
        data_collator=default_data_collator,
    )
    if training_args.do_train:
        result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
        trainer.save_model()
        trainer.save_state()
        trainer.log_metrics("train", result.metrics)
        trainer.save_metrics("train", result.metrics)
    metrics = {}
    if training_args.do_eval:
        metrics = trainer.evaluate()
        metrics["perplexity"] = math.exp(min(metrics["eval_loss"], 50))
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)
    return trainer, metrics


def _is_default_run(argv: list[str]) -> bool:
    """No flags besides --output_dir and --optim slimadam: the run the documented AdamW loss is for."""
    rest = list(argv)
    for flag in ("--output_dir", "--optim"):
        if flag in rest:
            i = rest.index(flag)
            if flag == "--optim" and rest[i + 1 : i + 2] != ["slimadam"]:
                return False
            del rest[i : i + 2]
    return not rest


def report(trainer: Trainer, metrics: dict, started: float, adamw_loss: Optional[float], adamw_source: str,
           output_dir: str) -> None:
    """The last lines: the loss, what AdamW reaches on the same run, and the memory saved."""
    from slimadam_hf.rules.render import fold, format_bytes, savings_clauses, terminal_width

    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    measured = optimizer_state_bytes(optimizer)
    plan = getattr(optimizer, "plan", None)
    elapsed = time.time() - started
    loss = metrics.get("eval_loss", float("nan"))
    statements = [[f"final eval loss {loss:.4f} (perplexity {metrics.get('perplexity', float('nan')):.1f}) after "
                   f"{trainer.state.global_step} steps in {elapsed / 60:.1f} min with {type(optimizer).__name__}"]]
    if adamw_loss is not None:
        statements.append([f"AdamW (adamw_torch_fused) {adamw_source}: eval loss {adamw_loss:.4f}",
                           f"{type(optimizer).__name__} is {100 * (loss / adamw_loss - 1):+.1f}% vs AdamW"])
    else:
        statements.append(["AdamW loss for these settings: rerun with --compare adamw to measure it"])
    if plan is not None:
        statements.append([*savings_clauses(plan),
                           f"measured: {format_bytes(measured)} vs AdamW {format_bytes(plan.adamw_state_bytes)}"])
    else:
        statements.append([f"optimizer state {format_bytes(measured)}"])
    width = terminal_width()  # None when stdout is not a terminal: each statement stays one line
    print("\n" + "\n".join(line for clauses in statements for line in fold(clauses, width, prefix="== ")))
    summary = {"eval_loss": metrics.get("eval_loss"), "adamw_eval_loss": adamw_loss,
               "steps": trainer.state.global_step, "optimizer": type(optimizer).__name__,
               "optimizer_state_bytes": measured, "adamw_state_bytes": None if plan is None else plan.adamw_state_bytes,
               "runtime_s": round(elapsed, 1)}
    Path(output_dir, "run_summary.json").write_text(json.dumps(summary, indent=2) + "\n")


def main() -> None:
    slimadam_hf.register()
    parser = HfArgumentParser((ModelArguments, DataArguments, CompareArguments, TrainingArguments))
    parser.set_defaults(
        output_dir="runs/clm-shakespeare", do_train=True, do_eval=True, optim="slimadam",
        max_steps=250, per_device_train_batch_size=16, per_device_eval_batch_size=32,
        learning_rate=3e-3, weight_decay=0.1, warmup_steps=25, lr_scheduler_type="cosine", max_grad_norm=1.0,
        logging_steps=50, save_strategy="no", eval_strategy="no", report_to="none", seed=42, use_cpu=True,
    )
    if len(sys.argv) == 2 and sys.argv[1].endswith(".json"):
        model_args, data_args, compare_args, training_args = parser.parse_json_file(os.path.abspath(sys.argv[1]))
    elif len(sys.argv) == 2 and sys.argv[1].endswith((".yaml", ".yml")):
        model_args, data_args, compare_args, training_args = parser.parse_yaml_file(os.path.abspath(sys.argv[1]))
    else:
        model_args, data_args, compare_args, training_args = parser.parse_args_into_dataclasses()
    if compare_args.compare not in (None, "adamw"):
        parser.error(f"--compare {compare_args.compare!r}: the only comparison is --compare adamw")

    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", datefmt="%H:%M:%S",
                        handlers=[logging.StreamHandler(sys.stdout)], level=logging.WARNING)
    logger.setLevel(logging.INFO if training_args.should_log else logging.WARNING)
    datasets.utils.logging.set_verbosity_warning()
    datasets.disable_progress_bars()
    transformers.utils.logging.set_verbosity(training_args.get_process_log_level())
    started = time.time()

    train_files = _files(data_args.train_file, TRAIN_PLAYS)
    eval_files = _files(data_args.validation_file, EVAL_PLAYS)
    tokenizer = load_tokenizer(model_args, train_files, training_args.output_dir)
    data = lm_datasets(train_files, eval_files, tokenizer, data_args.block_size)
    if data_args.max_eval_blocks and data_args.max_eval_blocks > 0:
        data["validation"] = data["validation"].select(range(min(data_args.max_eval_blocks, len(data["validation"]))))
    logger.info("%d train / %d eval blocks of %d tokens", len(data["train"]), len(data["validation"]),
                data_args.block_size)

    trainer, metrics = train_and_evaluate(model_args, training_args, tokenizer, data)
    adamw_loss, adamw_source = None, ""
    if compare_args.compare == "adamw":
        baseline_args = dataclasses.replace(
            training_args, optim="adamw_torch_fused", optim_args=None,
            output_dir=str(Path(training_args.output_dir) / "adamw"),
        )
        _, baseline = train_and_evaluate(model_args, baseline_args, tokenizer, data)
        adamw_loss, adamw_source = baseline.get("eval_loss"), "on the same run"
    elif DEFAULT_RUN_ADAMW_EVAL_LOSS is not None and _is_default_run(sys.argv[1:]):
        adamw_loss, adamw_source = DEFAULT_RUN_ADAMW_EVAL_LOSS, "on this default run (measured, docs/trainer.md)"
    if trainer.is_world_process_zero() and trainer.optimizer is not None:
        report(trainer, metrics, started, adamw_loss, adamw_source, training_args.output_dir)


if __name__ == "__main__":
    main()
