"""The bundled demo upstream: a tiny "insights" API that also plays the Backstage backend's key
endpoints (user-token JWKS and plugin-token JWKS), so ``./run.sh demo`` needs no setup."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

SERVICES: dict[str, dict[str, Any]] = {
    "payments-api": {"id": "payments-api", "owner": "group:default/payments", "tier": 1,
                     "score": 92, "checks": {"docs": "pass", "oncall": "pass", "slo": "warn"}},
    "search": {"id": "search", "owner": "group:default/discovery", "tier": 2, "score": 78,
               "checks": {"docs": "warn", "oncall": "pass", "slo": "pass"}},
}


class DemoBackend(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], user_jwks: dict[str, Any],
                 plugin_jwks: dict[str, Any]) -> None:
        super().__init__(address, _Handler)
        self.user_jwks = user_jwks
        self.plugin_jwks = plugin_jwks

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

    def _json(self, status: int, payload: Any) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def do_HEAD(self) -> None:
        self.do_GET()

    def do_GET(self) -> None:
        path = self.path.partition("?")[0]
        if path == "/api/auth/.well-known/jwks.json":
            return self._json(200, self.server.user_jwks)
        if path.startswith("/api/") and path.endswith("/.backstage/auth/v1/jwks.json"):
            return self._json(200, self.server.plugin_jwks)
        if path.startswith("/v1/services/"):
            service_id = path[len("/v1/services/"):]
            service = SERVICES.get(service_id)
            if service is None:
                return self._json(404, {"error": f"no service '{service_id}'"})
            caller = self.headers.get("x-stagedoor-principal", "")
            return self._json(200, {**service, "requestedBy": caller})
        self._json(404, {"error": "not found"})
