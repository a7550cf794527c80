"""The bundled demo upstream: a tiny "insights" API that also plays the Backstage backend's key
endpoints (user-token JWKS and plugin-token JWKS), so ``./run.sh demo`` needs no setup.

Besides ``/v1/services/{id}`` (policies/insights.yaml) it keeps notes about services and
searches them (``examples/notes/notes.yaml``): those endpoints want their own API token (the
``Authorization`` stagedoor sets from app-config, never the caller's), and answer with the
headers stagedoor's response filter removes (``Set-Cookie``, ``X-Powered-By``,
``X-Internal-Trace``)."""

from __future__ import annotations

import json
import secrets
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, urlsplit

SERVICES: dict[str, dict[str, Any]] = {
    "payments-api": {"id": "payments-api", "owner": "group:default/payments", "tier": 1,
                     "score": 92, "checks": {"docs": "pass", "oncall": "pass", "slo": "warn"}},
    "search": {"id": "search", "owner": "group:default/discovery", "tier": 2, "score": 78,
               "checks": {"docs": "warn", "oncall": "pass", "slo": "pass"}},
}


class DemoBackend(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], user_jwks: dict[str, Any],
                 plugin_jwks: dict[str, Any], notes_token: str | None = None) -> None:
        super().__init__(address, _Handler)
        self.user_jwks = user_jwks
        self.plugin_jwks = plugin_jwks
        #: What the notes endpoints want in ``Authorization: Bearer ...``.
        self.notes_token = notes_token or secrets.token_urlsafe(24)
        self.notes: dict[str, list[dict[str, Any]]] = {
            "payments-api": [{"id": 1, "text": "Runbook moved to the wiki", "tags": ["ops"]}],
        }
        self.lock = threading.Lock()

    @property
    def base_url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> threading.Thread:
        # shutdown() waits for the loop to look at its flag: every 50 ms, not the default
        # 0.5 s, so the process exits as soon as the sidecar has stopped.
        thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05},
                                  name="demo-upstream", daemon=True)
        thread.start()
        return thread


class _Handler(BaseHTTPRequestHandler):
    server: DemoBackend
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _json(self, status: int, payload: Any, extra: dict[str, str] | None = None) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        for name, value in (extra or {}).items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    #: What a careless API sends along: stagedoor's response filter keeps it from the client.
    _CHATTY = {"Set-Cookie": "notes_session=demo; HttpOnly", "X-Powered-By": "demo-notes/1.0",
               "X-Internal-Trace": "trace-7f3a"}

    def _notes_api(self) -> dict[str, Any] | None:
        """The notes endpoints: None when answered here already (401)."""
        if self.headers.get("authorization") != f"Bearer {self.server.notes_token}":
            self._json(401, {"error": "the notes API wants its own token"})
            return None
        parts = urlsplit(self.path)
        return {"path": parts.path, "query": parse_qsl(parts.query, keep_blank_values=True)}

    def do_POST(self) -> None:
        path = self.path.partition("?")[0]
        if path.startswith("/v1/services/") and path.endswith("/notes"):
            request = self._notes_api()
            if request is None:
                return
            length = int(self.headers.get("content-length") or 0)
            note = json.loads(self.rfile.read(length) or b"{}")
            service_id = path[len("/v1/services/"):-len("/notes")]
            with self.server.lock:
                notes = self.server.notes.setdefault(service_id, [])
                created = {"id": len(notes) + 1, **note}
                if ("dryRun", "true") not in request["query"]:
                    notes.append(created)
            return self._json(201, created, self._CHATTY)
        self._json(404, {"error": "not found"})

    def do_HEAD(self) -> None:
        self.do_GET()

    def do_GET(self) -> None:
        path = self.path.partition("?")[0]
        if path == "/api/auth/.well-known/jwks.json":
            return self._json(200, self.server.user_jwks)
        if path.startswith("/api/") and path.endswith("/.backstage/auth/v1/jwks.json"):
            return self._json(200, self.server.plugin_jwks)
        if path.startswith("/v1/services/") and path.endswith("/notes"):
            request = self._notes_api()
            if request is None:
                return
            service_id = path[len("/v1/services/"):-len("/notes")]
            tags = {value for name, value in request["query"] if name == "tag"}
            with self.server.lock:
                notes = list(self.server.notes.get(service_id, []))
            if tags:
                notes = [n for n in notes if tags & set(n.get("tags", []))]
            return self._json(200, {"service": service_id, "notes": notes,
                                    "upstreamSaw": self.path}, self._CHATTY)
        if path == "/v1/search":
            request = self._notes_api()
            if request is None:
                return
            words = dict(request["query"]).get("q", "")
            found = [s["id"] for s in SERVICES.values() if words in s["id"]]
            return self._json(200, {"q": words, "services": found}, self._CHATTY)
        if path.startswith("/v1/services/"):
            service_id = path[len("/v1/services/"):]
            service = SERVICES.get(service_id)
            if service is None:
                return self._json(404, {"error": f"no service '{service_id}'"})
            caller = self.headers.get("x-stagedoor-principal", "")
            return self._json(200, {**service, "requestedBy": caller})
        self._json(404, {"error": "not found"})
