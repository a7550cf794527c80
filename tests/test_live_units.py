"""Unit tests of the live-operation parts: log formatting and redaction, operations settings,
load/apply (what a reload keeps), the reloader, the watch plan, metrics and the admin answers."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
from pathlib import Path
from types import MappingProxyType

import pytest
from mitmproxy.test import tflow
from prometheus_client.parser import text_string_to_metric_families
from watchfiles import Change

from stagedoor.auth import Principal
from stagedoor.config import ConfigError, load_config
from stagedoor.decide import Context, Decision, Deny, Forward, Upstream
from stagedoor.errors import ApiError
from stagedoor.logsetup import (
    JsonFormatter,
    configure_logging,
    format_access_record,
    iso_time,
    redact_target,
)
from stagedoor.policy import PolicyProblem
from stagedoor.runtime import (
    DEFAULT_REDACTED_QUERY_KEYS,
    OperationsSettings,
    Runtime,
    State,
    input_fingerprint,
    load_state,
    parse_listen,
)
from stagedoor_addons.accesslog import AccessLog, access_record
from stagedoor_addons.admin import AdminServer, Metrics, parse_head
from stagedoor_addons.lifecycle import Lifecycle
from stagedoor_addons.record import META, FlowRecord
from stagedoor_addons.reload import Reloader, describe_changes, refusal_message, watch_plan

KEYS = frozenset(DEFAULT_REDACTED_QUERY_KEYS)

POLICY = """\
pluginId: unit
routes:
  - path: /things/{id}
    auth: [user]
    params: {id: '^[a-z]+$'}
    upstream: ${unit.url}/things/{id}
"""


# -- redaction and formatting ----------------------------------------------------------------------
@pytest.mark.parametrize(("target", "expected"), [
    ("/a?token=s3cr3t&x=1", "/a?token=[REDACTED]&x=1"),
    ("/a?TOKEN=s3cr3t", "/a?TOKEN=[REDACTED]"),
    ("/a?%74oken=s3cr3t", "/a?%74oken=[REDACTED]"),
    ("/a?%74%6F%6B%65%6E=s3cr3t", "/a?%74%6F%6B%65%6E=[REDACTED]"),
    ("/a?access%5Ftoken=s3cr3t", "/a?access%5Ftoken=[REDACTED]"),
    ("/a?api+key=1&apikey=2", "/a?api+key=1&apikey=[REDACTED]"),
    ("/a?token", "/a?token"),
    ("/a?token=", "/a?token=[REDACTED]"),
    ("/a?x=token", "/a?x=token"),
    ("/a?code=1&code=2", "/a?code=[REDACTED]&code=[REDACTED]"),
    ("/a", "/a"),
    ("/a?", "/a?"),
    ("/a?%zz=1&sig=2", "/a?%zz=1&sig=[REDACTED]"),
])
def test_redact_target(target, expected):
    assert redact_target(target, KEYS) == expected


def test_redact_target_uses_the_configured_keys():
    assert redact_target("/a?sessionid=1&token=2", {"sessionid"}) == \
        "/a?sessionid=[REDACTED]&token=2"


def test_access_record_json_drops_none_values():
    line = format_access_record({"a": 1, "b": None, "c": "x y"}, "json")
    assert json.loads(line) == {"a": 1, "c": "x y"}
    assert "\n" not in line


def test_access_record_text_is_logfmt_with_quoting():
    line = format_access_record({"status": 200, "route": "/things/{id}", "reason": 'bad "x" y',
                                 "principal": None, "empty": "", "ms": 1.5}, "text")
    assert line == 'status=200 route=/things/{id} reason="bad \\"x\\" y" empty="" ms=1.5'


def test_iso_time_is_utc_with_milliseconds():
    assert iso_time(0.1234) == "1970-01-01T00:00:00.123Z"


def test_json_formatter_writes_one_object_per_record():
    record = logging.LogRecord("stagedoor.x", logging.WARNING, __file__, 1, "hello %s", ("w",),
                               None)
    entry = json.loads(JsonFormatter().format(record))
    assert entry["level"] == "warning" and entry["logger"] == "stagedoor.x"
    assert entry["message"] == "hello w" and entry["time"].endswith("Z")


def test_configure_logging_replaces_its_own_handler_and_sets_the_level():
    root = logging.getLogger()
    saved_level, saved = root.level, list(root.handlers)
    try:
        first, second = io.StringIO(), io.StringIO()
        configure_logging("info", "json", first)
        configure_logging("warning", "text", second)
        logging.getLogger("stagedoor.t").info("quiet")
        logging.getLogger("stagedoor.t").warning("loud")
        assert first.getvalue() == ""
        assert second.getvalue().rstrip().endswith("WARNING stagedoor.t: loud")
        assert logging.getLogger("watchfiles").level == logging.WARNING
        with pytest.raises(ValueError, match="log format"):
            configure_logging("info", "xml")
        with pytest.raises(ValueError, match="log level"):
            configure_logging("loud", "json")
    finally:
        for handler in list(root.handlers):
            if handler not in saved:
                root.removeHandler(handler)
        root.setLevel(saved_level)


# -- operations settings ---------------------------------------------------------------------------
def config_from(tmp_path: Path, text: str):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return load_config([path])


def test_operations_defaults(tmp_path):
    ops = OperationsSettings.from_config(config_from(tmp_path, "{}"))
    assert ops == OperationsSettings("info", "json", ("127.0.0.1", 9464), True, 10.0)


def test_operations_from_config(tmp_path):
    ops = OperationsSettings.from_config(config_from(tmp_path, """\
stagedoor:
  log: {level: DEBUG, format: text}
  admin: {listen: '0.0.0.0:0'}
  reload: {watch: false}
  shutdown: {gracePeriod: 1500ms}
"""))
    assert ops == OperationsSettings("debug", "text", ("0.0.0.0", 0), False, 1.5)


@pytest.mark.parametrize("value", ["off", False])
def test_admin_listener_can_be_switched_off(tmp_path, value):
    config = config_from(tmp_path, f"stagedoor: {{admin: {{listen: {json.dumps(value)}}}}}")
    assert OperationsSettings.from_config(config).admin_listen is None


@pytest.mark.parametrize(("yaml", "key"), [
    ("stagedoor: {log: {level: loud}}", "stagedoor.log.level"),
    ("stagedoor: {log: {format: xml}}", "stagedoor.log.format"),
    ("stagedoor: {admin: {listen: 'nowhere'}}", "stagedoor.admin.listen"),
    ("stagedoor: {admin: {listen: '127.0.0.1:99999'}}", "stagedoor.admin.listen"),
    ("stagedoor: {shutdown: {gracePeriod: soon}}", "stagedoor.shutdown.gracePeriod"),
])
def test_bad_operations_values_name_the_key_and_file(tmp_path, yaml, key):
    with pytest.raises(ConfigError, match=f"'{key}' in '.*c.yaml'"):
        OperationsSettings.from_config(config_from(tmp_path, yaml))


def test_parse_listen():
    assert parse_listen("127.0.0.1:0") == ("127.0.0.1", 0)
    assert parse_listen("[::1]:9464") == ("::1", 9464)
    assert parse_listen(":9464") == ("127.0.0.1", 9464)
    with pytest.raises(ValueError):
        parse_listen("9464")


# -- load, apply, fingerprint ----------------------------------------------------------------------
class Files:
    def __init__(self, tmp: Path) -> None:
        self.policies = tmp / "policies"
        self.policies.mkdir()
        self.policy = self.policies / "unit.yaml"
        self.policy.write_text(POLICY)
        self.config = tmp / "app-config.yaml"
        self.write_config("http://127.0.0.1:1", "http://127.0.0.1:2")

    def write_config(self, base_url: str, unit_url: str, extra: str = "") -> None:
        self.config.write_text(f"backend: {{baseUrl: '{base_url}'}}\n"
                               f"unit: {{url: '{unit_url}'}}\n{extra}")

    def runtime(self) -> Runtime:
        return Runtime.load([str(self.config)], str(self.policies))

    def state(self, previous: State | None = None) -> State:
        return load_state([str(self.config)], str(self.policies), previous)


def upstream_port(runtime: Runtime) -> int:
    route = runtime.state.policies.plugins["unit"].routes[0]
    assert route.upstream is not None
    return route.upstream.port


def test_apply_swaps_policies_and_keeps_the_verifier_when_auth_is_unchanged(tmp_path):
    files = Files(tmp_path)
    runtime = files.runtime()
    verifier, authorizer = runtime.state.verifier, runtime.state.authorizer
    files.write_config("http://127.0.0.1:1", "http://127.0.0.1:3")
    report = runtime.apply(files.state(runtime.state))
    assert upstream_port(runtime) == 3
    assert runtime.state.verifier is verifier and runtime.state.authorizer is authorizer
    assert not report.verifier_replaced and not report.authorizer_replaced
    assert (report.plugins, report.routes, report.restart_needed) == (1, 1, ())


def test_apply_replaces_the_verifier_when_auth_config_changes_and_keeps_its_counts(tmp_path):
    files = Files(tmp_path)
    runtime = files.runtime()
    old = runtime.state.verifier
    assert old is not None
    old.stats["verified_ok"] = 7
    files.write_config("http://127.0.0.1:9", "http://127.0.0.1:2")
    report = runtime.apply(files.state(runtime.state))
    assert report.verifier_replaced and runtime.state.verifier is not old
    assert runtime.state.verifier is not None and runtime.state.verifier.settings.base_url == \
        "http://127.0.0.1:9"
    assert runtime.retired_token_stats["verified_ok"] == 7
    assert report.authorizer_replaced  # the permission backend is found through baseUrl


def test_apply_reports_settings_that_need_a_restart(tmp_path):
    files = Files(tmp_path)
    runtime = files.runtime()
    files.write_config("http://127.0.0.1:1", "http://127.0.0.1:2",
                       "stagedoor: {listen: '127.0.0.1:1234', admin: {listen: '127.0.0.1:0'}}")
    report = runtime.apply(files.state(runtime.state))
    assert report.restart_needed == ("stagedoor.listen", "stagedoor.admin.listen")


def test_input_fingerprint_follows_content_not_timestamps(tmp_path):
    files = Files(tmp_path)
    args = ([str(files.config)], str(files.policies))
    first = input_fingerprint(*args)
    os.utime(files.policy, (1, 1))
    (files.policies / "notes.txt").write_text("not read by a load")
    assert input_fingerprint(*args) == first
    files.policy.write_text(POLICY + "\n")
    assert input_fingerprint(*args) != first
    assert load_state(*args).fingerprint == input_fingerprint(*args)


# -- reloader --------------------------------------------------------------------------------------
def test_reloader_refuses_a_broken_edit_once_and_keeps_the_old_state(tmp_path, caplog):
    files = Files(tmp_path)
    runtime = files.runtime()
    reloader = Reloader(runtime)
    before = runtime.state.policies

    async def scenario() -> list[bool | None]:
        results = [await reloader.reload("nothing changed")]
        files.policy.write_text(POLICY.replace("'^[a-z]+$'", "'^[a-z(+$'"))
        results.append(await reloader.reload("edit"))
        results.append(await reloader.reload("same broken content"))
        files.policy.write_text(POLICY.replace("/things/{id}\n", "/items/{id}\n"))
        results.append(await reloader.reload("fixed"))
        return results

    with caplog.at_level(logging.INFO, "stagedoor.reload"):
        results = asyncio.run(scenario())
    assert results == [None, False, None, True]
    refused = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert len(refused) == 1
    assert f"{files.policy}:5: parameter 'id': invalid regex" in refused[0]
    assert runtime.state.policies is not before
    assert runtime.state.policies.plugins["unit"].routes[0].path == "/items/{id}"
    assert reloader.stats == {"success": 1, "failure": 1}


def test_reloader_forced_reload_runs_even_without_a_change(tmp_path):
    files = Files(tmp_path)
    runtime = files.runtime()
    reloader = Reloader(runtime)
    before = runtime.state.policies
    assert asyncio.run(reloader.reload("SIGHUP", force=True)) is True
    assert runtime.state.policies is not before
    assert reloader.last_success is not None


def test_refusal_message_is_one_line_with_every_problem():
    problems = [PolicyProblem("p/a.yaml", i, f"problem\n{i}") for i in range(1, 8)]
    text = refusal_message(problems)
    assert "\n" not in text
    assert text.startswith("p/a.yaml:1: problem 1; p/a.yaml:2: problem 2")
    assert text.endswith("; and 2 more problem(s)")


def test_describe_changes():
    changes = {(Change.modified, "/p/a.yaml"), (Change.added, "/p/..data"),
               (Change.deleted, "/p/..2026"), (Change.added, "/p/b.yaml")}
    assert describe_changes(changes) == "..2026 deleted, ..data added, a.yaml modified and 1 more"


def test_watch_plan_covers_configmap_symlinks_and_ignores_neighbours(tmp_path):
    volume = tmp_path / "policies"
    data = volume / "..2026_01"
    data.mkdir(parents=True)
    (data / "unit.yaml").write_text(POLICY)
    (volume / "..data").symlink_to(data.name)
    (volume / "unit.yaml").symlink_to("..data/unit.yaml")
    config_dir = tmp_path / "config"
    config_dir.mkdir()
    config = config_dir / "app-config.yaml"
    config.write_text("{}")
    plan = watch_plan([str(config)], str(volume))
    real = os.path.realpath
    assert plan.dirs == tuple(sorted({real(volume), real(config_dir), real(data)}))
    assert plan(Change.modified, f"{real(volume)}/anything")
    assert plan(Change.added, f"{real(config_dir)}/..data")
    assert plan(Change.modified, f"{real(config_dir)}/app-config.yaml")
    assert not plan(Change.modified, f"{real(config_dir)}/access.log")
    assert plan(Change.modified, f"{real(data)}/unit.yaml")
    assert not plan(Change.modified, f"{real(data)}/other.yaml")


# -- metrics, access log, lifecycle, admin ---------------------------------------------------------
def handled_record(state: State, denied_at: str | None = None, status: int = 403,
                   **fields: object) -> FlowRecord:
    """The record the gateway leaves on a flow it forwarded (or denied at ``denied_at``)."""
    route = state.policies.plugins["unit"].routes[0]
    context = Context("/things/a?token=x", "unit", route,
                      Principal("user", "user:default/jane"), MappingProxyType({"id": "a"}))
    decision: Decision
    if denied_at is not None:
        decision = Deny(context, ApiError(status, "refused"), denied_at)
    else:
        decision = Forward(context, Upstream("http", "127.0.0.1", 2, "/things/a"), 30.0)
    record = FlowRecord("rid-1", "/api/unit/things/a?token=x", 0.0, state)
    record.decided(decision)
    for name, value in fields.items():
        setattr(record, name, value)
    return record


def handled_flow(state: State, status: int = 200, denied_at: str | None = None,
                 **fields: object):
    flow = tflow.tflow(resp=True)
    flow.response.status_code = status
    flow.metadata[META] = handled_record(state, denied_at, status, **fields)
    return flow


def scrape(metrics: Metrics) -> dict:
    server = AdminServer(metrics, Lifecycle(metrics.runtime), None)
    status, _, body = server.answer("GET", "/metrics")
    assert status == 200
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(body.decode()) for s in f.samples}


def test_metrics_count_by_labels_and_cache_the_children(tmp_path):
    metrics = Metrics(Files(tmp_path).runtime())
    state = metrics.runtime.state
    for _ in range(3):
        metrics.response(handled_flow(state, 200, forwarded_at=0.0))
    metrics.response(handled_flow(state, 403, denied_at="principal"))
    samples = scrape(metrics)
    allow = (("check", "allow"), ("decision", "allow"), ("plugin", "unit"),
             ("route", "/things/{id}"), ("status", "200"))
    assert samples[("stagedoor_requests_total", allow)] == 3
    assert samples[("stagedoor_request_duration_seconds_count",
                    (("plugin", "unit"), ("route", "/things/{id}")))] == 4
    assert samples[("stagedoor_upstream_duration_seconds_count",
                    (("plugin", "unit"), ("route", "/things/{id}")))] == 3
    assert len(metrics._request_children) == 2


def test_metrics_registry_is_per_instance(tmp_path):
    runtime = Files(tmp_path).runtime()
    one, two = Metrics(runtime), Metrics(runtime)
    one.response(handled_flow(runtime.state))
    assert sum(v for (n, _), v in scrape(two).items() if n == "stagedoor_requests_total") == 0


def test_token_counters_include_replaced_verifiers(tmp_path):
    runtime = Files(tmp_path).runtime()
    assert runtime.state.verifier is not None
    runtime.state.verifier.stats["verified_ok"] = 2
    runtime.retired_token_stats["verified_ok"] = 5
    samples = scrape(Metrics(runtime))
    assert samples[("stagedoor_token_verifications_total", (("outcome", "ok"),))] == 7


def test_upstream_error_is_counted_with_the_gateway_status(tmp_path):
    metrics = Metrics(Files(tmp_path).runtime())
    flow = tflow.tflow(err=True)
    record = handled_record(metrics.runtime.state, forwarded_at=0.0)
    record.failed("upstream", 504)
    flow.metadata[META] = record
    metrics.error(flow)
    samples = scrape(metrics)
    assert samples[("stagedoor_requests_total", (("check", "upstream"), ("decision", "error"),
                                                 ("plugin", "unit"), ("route", "/things/{id}"),
                                                 ("status", "504")))] == 1


def test_access_record_from_a_flow(tmp_path):
    flow = handled_flow(Files(tmp_path).runtime().state, upstream_status=200, forwarded_at=1.0)
    flow.request.timestamp_start = 99.5
    rec = access_record(flow, 200, KEYS, now=100.0, now_perf=1.25)
    assert rec["path"] == "/api/unit/things/a?token=[REDACTED]"
    assert rec["latency_ms"] == 500.0 and rec["upstream_ms"] == 250.0
    assert rec["request_id"] == "rid-1" and rec["reason"] is None


def test_access_log_writes_lines_and_survives_a_closed_stream(tmp_path):
    runtime = Files(tmp_path).runtime()
    out = io.StringIO()
    AccessLog(runtime, out).response(handled_flow(runtime.state))
    assert json.loads(out.getvalue())["request_id"] == "rid-1"
    out.close()
    broken = AccessLog(runtime, out)
    broken.response(handled_flow(runtime.state))  # must not raise
    assert broken._broken


def test_lifecycle_counts_requests_in_flight(tmp_path):
    lifecycle = Lifecycle(Files(tmp_path).runtime())
    one, two = tflow.tflow(), tflow.tflow()
    lifecycle.requestheaders(one)
    lifecycle.requestheaders(two)
    assert lifecycle.in_flight == 2
    lifecycle.response(one)
    lifecycle.error(two)
    lifecycle.error(two)
    assert lifecycle.in_flight == 0


def test_admin_answers(tmp_path):
    runtime = Files(tmp_path).runtime()
    server = AdminServer(Metrics(runtime), Lifecycle(runtime), None)
    assert server.answer("GET", "/healthz")[0] == 200
    assert server.answer("POST", "/healthz")[0] == 405
    assert server.answer("GET", "/other")[0] == 404
    assert server.answer("", "")[0] == 400
    status, ctype, _ = server.answer("GET", "/metrics",
                                     "application/openmetrics-text; version=1.0.0")
    assert status == 200 and ctype.startswith("application/openmetrics-text")
    assert parse_head(b"GET /metrics?x=1 HTTP/1.1\r\nAccept: text/plain\r\n\r\n") == \
        ("GET", "/metrics", "text/plain")
    assert parse_head(b"garbage\r\n\r\n")[0] == ""


def test_readyz_is_503_until_the_proxy_listens_and_while_shutting_down(tmp_path):
    runtime = Files(tmp_path).runtime()
    lifecycle = Lifecycle(runtime)
    server = AdminServer(Metrics(runtime), lifecycle, None)
    status, _, body = server.answer("GET", "/readyz")
    assert status == 503 and json.loads(body)["reasons"] == ["proxy not listening"]
    lifecycle.draining = True
    assert "shutting down" in json.loads(server.answer("GET", "/readyz")[2])["reasons"]
