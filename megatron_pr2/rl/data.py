"""Prompt/answer datasets for GRPO: parquet or JSONL files read with ``datasets``.

The ``data.*`` keys follow NeMo-RL's layout. The default schema is DAPO-Math-17k's (as verl and
NeMo-RL ship it): ``prompt`` is a list of chat messages (``[{"role": "user", "content": ...}]``)
and the ground truth sits in ``reward_model.ground_truth``. A plain-text prompt column and a
top-level answer column work too (``data.prompt_key=problem data.answer_key=answer``).

Every row is checked when the files are read, before any training step runs: a missing column,
an empty file or a row whose prompt or answer cannot be read is a :class:`DatasetError` that
names the file, the row and the column. Nothing is skipped silently.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from megatron_pr2.errors import UserError

__all__ = [
    "DataConfig",
    "DatasetError",
    "Problem",
    "load_problems",
]

Message = Mapping[str, str]
_READERS = {".parquet": "parquet", ".jsonl": "json", ".json": "json"}


class DatasetError(UserError, ValueError):
    """A dataset file that cannot be used as it is; the message names file, row and column."""


@dataclass
class DataConfig:
    """``data.*``: where the prompts come from and how they become model input.

    Attributes:
        train_files / val_files: parquet or JSONL files (a path or a list of paths). Without
            ``train_files`` the trainer uses the synthetic task of ``task.*``.
        prompt_key: the prompt column: chat messages (a list of ``{role, content}``) or text.
        answer_key: the ground-truth column; dots reach into struct columns
            (``reward_model.ground_truth``).
        prompt_template: a ``str.format`` template with ``{prompt}`` applied to a text prompt
            (or to the last user message) before the chat template.
        system_prompt: prepended as a system message when the prompt has none.
        apply_chat_template: format with the tokenizer's chat template when it has one.
        reward: ``math_verify`` (symbolic comparison of the final answer) or ``exact_match``.
        shuffle: visit the training prompts in a seeded random order, epoch by epoch.
    """

    train_files: list[str] | str | None = None
    val_files: list[str] | str | None = None
    prompt_key: str = "prompt"
    answer_key: str = "reward_model.ground_truth"
    prompt_template: str | None = None
    system_prompt: str | None = None
    apply_chat_template: bool = True
    reward: Literal["math_verify", "exact_match"] = "math_verify"
    shuffle: bool = True
    # Recipes name the data set for the reader (``data.dataset: DAPO-Math-17K``).
    dataset: str | None = None

    def __post_init__(self) -> None:
        if self.reward not in ("math_verify", "exact_match"):
            raise ValueError(
                f"data.reward: unknown reward {self.reward!r}; choose math_verify or exact_match"
            )
        if self.prompt_template is not None and "{prompt}" not in self.prompt_template:
            raise ValueError("data.prompt_template must contain '{prompt}'")

    @property
    def enabled(self) -> bool:
        return bool(self.train_files)

    @staticmethod
    def as_list(files: list[str] | str | None) -> list[str]:
        if files is None:
            return []
        return [files] if isinstance(files, str) else list(files)


@dataclass(frozen=True)
class Problem:
    """One dataset row: the chat messages to prompt with and the ground-truth answer."""

    messages: tuple[tuple[str, str], ...]  # (role, content) pairs
    answer: str
    source: str  # "file:row", for error messages and traces


def _dig(row: Mapping[str, Any], key: str) -> tuple[bool, Any]:
    """``row['a']['b']`` for ``key='a.b'``; (False, None) when a part is missing."""
    value: Any = row
    for part in key.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return False, None
        value = value[part]
    return True, value


def _messages(value: Any, where: str, key: str) -> tuple[tuple[str, str], ...]:
    if isinstance(value, str):
        if not value.strip():
            raise DatasetError(f"{where}: column '{key}' is an empty prompt")
        return (("user", value),)
    if isinstance(value, Sequence) and value:
        out = []
        for i, message in enumerate(value):
            if not isinstance(message, Mapping) or not isinstance(message.get("content"), str):
                raise DatasetError(
                    f"{where}: column '{key}' message {i} is not a {{role, content}} mapping "
                    f"with text content: {message!r:.120}"
                )
            role = message.get("role") or "user"
            out.append((str(role), message["content"]))
        if not any(role == "user" for role, _ in out):
            raise DatasetError(f"{where}: column '{key}' has no user message")
        return tuple(out)
    raise DatasetError(
        f"{where}: column '{key}' must be text or a non-empty list of chat messages, "
        f"got {value!r:.120}"
    )


def _answer(value: Any, where: str, key: str) -> str:
    if isinstance(value, bool) or value is None:
        raise DatasetError(f"{where}: column '{key}' has no answer ({value!r})")
    if isinstance(value, int | float):
        value = str(value)
    if not isinstance(value, str) or not value.strip():
        raise DatasetError(f"{where}: column '{key}' is not a non-empty answer: {value!r:.120}")
    return value.strip()


def _read_rows(path: Path) -> list[dict[str, Any]]:
    """All rows of one file through ``datasets``, kept in memory (its cache holds only lock
    files)."""
    import datasets

    kind = _READERS.get(path.suffix.lower())
    if kind is None:
        raise DatasetError(f"{path}: unsupported file type {path.suffix!r} (parquet or jsonl)")
    if not path.is_file():
        raise DatasetError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise DatasetError(f"{path}: the file is empty")
    was_enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        reader = datasets.Dataset.from_parquet if kind == "parquet" else datasets.Dataset.from_json
        table = reader(str(path), keep_in_memory=True)
    except Exception as e:  # pyarrow's and datasets' own errors, with the file named
        if kind == "json":  # name the bad line (read again only when the file is broken)
            _check_jsonl(path)
        raise DatasetError(f"{path}: cannot be read as {kind}: {e}") from e
    finally:
        if was_enabled:
            datasets.enable_progress_bars()
    if len(table) == 0:
        raise DatasetError(f"{path}: the file has no rows")
    return table.to_list()


def _check_jsonl(path: Path) -> None:
    """Name the first line that is not a JSON object (pyarrow reports only a byte offset)."""
    import json

    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as e:
                raise DatasetError(f"{path}: row {number}: not valid JSON ({e.msg})") from None
            if not isinstance(value, dict):
                raise DatasetError(f"{path}: row {number}: expected a JSON object")


def load_problems(files: Sequence[str | Path], config: DataConfig) -> list[Problem]:
    """Every row of ``files`` as a :class:`Problem`, checked row by row.

    Raises :class:`DatasetError` naming file, row and column for the first row that cannot be
    used; an empty list of files is an error too (a run must never train on nothing).
    """
    if not files:
        raise DatasetError("no data files given (data.train_files)")
    problems: list[Problem] = []
    for name in files:
        path = Path(name)
        rows = _read_rows(path)
        columns = set(rows[0])
        for key in (config.prompt_key, config.answer_key):
            top = key.split(".")[0]
            if top not in columns:
                raise DatasetError(
                    f"{path}: missing column '{top}' (data.{_which(config, key)}='{key}'); "
                    f"the file has {sorted(columns)}"
                )
        for i, row in enumerate(rows):
            where = f"{path}: row {i}"
            found, prompt = _dig(row, config.prompt_key)
            if not found:
                raise DatasetError(f"{where}: column '{config.prompt_key}' is missing")
            found, answer = _dig(row, config.answer_key)
            if not found:
                raise DatasetError(f"{where}: column '{config.answer_key}' is missing")
            problems.append(
                Problem(
                    messages=_messages(prompt, where, config.prompt_key),
                    answer=_answer(answer, where, config.answer_key),
                    source=f"{path.name}:{i}",
                )
            )
    return problems


def _which(config: DataConfig, key: str) -> str:
    return "prompt_key" if key == config.prompt_key else "answer_key"
