"""Every shell example of README.md and docs/*.md runs as pasted (convention: tests/docblocks.py).

For each document: a copy of the repository (its tracked and untracked, not ignored, files: what
a fresh clone plus your edits holds) shares this checkout's ``.venv``; its ``sh`` blocks run in
order with ``bash`` from the copy's root, with no ``INSIGHTS_*``, ``BACKSTAGE_*`` or
``STAGEDOOR_*`` variables set. Servers (``./run.sh demo|run|inspect``) are started, must say
where they listen, must answer a probe there with Backstage-shaped JSON (the demo: every curl
line it prints, too), stay up while the following blocks run, and must exit 0 on Ctrl-C.

Two things are not run: ``./run.sh test`` / ``python -m pytest ...`` (this suite itself; the
files they name must exist, and ``.ci/run`` must run ``./run.sh test``), and ``console`` blocks.

So that parallel runs on one machine do not collide, every loopback port >= 1024 written in a
block or in the copy's config/ and policies/ files (``127.0.0.1:7007``, ``localhost:8080``)
is moved by one offset, the same for all of them, so ports keep their spacing (``run --dev``
serves its keys on the listen port + 1).
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from .conftest import ROOT
from .docblocks import (
    OUTPUT_TAG,
    RUN_TAGS,
    SHOWN_TAGS,
    Block,
    Command,
    blocks,
    commands,
    unlabelled_commands,
)

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
COMMAND_TIMEOUT = 120.0
SERVER_START_TIMEOUT = 90.0
SERVER_STOP_TIMEOUT = 20.0
HINT = ("Fix the example (or the code), or, if it is not meant to run as pasted, fence it "
        "```console (shown, not run); see tests/docblocks.py for the convention.")
_PORT = re.compile(r"((?:127\.0\.0\.1|localhost|\[::1\]):)(\d{4,5})\b")
_LISTENING = re.compile(r"(?:stagedoor listening on|sidecar on) (http://[^\s,]+)")
_FOREIGN_ENV = ("INSIGHTS_", "BACKSTAGE_", "STAGEDOOR_")


# -- the copy ----------------------------------------------------------------------------------
def _repository_files() -> list[str]:
    """Tracked and untracked-but-not-ignored files: a fresh clone plus uncommitted work."""
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                         cwd=ROOT, capture_output=True, check=True, timeout=30).stdout
    return [name for name in out.decode().split("\0") if name and (ROOT / name).is_file()]


def _refresh_venv() -> None:
    """Let this checkout's own run.sh bring .venv in step with pyproject.toml and the lock file
    first (instant when it is): the copy shares .venv, and its run.sh, seeing a stale stamp,
    would otherwise reinstall it with the copy (a temporary directory) as the editable source."""
    result = subprocess.run([str(ROOT / "run.sh"), "--help"], cwd=ROOT, capture_output=True,
                            timeout=900, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, _decode(result.stderr)


def _copy_repository(dest: Path) -> Path:
    _refresh_venv()
    for name in _repository_files():
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, target)
    venv = ROOT / ".venv"
    assert (venv / "bin" / "python").exists(), \
        "run the suite with ./run.sh test: the examples share its .venv"
    (dest / ".venv").symlink_to(venv)
    for name in ("pyproject.toml", "run.sh"):  # what decides whether run.sh reinstalls
        assert (dest / name).read_bytes() == (ROOT / name).read_bytes(), name
    return dest


def _ports_in(text: str) -> set[int]:
    return {int(port) for _, port in _PORT.findall(text) if int(port) >= 1024}


def _free(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _ephemeral_start() -> int:
    """The first port the kernel hands out for ``bind(port 0)`` (Linux; 32768 elsewhere)."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    return 32768


def _choose_offset(ports: set[int]) -> int:
    """One offset that puts every port (and the port after it) on a free port, below the
    ephemeral range where it fits: the other workers' sidecars listen on port 0, and one of
    them took a shifted port between this check and the example's server start."""
    wanted = ports | {p + 1 for p in ports}
    low, high = (min(wanted), max(wanted)) if wanted else (0, 0)
    top = _ephemeral_start() - 1 if _ephemeral_start() - 1 - (high - low) > 20000 else 60000
    for _ in range(50):
        offset = random.randint(20000, top - (high - low)) - low
        if all(_free(p + offset) for p in wanted):
            return offset
    raise AssertionError(f"no free block of ports for {sorted(ports)}")


def _shift(text: str, offset: int) -> str:
    return _PORT.sub(lambda m: m.group(1) + (str(int(m.group(2)) + offset)
                                             if int(m.group(2)) >= 1024 else m.group(2)), text)


# -- running -----------------------------------------------------------------------------------
@dataclass
class Server:
    command: Command
    process: subprocess.Popen[bytes]
    output: Path
    url: str = ""

    def text(self) -> str:
        return self.output.read_text(errors="replace")


@dataclass
class Session:
    """One document's run: its copy, environment, port offset, running server, failures."""

    root: Path
    env: dict[str, str]
    offset: int
    scratch: Path
    server: Server | None = None
    failures: list[str] = field(default_factory=list)
    ran: list[str] = field(default_factory=list)
    last: Command | None = None
    last_output: str = ""

    def fail(self, command: Command, problem: str, output: str = "") -> None:
        tail = "\n".join(output.strip().splitlines()[-25:])
        self.failures.append(f"{command.where}: `{_one_line(command.text)}` {problem}"
                             + ("\n    | " + tail.replace("\n", "\n    | ") if tail else ""))

    # -- one command --------------------------------------------------------------------------
    def run(self, command: Command) -> None:
        self.ran.append(command.where)
        self.last, self.last_output = command, ""
        if command.is_test_suite:
            self.check_suite_command(command)
            return
        text = _shift(command.text, self.offset)
        if command.is_server:
            self.stop_server()
            self.start_server(command, text)
            return
        if self.server is not None and self.server.command.block == command.block:
            self.stop_server()  # the same terminal: Ctrl-C before its next line
        self.run_plain(command, text)

    def run_plain(self, command: Command, text: str) -> str:
        """Run one command to its end; returns its stdout."""
        process = subprocess.Popen(["bash", "-o", "pipefail", "-c", text], cwd=self.root,
                                   env=self.env, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                                   start_new_session=True)
        try:
            stdout, stderr = process.communicate(timeout=COMMAND_TIMEOUT)
        except subprocess.TimeoutExpired:
            _kill(process)  # the whole group: a server started by mistake must not linger
            stdout, stderr = process.communicate()
            self.fail(command, f"did not finish within {COMMAND_TIMEOUT:.0f} s (a server must "
                      "say 'stagedoor listening on'; a command that runs for minutes belongs "
                      "in a ```console block)",
                      _decode(stdout) + _decode(stderr))
            return ""
        result = subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
        output = _decode(result.stdout) + _decode(result.stderr)
        self.last_output = output
        if result.returncode != command.expected_exit:
            self.fail(command, f"exited {result.returncode}, the example expects "
                      f"{command.expected_exit}" + (" (write `# ... (exit N)` after a command "
                                                    "that is meant to fail)"
                                                    if not command.expected_exit else ""),
                      output)
        return _decode(result.stdout)

    def check_suite_command(self, command: Command) -> None:
        words = command.words()
        if command.stagedoor_subcommand == "test":
            ci = (ROOT / ".ci" / "run").read_text()
            if "./run.sh test" not in ci:
                self.fail(command, "is not what .ci/run runs")
        missing = [w for w in words if w.startswith("tests/") and not glob.glob(str(ROOT / w))]
        if missing:
            self.fail(command, f"names test files that do not exist: {', '.join(missing)}")

    def compare_output(self, block: Block) -> None:
        """An ``output`` block: what the command before it prints (its lines in order,
        ``...`` matching anything; for a server, what it printed so far)."""
        if self.last is None:
            self.failures.append(f"{block.where}: an output block with no command before it")
            return
        actual = self.server.text() if self.server and self.server.command is self.last \
            else self.last_output
        lines = actual.splitlines()
        position = 0
        for wanted in _shift(block.text, self.offset).splitlines():
            if not wanted.strip():
                continue
            pattern = re.compile(".*".join(re.escape(part) for part in wanted.strip().split("...")))
            while position < len(lines) and not pattern.search(lines[position]):
                position += 1
            if position == len(lines):
                self.fail(self.last, f"does not print what {block.where} shows: no line "
                          f"matching\n    {wanted.strip()}\n  after the lines before it in:",
                          actual)
                return
            position += 1

    # -- servers ------------------------------------------------------------------------------
    def start_server(self, command: Command, text: str) -> None:
        output = self.scratch / f"server-{len(self.ran)}.log"
        with output.open("wb") as sink:
            process = subprocess.Popen(["bash", "-c", text], cwd=self.root, env=self.env,
                                       stdout=sink, stderr=subprocess.STDOUT,
                                       stdin=subprocess.DEVNULL, start_new_session=True)
        server = Server(command, process, output)
        deadline = time.monotonic() + SERVER_START_TIMEOUT
        while time.monotonic() < deadline:
            match = _LISTENING.search(server.text())
            if match and (command.stagedoor_subcommand != "demo" or "mint more" in server.text()):
                server.url = match.group(1).rstrip(".")
                break
            if process.poll() is not None:
                self.fail(command, f"is a server but exited {process.returncode} before "
                          "saying where it listens", server.text())
                return
            time.sleep(0.2)
        else:
            self.fail(command, f"did not say 'listening on http://...' within "
                      f"{SERVER_START_TIMEOUT:.0f} s", server.text())
            _kill(process)
            return
        self.server = server
        self.probe(server)

    def probe(self, server: Server) -> None:
        """A Backstage-shaped 404 for an unknown plugin; the demo's printed curl lines."""
        url = f"{server.url}/api/docs-example-probe/x"
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                status, body = response.status, response.read()
        except urllib.error.HTTPError as exc:
            status, body = exc.code, exc.read()
        except OSError as exc:
            self.fail(server.command, f"said it listens on {server.url} but {url} failed: {exc}",
                      server.text())
            return
        try:
            shaped = json.loads(body)["response"]["statusCode"] == status == 404
        except (ValueError, KeyError, TypeError):
            shaped = False
        if not shaped:
            self.fail(server.command, f"answered {url} with {status} {body[:200]!r}, not a "
                      "Backstage-shaped 404", server.text())
        if server.command.stagedoor_subcommand == "demo":  # and what it tells you to try
            for line in server.text().splitlines():
                if line.strip().startswith("curl "):
                    curl = Command(server.command.block, server.command.line,
                                   line.strip() + " -w ' %{http_code}'")
                    status = self.run_plain(curl, curl.text).rpartition(" ")[2]
                    if not status.isdigit() or int(status) >= 500:
                        self.fail(server.command, f"prints `{line.strip()[:60]}...`, which "
                                  f"got {status or 'no answer'}")

    def stop_server(self) -> None:
        server, self.server = self.server, None
        if server is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.process.pid, signal.SIGINT)  # what Ctrl-C does in a terminal
        try:
            code = server.process.wait(SERVER_STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            _kill(server.process)
            self.fail(server.command, f"did not stop within {SERVER_STOP_TIMEOUT:.0f} s of "
                      "Ctrl-C", server.text())
            return
        if code != 0:
            self.fail(server.command, f"exited {code} on Ctrl-C, not 0", server.text())


def _kill(process: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(5)


def _decode(data: bytes | str | None) -> str:
    if data is None:
        return ""
    return data if isinstance(data, str) else data.decode(errors="replace")


def _one_line(text: str) -> str:
    first = text.split("\n", 1)[0]
    return first if len(first) <= 120 and "\n" not in text else first[:117] + "..."


def _clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(_FOREIGN_ENV)}
    env.pop("VIRTUAL_ENV", None)
    return env


# -- the tests ---------------------------------------------------------------------------------
def test_every_block_says_whether_it_runs():
    """An untagged block that holds commands is ambiguous: tag it ``sh`` or ``console``."""
    problems = [f"{block.file.name}:{line}: looks like a command in an untagged block; tag the "
                "block ```sh (run by tests/test_docs_examples.py) or ```console (shown only)"
                for path in DOCS for block in blocks(path) for line in unlabelled_commands(block)]
    assert not problems, "\n".join(problems)


def test_console_blocks_show_commands_with_a_prompt():
    problems = []
    for path in DOCS:
        for block in blocks(path):
            if block.tag in SHOWN_TAGS and "$ " not in block.text and \
                    any(re.match(r"\s*(\./run\.sh|stagedoor |curl |docker |kubectl )", line)
                        for line in block.text.splitlines()):
                problems.append(f"{block.where}: write commands in a console block as "
                                "`$ command` so readers see which lines are commands")
    assert not problems, "\n".join(problems)


def _runnable(path: Path) -> list[Block]:
    return [b for b in blocks(path) if b.tag in RUN_TAGS]


@pytest.mark.e2e
@pytest.mark.timeout(900)
@pytest.mark.parametrize("doc", [d for d in DOCS if _runnable(d)],
                         ids=lambda d: str(d.relative_to(ROOT)))
def test_shell_examples_run_as_pasted(doc: Path, tmp_path: Path):
    copy = _copy_repository(tmp_path / "clone")
    runnable = _runnable(doc)
    texts = [b.text for b in runnable]
    for folder in ("config", "policies"):
        for file in (copy / folder).rglob("*.yaml"):
            texts.append(file.read_text())
    offset = _choose_offset(set().union(*(_ports_in(t) for t in texts)))
    for folder in ("config", "policies"):
        for file in (copy / folder).rglob("*.yaml"):
            file.write_text(_shift(file.read_text(), offset))
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    session = Session(copy, _clean_env(), offset, scratch)
    try:
        for block in blocks(doc):
            if block.tag in RUN_TAGS:
                for command in commands(block):
                    session.run(command)
            elif block.tag == OUTPUT_TAG:
                session.compare_output(block)
    finally:
        session.stop_server()
    assert session.ran, f"{doc.name}: no commands found in its sh blocks"
    assert not session.failures, (
        f"{len(session.failures)} example(s) in {doc.relative_to(ROOT)} do not work as pasted "
        f"(ports shown moved by {offset:+d}):\n\n" + "\n\n".join(session.failures)
        + f"\n\n{HINT}")


_LINK = re.compile(r"\]\(([^)\s]+)\)")
_OUTSIDE = re.compile(r"\.\./|(?<![\w-])(?:SPEC|MITMPROXY-NOTES)\.md|\bshared/(?:DESIGN|SPEC)")


def test_docs_stand_alone():
    """No doc points outside the repository, and every relative link resolves."""
    problems = []
    for path in DOCS:
        text = path.read_text()
        for n, line in enumerate(text.splitlines(), 1):
            if _OUTSIDE.search(line):
                problems.append(f"{path.name}:{n}: points outside the repository: "
                                f"{line.strip()[:100]} (bring what matters into docs/)")
            for target in _LINK.findall(line):
                if target.startswith(("http://", "https://", "#", "mailto:")):
                    continue
                file = target.split("#", 1)[0]
                if file and not (path.parent / file).exists():
                    problems.append(f"{path.name}:{n}: link to {target}, which does not exist")
    assert not problems, "\n".join(problems)
