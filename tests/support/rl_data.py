"""Test data for the real-data RL path: the package's tiny tokenizer and DAPO-Math-schema
builders (:mod:`megatron_pr2.recipes.smoke_data`, which ``pr2 smoke-assets`` uses too)."""

from megatron_pr2.recipes.smoke_data import (
    CHARS,
    SPECIALS,
    dapo_rows,
    save_char_tokenizer,
    write_jsonl,
    write_parquet,
)

__all__ = ["CHARS", "SPECIALS", "dapo_rows", "save_char_tokenizer", "write_jsonl", "write_parquet"]
