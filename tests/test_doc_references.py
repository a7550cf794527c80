"""The repository stands alone: no file points to the team's shared notes outside it, and every
docs/ page a file names exists."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
#: Spelled in pieces so that this file does not name them itself.
OUTSIDE = ("SPEC" + ".md", "MITMPROXY-NOTES" + ".md", "shared" + "/SPEC", "DESIGN" + ".md")
_DOCS_PAGE = re.compile(r"(?<![\w/.-])docs/([\w.-]+\.md)")


def tracked_text_files() -> list[Path]:
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"],
                            cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    return [ROOT / name for name in listed
            if name.endswith((".py", ".md", ".sh", ".toml", ".yaml", ".yml", ".txt"))
            or name in ("Dockerfile", "run.sh", ".ci/run")]


def test_no_file_cites_notes_that_are_not_in_the_repository():
    offenders = []
    for path in tracked_text_files():
        if not path.is_file():
            continue
        text = path.read_text(errors="replace")
        offenders += [f"{path.relative_to(ROOT)}: {name}" for name in OUTSIDE if name in text]
    assert offenders == [], "copy what matters into docs/ and cite that instead"


def test_every_docs_page_named_exists():
    missing = set()
    for path in tracked_text_files():
        if path.is_file():
            missing |= {f"{path.relative_to(ROOT)}: docs/{page}"
                        for page in _DOCS_PAGE.findall(path.read_text(errors="replace"))
                        if not (ROOT / "docs" / page).is_file()}
    assert sorted(missing) == []
