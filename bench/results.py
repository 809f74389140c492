"""``bench/RESULTS.md`` sections: each benchmark replaces its own ``## heading`` section."""

from __future__ import annotations

import re
from pathlib import Path

RESULTS_PATH = Path(__file__).resolve().parent / "RESULTS.md"


def write_section(heading: str, text: str, path: Path = RESULTS_PATH) -> None:
    """Replace the section that starts with ``heading`` (up to the next ``## ``) by ``text``,
    or append it; the other sections are left as they are."""
    current = path.read_text() if path.exists() else "# Benchmark results\n"
    pattern = re.compile(rf"^{re.escape(heading)}\n.*?(?=^## |\Z)", re.MULTILINE | re.DOTALL)
    if pattern.search(current):
        updated = pattern.sub(lambda _: text.rstrip("\n") + "\n\n", current, count=1)
    else:
        updated = current.rstrip("\n") + "\n\n" + text.rstrip("\n") + "\n"
    path.write_text(updated.rstrip("\n") + "\n")
