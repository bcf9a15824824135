#!/usr/bin/env python
"""A plain Hugging Face causal-LM training script, in the style of transformers' run_clm.py.

It knows nothing about SlimAdam (no slimadam_hf import): tests run it through
``python -m slimadam_hf.run`` to show that unmodified scripts accept ``--optim slimadam``.
"""

import json
import logging
import sys
from dataclasses import dataclass, field
from itertools import chain
from typing import Optional

import datasets
import transformers
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    HfArgumentParser,
    Trainer,
    TrainingArguments,
    default_data_collator,
    set_seed,
)

logger = logging.getLogger(__name__)


@dataclass
class ModelArguments:
    model_type: str = field(default="gpt2", metadata={"help": "model type when training from scratch"})
    config_overrides: Optional[str] = field(default=None, metadata={"help": "e.g. n_embd=32,n_layer=2"})
    tokenizer_name: Optional[str] = field(default=None, metadata={"help": "local tokenizer directory"})
    model_name_or_path: Optional[str] = field(default=None, metadata={"help": "local checkpoint"})


@dataclass
class DataTrainingArguments:
    train_file: Optional[str] = field(default=None)
    validation_file: Optional[str] = field(default=None)
    block_size: int = field(default=32)


def main():
    parser = HfArgumentParser((ModelArguments, DataTrainingArguments, TrainingArguments))
    if len(sys.argv) == 2 and sys.argv[1].endswith(".json"):
        model_args, data_args, training_args = parser.parse_json_file(json_file=sys.argv[1])
    elif len(sys.argv) == 2 and sys.argv[1].endswith((".yaml", ".yml")):
        model_args, data_args, training_args = parser.parse_yaml_file(yaml_file=sys.argv[1])
    else:
        model_args, data_args, training_args = parser.parse_args_into_dataclasses()

    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
        datefmt="%m/%d/%Y %H:%M:%S",
        handlers=[logging.StreamHandler(sys.stdout)],
    )
    log_level = training_args.get_process_log_level()
    logger.setLevel(log_level)
    datasets.utils.logging.set_verbosity(log_level)
    transformers.utils.logging.set_verbosity(log_level)
    logger.info(f"Training/evaluation parameters {training_args}")
    set_seed(training_args.seed)

    data_files = {"train": data_args.train_file}
    if data_args.validation_file:
        data_files["validation"] = data_args.validation_file
    raw = datasets.load_dataset("text", data_files=data_files)

    tokenizer = AutoTokenizer.from_pretrained(model_args.tokenizer_name)
    if model_args.model_name_or_path:
        model = AutoModelForCausalLM.from_pretrained(model_args.model_name_or_path)
    else:
        config = AutoConfig.for_model(model_args.model_type)
        if model_args.config_overrides:
            config.update_from_string(model_args.config_overrides)
        config.vocab_size = len(tokenizer)
        model = AutoModelForCausalLM.from_config(config)

    tokenized = raw.map(lambda ex: tokenizer(ex["text"]), batched=True, remove_columns=["text"])
    block = data_args.block_size

    def group_texts(examples):
        joined = {k: list(chain(*examples[k])) for k in examples}
        total = (len(joined["input_ids"]) // block) * block
        result = {k: [t[i : i + block] for i in range(0, total, block)] for k, t in joined.items()}
        result["labels"] = result["input_ids"].copy()
        return result

    lm_datasets = tokenized.map(group_texts, batched=True)
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=lm_datasets["train"] if training_args.do_train else None,
        eval_dataset=lm_datasets["validation"] if training_args.do_eval else None,
        processing_class=tokenizer,
        data_collator=default_data_collator,
    )
    if training_args.do_train:
        result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
        trainer.save_model()
        trainer.log_metrics("train", result.metrics)
        trainer.save_metrics("train", result.metrics)
        trainer.save_state()
    if training_args.do_eval:
        metrics = trainer.evaluate()
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)
    # Markers for the tests. Under `accelerate launch` both ranks share one (unbuffered) pipe, where
    # print() writes each argument separately: one write per whole line keeps the other rank out of it.
    sys.stdout.flush()
    inner = trainer.optimizer  # the optimizer inside accelerate's (and DeepSpeed's) wrappers
    while getattr(inner, "optimizer", None) is not None:
        inner = inner.optimizer
    sys.stdout.write(f"OPTIMIZER {type(inner).__name__}\n")
    sys.stdout.write(f"FINAL {json.dumps({'optim': str(training_args.optim), 'step': trainer.state.global_step})}\n")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
