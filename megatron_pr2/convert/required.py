"""Refusing a run whose model weights were never converted, with the command that converts them.

Why a module of its own: ``pr2 check-recipe``, ``pr2 launch`` and the trainer all refuse the
same case (a ``model.checkpoint`` / ``policy.model_path`` without ``pr2_model.json``), and the
user should read the same fix from each: the exact ``pr2 convert hf-to-mcore`` line.
"""

from __future__ import annotations

import shlex
from pathlib import Path

from megatron_pr2.errors import UserError

__all__ = ["NotConvertedError", "convert_command", "is_converted", "require_converted"]

DESCRIPTION_FILE = "pr2_model.json"  # megatron_pr2.convert.model.DESCRIPTION_NAME
HF_PLACEHOLDER = "<HF model folder>"


class NotConvertedError(UserError):
    """``model.checkpoint`` / ``policy.model_path`` is not a ``pr2 convert hf-to-mcore`` output."""


def is_converted(path: str | Path) -> bool:
    """Whether ``path`` holds a converted checkpoint (its ``pr2_model.json``)."""
    return (Path(path).expanduser() / DESCRIPTION_FILE).is_file()


def convert_command(
    hf_path: str | None,
    out_dir: str | Path,
    tp: int = 1,
    pp: int = 1,
    ep: int = 1,
    etp: int | None = None,
) -> str:
    """The ``pr2 convert hf-to-mcore`` line that writes ``out_dir`` at the run's layout.

    bf16 weights (what the recipes train in); sizes of 1 and an ETP equal to TP are left out,
    as they are the command's defaults."""
    words = ["pr2", "convert", "hf-to-mcore", hf_path or HF_PLACEHOLDER, str(out_dir)]
    words += ["--dtype", "bfloat16"]
    for flag, size in (("--tp", tp), ("--pp", pp), ("--ep", ep)):
        if size and int(size) > 1:
            words += [flag, str(int(size))]
    if etp is not None and int(etp) != int(tp or 1):
        words += ["--etp", str(int(etp))]
    return " ".join(w if w == HF_PLACEHOLDER else shlex.quote(w) for w in words)


def not_converted_message(key: str, path: str | Path, command: str) -> str:
    """One line: what is missing and the command that makes it."""
    return (
        f"{key}={path} is not a converted checkpoint (no {DESCRIPTION_FILE}); convert the "
        f"weights first: {command} (or model.random_init: true for a smoke run)"
    )


def require_converted(
    path: str | Path,
    key: str = "policy.model_path",
    hf_path: str | None = None,
    tp: int = 1,
    pp: int = 1,
    ep: int = 1,
    etp: int | None = None,
) -> None:
    """Raise :class:`NotConvertedError` naming the convert command unless ``path`` is converted."""
    if not is_converted(path):
        command = convert_command(hf_path, path, tp, pp, ep, etp)
        raise NotConvertedError(not_converted_message(key, path, command))
