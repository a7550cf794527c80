"""A bounded soak: N requests of mixed good and bad traffic against one real sidecar on
127.0.0.1, over keep-alive connections from several threads.

Pass: every answer has the status its kind must get (no 5xx except the deliberate 502 of a
refused upstream), no request that must be refused reaches the upstream, the sidecar is still
alive, and its open file descriptors (/proc/<pid>/fd) are back to where they were once the
clients have gone.

    python -m tests.soak                   # 100,000 requests over 8 connections (~3-4 min)
    python -m tests.soak --requests 5000 --json

tests/test_hardening_soak.py runs a 2,000-request version in the normal suite.
"""

from __future__ import annotations

import argparse
import http.client
import json
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from stagedoor.devkeys import DevKey

from .hardening import MAX_BODY_BYTES, HardEnv

MAX_SECONDS = 900  # the soak stops by itself, finished or not


@dataclass(frozen=True)
class Kind:
    name: str
    method: str
    target: str
    status: int
    auth: str = "user"  # user | none | bad | forged | service-only
    body: bytes = b""
    extra: tuple[tuple[str, str], ...] = ()
    forwards: bool = False  # reaches the upstream
    weight: int = 1


KINDS: list[Kind] = [
    Kind("forward GET", "GET", "/api/fixture/items/abc?x=1", 200, forwards=True, weight=8),
    Kind("forward POST", "POST", "/api/fixture/items/abc", 200, body=b'{"a":1}', forwards=True,
         weight=3),
    Kind("forward loose value", "GET", "/api/fixture/loose/a%20b%3Fc", 200, forwards=True,
         weight=2),
    Kind("unauthenticated forward", "GET", "/api/fixture/fault/ok", 200, auth="none",
         forwards=True, weight=2),
    Kind("local health", "GET", "/api/insights/health", 200, auth="none", weight=4),
    Kind("HEAD", "HEAD", "/api/fixture/items/abc", 200, forwards=True),
    Kind("no credentials", "GET", "/api/fixture/items/abc", 401, auth="none", weight=3),
    Kind("garbage token", "GET", "/api/fixture/items/abc", 401, auth="bad", weight=2),
    Kind("forged token", "GET", "/api/fixture/items/abc", 401, auth="forged", weight=2),
    Kind("unknown route, no token", "GET", "/api/fixture/secret", 401, auth="none"),
    Kind("unknown plugin", "GET", "/api/nope/x", 404, weight=2),
    Kind("unknown route", "GET", "/api/fixture/secret", 404),
    Kind("traversal", "GET", "/api/fixture/items/..%2fadmin", 400, weight=2),
    Kind("dot segment", "GET", "/api/fixture/items/abc/../../admin", 400),
    Kind("bad parameter", "GET", "/api/fixture/items/ABC", 400, weight=2),
    Kind("wrong method", "PATCH", "/api/fixture/items/abc", 405),
    Kind("service-only route", "GET", "/api/fixture/admin", 403),
    Kind("body over the limit", "POST", "/api/fixture/items/abc", 413,
         extra=(("Content-Length", str(MAX_BODY_BYTES + 1)),)),
    Kind("too many headers", "GET", "/api/fixture/items/abc", 431,
         extra=tuple((f"X-H{i}", "v") for i in range(60))),
    Kind("refused upstream", "GET", "/api/fixture/refused", 502, auth="none"),
]


def schedule() -> list[Kind]:
    """One round of the mix, interleaved by weight (deterministic)."""
    out: list[Kind] = []
    for round_ in range(max(k.weight for k in KINDS)):
        out += [k for k in KINDS if k.weight > round_]
    return out


@dataclass
class Result:
    requests: int = 0
    seconds: float = 0.0
    by_kind: Counter[str] = field(default_factory=Counter)
    unexpected: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    fds_idle_before: int = 0
    fds_idle_after: int = 0
    fds_peak: int = 0
    rss_kib_before: int = 0
    rss_kib_after: int = 0
    upstream_seen: int = 0
    upstream_expected: int = 0
    bad_upstream_targets: list[str] = field(default_factory=list)
    sidecar_alive: bool = True
    crash_lines: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return (not self.unexpected and not self.errors and self.sidecar_alive
                and not self.crash_lines and not self.bad_upstream_targets
                and self.upstream_seen == self.upstream_expected
                and self.fds_idle_after <= self.fds_idle_before + 2)

    def summary(self) -> dict[str, object]:
        return {
            "ok": self.ok, "requests": self.requests, "seconds": round(self.seconds, 1),
            "requests_per_second": round(self.requests / self.seconds) if self.seconds else 0,
            "unexpected_statuses": dict(self.unexpected), "client_errors": dict(self.errors),
            "fds_idle_before": self.fds_idle_before, "fds_idle_after": self.fds_idle_after,
            "fds_peak": self.fds_peak, "rss_mib_before": round(self.rss_kib_before / 1024, 1),
            "rss_mib_after": round(self.rss_kib_after / 1024, 1),
            "upstream_seen": self.upstream_seen, "upstream_expected": self.upstream_expected,
            "bad_upstream_targets": self.bad_upstream_targets[:5],
            "sidecar_alive": self.sidecar_alive, "crash_lines": self.crash_lines[:3],
            "by_kind": dict(self.by_kind),
        }


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


class _Worker(threading.Thread):
    def __init__(self, env: HardEnv, kinds: list[Kind], headers: dict[str, dict[str, str]],
                 result: Result, lock: threading.Lock, deadline: float) -> None:
        super().__init__(daemon=True)
        self.env, self.kinds, self.headers = env, kinds, headers
        self.result, self.lock, self.deadline = result, lock, deadline
        self.conn: http.client.HTTPConnection | None = None
        self.local = Counter[str]()
        self.bad = Counter[str]()
        self.errors = Counter[str]()

    def _connection(self) -> http.client.HTTPConnection:
        if self.conn is None:
            self.conn = http.client.HTTPConnection("127.0.0.1", self.env.port, timeout=10)
        return self.conn

    def _drop(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None

    def run(self) -> None:
        for kind in self.kinds:
            if time.monotonic() > self.deadline:
                break
            try:
                conn = self._connection()
                conn.putrequest(kind.method, kind.target, skip_accept_encoding=True)
                for name, value in (*self.headers[kind.auth].items(), *kind.extra):
                    conn.putheader(name, value)
                if kind.body:
                    conn.putheader("Content-Length", str(len(kind.body)))
                conn.endheaders(kind.body or None)
                resp = conn.getresponse()
                resp.read()
                status = resp.status
                if resp.getheader("connection", "").lower() == "close" or resp.will_close:
                    self._drop()
            except (OSError, http.client.HTTPException) as exc:
                self._drop()
                self.errors[f"{kind.name}: {type(exc).__name__}"] += 1
                continue
            self.local[kind.name] += 1
            if status != kind.status:
                self.bad[f"{kind.name}: {status}"] += 1
        self._drop()
        with self.lock:
            self.result.by_kind.update(self.local)
            self.result.unexpected.update(self.bad)
            self.result.errors.update(self.errors)


def run_soak(requests: int = 100_000, concurrency: int = 8, env: HardEnv | None = None,
             progress: bool = False) -> Result:
    own = env is None
    tmp = Path(tempfile.mkdtemp(prefix="stagedoor-soak-"))
    env = env or HardEnv(tmp)
    result = Result()
    try:
        evil = DevKey.generate("ES256", kid=env.user_key.kid)
        headers = {
            "user": {"Authorization": f"Bearer {env.token}"},
            "none": {},
            "bad": {"Authorization": "Bearer not-a-token"},
            "forged": {"Authorization": f"Bearer {env.user_token(key=evil)}"},
        }
        mix = schedule()
        # warm up (key fetch, first connections), then let the clients go
        for kind in mix:
            conn = http.client.HTTPConnection("127.0.0.1", env.port, timeout=10)
            conn.request(kind.method, kind.target, body=kind.body or None,
                         headers={**headers[kind.auth], **dict(kind.extra)})
            conn.getresponse().read()
            conn.close()
        time.sleep(0.5)
        result.fds_idle_before = env.open_fds()
        result.rss_kib_before = _rss_kib(env.pid)
        seen_before = len(env.up.requests())

        plan = [mix[i % len(mix)] for i in range(requests)]
        result.upstream_expected = sum(k.forwards for k in plan)
        lock = threading.Lock()
        deadline = time.monotonic() + MAX_SECONDS
        workers = [_Worker(env, plan[i::concurrency], headers, result, lock, deadline)
                   for i in range(concurrency)]
        started = time.monotonic()
        for w in workers:
            w.start()
        while any(w.is_alive() for w in workers):
            result.fds_peak = max(result.fds_peak, env.open_fds())
            if progress:
                done = sum(sum(w.local.values()) for w in workers)
                print(f"\r{done:>7}/{requests} requests, {env.open_fds()} fds", end="",
                      file=sys.stderr, flush=True)
            time.sleep(0.5)
        for w in workers:
            w.join()
        result.seconds = time.monotonic() - started
        if progress:
            print(file=sys.stderr)
        result.requests = sum(result.by_kind.values()) + sum(result.errors.values())

        time.sleep(1.0)  # let the proxy notice the closed connections
        deadline = time.monotonic() + 10
        while env.open_fds() > result.fds_idle_before and time.monotonic() < deadline:
            time.sleep(0.2)
        result.fds_idle_after = env.open_fds()
        result.rss_kib_after = _rss_kib(env.pid)
        seen = env.up.requests()[seen_before:]
        result.upstream_seen = len(seen)
        allowed = {"/v1/items/abc?x=1", "/v1/items/abc", "/v1/loose/a%20b%3Fc/end",
                   "/fault/ok"}
        result.bad_upstream_targets = [s.target for s in seen if s.target not in allowed]
        result.sidecar_alive = env.alive() and env.healthy()
        result.crash_lines = env.crash_lines()
    finally:
        if own:
            env.stop()
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.soak", description=__doc__)
    parser.add_argument("--requests", type=int, default=100_000)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--json", action="store_true", help="print the summary as JSON only")
    args = parser.parse_args(argv)
    result = run_soak(args.requests, args.concurrency, progress=not args.json)
    summary = result.summary()
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        for key, value in summary.items():
            print(f"{key:>22}: {value}")
        print("soak:", "PASS" if result.ok else "FAIL")
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
