"""bench/results.py: a benchmark rewriting its RESULTS.md section keeps the other sections and
the hand-written notes of its own section."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _results_module():
    spec = importlib.util.spec_from_file_location("bench_results", ROOT / "bench" / "results.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_rewriting_a_section_keeps_its_notes_and_the_other_sections(tmp_path):
    results = _results_module()
    path = tmp_path / "RESULTS.md"
    path.write_text(
        "# Benchmark results\n\n## A\nold a\n\n## Loop\nold table\n\n"
        f"{results.NOTES_MARKER}\n**Reading it.** notes\n\n### kept subheading\n\n## Z\nz\n"
    )
    results.write_section("## Loop", "## Loop\nnew table\n", path)
    text = path.read_text()
    assert "old table" not in text
    assert text.index("new table") < text.index(results.NOTES_MARKER)
    assert (
        text.index("**Reading it.** notes") < text.index("### kept subheading") < text.index("## Z")
    )
    assert "old a" in text and text.rstrip().endswith("z")

    results.write_section("## A", "## A\nnew a\n", path)  # no marker: replaced whole
    text = path.read_text()
    assert "old a" not in text and "new a" in text and "**Reading it.** notes" in text
    results.write_section("## New", "## New\nappended\n", path)
    assert path.read_text().rstrip().endswith("appended")
