"""``stagedoor inspect`` without a process: redaction, annotations, the bounded shadow View, the
guard, and tripwires for the mitmweb internals that ``addons/inspect.py`` relies on.

The end-to-end tests (a real ``stagedoor inspect``, its HTTP API, ``--save``, a browser
screenshot) are in ``test_inspect_e2e.py``.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import tornado.httpclient
import tornado.httpserver
import tornado.netutil
import tornado.websocket
from mitmproxy import exceptions, hooks, http, options
from mitmproxy.addons import view as view_module
from mitmproxy.addons.save import Save
from mitmproxy.addons.savehar import SaveHar
from mitmproxy.proxy.layers.http import (
    HttpErrorHook,
    HttpRequestHeadersHook,
    HttpRequestHook,
    HttpResponseHook,
)
from mitmproxy.test import tflow
from mitmproxy.tools.web import app
from mitmproxy.tools.web.master import WebMaster

from stagedoor_addons import inspect as insp
from stagedoor_addons.gateway import META

TOKEN = "eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJ1c2VyOmRlZmF1bHQvamFuZSJ9.c2lnbmF0dXJlLWJ5dGVz"
COOKIE = "s3ss10n-c00kie-value"
API_KEY = "k3y-for-the-upstream"
QUERY_SECRET = "query-secret-value"
SET_COOKIE = "upstream-issued-session"
SECRETS = (TOKEN, COOKIE, API_KEY, QUERY_SECRET, SET_COOKIE)


def redactor(**kw: Any) -> insp.Redactor:
    return insp.Redactor(kw.get("headers", ["x-api-key"]), kw.get("query_keys", ["token"]))


def live_flow(path: str = f"/api/insights/services/x?token={QUERY_SECRET}&page=2",
              headers: dict[str, str] | None = None, body: bytes = b"") -> http.HTTPFlow:
    hdrs = {"Authorization": f"Bearer {TOKEN}", "Cookie": f"sid={COOKIE}; theme=dark",
            "X-Api-Key": API_KEY, "Accept": "application/json"}
    hdrs.update(headers or {})
    req = http.Request.make("GET", f"http://127.0.0.1:7007{path}", body, hdrs)
    return tflow.tflow(req=req)


def answer(f: http.HTTPFlow, status: int = 200, body: bytes = b'{"ok":true}',
           headers: dict[str, str] | None = None) -> None:
    f.response = http.Response.make(status, body, headers or {})


def everything(f: http.HTTPFlow) -> str:
    """All of a flow as one string: what a UI or a file could possibly show."""
    return repr(f.get_state())


def assert_clean(text: str | bytes) -> None:
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    for secret in SECRETS:
        assert secret not in text, f"secret {secret!r} leaked"


# -- Redactor --------------------------------------------------------------------------------------
def test_authorization_keeps_its_scheme_and_loses_its_credentials():
    copy = redactor().scrubbed_copy(live_flow())
    assert copy.request.headers["authorization"] == "Bearer [REDACTED]"


def test_cookie_names_stay_visible_their_values_do_not():
    copy = redactor().scrubbed_copy(live_flow())
    assert copy.request.headers["cookie"] == "sid=[REDACTED]; theme=[REDACTED]"


def test_set_cookie_value_is_redacted_and_its_attributes_kept():
    f = live_flow()
    answer(f, headers={"Set-Cookie": f"session={SET_COOKIE}; Path=/; HttpOnly"})
    copy = redactor().scrubbed_copy(f)
    assert copy.response.headers["set-cookie"] == "session=[REDACTED]; Path=/; HttpOnly"


def test_configured_header_names_are_redacted_case_insensitively():
    f = live_flow(headers={"X-UPSTREAM-SECRET": API_KEY})
    copy = insp.Redactor(["X-Upstream-Secret"], []).scrubbed_copy(f)
    assert copy.request.headers.get_all("x-upstream-secret") == ["[REDACTED]"]


def test_other_headers_are_left_alone():
    copy = redactor().scrubbed_copy(live_flow())
    assert copy.request.headers["accept"] == "application/json"


def test_query_keys_are_redacted_in_the_path_and_the_rest_kept():
    copy = redactor().scrubbed_copy(live_flow())
    assert copy.request.path == "/api/insights/services/x?token=[REDACTED]&page=2"


def test_percent_encoded_query_key_names_are_recognised():
    copy = redactor().scrubbed_copy(live_flow(path="/api/x/y?%74oken=abc"))
    assert copy.request.path == "/api/x/y?%74oken=[REDACTED]"


def test_short_query_secret_is_redacted_where_it_stands():
    f = live_flow(path="/api/x/y?token=abc")
    f.metadata[META] = {"url": "/y?token=abc", "target": "/api/x/y?token=abc"}
    copy = redactor().scrubbed_copy(f)
    assert copy.request.path == "/api/x/y?token=[REDACTED]"
    assert copy.metadata[META] == {"url": "/y?token=[REDACTED]",
                                   "target": "/api/x/y?token=[REDACTED]"}


def test_long_secrets_are_scrubbed_wherever_they_appear():
    f = live_flow()
    f.metadata[META] = {"url": f"/services/x?token={QUERY_SECRET}"}
    f.comment = f"saw {TOKEN}"
    answer(f, 400, json.dumps({"echo": f"/services/x?token={QUERY_SECRET}", "c": COOKIE,
                               "k": API_KEY}).encode())
    copy = redactor().scrubbed_copy(f)
    assert_clean(everything(copy))
    assert copy.comment == "saw [REDACTED]"
    assert json.loads(copy.response.content)["echo"] == "/services/x?token=[REDACTED]"


def test_short_values_are_not_hunted_everywhere():
    f = live_flow(headers={"Cookie": "a=1"})
    answer(f, body=b'{"count": 1}')
    copy = redactor().scrubbed_copy(f)
    assert copy.request.headers["cookie"] == "a=[REDACTED]"
    assert copy.response.content == b'{"count": 1}'


def test_a_secret_seen_at_an_earlier_hook_stays_scrubbed_after_the_header_is_gone():
    r = redactor()
    f = live_flow()
    r.scrubbed_state(f)  # requestheaders: the token is in the Authorization header
    del f.request.headers["authorization"]  # the gateway strips it before forwarding
    answer(f, body=f'{{"echoed": "{TOKEN}"}}'.encode())
    assert TOKEN not in everything(r.scrubbed_copy(f))


def test_forgetting_a_flow_drops_its_remembered_secrets():
    r = redactor()
    f = live_flow()
    r.scrubbed_state(f)
    r.forget(f.id)
    del f.request.headers["authorization"]
    answer(f, body=TOKEN.encode())
    assert r.scrubbed_copy(f).response.content == TOKEN.encode()


def test_remembered_secrets_are_bounded():
    r = insp.Redactor([], [], memory=3)
    for _ in range(10):
        r.scrubbed_state(live_flow())
    assert len(r._seen) == 3


def test_the_live_flow_is_never_changed():
    f = live_flow()
    answer(f, headers={"Set-Cookie": f"s={SET_COOKIE}"})
    before = f.get_state()
    redactor().scrubbed_copy(f)
    assert f.get_state() == before


def test_the_copy_keeps_the_id_and_drops_the_edit_backup():
    f = live_flow()
    f.backup()
    copy = redactor().scrubbed_copy(f)
    assert copy.id == f.id
    assert copy.get_state()["backup"] is None
    assert copy.live is False


def test_a_flow_of_another_kind_is_copied_without_trouble():
    f = tflow.ttcpflow()
    f.comment = f"saw {TOKEN}"
    copy = redactor().scrubbed_copy(f)
    assert copy.id == f.id and copy.comment == f"saw {TOKEN}"  # nothing known to scrub


def test_a_local_answer_shows_the_address_the_client_called():
    f = live_flow()
    f.request.host, f.request.port = "127.0.0.1", 9  # reverse mode's never-contacted target
    f.client_conn.sockname = ("127.0.0.1", 7007)
    f.metadata[META] = {"decision": "deny"}
    copy = redactor().scrubbed_copy(f)
    assert (copy.request.host, copy.request.port) == ("127.0.0.1", 7007)
    assert (f.request.host, f.request.port) == ("127.0.0.1", 9)


def test_a_forwarded_request_keeps_its_upstream_address():
    f = live_flow()
    f.request.host, f.request.port = "insights.internal", 8080
    f.client_conn.sockname = ("127.0.0.1", 7007)
    f.metadata[META] = {"decision": "allow", "upstream": "http://insights.internal:8080/v1"}
    copy = redactor().scrubbed_copy(f)
    assert (copy.request.host, copy.request.port) == ("insights.internal", 8080)


def test_settings_merge_configured_headers_with_the_defaults():
    from stagedoor.config import Config
    from stagedoor.runtime import GatewaySettings

    config = Config(data={"stagedoor": {"inspect": {"redactHeaders": ["X-Api-Key"],
                                                     "maxFlows": 50}}})
    settings = insp.InspectSettings.from_config(config, GatewaySettings())
    assert settings.redact_headers >= {"authorization", "cookie", "set-cookie",
                                       "proxy-authorization", "x-api-key"}
    assert "token" in settings.redact_query_keys
    assert settings.max_flows == 50
    assert insp.InspectSettings.from_config(config, GatewaySettings(), max_flows=7).max_flows == 7


def test_a_buffer_of_zero_flows_is_refused_naming_the_option():
    from stagedoor.config import Config, ConfigError
    from stagedoor.runtime import GatewaySettings

    with pytest.raises(ConfigError, match="--max-flows"):
        insp.InspectSettings.from_config(Config(), GatewaySettings(), max_flows=0)


# -- annotations -----------------------------------------------------------------------------------
def decided(meta: dict[str, Any], status: int | None = None, message: str = "") -> http.HTTPFlow:
    f = live_flow()
    f.metadata[META] = meta
    if status is not None:
        answer(f, status, json.dumps({"error": {"name": "X", "message": message}}).encode())
    insp.Annotator().request(f)
    return f


def test_an_allowed_flow_says_who_went_where_and_is_not_marked():
    f = decided({"decision": "allow", "check": "allow", "plugin": "insights",
                 "route": "/services/{id}", "principal": "user:default/jane",
                 "principal_type": "user"})
    assert f.comment == ("allow plugin=insights route=/services/{id} principal=user:default/jane "
                         "type=user")
    assert f.marked == ""


def test_a_denied_flow_names_the_check_and_the_message_and_is_marked():
    f = decided({"decision": "deny", "check": "barrier", "plugin": "insights", "route": None,
                 "principal": None, "reason": ""}, 401, "Missing credentials")
    assert f.comment == ("deny check=barrier plugin=insights route=- principal=- — "
                         "Missing credentials")
    assert f.marked == insp.MARK_DENIED


def test_a_denial_with_a_log_reason_shows_both():
    f = decided({"decision": "deny", "check": "barrier", "plugin": "p", "reason": "expired"},
                401, "Illegal token")
    assert f.comment.endswith("— Illegal token (expired)")


def test_an_upstream_timeout_is_an_error_marked_differently():
    f = decided({"decision": "error", "check": "upstream", "plugin": "p", "route": "/slow",
                 "principal": "user:default/jane", "timed_out": True})
    assert f.comment.startswith("error check=upstream plugin=p route=/slow")
    assert f.comment.endswith("— upstream timed out")
    assert f.marked == insp.MARK_ERROR


def test_a_flow_the_gateway_never_saw_is_left_alone():
    f = live_flow()
    insp.Annotator().response(f)
    assert (f.comment, f.marked) == ("", "")


# -- ShadowView ------------------------------------------------------------------------------------
def test_the_view_stores_a_scrubbed_copy_never_the_live_flow():
    v = insp.ShadowView(redactor())
    f = live_flow()
    v.requestheaders(f)
    stored = v.get_by_id(f.id)
    assert stored is not None and stored is not f
    assert_clean(everything(stored))
    assert f.request.headers["authorization"] == f"Bearer {TOKEN}"  # upstream still gets it


def test_updates_refresh_the_same_copy_in_place():
    v = insp.ShadowView(redactor())
    f = live_flow()
    v.requestheaders(f)
    stored = v.get_by_id(f.id)
    answer(f, headers={"Set-Cookie": f"s={SET_COOKIE}"})
    f.comment = "allow plugin=insights"
    v.response(f)
    assert v.get_by_id(f.id) is stored
    assert stored.response is not None and stored.comment == "allow plugin=insights"
    assert_clean(everything(stored))
    assert len(v) == 1


def test_an_update_of_the_copy_itself_is_signalled_and_kept():
    v = insp.ShadowView(redactor())
    f = live_flow()
    v.requestheaders(f)
    stored = v.get_by_id(f.id)
    updates: list[Any] = []

    def updated(flow: Any) -> None:  # signals hold weak references: keep a named function
        updates.append(flow)

    v.sig_view_update.connect(updated)
    stored.comment = "edited in the UI"
    v.update([stored])
    assert updates == [stored] and stored.comment == "edited in the UI"


def test_a_copy_that_comes_back_with_secrets_is_scrubbed_again_in_place():
    # A UI edit, or a replay: mitmproxy replays the stored object and puts the answer in it.
    v = insp.ShadowView(redactor())
    f = live_flow()
    v.requestheaders(f)
    stored = v.get_by_id(f.id)
    request, server = stored.request, stored.server_conn
    stored.request.headers["authorization"] = f"Bearer {TOKEN}"
    answer(stored, headers={"Set-Cookie": f"s={SET_COOKIE}"}, body=COOKIE.encode())
    v.update([stored])
    assert v.get_by_id(f.id) is stored
    assert stored.request is request and stored.server_conn is server  # in flight: same objects
    assert stored.request.headers["authorization"] == "Bearer [REDACTED]"
    assert_clean(everything(stored))


def test_the_buffer_keeps_the_newest_flows():
    v = insp.ShadowView(redactor(), max_flows=3)
    removed: list[str] = []

    def gone(flow: Any, index: int) -> None:
        removed.append(flow.id)

    v.sig_view_remove.connect(gone)
    flows = [live_flow() for _ in range(5)]
    for f in flows:
        v.requestheaders(f)
    assert [f.id for f in v] == [f.id for f in flows[2:]]
    assert removed == [flows[0].id, flows[1].id]
    assert flows[0].id not in v.redactor._seen


def test_an_evicted_live_flow_is_not_brought_back_by_its_later_hooks():
    v = insp.ShadowView(redactor(), max_flows=1)
    first, second = live_flow(), live_flow()
    v.requestheaders(first)
    v.requestheaders(second)
    answer(first)
    v.response(first)
    assert [f.id for f in v] == [second.id]


class _RecordingView(view_module.View):
    """mitmproxy's View with add/update recorded (what ShadowView overrides to scrub)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def add(self, flows: Any) -> None:
        self.calls.append("add")
        super().add(flows)

    def update(self, flows: Any) -> None:
        self.calls.append("update")
        super().update(flows)


def _flow_for(hook: str) -> Any:
    if hook.startswith("dns_"):
        return tflow.tdnsflow(resp=True)
    if hook.startswith("tcp_"):
        return tflow.ttcpflow()
    if hook.startswith("udp_"):
        return tflow.tudpflow()
    return tflow.tflow(resp=True)


def test_every_view_hook_goes_through_add_or_update():
    # Tripwire, by behaviour: ShadowView scrubs in add() and update(). A View hook that stored
    # or refreshed flows any other way would bypass it.
    flow_hooks = [name for name in hooks.all_hooks
                  if name not in ("load", "configure", "running", "done", "update")
                  and getattr(view_module.View, name, None) is not None]
    assert "requestheaders" in flow_hooks and "response" in flow_hooks
    for name in flow_hooks:
        v = _RecordingView()
        getattr(v, name)(_flow_for(name))
        assert v.calls in (["add"], ["update"]), (name, v.calls)


def test_view_stores_flows_only_in_add():
    v = view_module.View()
    unseen = tflow.tflow(resp=True)
    v.update([unseen])  # a flow the view never added is not stored by an update
    assert len(v) == 0
    v.add([unseen])
    assert [f.id for f in v] == [unseen.id]
    v.update([unseen])
    assert len(v) == 1


# -- the whole thing on mitmweb's real master ------------------------------------------------------
class _Wire:
    """Stands in for a browser on mitmweb's websocket: records what would be pushed."""

    def __init__(self) -> None:
        self.conn = object.__new__(app.ClientConnection)
        self.conn.filters = {}
        self.messages: list[bytes] = []
        self.conn.send = self.messages.append  # type: ignore[method-assign]

    def __enter__(self) -> _Wire:
        app.ClientConnection.connections.add(self.conn)
        return self

    def __exit__(self, *exc: object) -> None:
        app.ClientConnection.connections.discard(self.conn)


def run_master(check: Any, save_path: str | None = None, max_flows: int = 1000) -> Any:
    async def main() -> Any:
        m = WebMaster(options.Options(), with_termlog=False)
        settings = insp.InspectSettings(frozenset({*insp.DEFAULT_REDACTED_HEADERS, "x-api-key"}),
                                        frozenset({"token"}), max_flows, save_path)
        shadow = insp.install(m, settings)
        result = await check(m, shadow)
        await m.addons.trigger_event(hooks.DoneHook())
        return result

    return asyncio.run(main())


async def through_hooks(m: WebMaster, f: http.HTTPFlow, status: int = 200) -> None:
    """What the proxy does with a flow, hook by hook (handle_lifecycle adds the update hook)."""
    await m.addons.handle_lifecycle(HttpRequestHeadersHook(f))
    f.metadata[META] = {"decision": "deny", "check": "barrier", "plugin": "insights",
                        "url": f"/services/x?token={QUERY_SECRET}"}
    await m.addons.handle_lifecycle(HttpRequestHook(f))
    answer(f, status, json.dumps({"error": {"message": "Missing credentials"},
                                  "request": {"url": f"/services/x?token={QUERY_SECRET}"}}
                                 ).encode(), {"Set-Cookie": f"s={SET_COOKIE}"})
    await m.addons.handle_lifecycle(HttpResponseHook(f))


def test_install_puts_the_shadow_view_in_place_and_unloads_live_flow_writers():
    async def check(m: WebMaster, shadow: insp.ShadowView) -> None:
        assert m.view is shadow
        assert m.addons.get("view") is shadow
        assert m.addons.get("save") is None and m.addons.get("savehar") is None
        assert m.commands.commands["view.flows.resolve"].func.__self__ is shadow

    run_master(check)


def test_what_the_browser_is_pushed_at_every_hook_is_scrubbed():
    async def check(m: WebMaster, shadow: insp.ShadowView) -> list[bytes]:
        f = live_flow()
        with _Wire() as wire:
            await through_hooks(m, f, 401)
        assert f.request.headers["authorization"] == f"Bearer {TOKEN}"
        return wire.messages

    messages = run_master(check)
    kinds = [json.loads(m)["type"] for m in messages]
    assert kinds[0] == "flows/add" and kinds.count("flows/update") >= 2
    for message in messages:
        assert_clean(message)
    last = json.loads(messages[-1])["payload"]["flow"]
    assert last["comment"].startswith("deny check=barrier plugin=insights")
    assert last["marked"] == "⛔"


def test_the_api_serialisation_and_dump_of_the_view_are_scrubbed():
    async def check(m: WebMaster, shadow: insp.ShadowView) -> tuple[str, bytes]:
        await through_hooks(m, live_flow())
        from io import BytesIO

        from mitmproxy import io

        listing = json.dumps([app.flow_to_json(f) for f in m.view])
        buf = BytesIO()
        writer = io.FlowWriter(buf)
        for f in m.view:
            writer.add(f)
        return listing, buf.getvalue()

    listing, dump = run_master(check)
    assert "Bearer [REDACTED]" in listing
    assert_clean(listing)
    assert_clean(dump)


def test_commands_resolve_to_the_scrubbed_copies():
    async def check(m: WebMaster, shadow: insp.ShadowView) -> str:
        await through_hooks(m, live_flow())
        return m.commands.call_strings("export", ["curl", "@all"])

    exported = run_master(check)
    assert "[REDACTED]" in exported
    assert_clean(exported)


def test_redacted_save_writes_scrubbed_finished_flows(tmp_path: Path):
    path = tmp_path / "flows.mitm"

    async def check(m: WebMaster, shadow: insp.ShadowView) -> None:
        await through_hooks(m, live_flow())
        failing = live_flow()
        await m.addons.handle_lifecycle(HttpRequestHeadersHook(failing))
        failing.error = tflow.terr("Connection refused")
        await m.addons.handle_lifecycle(HttpErrorHook(failing))

    run_master(check, save_path=str(path))
    from mitmproxy import io

    data = path.read_bytes()
    assert_clean(data)
    with path.open("rb") as fh:
        flows = list(io.FlowReader(fh).stream())
    assert len(flows) == 2
    assert flows[0].request.headers["authorization"] == "Bearer [REDACTED]"
    assert flows[1].error is not None and flows[1].response is None


def test_the_buffer_bound_holds_on_the_real_master():
    async def check(m: WebMaster, shadow: insp.ShadowView) -> int:
        for _ in range(7):
            await through_hooks(m, live_flow())
        return len(m.view)

    assert run_master(check, max_flows=4) == 4


@pytest.mark.parametrize("name, value", [("save_stream_file", "{tmp}/live.mitm"),
                                         ("hardump", "{tmp}/live.har"),
                                         ("intercept", "~q")])
def test_options_that_would_store_or_pause_live_flows_are_refused(tmp_path: Path, name: str,
                                                                  value: str):
    async def check(m: WebMaster, shadow: insp.ShadowView) -> None:
        with pytest.raises(exceptions.OptionsError, match="stagedoor inspect"):
            m.options.update(**{name: value.format(tmp=tmp_path)})
        assert not getattr(m.options, name)

    run_master(check)
    assert list(tmp_path.iterdir()) == []


# -- mitmweb's private wiring, by behaviour: a real web server, a real websocket, real requests --
WEB_TOKEN = "inspect-web-ui-test-token-0123456789"


async def serve_web_ui(m: WebMaster) -> tuple[tornado.httpserver.HTTPServer, int]:
    """mitmweb's own web application on a loopback port (what ``WebMaster.running`` starts)."""
    m.options.update(web_password=WEB_TOKEN)
    server = tornado.httpserver.HTTPServer(m.app)
    sockets = tornado.netutil.bind_sockets(0, "127.0.0.1")
    server.add_sockets(sockets)
    return server, sockets[0].getsockname()[1]


async def web_get(port: int, path: str) -> bytes:
    response = await tornado.httpclient.AsyncHTTPClient().fetch(
        f"http://127.0.0.1:{port}{path}", headers={"Authorization": f"Bearer {WEB_TOKEN}"})
    assert response.code == 200, (path, response.code)
    return response.body


async def pushed_flow_messages(ws: Any, flow_id: str, updates: int) -> list[bytes]:
    """The websocket's flow messages about ``flow_id`` until ``updates`` updates came (a
    bounded wait: a UI that is never told fails here instead of hanging)."""
    messages: list[bytes] = []
    while sum(b'"flows/update"' in m for m in messages) < updates:
        raw = await asyncio.wait_for(ws.read_message(), 30)
        assert raw is not None, "the web UI closed the websocket"
        message = raw.encode() if isinstance(raw, str) else raw
        if json.loads(message)["type"].startswith("flows/") and flow_id.encode() in message:
            messages.append(message)
    return messages


def test_the_web_ui_pushes_and_serves_only_the_shadow_views_scrubbed_copies():
    """What a browser gets from mitmweb's real web server under ``stagedoor inspect``.

    Pushes (``/updates``): mitmweb tells browsers about flows from its view's signals, which
    ``install`` re-connects to the ShadowView (``WebMaster._sig_view_*``). Lookups (``/flows``,
    bodies, ``/flows/dump``): mitmweb's handlers find flows through ``master.view``, which
    ``install`` points at the ShadowView. If an upgrade wires either another way, the browser
    is not told of the flow, cannot find it, or is shown the live one: this fails.
    """
    async def check(m: WebMaster, shadow: insp.ShadowView) -> tuple[list[bytes], dict[str, bytes]]:
        server, port = await serve_web_ui(m)
        ws = await tornado.websocket.websocket_connect(tornado.httpclient.HTTPRequest(
            f"ws://127.0.0.1:{port}/updates", headers={"Authorization": f"Bearer {WEB_TOKEN}"}))
        try:
            f = live_flow()
            hooks_done = asyncio.ensure_future(through_hooks(m, f, 401))
            pushed = await pushed_flow_messages(ws, f.id, updates=2)
            await hooks_done
            assert f.request.headers["authorization"] == f"Bearer {TOKEN}"  # live: untouched
            served = {path: await web_get(port, path) for path in (
                "/flows", f"/flows/{f.id}/response/content.data", "/flows/dump")}
            return pushed, served
        finally:
            ws.close()
            server.stop()

    pushed, served = run_master(check)
    assert json.loads(pushed[0])["type"] == "flows/add"
    last = json.loads(pushed[-1])["payload"]["flow"]
    assert last["request"]["path"] == "/api/insights/services/x?token=[REDACTED]&page=2"
    listing = json.loads(served["/flows"])
    assert len(listing) == 1 and listing[0]["id"] == last["id"]
    assert listing[0]["comment"].startswith("deny check=barrier plugin=insights")
    assert "Bearer [REDACTED]" in served["/flows"].decode()
    body = next(v for k, v in served.items() if k.endswith("content.data"))
    assert json.loads(body)["request"]["url"] == "/services/x?token=[REDACTED]"
    for text in (*pushed, *served.values()):
        assert_clean(text)


def test_webmasters_live_flow_writers_are_the_ones_install_unloads():
    async def check() -> None:
        m = WebMaster(options.Options(), with_termlog=False)
        assert isinstance(m.addons.get("save"), Save)
        assert isinstance(m.addons.get("savehar"), SaveHar)
        for name in insp.REFUSED_OPTIONS:
            assert name in m.options, name
        await m.addons.trigger_event(hooks.DoneHook())

    asyncio.run(check())


# (That every flow hook is followed by an update hook is pinned by behaviour in
# tests/test_lean.py: test_stock_handle_lifecycle_dispatches_and_follows_with_update.)


# -- the web server's log --------------------------------------------------------------------------
def test_the_web_access_log_never_repeats_the_login_token(caplog: pytest.LogCaptureFixture):
    insp.quiet_web_access_log()
    access = logging.getLogger("tornado.access")
    with caplog.at_level(logging.WARNING, logger="tornado.access"):
        access.warning("%d %s %.2fms", 404, "GET /favicon.ico?token=0123abcd (127.0.0.1)", 1.0)
        access.info("%d %s %.2fms", 200, "GET /?token=0123abcd (127.0.0.1)", 1.0)
    assert [r.getMessage() for r in caplog.records] == [
        "404 GET /favicon.ico?token=[REDACTED] (127.0.0.1) 1.00ms"]


@pytest.fixture(autouse=True)
def _no_leftover_connections() -> Iterator[None]:
    yield
    app.ClientConnection.connections.clear()
