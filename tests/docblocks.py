"""The shell examples of README.md and docs/*.md, read as a reader pastes them.

The convention (also stated in README.md, "Examples in these docs"):

- A fenced block tagged ``sh`` (or ``bash``/``shell``) is **run** by
  ``tests/test_docs_examples.py``, as pasted, from a copy of the repository (like a fresh clone),
  with no ``INSIGHTS_*``/``BACKSTAGE_*``/``STAGEDOOR_*`` variables in the environment: whatever
  an example needs is written on its own line.
- A block tagged ``console`` is **shown, not run**: output, or commands that need what a test
  machine does not have (a cluster, docker, a registry) or run for minutes. Write commands in
  it with a ``$ `` prompt so a reader sees which lines are commands.
- Any other tag (``yaml``, ``json``, ``text``, none) is not a command. An untagged block whose
  lines look like commands (``./run.sh``, ``stagedoor <subcommand>``, ``curl``) is an error:
  tag it ``sh`` or ``console``.

A block tagged ``output`` right after an ``sh`` block is what its last command prints (stdout
and stderr; for a server, what it printed so far): each of its lines must match a line of the
real output, in order; ``...`` in a line matches anything (timestamps, tokens, ids).

Inside an ``sh`` block, each command must exit 0 unless its trailing comment says otherwise,
``(exit 1)``. Commands that start a server (``./run.sh demo|run|inspect``) keep running while
the blocks after them run, as in a second terminal; they are stopped with Ctrl-C (SIGINT)
before the next command of their own block, before the next server, and at the end of the file.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

RUN_TAGS = frozenset({"sh", "bash", "shell"})
SHOWN_TAGS = frozenset({"console"})
OUTPUT_TAG = "output"
SERVER_SUBCOMMANDS = frozenset({"demo", "run", "inspect"})
SUBCOMMANDS = frozenset({"run", "inspect", "check", "demo", "explain", "openapi", "token",
                         "test", "bench"})
_FENCE = re.compile(r"^(?P<indent> {0,3})(?P<fence>`{3,}|~{3,})\s*(?P<info>[^`\s]*)[^`]*$")
_EXPECTED_EXIT = re.compile(r"#.*\(exit (\d+)\)\s*$")
_LOOKS_LIKE_COMMAND = re.compile(
    r"^\s*(\./run\.sh\b|curl\s|\.venv/bin/|stagedoor\s+(" + "|".join(sorted(SUBCOMMANDS))
    + r")(?=\s|$))")
_HEREDOC = re.compile(r"<<-?\s*(['\"]?)(\w+)\1")
_ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")


@dataclass(frozen=True)
class Block:
    """One fenced code block: where it is, its tag (first word of the info string), its text."""

    file: Path
    line: int  # 1-based line of the opening fence
    tag: str
    text: str

    @property
    def where(self) -> str:
        return f"{self.file.name}:{self.line}"


@dataclass(frozen=True)
class Command:
    """One command of an ``sh`` block (continuation lines and heredocs joined)."""

    block: Block
    line: int  # 1-based line in the file
    text: str
    expected_exit: int = 0

    @property
    def where(self) -> str:
        return f"{self.block.file.name}:{self.line}"

    def words(self) -> list[str]:
        """The words after leading ``VAR=value`` assignments (shell quoting applied)."""
        try:  # continuation lines joined; a heredoc's body is not words of the command
            words = shlex.split(self.text.replace("\\\n", " ").split("\n", 1)[0],
                                comments=True)
        except ValueError:
            return []
        while words and _ASSIGNMENT.match(words[0]):
            words.pop(0)
        return words

    @property
    def stagedoor_subcommand(self) -> str | None:
        """``run`` for ``./run.sh run ...`` / ``stagedoor run ...``; None for anything else."""
        words = self.words()
        if not words or Path(words[0]).name not in ("run.sh", "stagedoor"):
            return None
        if len(words) == 1:
            return "run" if Path(words[0]).name == "run.sh" else None
        return words[1]

    @property
    def is_server(self) -> bool:
        return (self.stagedoor_subcommand in SERVER_SUBCOMMANDS and "--help" not in self.words()
                and self.expected_exit == 0)  # one meant to fail does not stay up

    @property
    def is_test_suite(self) -> bool:
        """``./run.sh test`` or ``python -m pytest ...``: the suite this test is part of."""
        words = self.words()
        return self.stagedoor_subcommand == "test" or (
            len(words) >= 3 and words[1:3] == ["-m", "pytest"])


def blocks(path: Path) -> list[Block]:
    """Every fenced block of a Markdown file, in order."""
    found: list[Block] = []
    lines = path.read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
        match = _FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        fence, start = match.group("fence"), i
        body: list[str] = []
        i += 1
        while i < len(lines) and not lines[i].strip().startswith(fence):
            body.append(lines[i])
            i += 1
        found.append(Block(path, start + 1, match.group("info").lower(), "\n".join(body)))
        i += 1
    return found


def commands(block: Block) -> list[Command]:
    """The commands of a block: ``\\``-continued lines joined, heredoc bodies attached,
    blank lines and whole-line comments skipped."""
    result: list[Command] = []
    lines = block.text.splitlines()
    i = 0
    while i < len(lines):
        first = i
        text = lines[i]
        while text.endswith("\\") and i + 1 < len(lines):
            i += 1
            text += "\n" + lines[i]  # bash joins them, as in a terminal
        heredoc = _HEREDOC.search(text) if "<<" in text else None
        if heredoc:
            end = heredoc.group(2)
            while i + 1 < len(lines):
                i += 1
                text += "\n" + lines[i]
                if lines[i].strip() == end:
                    break
        i += 1
        stripped = text.strip()
        if not stripped or stripped.startswith("#"):
            continue
        expected = _EXPECTED_EXIT.search(text.split("\n", 1)[0] if heredoc else text)
        result.append(Command(block, block.line + 1 + first, text,
                              int(expected.group(1)) if expected else 0))
    return result


def unlabelled_commands(block: Block) -> list[int]:
    """Lines (1-based, in the file) of an untagged block that look like commands."""
    if block.tag:
        return []
    return [block.line + 1 + n for n, line in enumerate(block.text.splitlines())
            if _LOOKS_LIKE_COMMAND.match(line)]
