"""The model's own Hugging Face tokenizer, with the small interface the trainer uses.

Loaded with ``transformers.AutoTokenizer`` from a local directory only (nothing is downloaded):
the vocabulary, eos and pad come from it, and prompts go through its chat template when it has
one. The synthetic task's :class:`~megatron_pr2.rl.task.CharTokenizer` has the same interface.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

from megatron_pr2.errors import UserError

__all__ = ["HFTokenizer", "TokenizerError"]


class TokenizerError(UserError, ValueError):
    """A tokenizer directory the trainer cannot use; the message says what is missing."""


class HFTokenizer:
    """``AutoTokenizer.from_pretrained(path, local_files_only=True)`` behind the trainer's
    tokenizer interface (``vocab_size``, ``pad_id``, ``bos_id``, ``eos_id``, ``encode``,
    ``decode``, ``encode_chat``)."""

    def __init__(self, path: str | Path, chat_template: str | None = None) -> None:
        from transformers import AutoTokenizer

        path = Path(path)
        if not path.is_dir():
            raise TokenizerError(f"tokenizer: {path} is not a directory")
        try:
            self.hf = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        except (OSError, ValueError) as e:
            raise TokenizerError(
                f"tokenizer: cannot load a Hugging Face tokenizer from {path} "
                f"(tokenizer.json / tokenizer_config.json): {e}"
            ) from e
        if self.hf.eos_token_id is None:
            raise TokenizerError(f"tokenizer {path}: has no eos token; generation could not stop")
        self.path = path
        self.eos_id: int = int(self.hf.eos_token_id)
        # Qwen-style tokenizers have a pad token; others pad with eos (masked out anyway).
        pad = self.hf.pad_token_id
        self.pad_id: int = int(pad) if pad is not None else self.eos_id
        bos = self.hf.bos_token_id
        self.bos_id: int | None = int(bos) if bos is not None else None
        if chat_template is not None:  # policy.tokenizer.chat_template
            self.hf.chat_template = chat_template
        self.has_chat_template = bool(getattr(self.hf, "chat_template", None))

    @property
    def vocab_size(self) -> int:
        """Ids the tokenizer can produce (added tokens included); the model may pad beyond."""
        return len(self.hf)

    def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> list[int]:
        ids = list(self.hf.encode(text, add_special_tokens=False))
        if bos and self.bos_id is not None:
            ids.insert(0, self.bos_id)
        return ids + ([self.eos_id] if eos else [])

    def encode_chat(
        self, messages: Sequence[tuple[str, str]], *, use_chat_template: bool = True
    ) -> list[int]:
        """Prompt ids for chat messages: the chat template with the generation prompt when the
        tokenizer has one (and it is wanted), else the message texts joined by new lines."""
        if use_chat_template and self.has_chat_template:
            conversation = [{"role": r, "content": c} for r, c in messages]
            out = self.hf.apply_chat_template(
                conversation, tokenize=True, add_generation_prompt=True
            )
            ids = out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out
            return [int(i) for i in ids]
        return self.encode("\n".join(c for _, c in messages), bos=True)

    def decode(self, ids: Iterable[int], *, stop_at_eos: bool = True) -> str:
        """Text of ``ids`` up to the first eos (by default), special tokens dropped."""
        kept = []
        for i in ids:
            i = int(i)
            if i == self.eos_id and stop_at_eos:
                break
            kept.append(i)
        return self.hf.decode(kept, skip_special_tokens=True)
