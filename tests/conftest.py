"""Real parts for end-to-end tests: upstream HTTP servers and a stagedoor process, all on
127.0.0.1 with ephemeral ports, each bounded in time and stopped by the fixture."""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import ssl
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from tests import forkserver

ROOT = Path(__file__).resolve().parent.parent

pytest_plugins = [
    "tests.redisserver",  # the redis_server fixture (a real redis-server)
    "tests.backstage",  # the real Backstage backend fixture (`backstage`)
]


# -- parallel runs (pytest-xdist) ------------------------------------------------------------------
#: One worker per CPU plus two (at least four): with sidecars and CLI commands forked
#: after their imports (tests/forkserver.py) a worker spends much of its time waiting on real
#: processes and sockets, and the extra workers run in those waits. Measured on 2 cores (Intel
#: Xeon VM), the same tree, whole runs: 4 workers 64.1 / 60.6 / 63.1 / 61.9 / 62.1 s, 3 workers
#: 70.1 / 69.6 / 67.8 / 68.4 s (and before the CLI commands were forked, 3 workers 123.7 s
#: against 2 workers 154.6 s on an AMD EPYC VM). Capped for big machines: more workers than that
#: starve the sidecars they start (their answers are timed: JWKS timeouts, head limits).
MIN_WORKERS = 4
MAX_WORKERS = 8


def pytest_sessionfinish(session: pytest.Session) -> None:
    forkserver.shutdown()  # this worker's fork server, if it started one (it kills its children)


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    return max(MIN_WORKERS, min(MAX_WORKERS, (os.cpu_count() or 1) + 2))


def pytest_sessionstart(session: pytest.Session) -> None:
    """Byte-compile the project's own modules once, before any worker starts.

    The suite starts a few hundred Python processes (sidecars, CLI commands). With
    ``PYTHONDONTWRITEBYTECODE=1`` in the environment (the Dockerfile sets it, so do many CI and
    container setups) none of them writes a ``__pycache__``, so each one compiled ``stagedoor``
    and ``addons`` from source again: about 0.2 s of CPU per sidecar start. ``compileall``
    writes the caches regardless of that variable; Python checks them against the sources'
    mtime and size, so an edited module is compiled afresh as usual.
    """
    if hasattr(session.config, "workerinput"):  # the controller did it for the workers
        return
    import compileall

    for package in ("stagedoor", "addons"):
        compileall.compile_dir(ROOT / package, quiet=2)


# Scheduling is ``--dist loadscope`` (pyproject.toml): a module's tests run on one worker, in
# order, so its module-scoped sidecars start once and tests that read what earlier ones did
# (inspect's --save file after its replay) see it. ``loadgroup`` with marks added from a conftest
# hook was tried and silently split modules: xdist had read the marks before the hook ran.
#
# Modules are handed out in collection order (``--no-loadscope-reorder``), longest first: xdist's
# default order (most tests first) left the long modules with few tests (the docs examples,
# schemathesis, the Backstage parity runs, the soak) for the end, where one worker ran them
# while the other had nothing left to do. Measured module wall times (2 workers, 2 cores),
# longest first; a module not listed runs after these, in file order. A stale list costs time,
# never correctness.
LONGEST_MODULES = (
    "test_openapi_e2e.py", "test_docs_examples.py", "test_live_e2e.py", "test_ratelimit_e2e.py",
    "test_cli_dev.py", "test_operator_logs.py", "test_ratelimit_parity.py", "test_cli.py",
    "test_backstage_citizen.py", "test_auth_e2e.py", "test_workers.py", "test_inspect_e2e.py",
    "test_hardening_resources.py", "test_hardening_soak.py", "test_policy_e2e.py",
    "test_hardening_faults.py", "test_eventloop.py", "test_hardening_edge.py",
    "test_reload_consistency.py", "test_property_decide.py", "test_signing.py",
)


#: Modules that share one worker (one scope for xdist): the users of the session's real
#: Backstage backend (tests/backstage.py), which each worker that runs one starts for itself.
SAME_WORKER = {"tests/test_backstage_fixture.py": "tests/test_backstage_citizen.py"}


def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """``--dist loadscope`` with the modules of ``SAME_WORKER`` in one scope."""
    if config.getvalue("dist") != "loadscope":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class Scheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            scope = super()._split_scope(nodeid)
            return SAME_WORKER.get(scope, scope)

    return Scheduling(config, log)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Longest modules first (see ``LONGEST_MODULES``); each module's tests keep their order.
    Every worker collects and sorts the same way, as xdist requires."""
    rank = {name: i for i, name in enumerate(LONGEST_MODULES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


# -- upstreams -------------------------------------------------------------------------------------
@dataclass
class SeenRequest:
    method: str
    path: str
    headers: dict[str, list[str]]
    body: bytes


class LoopbackServer(ThreadingHTTPServer):
    """A threaded HTTP server on an ephemeral 127.0.0.1 port, serving from construction on.

    Subclasses set their own attributes *before* calling ``super().__init__``.
    """

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, handler: type[BaseHTTPRequestHandler],
                 tls: ssl.SSLContext | None = None) -> None:
        super().__init__(("127.0.0.1", 0), handler)
        if tls is not None:  # an https upstream (a server-side context from the test)
            self.socket = tls.wrap_socket(self.socket, server_side=True)
        self.scheme = "https" if tls is not None else "http"
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.server_address[1]}"

    def stop(self) -> None:
        self.shutdown()
        self.server_close()


class RecordingServer(LoopbackServer):
    """An upstream that records every request and answers per ``mode``."""

    def __init__(self, mode: str = "json") -> None:
        self.mode = mode
        self.seen: list[SeenRequest] = []
        self.jwks: dict[str, Any] = {"keys": []}
        self.jwks_by_path: dict[str, Any] = {}  # path -> JWKS document (or raw bytes)
        self.hits: dict[str, int] = {}
        super().__init__(_RecordingHandler)


def read_request(handler: BaseHTTPRequestHandler) -> tuple[dict[str, list[str]], bytes]:
    """A test upstream's view of a request: headers (lowercased names, every value) and body."""
    length = int(handler.headers.get("content-length") or 0)
    body = handler.rfile.read(length) if length else b""
    headers: dict[str, list[str]] = {}
    for key, value in handler.headers.items():
        headers.setdefault(key.lower(), []).append(value)
    return headers, body


class _RecordingHandler(BaseHTTPRequestHandler):
    server: RecordingServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _handle(self) -> None:
        headers, body = read_request(self)
        self.server.seen.append(SeenRequest(self.command, self.path, headers, body))
        self.server.hits[self.path] = self.server.hits.get(self.path, 0) + 1
        if self.path.endswith("jwks.json"):
            doc = self.server.jwks_by_path.get(self.path, self.server.jwks)
            payload = doc if isinstance(doc, bytes) else json.dumps(doc).encode()
            ctype = "application/json"
            status = 200
        elif self.server.mode == "text":
            payload, ctype, status = b"plain words, not JSON", "text/plain", 200
        elif self.path.startswith("/v1/status/"):
            status = int(self.path.rsplit("/", 1)[1])
            payload, ctype = json.dumps({"upstream": "said so"}).encode(), "application/json"
        else:
            status = 200
            ctype = "application/json"
            payload = json.dumps({"upstream": True, "path": self.path,
                                  "method": self.command}).encode()
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(payload)))
        self.send_header("X-Upstream", "yes")
        if self.path.startswith("/v1/hop"):
            self.send_header("Connection", "keep-alive, X-Hop")
            self.send_header("X-Hop", "1")
            self.send_header("Keep-Alive", "timeout=5")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)

    do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = do_PATCH = do_OPTIONS = _handle


class SilentServer:
    """Accepts connections and reads, but never answers (a hung upstream)."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.conns: list[socket.socket] = []
        self._stop = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.sock.getsockname()[1]}"

    def _run(self) -> None:
        self.sock.settimeout(0.2)
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
                self.conns.append(conn)
            except OSError:
                continue

    def stop(self) -> None:
        self._stop = True
        for c in self.conns:
            c.close()
        self.sock.close()


def closed_port() -> int:
    """A loopback port with nothing listening."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


@pytest.fixture
def upstream() -> Iterator[RecordingServer]:
    server = RecordingServer("json")
    yield server
    server.stop()


# -- the stagedoor process -------------------------------------------------------------------------
_LISTENING = re.compile(r"stagedoor listening on http://([\d.]+):(\d+)")


@dataclass
class Sidecar:
    proc: subprocess.Popen[bytes] | forkserver.ForkedProcess
    host: str
    port: int
    stderr_lines: list[str] = field(default_factory=list)
    stdout_lines: list[str] = field(default_factory=list)
    _threads: list[threading.Thread] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        for t in self._threads:
            t.join(2)
        return self.proc.returncode

    def access_log(self) -> list[dict[str, Any]]:
        records = []
        for line in list(self.stdout_lines):
            with contextlib.suppress(ValueError):
                records.append(json.loads(line))
        return records


def _pump(stream: Any, sink: list[str]) -> None:
    for raw in iter(stream.readline, b""):
        sink.append(raw.decode("utf-8", "replace").rstrip("\n"))


def start_sidecar(config_files: list[Path], policy_dir: Path, env: dict[str, str] | None = None,
                  extra_args: list[str] | None = None, timeout: float = 20.0,
                  fork: bool = True) -> Sidecar:
    """``python -m stagedoor_addons run`` on ephemeral ports, once it listens.

    ``fork``: start it from this worker's fork server (tests/forkserver.py: the same command
    in a process forked after the imports, a second of CPU less per start); False for a
    fresh interpreter (``subprocess``).
    """
    args = [sys.executable, "-m", "stagedoor_addons", "run", "--policies", str(policy_dir),
            "--listen", "127.0.0.1:0"]
    for f in config_files:
        args += ["--config", str(f)]
    args += extra_args or []
    if "--admin" not in args:  # never the fixed default port: sidecars run side by side
        args += ["--admin", "127.0.0.1:0"]
    full_env = {k: v for k, v in os.environ.items()
                if not k.startswith(("INSIGHTS_", "BACKSTAGE_"))}
    full_env.update(env or {})
    full_env["PYTHONUNBUFFERED"] = "1"
    proc = forkserver.popen(args, env=full_env, fork=fork)
    sidecar = Sidecar(proc, "", 0)
    assert proc.stderr is not None and proc.stdout is not None
    # Pump both pipes from the start and look for the address in what arrived: a select() on
    # the pipe misses lines a buffered readline() has already pulled in with an earlier one.
    for stream, sink in ((proc.stderr, sidecar.stderr_lines), (proc.stdout, sidecar.stdout_lines)):
        t = threading.Thread(target=_pump, args=(stream, sink), daemon=True)
        t.start()
        sidecar._threads.append(t)
    deadline = time.monotonic() + timeout
    seen = 0
    while not sidecar.port and time.monotonic() < deadline:
        lines = sidecar.stderr_lines[seen:]
        seen += len(lines)
        for text in lines:
            match = _LISTENING.search(text)
            if match:
                sidecar.host, sidecar.port = match.group(1), int(match.group(2))
                break
        else:
            if proc.poll() is not None:
                break
            time.sleep(0.02)
    if not sidecar.port:
        if proc.poll() is None:
            proc.kill()
        proc.wait(5)
        for t in sidecar._threads:
            t.join(2)
        raise RuntimeError("stagedoor did not start:\n" + "\n".join(sidecar.stderr_lines))
    return sidecar


def write_config(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text))
    return path
