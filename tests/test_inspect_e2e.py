"""``stagedoor inspect`` end to end: a real process under mitmweb's master, real ES256 user
tokens against a real JWKS endpoint, the flows read back through mitmweb's own HTTP API with its
token, a ``--save`` file opened with mitmproxy's reader, and (when Debian's ``chromium`` is
installed) a headless browser looking at the flow list.

The secrets below go out on every request that can carry them; none of them may come back from
the UI's API, a saved file, the browser's page or the console.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import selectors
import shutil
import struct
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from mitmproxy import io

from stagedoor.devkeys import generate_dev_keys, mint_user_token

from . import forkserver
from .conftest import ROOT, LoopbackServer, Sidecar, _pump, closed_port, write_config
from .httpraw import request

pytestmark = pytest.mark.e2e

MAX_FLOWS = 8
COOKIE = "c00kie-s3cret-value"
API_KEY = "upstream-api-k3y-value"
QUERY_SECRET = "qu3ry-s3cret-session"
SET_COOKIE = "upstream-set-c00kie-value"
BAD_TOKEN_QUERY = "t0ken-in-the-query-string"

FIXTURE_POLICY = """\
pluginId: fixture
routes:
  - path: /items/{name}
    methods: [GET]
    auth: [user]
    params:
      name: {pattern: '^[a-z]+$'}
    query:  # the secret-looking query reaches the upstream, and must be redacted in the UI
      session: {pattern: '^.+$'}
      page: {pattern: '^[0-9]+$'}
    upstream: ${fixture.url}/v1/items/{name}
    response: {headers: {allow: [Set-Cookie]}}  # and so does the upstream's cookie
  - path: /down
    auth: unauthenticated
    upstream: ${fixture.downUrl}/down
"""

# The three filters docs/inspect.md documents (test_the_documented_filters_*).
FILTER_DENIALS = '~comment "^deny "'
FILTER_401_OF_PLUGIN = '~c 401 & ~comment "plugin=insights "'
FILTER_PRINCIPAL = '~comment "principal=user:default/jane "'
MORE_FILTERS = ("~marked", "~marker no_entry", '~meta "\'decision\': \'error\'"')


# -- an upstream that also serves the JWKS, records what it got and sets a cookie ------------------
class Upstream(LoopbackServer):
    def __init__(self) -> None:
        self.jwks: dict[str, Any] = {"keys": []}
        self.seen: list[tuple[str, dict[str, str]]] = []
        super().__init__(_UpstreamHandler)


class _UpstreamHandler(BaseHTTPRequestHandler):
    server: Upstream
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self.server.seen.append((self.path, {k.lower(): v for k, v in self.headers.items()}))
        if self.path.endswith("jwks.json"):
            body, extra = json.dumps(self.server.jwks).encode(), []
        else:
            body = json.dumps({"item": self.path.rsplit("?", 1)[0].rsplit("/", 1)[1]}).encode()
            extra = [("Set-Cookie", f"session={SET_COOKIE}; Path=/; HttpOnly")]
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for name, value in extra:
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)


# -- the inspect process ---------------------------------------------------------------------------
_LISTENING = re.compile(r"stagedoor listening on http://([\d.]+):(\d+)")
_WEB_UI = re.compile(r"web UI at (http://127\.0\.0\.1:(\d+)/\?token=([0-9a-f]+))")


@dataclass
class Inspect:
    sidecar: Sidecar
    web_url: str
    web_port: int
    web_token: str
    save_path: Path
    sent: list[str] = field(default_factory=list)  # request targets, in order

    def api(self, path: str, token: str | None = "default") -> tuple[int, bytes]:
        headers = {}
        if token is not None:
            headers["Authorization"] = f"Bearer {self.web_token if token == 'default' else token}"
        conn = http.client.HTTPConnection("127.0.0.1", self.web_port, timeout=10)
        try:
            conn.request("GET", path, headers=headers)
            resp = conn.getresponse()
            return resp.status, resp.read()
        finally:
            conn.close()

    def flows(self) -> list[dict[str, Any]]:
        status, body = self.api("/flows")
        assert status == 200, body
        return json.loads(body)

    def flow_for(self, target: str) -> dict[str, Any]:
        """The flow of the request sent with this target (paths are shown redacted)."""
        index = self.sent.index(target)
        flows = self.flows()
        # Flows are listed in request order; the buffer may have dropped the oldest.
        offset = len(self.sent) - len(flows)
        return flows[index - offset]

    def send(self, target: str, headers: dict[str, str] | None = None):
        self.sent.append(target)
        return request(self.sidecar.port, "GET", target, headers)

    def console(self) -> str:
        return "\n".join(self.sidecar.stderr_lines + self.sidecar.stdout_lines)


def start_inspect(config: Path, policies: Path, save: Path, timeout: float = 20.0) -> Inspect:
    args = [sys.executable, "-m", "stagedoor_addons", "inspect", "--policies", str(policies),
            "--config", str(config), "--listen", "127.0.0.1:0", "--web", "127.0.0.1:0",
            "--max-flows", str(MAX_FLOWS), "--save", str(save)]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("INSIGHTS_", "BACKSTAGE_"))}
    env["PYTHONUNBUFFERED"] = "1"
    proc = forkserver.popen(args, env=env)  # the same command, forked after the imports
    assert proc.stderr is not None and proc.stdout is not None
    sidecar = Sidecar(proc, "", 0)
    web: re.Match[str] | None = None
    sel = selectors.DefaultSelector()
    sel.register(proc.stderr, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not (sidecar.port and web):
        if not sel.select(0.2):
            if proc.poll() is not None:
                break
            continue
        line = proc.stderr.readline()
        if not line:
            break
        text = line.decode("utf-8", "replace").rstrip("\n")
        sidecar.stderr_lines.append(text)
        if match := _LISTENING.search(text):
            sidecar.host, sidecar.port = match.group(1), int(match.group(2))
        web = web or _WEB_UI.search(text)
    sel.close()
    if not (sidecar.port and web):
        proc.kill()
        raise RuntimeError("stagedoor inspect did not start:\n" + "\n".join(sidecar.stderr_lines))
    for stream, sink in ((proc.stderr, sidecar.stderr_lines), (proc.stdout, sidecar.stdout_lines)):
        t = threading.Thread(target=_pump, args=(stream, sink), daemon=True)
        t.start()
        sidecar._threads.append(t)
    return Inspect(sidecar, web.group(1), int(web.group(2)), web.group(3), save)


@dataclass
class Env:
    upstream: Upstream
    inspect: Inspect
    token: str  # a real ES256 user token for user:default/jane

    @property
    def secrets(self) -> tuple[str, ...]:
        return (self.token, self.token.rsplit(".", 1)[1], COOKIE, API_KEY, QUERY_SECRET,
                SET_COOKIE, BAD_TOKEN_QUERY)


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    tmp = tmp_path_factory.mktemp("inspect")
    upstream = Upstream()
    keys = generate_dev_keys(tmp / "keys")
    upstream.jwks = keys.user_jwks()
    policies = tmp / "policies"
    policies.mkdir()
    shutil.copy(ROOT / "policies" / "insights.yaml", policies / "insights.yaml")
    (policies / "fixture.yaml").write_text(FIXTURE_POLICY)
    config = write_config(tmp / "app-config.yaml", f"""\
        backend:
          baseUrl: {upstream.url}
        insights:
          externalApiUrl: {upstream.url}
        fixture:
          url: {upstream.url}
          downUrl: http://127.0.0.1:{closed_port()}
        stagedoor:
          accessLog:
            redactQueryKeys: [session]
          inspect:
            redactHeaders: [X-Api-Key]
        """)
    inspect = start_inspect(config, policies, tmp / "flows.mitm")
    e = Env(upstream, inspect, mint_user_token(keys.user, issuer=f"{upstream.url}/api/auth"))
    yield e
    inspect.sidecar.stop()
    upstream.stop()


ALLOWED = f"/api/fixture/items/widget?session={QUERY_SECRET}&page=2"
DENIED_401 = f"/api/insights/services/payments-api?token={BAD_TOKEN_QUERY}"
DENIED_400 = "/api/insights/services/Bad_Id"
HEALTH = "/api/insights/health"
DOWN = "/api/fixture/down"


@pytest.fixture(scope="module")
def traffic(env: Env) -> Env:
    """One allowed and two denied requests, each carrying every kind of secret it can."""
    carrying = {"Cookie": f"sid={COOKIE}; theme=dark", "X-Api-Key": API_KEY}
    assert env.inspect.send(ALLOWED, {"Authorization": f"Bearer {env.token}", **carrying}
                            ).status == 200
    assert env.inspect.send(DENIED_401, carrying).status == 401
    assert env.inspect.send(DENIED_400, {"Authorization": f"Bearer {env.token}", **carrying}
                            ).status == 400
    assert env.inspect.send(HEALTH).status == 200
    assert env.inspect.send(DOWN).status == 502
    deadline = time.monotonic() + 5  # the UI's copy is refreshed after the response hook
    while time.monotonic() < deadline and not all(
            f.get("response") or f.get("error") for f in env.inspect.flows()):
        time.sleep(0.05)
    return env


def assert_no_secret(env: Env, data: bytes | str, where: str) -> None:
    text = data.decode("utf-8", "replace") if isinstance(data, bytes) else data
    for secret in env.secrets:
        assert secret not in text, f"{where}: secret {secret[:12]}... leaked"


# -- refusals before anything listens --------------------------------------------------------------
def _inspect_fails(tmp: Path, *extra: str) -> str:
    policies = tmp / "policies"
    policies.mkdir(exist_ok=True)
    shutil.copy(ROOT / "policies" / "insights.yaml", policies / "insights.yaml")
    config = write_config(tmp / "app-config.yaml", """\
        backend: {baseUrl: http://127.0.0.1:9}
        insights: {externalApiUrl: http://127.0.0.1:9}
        """)
    result = forkserver.run(
        [sys.executable, "-m", "stagedoor_addons", "inspect", "--policies", str(policies),
         "--config", str(config), "--listen", "127.0.0.1:0", *extra], timeout=30)
    assert result.returncode == 1, result.stderr.decode()[-2000:]
    return result.stderr.decode()


def test_a_web_address_off_loopback_is_refused(tmp_path: Path):
    assert "--web must be a loopback address" in _inspect_fails(tmp_path, "--web", "0.0.0.0:0")


def test_an_empty_flow_buffer_is_refused(tmp_path: Path):
    assert "--max-flows" in _inspect_fails(tmp_path, "--web", "127.0.0.1:0", "--max-flows", "0")


def test_a_save_file_that_cannot_be_written_is_reported(tmp_path: Path):
    stderr = _inspect_fails(tmp_path, "--web", "127.0.0.1:0", "--save",
                            str(tmp_path / "missing" / "flows.mitm"))
    assert "stagedoor: inspect:" in stderr and "No such file or directory" in stderr


def test_a_web_port_in_use_is_reported(tmp_path: Path):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        stderr = _inspect_fails(tmp_path, "--web", f"127.0.0.1:{port}")
    assert "stagedoor: inspect:" in stderr and f"127.0.0.1:{port}" in stderr


# -- the web UI's door -----------------------------------------------------------------------------
def test_the_web_ui_listens_on_loopback_with_a_printed_token(env: Env):
    assert env.inspect.web_url.startswith("http://127.0.0.1:")
    assert len(env.inspect.web_token) >= 32


@pytest.mark.parametrize("path", ["/", "/flows", "/flows/dump", "/updates", "/events",
                                  "/options", "/commands", "/state"])
def test_the_ui_refuses_requests_without_the_token(env: Env, path: str):
    assert env.inspect.api(path, token=None)[0] == 403
    assert env.inspect.api(path, token="0" * 32)[0] == 403


def test_the_ui_accepts_its_token(env: Env):
    assert env.inspect.api("/flows")[0] == 200


# -- decisions on every flow -----------------------------------------------------------------------
def test_the_real_request_still_carries_what_the_policy_forwards(traffic: Env):
    path, headers = next((p, h) for p, h in traffic.upstream.seen if p.startswith("/v1/items"))
    assert path == f"/v1/items/widget?session={QUERY_SECRET}&page=2"
    assert headers["cookie"] == f"sid={COOKIE}; theme=dark"
    assert headers["x-api-key"] == API_KEY
    assert "authorization" not in headers  # the gateway never forwards the caller's token


def test_an_allowed_flow_carries_its_decision(traffic: Env):
    flow = traffic.inspect.flow_for(ALLOWED)
    assert flow["comment"] == ("allow plugin=fixture route=/items/{name} "
                               "principal=user:default/jane type=user")
    assert flow["marked"] == ""
    assert flow["response"]["status_code"] == 200


def test_a_missing_token_is_a_marked_denial_at_the_barrier(traffic: Env):
    flow = traffic.inspect.flow_for(DENIED_401)
    assert flow["comment"] == ("deny check=barrier plugin=insights route=- principal=- — "
                               "Missing credentials")
    assert flow["marked"] == "⛔"
    assert flow["response"]["status_code"] == 401


def test_a_bad_parameter_is_a_marked_denial_naming_the_route_and_the_principal(traffic: Env):
    flow = traffic.inspect.flow_for(DENIED_400)
    assert flow["comment"] == ("deny check=params plugin=insights route=/services/{id} "
                               "principal=user:default/jane type=user — "
                               "Invalid service id: Bad_Id")
    assert flow["marked"] == "⛔"


def test_an_unreachable_upstream_is_a_flow_marked_as_an_error(traffic: Env):
    flow = traffic.inspect.flow_for(DOWN)
    assert flow["comment"] == ("error check=upstream plugin=fixture route=/down principal=- — "
                               "upstream unreachable")
    assert flow["marked"] == "⚠"
    assert "response" not in flow and flow["error"]["msg"]


# -- secrets ---------------------------------------------------------------------------------------
def test_the_flow_list_shows_where_secrets_were_not_what_they_were(traffic: Env):
    allowed = traffic.inspect.flow_for(ALLOWED)
    request_headers = dict(allowed["request"]["headers"])
    assert allowed["request"]["path"] == "/v1/items/widget?session=[REDACTED]&page=2"
    assert request_headers["Cookie"] == "sid=[REDACTED]; theme=[REDACTED]"
    assert request_headers["X-Api-Key"] == "[REDACTED]"
    assert dict(allowed["response"]["headers"])["Set-Cookie"] == \
        "session=[REDACTED]; Path=/; HttpOnly"
    denied = traffic.inspect.flow_for(DENIED_400)
    assert dict(denied["request"]["headers"])["Authorization"] == "Bearer [REDACTED]"


def test_no_secret_comes_back_from_any_part_of_the_api(traffic: Env):
    status, listing = traffic.inspect.api("/flows")
    assert status == 200
    assert_no_secret(traffic, listing, "/flows")
    status, dump = traffic.inspect.api("/flows/dump")
    assert status == 200 and len(dump) > 1000
    assert_no_secret(traffic, dump, "/flows/dump")
    for flow in json.loads(listing):
        for part in ("request", "response") if "response" in flow else ("request",):
            for path in (f"/flows/{flow['id']}/{part}/content.data",
                         f"/flows/{flow['id']}/{part}/content/auto.json",
                         f"/flows/{flow['id']}/{part}/content/query.json"):
                status, body = traffic.inspect.api(path)
                assert status in (200, 400), (path, status)
                assert_no_secret(traffic, body, path)
    status, events = traffic.inspect.api("/events")
    assert_no_secret(traffic, events, "/events")


def test_a_denial_that_echoes_the_query_is_scrubbed_in_the_body_too(traffic: Env):
    flow = traffic.inspect.flow_for(DENIED_401)
    status, body = traffic.inspect.api(f"/flows/{flow['id']}/response/content.data")
    assert status == 200
    assert json.loads(body)["request"]["url"] == "/services/payments-api?token=[REDACTED]"


def _dump(env: Env, expr: str) -> list[Any]:
    status, data = env.inspect.api("/flows/dump?filter=" + quote(expr))
    assert status == 200, data
    from io import BytesIO

    return list(io.FlowReader(BytesIO(data)).stream())


def test_the_documented_filters_select_the_right_flows(traffic: Env):
    docs = (ROOT / "docs" / "inspect.md").read_text()
    for expr in (FILTER_DENIALS, FILTER_401_OF_PLUGIN, FILTER_PRINCIPAL, *MORE_FILTERS):
        assert expr in docs, expr
    paths = {expr: sorted(f.request.path.split("?")[0] for f in _dump(traffic, expr))
             for expr in (FILTER_DENIALS, FILTER_401_OF_PLUGIN, FILTER_PRINCIPAL, *MORE_FILTERS)}
    assert paths[FILTER_DENIALS] == ["/api/insights/services/Bad_Id",
                                     "/api/insights/services/payments-api"]
    assert paths[FILTER_401_OF_PLUGIN] == ["/api/insights/services/payments-api"]
    assert paths[FILTER_PRINCIPAL] == ["/api/insights/services/Bad_Id", "/v1/items/widget"]
    assert paths["~marked"] == sorted([*paths[FILTER_DENIALS], "/down"])
    assert paths["~marker no_entry"] == paths[FILTER_DENIALS]
    assert paths['~meta "\'decision\': \'error\'"'] == ["/down"]


def test_options_that_would_store_unredacted_flows_are_refused_over_the_api(env: Env):
    web = env.inspect
    # As the browser does: authenticated, and the XSRF cookie echoed in a header.
    conn = http.client.HTTPConnection("127.0.0.1", web.web_port, timeout=10)
    try:
        conn.request("PUT", "/options", json.dumps({"save_stream_file": "/tmp/unredacted.mitm"}),
                     {"Authorization": f"Bearer {web.web_token}",
                      "Cookie": "_mitmproxy_xsrf=0123456789abcdef",
                      "X-XSRFToken": "0123456789abcdef", "Content-Type": "application/json"})
        resp = conn.getresponse()
        body = resp.read().decode()
    finally:
        conn.close()
    assert resp.status == 400 and "stagedoor inspect" in body and "--save" in body, body
    assert json.loads(web.api("/options")[1])["save_stream_file"]["value"] is None
    assert not Path("/tmp/unredacted.mitm").exists()


# -- what a person sees --------------------------------------------------------------------------
CHROMIUM = shutil.which("chromium")


def _chromium(url: str, tmp: Path, *mode: str) -> subprocess.CompletedProcess[bytes]:
    clean_env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    return subprocess.run(
        [CHROMIUM or "chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
         "--no-first-run", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--no-proxy-server", f"--user-data-dir={tmp / 'profile'}",
         "--window-size=1400,900", "--virtual-time-budget=8000", *mode, url],
        env=clean_env, capture_output=True, timeout=45)


def _png_size_and_colours(data: bytes) -> tuple[int, int, int]:
    """Width, height, and how many distinct byte values its pixel data has."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    width, height = struct.unpack(">II", data[16:24])
    pos, idat = 8, b""
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        if kind == b"IDAT":
            idat += data[pos + 8:pos + 8 + length]
        pos += 12 + length
    return width, height, len(set(zlib.decompress(idat)))


# A developer without a browser may skip this; CI (.ci/run installs chromium) must not.
@pytest.mark.skipif(CHROMIUM is None and os.environ.get("CI") != "true",
                    reason="Debian's `chromium` is not installed (apt-get install -y "
                    "chromium) - no browser to look at the flow list")
def test_a_browser_sees_the_annotated_flow_list_and_no_secret(traffic: Env, tmp_path: Path):
    assert CHROMIUM is not None, "CI needs Debian's chromium: .ci/run installs it with apt-get"
    # The flow list, with the 400's request (its redacted headers) open below it.
    selected = traffic.inspect.flow_for(DENIED_400)["id"]
    url = f"{traffic.inspect.web_url}#/flows/{selected}/request"
    dom = _chromium(url, tmp_path, "--dump-dom")
    page = dom.stdout.decode("utf-8", "replace")
    assert "deny check=barrier plugin=insights" in page, dom.stderr.decode()[-2000:]
    assert "allow plugin=fixture route=/items/{name}" in page
    assert "Bearer [REDACTED]" in page
    assert_no_secret(traffic, page.replace(traffic.inspect.web_token, ""), "the rendered page")

    shot = tmp_path / "inspect-flows.png"
    result = _chromium(url, tmp_path, f"--screenshot={shot}")
    assert shot.exists(), result.stderr.decode()[-2000:]
    data = shot.read_bytes()
    width, height, colours = _png_size_and_colours(data)
    assert (width, height) == (1400, 900)
    assert len(data) > 20_000 and colours > 50, "the screenshot looks blank"
    if os.environ.get("STAGEDOOR_SCREENSHOT_OUT"):  # refresh docs/inspect-flows.png on request
        shutil.copy(shot, os.environ["STAGEDOOR_SCREENSHOT_OUT"])


def test_a_replay_from_the_ui_goes_through_the_gateway_again(traffic: Env):
    # A replayed copy carries "Bearer [REDACTED]" and the upstream path: the gateway refuses it
    # like any other request, so the UI cannot reach an upstream on someone else's behalf.
    web = traffic.inspect
    allowed = web.flow_for(ALLOWED)
    upstream_calls = len(traffic.upstream.seen)
    conn = http.client.HTTPConnection("127.0.0.1", web.web_port, timeout=10)
    try:
        conn.request("POST", f"/flows/{allowed['id']}/replay", b"",
                     {"Authorization": f"Bearer {web.web_token}",
                      "Cookie": "_mitmproxy_xsrf=0123456789abcdef",
                      "X-XSRFToken": "0123456789abcdef"})
        resp = conn.getresponse()
        resp.read()
    finally:
        conn.close()
    assert resp.status == 200
    # mitmproxy replays the stored flow itself and puts the new answer in it.
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and not (web.flow_for(ALLOWED)["is_replay"]
                                               and "response" in web.flow_for(ALLOWED)):
        time.sleep(0.05)
    replay = web.flow_for(ALLOWED)
    assert replay["is_replay"] == "request"
    assert replay["response"]["status_code"] == 404
    assert replay["comment"].startswith("deny check=plugin")
    assert len(traffic.upstream.seen) == upstream_calls


# -- bounded memory, the saved file, the console ---------------------------------------------------
def test_the_buffer_keeps_only_the_newest_flows(traffic: Env):
    for _ in range(MAX_FLOWS + 2):
        assert traffic.inspect.send(HEALTH).status == 200
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and len(traffic.inspect.flows()) > MAX_FLOWS:
        time.sleep(0.05)
    flows = traffic.inspect.flows()
    assert len(flows) == MAX_FLOWS
    assert all(f["request"]["path"] == HEALTH for f in flows)


def test_the_saved_file_opens_in_mitmproxy_and_holds_no_secret(traffic: Env):
    sent = len(traffic.inspect.sent)
    assert traffic.inspect.sidecar.stop() == 0  # SIGTERM: the file is complete once it exits
    data = traffic.inspect.save_path.read_bytes()
    assert_no_secret(traffic, data, "the --save file")
    with traffic.inspect.save_path.open("rb") as fh:
        flows = list(io.FlowReader(fh).stream())
    # Every request, including those the buffer dropped (and the replay, written again).
    assert len({f.id for f in flows}) == sent and len(flows) == sent + 1
    by_comment = [f.comment for f in flows]
    assert any(c.startswith("deny check=barrier plugin=insights") for c in by_comment)
    allowed = next(f for f in flows if f.comment.startswith("allow plugin=fixture"))
    assert allowed.request.headers["cookie"] == "sid=[REDACTED]; theme=[REDACTED]"
    assert allowed.metadata["stagedoor"]["decision"] == "allow"


def test_the_console_shows_the_login_token_once_and_no_other_secret(traffic: Env):
    console = traffic.inspect.console()
    assert console.count(traffic.inspect.web_token) == 1
    assert_no_secret(traffic, console, "the console")
