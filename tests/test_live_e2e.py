"""Live operation end to end: hot reload under load, refused edits, a ConfigMap ``..data`` swap,
SIGHUP, the access log, metrics and health on the admin listener, and a graceful SIGTERM.
Every test runs a real `stagedoor run` process against real upstreams on 127.0.0.1."""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from stagedoor.devkeys import DevKey, mint_user_token

from .conftest import (
    LoopbackServer,
    RecordingServer,
    Sidecar,
    closed_port,
    start_sidecar,
    write_config,
)
from .httpraw import request

pytestmark = pytest.mark.e2e

_ADMIN = re.compile(r"stagedoor admin listening on http://([\d.]+):(\d+)")

POLICY_V1 = """\
pluginId: live
routes:
  - path: /version
    auth: unauthenticated
    respond: {status: 200, json: {version: 1}}
  - path: /items/{id}
    auth: unauthenticated
    params:
      id: {pattern: '^[a-z]+$', message: 'Invalid item: {value}'}
    upstream: ${live.upstreamUrl}/v1/items/{id}
"""
POLICY_V2 = POLICY_V1.replace("{version: 1}", "{version: 2}") + """\
  - path: /new
    auth: unauthenticated
    respond: {status: 200, json: {new: true}}
"""
# Line 9 of this file has a regex that does not compile.
POLICY_BROKEN = POLICY_V1.replace("'^[a-z]+$'", "'^[a-z(+$'")
BROKEN_LINE = 9


# -- helpers ---------------------------------------------------------------------------------------
def admin_port(sidecar: Sidecar) -> int:
    for line in sidecar.stderr_lines:
        match = _ADMIN.search(line)
        if match:
            return int(match.group(2))
    raise AssertionError("no admin address in the log:\n" + "\n".join(sidecar.stderr_lines))


def admin_get(sidecar: Sidecar, path: str) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", admin_port(sidecar), timeout=5)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def scrape(sidecar: Sidecar) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of /metrics, keyed by (name, sorted labels)."""
    status, body = admin_get(sidecar, "/metrics")
    assert status == 200
    samples = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def sample(samples: dict[Any, float], name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def wait_for(predicate: Callable[[], Any], timeout: float = 5.0, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}")


def log_lines(sidecar: Sidecar, text: str) -> list[str]:
    return [line for line in list(sidecar.stderr_lines) if text in line]


def get_json(sidecar: Sidecar, target: str) -> tuple[int, Any]:
    resp = request(sidecar.port, "GET", target)
    try:
        return resp.status, resp.json()
    except ValueError:
        return resp.status, None


def live_version(sidecar: Sidecar) -> int | None:
    status, body = get_json(sidecar, "/api/live/version")
    return body["version"] if status == 200 else None


@dataclass
class LiveEnv:
    tmp: Path
    upstream: RecordingServer
    policies: Path
    config: Path
    sidecar: Sidecar
    others: list[Any] = field(default_factory=list)

    def stop(self) -> int:
        code = self.sidecar.stop()
        self.upstream.stop()
        for other in self.others:
            other.stop()
        return code


def start_live(tmp: Path, *, stagedoor: str = "", policy: str = POLICY_V1,
               policy_dir: Path | None = None, upstream: Any = None) -> LiveEnv:
    """A sidecar serving ``policy`` (or ``policy_dir``); ``stagedoor`` is YAML for under the
    config's ``stagedoor:`` key, one key per line."""
    server = upstream or RecordingServer("json")
    policies = policy_dir or tmp / "policies"
    if policy_dir is None:
        policies.mkdir()
        (policies / "live.yaml").write_text(policy)
    extra = "".join(f"  {line}\n" for line in stagedoor.splitlines())
    config = write_config(tmp / "app-config.yaml", f"""\
backend:
  baseUrl: {server.url}
live:
  upstreamUrl: {server.url}
stagedoor:
  auth: {{userTokens: false, pluginTokens: false}}
{extra}""")
    sidecar = start_sidecar([config], policies)
    return LiveEnv(tmp, server, policies, config, sidecar)


@pytest.fixture
def live(tmp_path: Path) -> Iterator[LiveEnv]:
    env = start_live(tmp_path)
    yield env
    env.stop()


# -- hot reload ------------------------------------------------------------------------------------
def test_reload_under_load_loses_no_request_and_the_new_rule_takes_effect(live):
    stop = threading.Event()
    results: list[tuple[str, int, Any]] = []
    failures: list[str] = []
    lock = threading.Lock()
    cap = 3000  # bounds the test even if the reload never shows

    def worker(n: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", live.sidecar.port, timeout=10)
        i = 0
        try:
            while not stop.is_set() and len(results) + len(failures) < cap:
                target = "/api/live/version" if (i + n) % 2 else "/api/live/items/abc"
                i += 1
                try:
                    conn.request("GET", target)
                    resp = conn.getresponse()
                    body = json.loads(resp.read())
                except Exception as exc:  # a lost request: what this test is about
                    with lock:
                        failures.append(f"{target}: {type(exc).__name__}: {exc}")
                    conn.close()
                    conn = http.client.HTTPConnection("127.0.0.1", live.sidecar.port, timeout=10)
                    continue
                with lock:
                    results.append((target, resp.status, body))
        finally:
            conn.close()

    def versions() -> set[int]:
        with lock:
            return {b["version"] for t, s, b in results if t.endswith("/version") and s == 200}

    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(worker, n) for n in range(8)]
        try:
            wait_for(lambda: len(results) >= 100, 10, "100 requests before the edit")
            edited = time.monotonic()
            (live.policies / "live.yaml").write_text(POLICY_V2)  # in place, as editors save
            wait_for(lambda: 2 in versions(), 5, "the new policy to answer")
            took = time.monotonic() - edited
            at_switch = len(results)
            wait_for(lambda: len(results) >= max(at_switch + 100, 300), 10,
                     "100 requests after the edit, 300 in all")
        finally:
            stop.set()
        for f in futures:
            f.result()

    assert failures == []
    assert len(results) >= 300
    assert all(status == 200 for _, status, _ in results), \
        [r for r in results if r[1] != 200][:5]
    forwarded = [b for t, _, b in results if t.endswith("/items/abc")]
    assert all(b == {"upstream": True, "path": "/v1/items/abc", "method": "GET"}
               for b in forwarded)
    assert versions() == {1, 2}  # the reload happened while the load ran
    assert took < 2.0, took
    # afterwards only the new rule answers, and its new route exists
    assert {live_version(live.sidecar) for _ in range(20)} == {2}
    assert get_json(live.sidecar, "/api/live/new") == (200, {"new": True})
    assert len(log_lines(live.sidecar, "stagedoor reloaded")) >= 1


def test_broken_edit_is_refused_with_one_line_and_the_old_policy_keeps_serving(live):
    policy = live.policies / "live.yaml"
    policy.write_text(POLICY_BROKEN)
    refused = wait_for(lambda: log_lines(live.sidecar, "reload refused"), 5, "the refusal")
    assert len(refused) == 1
    assert f"{policy}:{BROKEN_LINE}:" in refused[0]
    assert "invalid regex" in refused[0]
    assert "still serving the last good policy" in refused[0]
    # the old rule still serves: the regex of v1 still applies
    assert get_json(live.sidecar, "/api/live/items/abc")[0] == 200
    assert get_json(live.sidecar, "/api/live/items/ABC") == (
        400, {"error": {"name": "InputError", "message": "Invalid item: ABC"},
              "request": {"method": "GET", "url": "/items/ABC"},
              "response": {"statusCode": 400}})
    # an event that changes nothing the load reads does not repeat the complaint
    (live.policies / "notes.txt").write_text("not a policy")
    time.sleep(0.6)
    assert len(log_lines(live.sidecar, "reload refused")) == 1
    # fixing the file is picked up
    policy.write_text(POLICY_V2)
    wait_for(lambda: live_version(live.sidecar) == 2, 5, "the fixed policy")
    assert len(log_lines(live.sidecar, "reload refused")) == 1
    metrics = scrape(live.sidecar)
    assert sample(metrics, "stagedoor_reloads_total", outcome="failure") == 1
    assert sample(metrics, "stagedoor_reloads_total", outcome="success") >= 1


def test_configmap_data_symlink_swap_is_picked_up(tmp_path):
    # The layout a Kubernetes ConfigMap volume has: files are symlinks through ..data, and an
    # update renames a new ..data symlink over the old one, then deletes the old directory.
    volume = tmp_path / "policies"
    volume.mkdir()
    first = volume / "..2026_11_25_10_00_00.000000001"
    first.mkdir()
    (first / "live.yaml").write_text(POLICY_V1)
    (volume / "..data").symlink_to(first.name)
    (volume / "live.yaml").symlink_to("..data/live.yaml")
    env = start_live(tmp_path, policy_dir=volume)
    try:
        assert live_version(env.sidecar) == 1
        for n, policy in ((2, POLICY_V2), (3, POLICY_V2.replace("{version: 2}",
                                                                 "{version: 3}"))):
            new = volume / f"..2026_11_25_10_0{n}_00.000000001"
            new.mkdir()
            (new / "live.yaml").write_text(policy)
            old = (volume / "..data").resolve()
            (volume / "..data_tmp").symlink_to(new.name)
            os.rename(volume / "..data_tmp", volume / "..data")
            for f in old.iterdir():
                f.unlink()
            old.rmdir()
            # twice in a row: the watch must survive the old directory vanishing
            wait_for(lambda n=n: live_version(env.sidecar) == n, 5, f"version {n}")
        assert log_lines(env.sidecar, "reload refused") == []
    finally:
        env.stop()


def test_config_change_reloads_values_the_policy_reads(tmp_path):
    other = RecordingServer("json")
    env = start_live(tmp_path)
    env.others.append(other)
    try:
        assert get_json(env.sidecar, "/api/live/items/abc")[0] == 200
        assert env.upstream.seen and not other.seen
        text = env.config.read_text().replace(f"upstreamUrl: {env.upstream.url}",
                                              f"upstreamUrl: {other.url}")
        env.config.write_text(text)
        wait_for(lambda: get_json(env.sidecar, "/api/live/items/abc")[0] == 200 and other.seen,
                 5, "requests to reach the other upstream")
        assert "kept the token verifier" in log_lines(env.sidecar, "stagedoor reloaded")[-1]
    finally:
        env.stop()


def test_sighup_reloads_when_watching_is_off(tmp_path):
    env = start_live(tmp_path, stagedoor="reload: {watch: false}")
    try:
        (env.policies / "live.yaml").write_text(POLICY_V2)
        time.sleep(0.5)
        assert live_version(env.sidecar) == 1  # not watching: nothing happens by itself
        env.sidecar.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: live_version(env.sidecar) == 2, 5, "the SIGHUP reload")
        # the line is logged right after the swap; it reaches us through the stderr pump thread,
        # which can be behind the answer that already shows the new version
        wait_for(lambda: any("(SIGHUP)" in line
                             for line in log_lines(env.sidecar, "stagedoor reloaded")),
                 5, "the reload line naming SIGHUP")
        assert env.sidecar.proc.poll() is None
    finally:
        env.stop()


# -- access log and metrics ------------------------------------------------------------------------
AUTH_POLICY = """\
pluginId: acct
routes:
  - path: /health
    auth: unauthenticated
    respond: {status: 200, json: {ok: true}}
  - path: /things/{id}
    auth: [user]
    params: {id: '^[a-z]+$'}
    upstream: ${acct.upstreamUrl}/v1/things/{id}
  - path: /down
    auth: unauthenticated
    upstream: ${acct.downUrl}/down
"""


class AuthEnv:
    def __init__(self, tmp: Path) -> None:
        self.server = RecordingServer("json")
        key = DevKey.generate("ES256", kid="live-1")
        self.server.jwks = key.jwks()
        policies = tmp / "policies"
        policies.mkdir()
        (policies / "acct.yaml").write_text(AUTH_POLICY)
        config = write_config(tmp / "app-config.yaml", f"""\
            backend:
              baseUrl: {self.server.url}
            acct:
              upstreamUrl: {self.server.url}
              downUrl: http://127.0.0.1:{closed_port()}
            stagedoor:
              accessLog:
                redactQueryKeys: [sessionid]
            """)
        self.sidecar = start_sidecar([config], policies)
        self.token = mint_user_token(key, issuer=f"{self.server.url}/api/auth")

    def get(self, target: str, token: str | None = None, **headers: str):
        all_headers = {k.replace("_", "-"): v for k, v in headers.items()}
        if token:
            all_headers["Authorization"] = f"Bearer {token}"
        return request(self.sidecar.port, "GET", target, all_headers)

    def record(self, request_id: str) -> dict[str, Any]:
        def find() -> dict[str, Any] | None:
            for rec in self.sidecar.access_log():
                if rec.get("request_id") == request_id:
                    return rec
            return None
        return wait_for(find, 5, f"the access-log line of {request_id}")


@pytest.fixture(scope="module")
def acct(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AuthEnv]:
    env = AuthEnv(tmp_path_factory.mktemp("live-acct"))
    yield env
    env.sidecar.stop()
    env.server.stop()


def test_allowed_request_is_one_json_line_with_every_field(acct):
    resp = acct.get("/api/acct/things/abc?x=1", acct.token, X_Request_Id="allow-1")
    assert resp.status == 200
    assert resp.header("x-request-id") == "allow-1"
    rec = acct.record("allow-1")
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", rec["time"])
    assert rec["method"] == "GET"
    assert rec["path"] == "/api/acct/things/abc?x=1"
    assert rec["plugin"] == "acct"
    assert rec["route"] == "/things/{id}"
    assert rec["status"] == 200
    assert rec["decision"] == "allow" and rec["check"] == "allow"
    assert rec["principal"] == "user:default/jane" and rec["principal_type"] == "user"
    assert rec["upstream_status"] == 200
    assert isinstance(rec["latency_ms"], float) and 0 <= rec["latency_ms"] < 5000
    assert isinstance(rec["upstream_ms"], float) and rec["upstream_ms"] <= rec["latency_ms"]
    assert rec["client"] == "127.0.0.1"


def test_denied_request_gets_a_request_id_and_names_the_check(acct):
    resp = acct.get("/api/acct/things/abc")
    assert resp.status == 401
    rid = resp.header("x-request-id")
    assert rid and re.fullmatch(r"[0-9a-f]{32}", rid)
    rec = acct.record(rid)
    assert rec["status"] == 401 and rec["decision"] == "deny" and rec["check"] == "barrier"
    assert "principal" not in rec and "upstream_status" not in rec
    resp = acct.get("/api/acct/things/ABC", acct.token, X_Request_Id="deny-params")
    assert resp.status == 400 and resp.header("x-request-id") == "deny-params"
    rec = acct.record("deny-params")
    assert (rec["check"], rec["route"], rec["principal"]) == ("params", "/things/{id}",
                                                              "user:default/jane")


def test_upstream_failure_is_logged_with_its_request_id(acct):
    resp = acct.get("/api/acct/down", X_Request_Id="down-1")
    assert resp.status == 502
    assert resp.header("x-request-id") == "down-1"
    rec = acct.record("down-1")
    assert (rec["status"], rec["decision"], rec["check"]) == (502, "error", "upstream")


def test_no_token_cookie_or_query_secret_reaches_any_log(acct):
    secrets = ["QSECRET-token-1", "QSECRET-encoded-2", "QSECRET-custom-3", "COOKIESECRET-4"]
    target = (f"/api/acct/things/abc?token={secrets[0]}&%74%6Fken={secrets[1]}"
              f"&SessionID={secrets[2]}&page=2")
    resp = acct.get(target, acct.token, X_Request_Id="secrets-1",
                    Cookie=f"session={secrets[3]}")
    assert resp.status == 200
    rec = acct.record("secrets-1")
    assert rec["path"] == ("/api/acct/things/abc?token=[REDACTED]&%74%6Fken=[REDACTED]"
                           "&SessionID=[REDACTED]&page=2")
    denied = acct.get(f"/api/acct/things/abc?access_token={secrets[0]}", "not-a-jwt",
                      X_Request_Id="secrets-2")
    assert denied.status == 401
    acct.record("secrets-2")
    everything = "\n".join(acct.sidecar.stdout_lines + acct.sidecar.stderr_lines)
    assert acct.token not in everything
    assert acct.token.split(".")[2] not in everything  # not even the signature
    assert "not-a-jwt" not in everything
    for secret in secrets:
        assert secret not in everything, secret
    for line in acct.sidecar.stdout_lines:
        json.loads(line)  # every stdout line is one JSON object


def test_metrics_count_requests_time_them_and_read_the_verifier(acct):
    before = scrape(acct.sidecar)
    for i in range(5):
        assert acct.get("/api/acct/things/abc", acct.token, X_Request_Id=f"m-{i}").status == 200
    for _ in range(3):
        assert acct.get("/api/acct/things/abc").status == 401
    acct.record("m-4")
    after = scrape(acct.sidecar)

    def delta(name: str, **labels: str) -> float:
        return sample(after, name, **labels) - sample(before, name, **labels)

    assert delta("stagedoor_requests_total", plugin="acct", route="/things/{id}", status="200",
                 decision="allow", check="allow") == 5
    assert delta("stagedoor_requests_total", plugin="acct", route="", status="401",
                 decision="deny", check="barrier") == 3
    assert delta("stagedoor_request_duration_seconds_count", plugin="acct",
                 route="/things/{id}") == 5
    assert delta("stagedoor_upstream_duration_seconds_count", plugin="acct",
                 route="/things/{id}") == 5
    assert delta("stagedoor_upstream_duration_seconds_sum", plugin="acct",
                 route="/things/{id}") > 0
    verified = (delta("stagedoor_token_verifications_total", outcome="ok")
                + delta("stagedoor_token_verifications_total", outcome="cached"))
    assert verified == 5
    assert sample(after, "stagedoor_jwks_fetches_total", outcome="ok") >= 1
    assert sample(after, "stagedoor_requests_in_flight") == 0
    assert sample(after, "stagedoor_policy_plugins") == 1
    assert sample(after, "stagedoor_policy_routes") == 3
    assert ("stagedoor_reloads_total", (("outcome", "success"),)) in after
    assert sample(after, "process_resident_memory_bytes") > 0


def test_admin_listener_answers_health_and_readiness(acct):
    assert admin_get(acct.sidecar, "/healthz") == (200, b'{"status": "ok"}\n')
    assert admin_get(acct.sidecar, "/readyz") == (200, b'{"status": "ready"}\n')
    assert admin_get(acct.sidecar, "/nope")[0] == 404
    # the proxy port does not serve admin paths
    assert request(acct.sidecar.port, "GET", "/metrics").status == 404


def test_log_format_and_level_come_from_config(tmp_path):
    policy = POLICY_V1 + """\
  - path: /private
    auth: [service]
    respond: {status: 200, json: {}}
"""
    env = start_live(tmp_path, policy=policy, stagedoor="log: {level: debug, format: text}")
    try:
        assert get_json(env.sidecar, "/api/live/items/ABC")[0] == 400
        line = wait_for(lambda: [x for x in env.sidecar.stdout_lines if "/items/ABC" in x], 5)[0]
        assert line.startswith("time=") and " status=400 " in line and " check=params " in line
        resp = request(env.sidecar.port, "GET", "/api/live/private",
                       {"Authorization": "Bearer not-a-jwt"})
        assert resp.status == 401
        debug = wait_for(lambda: log_lines(env.sidecar, " DEBUG stagedoor.gateway: GET "
                                                        "/private denied at barrier"), 5)
        assert "not a JWT" in debug[0] and "not-a-jwt" not in debug[0]
        with pytest.raises(ValueError):
            json.loads(env.sidecar.stderr_lines[0])
    finally:
        env.stop()


def test_admin_listener_on_a_taken_port_stops_the_start(tmp_path):
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    try:
        with pytest.raises(RuntimeError, match=r"admin cannot listen on 127\.0\.0\.1"):
            start_sidecar([write_config(tmp_path / "c.yaml", """\
                backend: {baseUrl: 'http://127.0.0.1:1'}
                insights: {externalApiUrl: 'http://127.0.0.1:1'}
                """)], Path(__file__).resolve().parent.parent / "policies",
                extra_args=["--admin", f"127.0.0.1:{taken.getsockname()[1]}"], timeout=15)
    finally:
        taken.close()


# -- graceful shutdown -----------------------------------------------------------------------------
class SlowServer(LoopbackServer):
    """An upstream that answers ``/slow/<ms>`` after that many milliseconds."""

    def __init__(self) -> None:
        self.started = threading.Event()
        super().__init__(_SlowHandler)


class _SlowHandler(BaseHTTPRequestHandler):
    server: SlowServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self.server.started.set()
        time.sleep(int(self.path.rsplit("/", 1)[1]) / 1000)
        payload = b'{"slow": true}'
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)


SLOW_POLICY = """\
pluginId: live
routes:
  - path: /slow/{ms}
    auth: unauthenticated
    params: {ms: '^[0-9]+$'}
    upstream: ${live.upstreamUrl}/slow/{ms}
"""


def connection_refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except ConnectionRefusedError:
        return True
    return False


def test_sigterm_lets_the_request_in_flight_finish_then_exits_0(tmp_path):
    slow = SlowServer()
    env = start_live(tmp_path, policy=SLOW_POLICY, upstream=slow)
    outcome: dict[str, Any] = {}

    def client() -> None:
        try:
            resp = request(env.sidecar.port, "GET", "/api/live/slow/1500", timeout=15)
            outcome["status"], outcome["body"] = resp.status, resp.body
            outcome["connection"] = resp.header("connection")
        except Exception as exc:
            outcome["error"] = repr(exc)

    try:
        thread = threading.Thread(target=client)
        thread.start()
        assert slow.started.wait(5)
        signalled = time.monotonic()
        env.sidecar.proc.send_signal(signal.SIGTERM)
        wait_for(lambda: connection_refused(env.sidecar.port), 2, "the listener to close")
        status, body = admin_get(env.sidecar, "/readyz")
        assert status == 503 and b"shutting down" in body
        assert env.sidecar.proc.wait(10) == 0
        thread.join(5)
        assert outcome.get("status") == 200, outcome
        assert outcome["body"] == b'{"slow": true}'
        assert outcome["connection"] == "close"
        assert time.monotonic() - signalled >= 1.0  # it waited for the request
        rec = next(r for r in env.sidecar.access_log() if r.get("route") == "/slow/{ms}")
        assert rec["status"] == 200
    finally:
        env.stop()


def test_sigterm_gives_up_after_the_grace_period_and_still_exits_0(tmp_path):
    slow = SlowServer()
    env = start_live(tmp_path, policy=SLOW_POLICY, upstream=slow,
                     stagedoor="shutdown: {gracePeriod: 500ms}")
    errors: list[str] = []

    def client() -> None:
        try:
            resp = request(env.sidecar.port, "GET", "/api/live/slow/8000", timeout=15)
            errors.append(f"answered {resp.status}")
        except Exception as exc:
            errors.append(type(exc).__name__)

    try:
        thread = threading.Thread(target=client)
        thread.start()
        assert slow.started.wait(5)
        signalled = time.monotonic()
        env.sidecar.proc.send_signal(signal.SIGTERM)
        assert env.sidecar.proc.wait(10) == 0
        elapsed = time.monotonic() - signalled
        assert 0.4 <= elapsed < 4, elapsed
        thread.join(5)
        assert errors and not errors[0].startswith("answered 200"), errors
        assert log_lines(env.sidecar, "grace period of 0.5s over, 1 request(s)")
    finally:
        env.stop()


def test_policy_symlinked_elsewhere_is_followed_after_the_link_moves(tmp_path):
    # The real file lives outside the policy directory (git-sync style); an in-place edit there
    # is seen, also after the link is pointed at another directory.
    first, second = tmp_path / "rev-1", tmp_path / "rev-2"
    for rev, policy in ((first, POLICY_V1), (second, POLICY_V2)):
        rev.mkdir()
        (rev / "live.yaml").write_text(policy)
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "live.yaml").symlink_to(first / "live.yaml")
    env = start_live(tmp_path, policy_dir=policies)
    try:
        (first / "live.yaml").write_text(POLICY_V1.replace("{version: 1}", "{version: 11}"))
        wait_for(lambda: live_version(env.sidecar) == 11, 5, "the edit at the link's target")
        link = policies / "live.yaml"
        (policies / "live.yaml.tmp").symlink_to(second / "live.yaml")
        os.replace(policies / "live.yaml.tmp", link)
        wait_for(lambda: live_version(env.sidecar) == 2, 5, "the moved link")
        (second / "live.yaml").write_text(POLICY_V2.replace("{version: 2}", "{version: 22}"))
        wait_for(lambda: live_version(env.sidecar) == 22, 5, "the edit at the new target")
    finally:
        env.stop()
