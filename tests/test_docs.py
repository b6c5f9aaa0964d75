"""The repository describes the product as it is: no text file dates a statement by a numbered work
period or work item. History lives in git and, by version and date, in CHANGELOG.md."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# A numbered work period or work item ("Session" or "Issue" followed by a number, "#" allowed),
# or a remark about lending machines. Dates, versions, schema numbers and machine names
# are fine.
NARRATIVE = re.compile(r"\b(?:session|issue)s?\s*#?\d|\b(?:was|were|next) lent\b", re.IGNORECASE)


def tracked_text_files() -> list[Path]:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs a git checkout to list the tracked files")
    listed = subprocess.run(
        ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True
    ).stdout.decode()
    return [ROOT / name for name in listed.split("\0") if name and (ROOT / name).is_file()]


def narrative_lines(path: Path) -> list[str]:
    data = path.read_bytes()
    if b"\0" in data:  # a binary file
        return []
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return []
    lines = enumerate(text.splitlines(), 1)
    return [f"{number}: {line.strip()}" for number, line in lines if NARRATIVE.search(line)]


def test_the_pattern_catches_narrative_and_spares_facts():
    # Built from pieces, so that this file does not match its own pattern.
    number = "7"
    caught = [f"measured in Session {number}", f"see issue {number}", f"(issue #{number}, item 4)",
              f"sessions {number} and 8", "no GPU was" + " lent"]
    spared = ["two sessions over one memory map", "schema 1.4", "measured 2026-11-30 on an H200",
              "onnxruntime 1.32", "one session per graph", "issues are filed on GitHub"]
    assert all(NARRATIVE.search(text) for text in caught)
    assert not any(NARRATIVE.search(text) for text in spared)


def test_no_tracked_file_dates_statements_by_work_periods_or_items():
    files = tracked_text_files()
    assert any(path.name == "README.md" for path in files)  # the listing found the repository
    found = {
        str(path.relative_to(ROOT)): lines for path in files if (lines := narrative_lines(path))
    }
    where = "; ".join(f"{name} line {line}" for name, lines in found.items() for line in lines)
    assert not found, f"development narrative (git and CHANGELOG.md keep history): {where}"
