"""Bounded resources per client, through a real sidecar (issue 13).

- Credentials are checked on the request head: eight concurrent 10 MiB POSTs without
  credentials are refused (401) before their bodies are read, and the proxy's resident memory
  stays within 10 MB of what it was idle (a body is dropped as it arrives, never buffered).
- ``maxConnectionsPerClient`` holds: one client address cannot open more connections than the
  cap, while a client from another address is served meanwhile.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import pytest

from .hardening import HardEnv
from .httpraw import send_raw

pytestmark = pytest.mark.e2e

PER_CLIENT = 10  # above POSTS: the posts come from one address too
POSTS = 8
POST_BYTES = 10 << 20  # 10 MiB each
RSS_SLACK = 10 << 20


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HardEnv]:
    # A body limit above the posts' size: only the credentials check can stop them early.
    e = HardEnv(tmp_path_factory.mktemp("hard-resources"),
                extra_config=f"    maxBodyBytes: {32 << 20}\n"
                             f"    maxConnectionsPerClient: {PER_CLIENT}\n")
    yield e
    e.stop()


def rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def _post_unauthenticated(port: int, results: list[bytes]) -> None:
    head = (b"POST /api/fixture/items/abc HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Content-Length: %d\r\n\r\n" % POST_BYTES)
    sock = socket.create_connection(("127.0.0.1", port), timeout=20)
    received = bytearray()

    def send() -> None:
        chunk = b"x" * 65536
        try:
            sock.sendall(head)
            for _ in range(POST_BYTES // len(chunk)):
                sock.sendall(chunk)
        except OSError:
            pass  # the proxy may close once it has answered

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    try:
        while chunk := sock.recv(65536):
            received += chunk
    except OSError:
        pass
    sender.join(30)
    sock.close()
    results.append(bytes(received))


def test_unauthenticated_large_posts_are_refused_from_the_head_and_memory_stays_flat(env):
    for _ in range(3):  # warm up: imports, first connections, JWKS
        assert send_raw(env.port, b"GET /api/fixture/open/abc HTTP/1.1\r\nHost: x\r\n"
                                  b"Connection: close\r\n\r\n").status == 200
    time.sleep(0.5)
    idle = rss(env.pid)
    before = len(env.up.requests())
    results: list[bytes] = []
    threads = [threading.Thread(target=_post_unauthenticated, args=(env.port, results))
               for _ in range(POSTS)]
    peak = idle
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        peak = max(peak, rss(env.pid))
        time.sleep(0.02)
    for t in threads:
        t.join(60)
    time.sleep(0.3)
    after = rss(env.pid)
    print(f"RSS idle {idle / 2**20:.1f} MiB, peak {peak / 2**20:.1f} MiB, after "
          f"{after / 2**20:.1f} MiB ({POSTS} x {POST_BYTES >> 20} MiB unauthenticated POSTs)")
    assert len(results) == POSTS
    assert all(r.startswith(b"HTTP/1.1 401 ") for r in results), [r[:40] for r in results]
    assert env.up.requests()[before:] == []
    assert after - idle < RSS_SLACK, f"RSS {idle >> 20} MiB idle, {after >> 20} MiB after"
    assert peak - idle < RSS_SLACK, f"RSS {idle >> 20} MiB idle, peak {peak >> 20} MiB"
    assert env.alive() and not env.crash_lines()


def _held(port: int, source: str) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.settimeout(5)
    sock.bind((source, 0))
    sock.connect(("127.0.0.1", port))
    return sock


def _closed_by_peer(sock: socket.socket, timeout: float = 5.0) -> bool:
    sock.settimeout(timeout)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def test_per_client_connection_cap_holds_while_another_client_is_served(env):
    held = [_held(env.port, "127.0.0.1") for _ in range(PER_CLIENT)]
    try:
        # Each held connection is open and usable (a request on the first one is answered).
        held[0].sendall(b"GET /api/fixture/open/abc HTTP/1.1\r\nHost: x\r\n\r\n")
        assert held[0].recv(65536).startswith(b"HTTP/1.1 200 ")
        extra = _held(env.port, "127.0.0.1")
        try:
            assert _closed_by_peer(extra), "a connection over maxConnectionsPerClient was kept"
        finally:
            extra.close()
        other = _held(env.port, "127.0.0.2")  # another client address
        try:
            other.sendall(b"GET /api/fixture/open/abc HTTP/1.1\r\nHost: x\r\n"
                          b"Connection: close\r\n\r\n")
            assert other.recv(65536).startswith(b"HTTP/1.1 200 ")
        finally:
            other.close()
    finally:
        for sock in held:
            sock.close()
    # Once the first client's connections are closed, it is admitted again.
    deadline = time.monotonic() + 5
    while True:
        again = _held(env.port, "127.0.0.1")
        try:
            again.sendall(b"GET /api/fixture/open/abc HTTP/1.1\r\nHost: x\r\n"
                          b"Connection: close\r\n\r\n")
            data = again.recv(65536)
        except OSError:
            data = b""
        finally:
            again.close()
        if data.startswith(b"HTTP/1.1 200 ") or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert data.startswith(b"HTTP/1.1 200 ")
    assert any("maxConnectionsPerClient" in line for line in env.sidecar.stderr_lines)


def test_a_low_fd_limit_and_hundreds_of_idle_connections_starve_no_one_and_flood_no_log(
        tmp_path_factory):
    """The issue's case: a low file-descriptor limit, 300 idle connections from one client.
    The caps (maxConnections from the fd limit, at most 3/4 of it per address) keep the proxy
    under its limit: another client is served, and stderr has no traceback flood."""
    import resource

    e = HardEnv(tmp_path_factory.mktemp("hard-lowfd"))
    held: list[socket.socket] = []
    try:
        resource.prlimit(e.pid, resource.RLIMIT_NOFILE, (160, 160))  # maxConnections 48
        for _ in range(300):
            try:
                held.append(_held(e.port, "127.0.0.1"))
            except OSError:
                break
        time.sleep(0.5)
        assert e.open_fds() < 160
        other = _held(e.port, "127.0.0.2")
        try:
            other.sendall(b"GET /api/fixture/open/abc HTTP/1.1\r\nHost: x\r\n"
                          b"Connection: close\r\n\r\n")
            answer = other.recv(65536)
        finally:
            other.close()
        assert answer.startswith(b"HTTP/1.1 200 "), answer[:100]
        lines = e.sidecar.stderr_lines
        assert sum("Traceback" in line for line in lines) <= 2, lines[-5:]
        refusals = [line for line in lines if "refusing a connection" in line]
        assert 1 <= len(refusals) <= 5, len(refusals)  # one line per cause per interval
        assert e.alive()
    finally:
        for sock in held:
            sock.close()
        e.stop()
