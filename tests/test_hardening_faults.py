"""Faults around the proxy: upstreams that refuse, reset, babble, stall or flood; policy and
config files replaced by garbage while it runs. Invariant: JSON errors, the proxy keeps
serving everyone else, nothing crashes, and a huge answer is streamed, not buffered."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from .hardening import (
    FAULT_CASES,
    HUGE_BODY_BYTES,
    POLICY_GARBAGE,
    STREAM_RESPONSE_BYTES,
    HardEnv,
    _billion_laughs,
    is_json_error,
)
from .httpraw import request

pytestmark = pytest.mark.e2e

CONFIG_GARBAGE: list[tuple[str, bytes | None]] = [
    ("binary junk", bytes(range(256)) * 4),
    ("not a mapping", b"- 1\n- 2\n"),
    ("billion laughs (9 levels of aliases)", _billion_laughs(9, "stagedoor:\n  x: ")),
    ("negative body limit", None),  # the real config with maxBodyBytes: -1 (filled in below)
]


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HardEnv]:
    e = HardEnv(tmp_path_factory.mktemp("hard-faults"))
    yield e
    e.stop()


@pytest.mark.parametrize(("path", "status", "name"), FAULT_CASES,
                         ids=[c[0] for c in FAULT_CASES])
def test_upstream_fault(env, path, status, name):
    started = time.monotonic()
    resp = request(env.port, "GET", f"/api/fixture{path}", timeout=10)
    elapsed = time.monotonic() - started
    assert is_json_error(resp, status), (resp.status, resp.body[:300])
    assert resp.json()["error"]["name"] == name
    assert resp.json()["request"] == {"method": "GET", "url": path}
    assert resp.header("x-frame-options") == "SAMEORIGIN"
    assert b"<html" not in resp.body.lower()
    assert elapsed < 2.5, elapsed  # the route timeout is 1 s; the slow upstream takes 3 s
    assert env.healthy()


def test_faults_in_parallel_do_not_hold_up_good_requests(env):
    """Stalled upstreams occupy 16 requests while 60 good ones go through promptly."""
    def fault(i: int) -> int:
        kind = ("slow-head", "slow-body", "reset-body", "garbage")[i % 4]
        return request(env.port, "GET", f"/api/fixture/fault/{kind}", timeout=10).status

    def good(_: int) -> float:
        t0 = time.monotonic()
        resp = request(env.port, "GET", "/api/fixture/items/abc",
                       {"Authorization": f"Bearer {env.token}"})
        assert resp.status == 200
        return time.monotonic() - t0

    with ThreadPoolExecutor(24) as pool:
        faults = [pool.submit(fault, i) for i in range(16)]
        time.sleep(0.1)
        latencies = list(pool.map(good, range(60)))
        statuses = {f.result() for f in faults}
    assert statuses <= {502, 504}, statuses
    assert max(latencies) < 1.0, max(latencies)


def _peak_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


@pytest.mark.parametrize("kind", ["huge", "huge-chunked"])
def test_a_huge_answer_is_streamed_not_buffered(env, kind):
    """The upstream sends part of a 64 MiB answer and waits: the client already has the head
    and those bytes (so nothing waits for the whole body), with the security headers; after
    the rest, the proxy's peak memory grew by far less than the body."""
    env.up.pause_huge_at = 4 * STREAM_RESPONSE_BYTES
    env.up.release.clear()
    peak_before = _peak_rss_kib(env.pid)
    sock = socket.create_connection(("127.0.0.1", env.port), timeout=10)
    try:
        sock.sendall(f"GET /api/fixture/fault/{kind} HTTP/1.1\r\nHost: x\r\n"
                     "Connection: close\r\n\r\n".encode())
        got = b""
        deadline = time.monotonic() + 8
        while len(got) < 2 * STREAM_RESPONSE_BYTES and time.monotonic() < deadline:
            chunk = sock.recv(65536)
            if not chunk:
                break
            got += chunk
        head, _, first = got.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200"), head[:200]
        assert b"X-Frame-Options: SAMEORIGIN" in head
        assert len(first) >= STREAM_RESPONSE_BYTES, "the body was held back until complete"
        assert env.up.huge_sent < HUGE_BODY_BYTES
        env.up.release.set()
        total = len(first)
        while True:
            chunk = sock.recv(1 << 20)
            if not chunk:
                break
            total += len(chunk)
    finally:
        env.up.release.set()
        env.up.pause_huge_at = 0
        sock.close()
    assert total >= HUGE_BODY_BYTES  # (chunk framing adds a little for huge-chunked)
    grown_mib = (_peak_rss_kib(env.pid) - peak_before) / 1024
    assert grown_mib < 24, f"peak memory grew by {grown_mib:.0f} MiB for a 64 MiB answer"
    assert env.healthy()


def test_head_requests_and_small_answers_are_not_streamed(env):
    resp = request(env.port, "GET", "/api/fixture/fault/ok")
    assert resp.status == 200 and resp.header("content-length")
    assert resp.header("x-frame-options") == "SAMEORIGIN"


# -- files replaced by garbage while the proxy runs --------------------------------------------
def _wait_for(env: HardEnv, needle: str, count: int, timeout: float = 8.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if sum(needle in line for line in env.sidecar.stderr_lines) >= count:
            return True
        time.sleep(0.05)
    return False


def _still_serving(env: HardEnv) -> None:
    resp = request(env.port, "GET", "/api/fixture/items/abc",
                   {"Authorization": f"Bearer {env.token}"})
    assert resp.status == 200, resp.body
    assert env.healthy()


def test_policy_replaced_by_garbage_keeps_the_last_good_policy(env):
    policy = env.policy_dir / "fixture.yaml"
    good = policy.read_bytes()
    refused = sum("reload refused" in line for line in env.sidecar.stderr_lines)
    try:
        for label, garbage in POLICY_GARBAGE:
            policy.write_bytes(garbage)
            refused += 1
            started = time.monotonic()
            assert _wait_for(env, "reload refused", refused), f"{label}: no refusal logged"
            assert time.monotonic() - started < 8, label
            _still_serving(env)
            assert env.alive(), label
    finally:
        policy.write_bytes(good)  # the same bytes as the running policy: nothing to reload
    _still_serving(env)
    assert not env.crash_lines(), env.crash_lines()


def test_config_replaced_by_garbage_keeps_the_last_good_config(env):
    good = env.config_file.read_bytes()
    refused = sum("reload refused" in line for line in env.sidecar.stderr_lines)
    try:
        for label, garbage in CONFIG_GARBAGE:
            if garbage is None:
                garbage = good.replace(b"maxBodyBytes: ", b"maxBodyBytes: -")
            env.config_file.write_bytes(garbage)
            refused += 1
            assert _wait_for(env, "reload refused", refused), f"{label}: no refusal logged"
            _still_serving(env)
    finally:
        env.config_file.write_bytes(good)
        os.utime(env.config_file)
    _still_serving(env)
    assert env.alive() and not env.crash_lines(), env.crash_lines()


def test_connection_close_is_honoured_on_forwarded_answers(env):
    """Regression: the gateway strips the client's Connection header before forwarding, and
    mitmproxy decided from that very header whether to close; the client's "close" was lost
    and the connection stayed open until the idle timeout."""
    for path in ("/api/fixture/fault/ok", "/api/insights/health"):
        sock = socket.create_connection(("127.0.0.1", env.port), timeout=3)
        try:
            sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
            data = b""
            while chunk := sock.recv(65536):  # ends only if the proxy closes
                data += chunk
        finally:
            sock.close()
        assert data.startswith(b"HTTP/1.1 200"), data[:100]
