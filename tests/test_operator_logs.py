"""Logs an operator can join and trust, one end-to-end test per finding of the first incident:
a 502 and its upstream warning share a request id; every refusal says why; the start and reload
lines name the plugins; a reload that takes plugins or routes away warns; a refused edit that is
fixed says so; editors' temporary files are never named; the inspect UI's favicon logs no error;
``stopped`` is the last thing a sidecar says, with its listeners already closed."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from . import forkserver
from .conftest import ROOT, Sidecar, closed_port, start_sidecar, write_config
from .httpraw import request
from .test_live_e2e import connection_refused, wait_for

pytestmark = pytest.mark.e2e

POLICY_A = """\
pluginId: alpha
routes:
  - path: /health
    auth: unauthenticated
    respond: {status: 200, json: {ok: true}}
  - path: /items/{id}
    methods: [GET]
    auth: unauthenticated
    params: {id: {pattern: '^[a-z]+$', message: 'Invalid item: {value}'}}
    upstream: ${ops.upstreamUrl}/v1/items/{id}
  - path: /private
    respond: {status: 200, json: {private: true}}
"""
POLICY_B = """\
pluginId: beta
routes:
  - path: /ping
    auth: unauthenticated
    respond: {status: 200, json: {pong: true}}
  - path: /pong
    auth: unauthenticated
    respond: {status: 200, json: {ping: true}}
"""


class Ops:
    """A sidecar with plugins alpha and beta, its policy directory, and its JSON logs."""

    def __init__(self, tmp: Path) -> None:
        self.policies = tmp / "policies"
        self.policies.mkdir()
        (self.policies / "alpha.yaml").write_text(POLICY_A)
        (self.policies / "beta.yaml").write_text(POLICY_B)
        # An upstream that refuses every connection: forwarded requests end in 502.
        self.config = write_config(tmp / "app-config.yaml", f"""\
            backend: {{baseUrl: "http://127.0.0.1:{closed_port()}"}}
            ops: {{upstreamUrl: "http://127.0.0.1:{closed_port()}"}}
            stagedoor: {{auth: {{userTokens: false, pluginTokens: false}}}}
            """)
        self.sidecar: Sidecar = start_sidecar([self.config], self.policies)

    def get(self, target: str, method: str = "GET", **headers: str) -> Any:
        return request(self.sidecar.port, method, target,
                       {k.replace("_", "-"): v for k, v in headers.items()})

    def diagnostics(self) -> list[dict[str, Any]]:
        lines = []
        for text in list(self.sidecar.stderr_lines):
            try:
                lines.append(json.loads(text))
            except ValueError:
                continue
        return lines

    def messages(self, level: str | None = None) -> list[str]:
        return [d["message"] for d in self.diagnostics() if level in (None, d.get("level"))]

    def wait_message(self, pattern: str, what: str) -> str:
        found = wait_for(lambda: [m for m in self.messages() if re.search(pattern, m)], 10,
                         what)
        return found[-1]

    def access(self, request_id: str) -> dict[str, Any]:
        return wait_for(lambda: next((r for r in self.sidecar.access_log()
                                      if r.get("request_id") == request_id), None),
                        5, f"the access-log line of {request_id}")


@pytest.fixture
def ops(tmp_path: Path) -> Iterator[Ops]:
    env = Ops(tmp_path)
    yield env
    env.sidecar.stop()


def test_a_502_line_has_a_reason_and_the_upstream_warning_its_request_id(ops):
    resp = ops.get("/api/alpha/items/abc", X_Request_Id="incident-502")
    assert resp.status == 502
    line = ops.access("incident-502")
    assert (line["status"], line["check"]) == (502, "upstream")
    assert line["reason"].startswith("upstream error: "), line
    warnings = wait_for(lambda: [d for d in ops.diagnostics()
                                 if d["message"].startswith("upstream error for")], 5,
                        "the upstream-error warning")
    assert warnings[-1]["request_id"] == "incident-502", warnings
    assert warnings[-1]["level"] == "warning"


def test_every_line_stagedoor_refused_says_why(ops):
    cases = {"r-401": ("GET", "/api/alpha/private", 401),
             "r-404-plugin": ("GET", "/api/nope/x", 404),
             "r-405": ("DELETE", "/api/alpha/items/abc", 405),
             "r-400": ("GET", "/api/alpha/items/ABC", 400),
             "r-400-path": ("GET", "/api/alpha/items/%2e%2e", 400),
             "r-502": ("GET", "/api/alpha/items/abc", 502)}
    for request_id, (method, target, status) in cases.items():
        assert ops.get(target, method, X_Request_Id=request_id).status == status, request_id
    for request_id, (_, _, status) in cases.items():
        line = ops.access(request_id)
        assert line["status"] == status
        assert line.get("reason"), f"no reason on the {status} line: {line}"
    allowed = ops.get("/api/alpha/health", X_Request_Id="r-200")
    assert allowed.status == 200 and "reason" not in ops.access("r-200")


def test_the_start_and_reload_lines_name_the_plugins(ops):
    started = [m for m in ops.messages() if m.startswith("stagedoor listening on")]
    assert started and started[0].endswith("plugins: alpha, beta)"), started
    (ops.policies / "gamma.yaml").write_text(POLICY_B.replace("beta", "gamma"))
    line = ops.wait_message(r"^stagedoor reloaded", "the reload line")
    assert "3 plugin(s)" in line and "plugins: alpha, beta, gamma" in line, line


def test_a_reload_that_removes_a_plugin_warns_naming_it(ops):
    (ops.policies / "beta.yaml").unlink()
    warning = ops.wait_message(r"^stagedoor reload removed", "the removal warning")
    assert "plugin(s) beta" in warning and "/api/beta/..." in warning, warning
    assert warning in ops.messages("warning")
    assert ops.get("/api/beta/ping").status == 404


def test_a_reload_that_removes_a_route_warns_naming_it(ops):
    (ops.policies / "beta.yaml").write_text(POLICY_B.split("  - path: /pong")[0])
    warning = ops.wait_message(r"^stagedoor reload removed", "the removal warning")
    assert warning == "stagedoor reload removed route(s) GET /api/beta/pong", warning
    assert warning in ops.messages("warning")


def test_a_refused_edit_that_is_fixed_logs_recovered(ops):
    (ops.policies / "alpha.yaml").write_text(POLICY_A.replace("'^[a-z]+$'", "'^[a-z(+$'"))
    ops.wait_message(r"^stagedoor reload refused", "the refusal")
    assert not [m for m in ops.messages() if "recovered" in m]
    (ops.policies / "alpha.yaml").write_text(POLICY_A.replace("/health", "/healthz"))
    line = ops.wait_message(r"recovered", "the recovered line")
    assert line == ("stagedoor reload recovered: the edit loads and is served (after 1 failed "
                    "reload(s))"), line
    assert ops.get("/api/alpha/healthz").status == 200


def test_an_undone_refused_edit_logs_recovered_too(ops):
    good = (ops.policies / "beta.yaml").read_text()
    (ops.policies / "beta.yaml").write_text(good + "  - nonsense\n")
    ops.wait_message(r"^stagedoor reload refused", "the refusal")
    (ops.policies / "beta.yaml").write_text(good)  # back to exactly what is served
    line = ops.wait_message(r"recovered", "the recovered line")
    assert "the files are back to what is being served" in line, line


def test_sed_in_place_and_editor_files_are_never_named(ops):
    # vim's swap file and its 4913 probe, a backup, an emacs lock: no reload at all
    for name in (".alpha.yaml.swp", "4913", "alpha.yaml~", ".#alpha.yaml"):
        (ops.policies / name).write_text("x")
    # sed -i writes sedXXXXXX next to the file and renames it over the original
    subprocess.run(["sed", "-i", "s|/health|/status|", str(ops.policies / "alpha.yaml")],
                   check=True, timeout=30)
    line = ops.wait_message(r"^stagedoor reloaded", "the reload line")
    assert ops.get("/api/alpha/status").status == 200
    trigger = line.split("(", 1)[1].split(")", 1)[0]
    assert trigger == "alpha.yaml added" or trigger.startswith("alpha.yaml "), line
    temp = re.compile(r"sed[A-Za-z0-9]{6}|\.swp|4913|alpha\.yaml~|\.#alpha")
    assert not [m for m in ops.messages() if temp.search(m)], ops.messages()
    assert len([m for m in ops.messages() if m.startswith("stagedoor reloaded")]) == 1


def test_stopped_is_the_last_line_and_the_listeners_are_closed_by_then(tmp_path):
    env = Ops(tmp_path)
    sidecar = env.sidecar
    admin = re.search(r"admin listening on http://[\d.]+:(\d+)", "\n".join(env.messages()))
    assert admin is not None
    sidecar.proc.send_signal(signal.SIGTERM)
    assert sidecar.proc.wait(20) == 0
    for thread in sidecar._threads:
        thread.join(5)
    messages = env.messages()
    assert messages[-1] == "stagedoor stopped", messages[-3:]
    assert connection_refused(sidecar.port) and connection_refused(int(admin.group(1)))


def test_opening_the_inspect_ui_logs_no_error_about_its_favicon(tmp_path):
    env = {"INSIGHTS_API_URL": "http://127.0.0.1:1", "BACKSTAGE_BASE_URL": "http://127.0.0.1:1",
           "PYTHONUNBUFFERED": "1"}
    proc = forkserver.popen([sys.executable, "-m", "stagedoor_addons", "inspect", "--listen",
                             "127.0.0.1:0", "--web", "127.0.0.1:0"],
                            env={**_clean_env(), **env}, text=True, stderr_to_stdout=True)
    lines: list[str] = []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:  # bounded by the UI line below, or the process ending
            lines.append(line)
            if "web UI at" in line:
                break
        match = re.search(r"http://127\.0\.0\.1:(\d+)/\?token=(\w+)", "".join(lines))
        assert match, "".join(lines)
        port, token = int(match.group(1)), match.group(2)
        page = request(port, "GET", f"/?token={token}")
        assert page.status == 200
        cookie = "; ".join(v.split(";", 1)[0] for v in page.headers.get_all("set-cookie") or [])
        for target in ("/favicon.ico", "/static/favicon.ico"):  # what a browser asks for
            assert request(port, "GET", target, {"Cookie": cookie}).status == 200, target
            assert request(port, "GET", target).status in (200, 403), target
    finally:
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=20)
        lines.append(rest)
    noisy = [line for line in "".join(lines).splitlines()
             if "favicon" in line or '"level":"error"' in line or " ERROR " in line]
    assert not noisy, noisy


def _clean_env() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if not k.startswith(("INSIGHTS_", "BACKSTAGE_"))}


DELEGATING_POLICY = """\
pluginId: insights
routes:
  - path: /services/{id}
    methods: [GET]
    auth: [user]
    params: {id: {pattern: '^[a-z0-9-]+$'}}
    permission: insights.service.read
    upstream: http://127.0.0.1:1/v1/services/{id}
permissions:
  - permission: insights.service.read
    effect: delegate
"""


def test_lines_logged_inside_a_decision_carry_its_request_id(tmp_path):
    """A permission delegation that fails is logged deep in the core, which knows no request:
    the line still carries the request id of the request it was for."""
    from .test_cli import stagedoor

    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "insights.yaml").write_text(DELEGATING_POLICY)
    dev = tmp_path / "dev"
    sidecar = start_sidecar([ROOT / "config" / "app-config.yaml"], policies,
                            env={"INSIGHTS_API_URL": "http://127.0.0.1:1"},
                            extra_args=["--dev", "--dev-dir", str(dev)])
    try:
        token = stagedoor("token", "--dev-dir", str(dev)).stdout.strip()
        resp = request(sidecar.port, "GET", "/api/insights/services/payments-api",
                       {"Authorization": f"Bearer {token}", "X-Request-Id": "deep-1"})
        assert resp.status == 403
        lines = wait_for(lambda: [json.loads(t) for t in list(sidecar.stderr_lines)
                                  if '"logger":"stagedoor.permissions"' in t], 5,
                         "the permission warning")
        assert lines[-1]["request_id"] == "deep-1", lines
    finally:
        sidecar.stop()
