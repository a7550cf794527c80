"""A request is forwarded with the settings of the state it was decided on, even when a reload
lands while it waits (here: on the permission backend).

Two configs alternate under load. Each names its own upstream path prefix (``/a`` or ``/b``,
read by the policy, so it is part of the decision) and its own identity header names
(``x-a-*`` or ``x-b-*``, read when forwarding). Every request waits on a slow permission
backend between being decided and being forwarded, which is where a reload lands. A request
decided under config A must arrive at ``/a`` with only ``x-a-*`` identity headers, and one
decided under B at ``/b`` with only ``x-b-*``.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import pytest
from mitmproxy.test import tflow

from stagedoor.decide import Forward
from stagedoor.devkeys import DevKey, mint_user_token
from stagedoor.runtime import Runtime, load_state
from stagedoor_addons.gateway import Gateway
from stagedoor_addons.record import record_of

from .conftest import LoopbackServer, RecordingServer, start_sidecar

USER_JWKS = "/api/auth/.well-known/jwks.json"
POLICY = """\
pluginId: rc
routes:
  - path: /items/{id}
    auth: [user]
    params: {id: '^[a-z0-9]+$'}
    permission: rc.read
    upstream: ${rc.upstreamUrl}/items/{id}
permissions:
  - permission: rc.read
    effect: delegate
"""
ROUNDS = 12          # config switches while the load runs
REQUEST_CAP = 4000   # bounds the load whatever happens
PERMISSION_DELAY = 0.03  # how long the permission backend takes (where a reload lands)


class Backend(LoopbackServer):
    """The Backstage backend the sidecar talks to: user keys and a slow permission backend."""

    def __init__(self, key: DevKey) -> None:
        self.jwks = json.dumps(key.jwks()).encode()
        self.asked = 0
        super().__init__(_BackendHandler)


class _BackendHandler(BaseHTTPRequestHandler):
    server: Backend
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _send(self, payload: bytes) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def do_GET(self) -> None:
        self._send(self.server.jwks if self.path == USER_JWKS else b"{}")

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers.get("content-length") or 0)))
        self.server.asked += 1
        time.sleep(PERMISSION_DELAY)
        self._send(json.dumps({"items": [{"id": item["id"], "result": "ALLOW"}
                                         for item in body["items"]]}).encode())


def config_text(backend: str, upstream: str, which: str) -> str:
    return (f"backend: {{baseUrl: '{backend}'}}\n"
            f"rc: {{upstreamUrl: '{upstream}/{which}'}}\n"
            "stagedoor:\n"
            "  reload: {watch: false}\n"
            f"  identityHeaders: {{principal: x-{which}-principal, "
            f"principalType: x-{which}-type}}\n"
            "  accessLog: {enabled: false}\n"
            # a busy machine must not turn the slow backend into a deny: generous timeout
            "  permissions: {timeoutSeconds: 30}\n")


def write_atomically(path: Path, text: str) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


@pytest.fixture
def files(tmp_path: Path) -> Iterator[tuple[Path, Path, Backend, RecordingServer, DevKey]]:
    key = DevKey.generate("ES256", kid="user-1")
    backend, upstream = Backend(key), RecordingServer("json")
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "rc.yaml").write_text(POLICY)
    config = tmp_path / "app-config.yaml"
    config.write_text(config_text(backend.url, upstream.url, "a"))
    yield config, policies, backend, upstream, key
    backend.stop()
    upstream.stop()


def wait_for(predicate: Callable[[], object], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def _identity(headers: dict[str, list[str]]) -> dict[str, list[str]]:
    return {name: value for name, value in headers.items()
            if name.startswith(("x-a-", "x-b-"))}


@pytest.mark.e2e
def test_reloads_under_load_forward_each_request_with_the_state_it_was_decided_on(files):
    config, policies, backend, upstream, key = files
    sidecar = start_sidecar([config], policies)
    issuer = f"{backend.url}/api/auth"
    stop = threading.Event()
    statuses: list[int] = []
    failures: list[str] = []
    lock = threading.Lock()

    def worker() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", sidecar.port, timeout=10)
        try:
            while not stop.is_set() and len(statuses) < REQUEST_CAP:
                # A token of its own per request: the permission answer is never cached, so
                # every request waits on the backend between its decision and its forwarding.
                token = mint_user_token(key, issuer=issuer,
                                        subject=f"user:default/u{uuid.uuid4().hex[:12]}")
                try:
                    conn.request("GET", "/api/rc/items/abc",
                                 headers={"Authorization": f"Bearer {token}"})
                    resp = conn.getresponse()
                    resp.read()
                except Exception as exc:
                    with lock:
                        failures.append(f"{type(exc).__name__}: {exc}")
                    conn.close()
                    conn = http.client.HTTPConnection("127.0.0.1", sidecar.port, timeout=10)
                    continue
                with lock:
                    statuses.append(resp.status)
        finally:
            conn.close()

    def reloads() -> list[str]:
        return [line for line in list(sidecar.stderr_lines) if "stagedoor reloaded" in line]

    def answered_after(count: int) -> bool:
        with lock:
            return len(statuses) >= count

    try:
        with ThreadPoolExecutor(6) as pool:
            futures = [pool.submit(worker) for _ in range(6)]
            try:
                for i in range(ROUNDS):
                    # some traffic on this state, then the switch, applied before the next one
                    seen_so_far = len(statuses)
                    wait_for(lambda n=seen_so_far: answered_after(n + 20), 30, "traffic")
                    write_atomically(config, config_text(backend.url, upstream.url,
                                                         "b" if i % 2 == 0 else "a"))
                    sidecar.proc.send_signal(signal.SIGHUP)
                    wait_for(lambda i=i: len(reloads()) > i, 30, f"reload {i + 1}")
                seen_so_far = len(statuses)
                wait_for(lambda: answered_after(seen_so_far + 20), 30, "traffic at the end")
            finally:
                stop.set()
            for f in futures:
                f.result()
        applied = reloads()
    finally:
        sidecar.stop()

    assert failures == []
    assert statuses and set(statuses) == {200}, set(statuses)
    assert len(applied) == ROUNDS, applied
    seen = {"a": 0, "b": 0}
    mixed = []
    for request in upstream.seen:
        which = request.path.split("/")[1]
        identity = _identity(request.headers)
        subject = identity.get(f"x-{which}-principal", [""])[0]
        if sorted(identity) != [f"x-{which}-principal", f"x-{which}-type"] \
                or not subject.startswith("user:default/u") \
                or identity[f"x-{which}-type"] != ["user"]:
            mixed.append((request.path, identity))
        seen[which] = seen.get(which, 0) + 1
    assert not mixed, mixed[:5]
    assert seen["a"] and seen["b"], seen  # both states forwarded while the load ran
    assert len(upstream.seen) == len(statuses)
    assert backend.asked >= len(statuses)  # every one of them waited on the backend


# -- the same property in process, with the reload placed exactly --------------------------------
class _HeldAuthorizer:
    """A permission backend that answers only when told to (the reload happens meanwhile)."""

    def __init__(self) -> None:
        self.asked = asyncio.Event()
        self.release = asyncio.Event()
        self.answers: dict[str | None, bool] = {}

    def groups_for(self, principal: object) -> frozenset[str]:
        return frozenset()

    def membership_of(self, principal: object, token: object) -> tuple[frozenset[str], str]:
        return frozenset(), "subject"

    def cached(self, token: str | None, permission: str) -> bool | None:
        return self.answers.get(token)

    async def resolve(self, token: str | None, permission: str, *_: object) -> bool:
        self.asked.set()
        await self.release.wait()
        self.answers[token] = True
        return True


def test_a_reload_while_a_request_waits_does_not_change_how_it_is_forwarded(files):
    config, policies, backend, upstream, key = files
    token = mint_user_token(key, issuer=f"{backend.url}/api/auth")

    async def scenario() -> tuple[Any, Any]:
        runtime = Runtime.load([str(config)], str(policies))
        held = _HeldAuthorizer()
        await runtime.state.verifier.prefetch()
        runtime.state = replace(runtime.state, authorizer=held)
        gateway = Gateway(runtime)
        flow = tflow.tflow()
        flow.request.path = "/api/rc/items/abc"
        flow.request.headers["Host"] = "127.0.0.1"
        flow.request.headers["Authorization"] = f"Bearer {token}"
        flow.request.headers["x-a-principal"] = "spoofed"
        async def through_the_gateway() -> None:
            await gateway.requestheaders(flow)  # decided on the head (waits on the backend)
            await gateway.request(flow)  # the body is in: forwarded

        task = asyncio.create_task(through_the_gateway())
        await asyncio.wait_for(held.asked.wait(), 10)
        # The reload lands while the request waits on the permission backend.
        config.write_text(config_text(backend.url, upstream.url, "b"))
        runtime.apply(replace(load_state([str(config)], str(policies), runtime.state),
                              authorizer=held))
        held.release.set()
        await asyncio.wait_for(task, 10)
        gateway._cancel_timer(flow)
        return flow, runtime

    flow, runtime = asyncio.run(scenario())
    record = record_of(flow.metadata)
    assert record is not None and isinstance(record.decision, Forward)
    assert runtime.state is not record.state  # the reload did happen
    assert flow.request.path == "/a/items/abc"
    names = {name.decode().lower() for name, _ in flow.request.headers.fields}
    assert {"x-a-principal", "x-a-type"} <= names
    assert not any(name.startswith("x-b-") for name in names)
    assert flow.request.headers.get_all("x-a-principal") == ["user:default/jane"]
