"""The repository itself: no half-finished merge is ever committed."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).parent.parent
MARKER = re.compile(r"^(<{7} |={7}$|>{7} )", re.MULTILINE)


def tracked_text_files() -> list[Path]:
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    files = [ROOT / name for name in listed.decode().split("\0") if name]
    return [
        f
        for f in files
        if f.suffix in {".py", ".md", ".sql", ".toml", ".yaml", ".yml", ".txt", ".cfg"} or f.name == "run"
    ]


def test_no_merge_conflict_markers() -> None:
    files = tracked_text_files()
    assert len(files) > 50 and any(f.name == "README.md" for f in files)
    marked = [
        f"{f.relative_to(ROOT)}:{text[: m.start()].count(chr(10)) + 1}"
        for f in files
        if f.exists()
        for text in [f.read_text(errors="replace")]
        for m in [MARKER.search(text)]
        if m
    ]
    assert not marked, f"merge conflict markers left in: {marked}"
