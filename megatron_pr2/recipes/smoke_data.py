"""Tiny stand-ins for a model's tokenizer and a math dataset, for smoke runs and tests.

Why in the package: ``pr2 smoke-assets`` (:mod:`megatron_pr2.recipes.smoke`) writes them next to
a scaled-down model so a recipe's ``smoke`` variant runs the real data path (HF tokenizer files,
DAPO-Math-17k parquet, math_verify) offline. The tokenizer is built with ``tokenizers`` (one
token per character, plus chat specials) and saved as Hugging Face files, so
``AutoTokenizer.from_pretrained(dir)`` loads it like a model's.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "CHARS",
    "SPECIALS",
    "addition_problems",
    "char_vocab_size",
    "dapo_rows",
    "gsm8k_rows",
    "save_char_tokenizer",
    "write_jsonl",
    "write_parquet",
]

CHARS = "0123456789+-*/=()^.,:$\\{}?! abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ\n#"
SPECIALS = ["<pad>", "<|im_start|>", "<|im_end|>", "<unk>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def char_vocab_size() -> int:
    """Tokens of :func:`save_char_tokenizer`'s vocabulary (a smoke model's minimum vocab)."""
    return len(SPECIALS) + len(CHARS)


def save_char_tokenizer(directory: Path, chat_template: bool = True) -> Path:
    """A character-level WordLevel tokenizer with Qwen-like chat specials, saved in ``directory``."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate([*SPECIALS, *CHARS])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    hf = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<pad>",
        eos_token="<|im_end|>",
        unk_token="<unk>",
        additional_special_tokens=["<|im_start|>"],
    )
    if chat_template:
        hf.chat_template = CHAT_TEMPLATE
    directory.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(str(directory))
    return directory


def addition_problems(seed: int = 0, max_operand: int = 9) -> list[tuple[str, str]]:
    """Every ``What is a+b?`` with ``0 <= a, b <= max_operand`` and its answer, in an order
    shuffled by ``seed``. One-digit addition is what a toy model learns in CPU minutes: after
    the supervised warm start it is right a fifth to two fifths of the time, so GRPO's groups
    carry reward signal and the reward visibly rises (the recipes' ``tiny`` variant)."""
    problems = [
        (f"What is {a}+{b}?", str(a + b))
        for a in range(max_operand + 1)
        for b in range(max_operand + 1)
    ]
    random.Random(seed).shuffle(problems)
    return problems


def dapo_rows(problems: Sequence[tuple[str, str]]) -> list[dict[str, Any]]:
    """Rows in DAPO-Math-17k's schema for (question, ground truth) pairs."""
    return [
        {
            "data_source": "math_dapo",
            "prompt": [{"role": "user", "content": question}],
            "ability": "MATH",
            "reward_model": {"ground_truth": answer, "style": "rule-lang"},
            "extra_info": {"index": str(i)},
        }
        for i, (question, answer) in enumerate(problems)
    ]


def gsm8k_rows(problems: Sequence[tuple[str, str]]) -> list[dict[str, Any]]:
    """Rows in GSM8K's schema (``question``; ``answer`` ending in ``#### <number>``)."""
    return [{"question": q, "answer": f"{q} = {a}\n#### {a}"} for q, a in problems]


def write_parquet(path: Path, rows: list[dict[str, Any]]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
