"""Test data for the real-data RL path: a small HF tokenizer and DAPO-Math-schema files.

Built offline with ``tokenizers`` (one token per character, plus chat specials) and saved as
Hugging Face tokenizer files, so ``AutoTokenizer.from_pretrained(dir)`` loads it like a model's.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

CHARS = "0123456789+-*/=()^.,:$\\{}?! abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ\n"
SPECIALS = ["<pad>", "<|im_start|>", "<|im_end|>", "<unk>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


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


def dapo_rows(problems: Sequence[tuple[str, str]]) -> list[dict]:
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


def write_parquet(path: Path, rows: list[dict]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
