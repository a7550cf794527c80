"""Load generation: wrk when installed, else a bundled asyncio generator. Same result shape.

Both keep ``connections`` HTTP/1.1 keep-alive connections busy with the same GET (one request in
flight per connection, no pipelining) for ``duration`` seconds, or until ``requests`` answers
have arrived, and report requests/s and latency percentiles.
"""

from __future__ import annotations

import asyncio
import math
import re
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from urllib.parse import urlsplit

from .http1 import split_message
from .procs import which


@dataclass
class LoadResult:
    requests: int
    seconds: float
    rps: float
    p50_ms: float
    p99_ms: float
    non_2xx: int = 0
    socket_errors: int = 0
    tool: str = "wrk"

    def as_dict(self) -> dict[str, float | int | str]:
        return asdict(self)


@dataclass(frozen=True)
class Load:
    url: str
    headers: tuple[tuple[str, str], ...]
    connections: int = 16
    threads: int = 1
    method: str = "GET"
    body: bytes = b""


def wrk_script(load: Load) -> str:
    """The Lua that makes wrk send ``load.method`` with ``load.body`` (every request alike)."""
    def lua(text: str) -> str:
        return '"' + "".join(c if c.isalnum() or c in " -_./:{},[]'" else f"\\{ord(c):03d}"
                             for c in text) + '"'
    return f"wrk.method = {lua(load.method)}\nwrk.body = {lua(load.body.decode('latin-1'))}\n"


# -- wrk ---------------------------------------------------------------------------------------
_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0}
_LATENCY = re.compile(r"^\s*(50|99)(?:\.0+)?%\s+([\d.]+)(us|ms|s|m)\s*$", re.MULTILINE)
_RPS = re.compile(r"^Requests/sec:\s+([\d.]+)", re.MULTILINE)
_TOTAL = re.compile(r"^\s*(\d+) requests in ([\d.]+)(us|ms|s|m),", re.MULTILINE)
_NON2XX = re.compile(r"Non-2xx or 3xx responses:\s+(\d+)")
_SOCKET = re.compile(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)")

def parse_wrk(output: str) -> LoadResult:
    """wrk --latency output -> LoadResult. Raises ValueError when something is missing."""
    latency = {m.group(1): float(m.group(2)) * _UNITS[m.group(3)]
               for m in _LATENCY.finditer(output)}
    rps = _RPS.search(output)
    total = _TOTAL.search(output)
    if rps is None or total is None or set(latency) != {"50", "99"}:
        raise ValueError("unexpected wrk output:\n" + output)
    non2xx = _NON2XX.search(output)
    sock = _SOCKET.search(output)
    return LoadResult(
        requests=int(total.group(1)),
        seconds=float(total.group(2)) * _UNITS[total.group(3)] / 1000.0,
        rps=float(rps.group(1)),
        p50_ms=latency["50"],
        p99_ms=latency["99"],
        non_2xx=int(non2xx.group(1)) if non2xx else 0,
        socket_errors=sum(int(g) for g in sock.groups()) if sock else 0,
        tool="wrk",
    )


def run_wrk(load: Load, duration: float) -> LoadResult:
    wrk = which("wrk")
    assert wrk is not None
    args = [wrk, f"-t{load.threads}", f"-c{load.connections}", f"-d{max(1, round(duration))}s",
            "--latency", "--timeout", "5s"]
    for name, value in load.headers:
        args += ["-H", f"{name}: {value}"]
    with tempfile.TemporaryDirectory(prefix="stagedoor-wrk-") as tmp:
        if load.method != "GET" or load.body:
            script = Path(tmp) / "request.lua"
            script.write_text(wrk_script(load))
            args += ["-s", str(script)]
        args.append(load.url)
        done = subprocess.run(args, capture_output=True, text=True, timeout=duration + 60,
                              check=False)
    if done.returncode != 0:
        raise RuntimeError(f"wrk failed ({done.returncode}): {done.stderr or done.stdout}")
    return parse_wrk(done.stdout)


# -- the bundled generator ------------------------------------------------------------------------
def percentile(sorted_values: list[float], fraction: float) -> float:
    """Nearest-rank percentile of an ascending list (0 for an empty one)."""
    if not sorted_values:
        return 0.0
    rank = max(1, min(len(sorted_values), math.ceil(fraction * len(sorted_values))))
    return sorted_values[rank - 1]


class _Client(asyncio.Protocol):
    def __init__(self, request: bytes, state: _State) -> None:
        self.request = request
        self.state = state
        self.buffer = b""
        self.sent_at = 0.0
        self.transport: asyncio.Transport | None = None
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self._send()

    def _send(self) -> None:
        assert self.transport is not None
        if not self.state.more():
            self.transport.close()
            return
        self.sent_at = time.perf_counter()
        self.transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while (message := split_message(self.buffer)) is not None:
            head, self.buffer = message
            status = head[9:12]
            self.state.record(time.perf_counter() - self.sent_at, status.startswith(b"2"))
            self._send()

    def connection_lost(self, exc: Exception | None) -> None:
        if exc is not None:
            self.state.errors += 1
        if not self.closed.done():
            self.closed.set_result(None)


class _State:
    def __init__(self, deadline: float, limit: int) -> None:
        self.deadline = deadline
        self.limit = limit
        self.latencies: list[float] = []
        self.non_2xx = 0
        self.errors = 0
        self.sent = 0

    def more(self) -> bool:
        if time.perf_counter() >= self.deadline or (self.limit and self.sent >= self.limit):
            return False
        self.sent += 1
        return True

    def record(self, seconds: float, ok: bool) -> None:
        self.latencies.append(seconds)
        if not ok:
            self.non_2xx += 1


async def _generate(load: Load, duration: float, requests: int) -> LoadResult:
    parts = urlsplit(load.url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    lines = [f"{load.method} {parts.path or '/'}{'?' + parts.query if parts.query else ''} "
             f"HTTP/1.1", f"Host: {parts.netloc}"] + [f"{k}: {v}" for k, v in load.headers]
    if load.body or load.method not in ("GET", "HEAD"):
        lines.append(f"Content-Length: {len(load.body)}")
    request = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + load.body
    loop = asyncio.get_running_loop()
    started = time.perf_counter()
    state = _State(started + duration, requests)
    clients = []
    for _ in range(load.connections):
        _, client = await loop.create_connection(lambda: _Client(request, state), host, port)
        clients.append(client)
    await asyncio.wait_for(asyncio.gather(*(c.closed for c in clients)), duration + 30)
    seconds = time.perf_counter() - started
    values = sorted(state.latencies)
    return LoadResult(len(values), seconds, len(values) / seconds if seconds else 0.0,
                      percentile(values, 0.50) * 1000, percentile(values, 0.99) * 1000,
                      state.non_2xx, state.errors, tool="bench.load")


def run_builtin(load: Load, duration: float, requests: int = 0) -> LoadResult:
    return asyncio.run(_generate(load, duration, requests))


def run(load: Load, duration: float, requests: int = 0, force_builtin: bool = False,
        ) -> LoadResult:
    """Drive ``load`` for ``duration`` seconds, or until ``requests`` answers when > 0.

    Counted runs always use the bundled generator: wrk can stop sending after N answers but
    still waits out its whole duration.
    """
    if requests or force_builtin or which("wrk") is None:
        return run_builtin(load, duration, requests)
    return run_wrk(load, duration)
