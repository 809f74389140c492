"""``bench/RESULTS.md`` sections: each benchmark replaces its own ``## heading`` section."""

from __future__ import annotations

import re
from pathlib import Path

RESULTS_PATH = Path(__file__).resolve().parent / "RESULTS.md"


# Everything from this line to the end of a section is hand-written reading of the numbers;
# a benchmark that rewrites its section keeps it (after the new tables).
NOTES_MARKER = "<!-- notes: kept when the benchmark rewrites this section -->"


def write_section(heading: str, text: str, path: Path = RESULTS_PATH) -> None:
    """Replace the section that starts with ``heading`` (up to the next ``## ``) by ``text``,
    or append it; the other sections are left as they are, and so is the part of this section
    from :data:`NOTES_MARKER` on."""
    current = path.read_text() if path.exists() else "# Benchmark results\n"
    pattern = re.compile(rf"^{re.escape(heading)}\n.*?(?=^## |\Z)", re.MULTILINE | re.DOTALL)
    found = pattern.search(current)
    if found:
        old = found.group(0)
        notes = old[old.index(NOTES_MARKER) :].rstrip("\n") if NOTES_MARKER in old else ""
        new = text.rstrip("\n") + ("\n\n" + notes if notes else "") + "\n\n"
        updated = current[: found.start()] + new + current[found.end() :]
    else:
        updated = current.rstrip("\n") + "\n\n" + text.rstrip("\n") + "\n"
    path.write_text(updated.rstrip("\n") + "\n")
