"""The event loop (stagedoor/eventloop.py): uvloop where installed, asyncio on request, and the
same gateway on both.

The rest of the suite runs its sidecars on the default loop (uvloop on Linux, where it is a
dependency); the end-to-end tests here run one real ``stagedoor run`` per loop through what
leans hardest on the loop: a token verified against a real JWKS endpoint, an upstream rewrite,
mitmproxy's error page replaced by JSON (a refused upstream), the upstream timeout (a loop timer
closing the server connection), the request-head limit, and a graceful SIGTERM.
"""

from __future__ import annotations

import asyncio
import shutil
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from stagedoor import eventloop
from stagedoor.devkeys import generate_dev_keys, mint_user_token

from .conftest import (
    ROOT,
    RecordingServer,
    Sidecar,
    SilentServer,
    closed_port,
    start_sidecar,
    write_config,
)
from .httpraw import request, send_raw

LOOPS = ("uvloop", "asyncio")

FIXTURE_POLICY = """\
pluginId: fixture
routes:
  - path: /down
    auth: unauthenticated
    upstream: ${fixture.downUrl}/down
  - path: /slow
    auth: unauthenticated
    timeout: 1s
    upstream: ${fixture.silentUrl}/slow
"""


# -- choosing ------------------------------------------------------------------------------------
def test_auto_takes_uvloop_where_installed():
    pytest.importorskip("uvloop")  # a Linux dependency: installed wherever the suite runs in CI
    choice = eventloop.choose(None, env={})
    assert choice.name == "uvloop" and "default" in choice.reason
    loop = choice.factory()
    try:
        assert type(loop).__module__.startswith("uvloop")
    finally:
        loop.close()


def test_asyncio_is_forced_by_config_or_by_the_environment_which_wins():
    assert eventloop.choose("asyncio", env={}).name == "asyncio"
    forced = eventloop.choose("uvloop", env={eventloop.ENV_VAR: "asyncio"})
    assert forced.name == "asyncio" and eventloop.ENV_VAR in forced.reason
    loop = forced.factory()
    try:
        assert isinstance(loop, asyncio.SelectorEventLoop)
    finally:
        loop.close()


def test_unknown_names_are_refused_with_where_they_came_from():
    with pytest.raises(eventloop.EventLoopError, match=r"stagedoor\.eventLoop.*'tokio'"):
        eventloop.choose("tokio", env={})
    with pytest.raises(eventloop.EventLoopError, match=eventloop.ENV_VAR):
        eventloop.choose(None, env={eventloop.ENV_VAR: "fast"})


def test_uvloop_asked_for_but_missing_is_an_error_and_auto_falls_back(monkeypatch):
    monkeypatch.setattr(eventloop, "_uvloop", lambda: None)
    with pytest.raises(eventloop.EventLoopError, match="not installed"):
        eventloop.choose("uvloop", env={})
    fallback = eventloop.choose(None, env={})
    assert fallback.name == "asyncio" and "not installed" in fallback.reason


@pytest.mark.parametrize("loop_name", LOOPS)
def test_reuse_port_applies_to_the_shared_port_only_on_both_loops(loop_name):
    if loop_name == "uvloop":
        pytest.importorskip("uvloop")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]

    async def main() -> tuple[int, int, str]:
        shared = await asyncio.start_server(lambda r, w: None, "127.0.0.1", port)
        other = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
        flags = (shared.sockets[0].getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT),
                 other.sockets[0].getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT))
        shared.close()
        other.close()
        return (*flags, eventloop.running_loop_name())

    factory = eventloop.choose(loop_name, env={}, reuse_port=port).factory
    shared_flag, other_flag, running = asyncio.run(main(), loop_factory=factory)
    assert shared_flag and not other_flag
    assert running == loop_name


# -- the gateway on each loop ----------------------------------------------------------------------
class LoopEnv:
    def __init__(self, tmp: Path, loop_name: str) -> None:
        self.upstream = RecordingServer("json")
        self.silent = SilentServer()
        keys = generate_dev_keys(tmp / "keys")
        self.upstream.jwks = keys.user_jwks()
        policies = tmp / "policies"
        policies.mkdir()
        shutil.copy(ROOT / "policies" / "insights.yaml", policies / "insights.yaml")
        (policies / "fixture.yaml").write_text(FIXTURE_POLICY)
        config = write_config(tmp / "app-config.yaml", f"""\
            backend:
              baseUrl: {self.upstream.url}
            insights:
              externalApiUrl: {self.upstream.url}
            fixture:
              downUrl: http://127.0.0.1:{closed_port()}
              silentUrl: {self.silent.url}
            stagedoor:
              limits:
                maxHeaderBytes: 4096
            """)
        self.sidecar: Sidecar = start_sidecar([config], policies,
                                              env={eventloop.ENV_VAR: loop_name})
        self.token = mint_user_token(keys.user, issuer=f"{self.upstream.url}/api/auth")

    def stop(self) -> None:
        self.sidecar.stop()
        self.upstream.stop()
        self.silent.stop()


@pytest.fixture(scope="module", params=LOOPS)
def loop_env(request: pytest.FixtureRequest,
             tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, LoopEnv]]:
    if request.param == "uvloop":
        pytest.importorskip("uvloop")
    env = LoopEnv(tmp_path_factory.mktemp(request.param), request.param)
    yield request.param, env
    env.stop()


@pytest.mark.e2e
def test_the_gateway_runs_on_the_chosen_loop(loop_env):
    name, env = loop_env
    port = env.sidecar.port
    assert any(f"event loop: {name}" in line for line in env.sidecar.stderr_lines), \
        env.sidecar.stderr_lines

    ok = request(port, "GET", "/api/insights/services/payments-api",
                 {"Authorization": f"Bearer {env.token}"})
    assert ok.status == 200, ok.body
    assert env.upstream.seen[-1].path == "/v1/services/payments-api"
    assert "authorization" not in env.upstream.seen[-1].headers
    assert request(port, "GET", "/api/insights/services/payments-api").status == 401

    down = request(port, "GET", "/api/fixture/down")  # mitmproxy's error page, as JSON
    assert down.status == 502 and down.json()["response"] == {"statusCode": 502}
    slow = request(port, "GET", "/api/fixture/slow")  # a loop timer closes the connection
    assert slow.status == 504 and slow.json()["response"] == {"statusCode": 504}
    big = send_raw(port, b"GET /api/insights/health HTTP/1.1\r\nHost: x\r\nX-Big: "
                   + b"a" * 5000 + b"\r\n\r\n")
    assert big.status == 431 and big.json()["response"] == {"statusCode": 431}

    # (a head refused by the limit never becomes a flow, so it has no access-log line)
    deadline = time.monotonic() + 5
    while len(env.sidecar.access_log()) < 4 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert [r["status"] for r in env.sidecar.access_log()] == [200, 401, 502, 504]


@pytest.mark.e2e
def test_sigterm_drains_and_exits_zero_on_the_chosen_loop(loop_env):
    _, env = loop_env
    assert request(env.sidecar.port, "GET", "/api/insights/health").status == 200
    env.sidecar.proc.send_signal(signal.SIGTERM)
    assert env.sidecar.proc.wait(20) == 0, "\n".join(env.sidecar.stderr_lines[-20:])
    assert any("stagedoor stopped" in line for line in env.sidecar.stderr_lines)
