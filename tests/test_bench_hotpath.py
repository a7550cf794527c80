"""Hot-path discipline, checked the way bench/ exercises it: a request through every addon of the
lean master does no YAML parsing, regex compilation, JSON parsing or logging configuration, and
a repeated token is answered from the verified-token cache. (Speed itself is measured by
``./run.sh bench``, never asserted here.)"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import logging.config
import re
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml
from mitmproxy import http
from mitmproxy.proxy.layers.http import (
    HttpRequestHeadersHook,
    HttpRequestHook,
    HttpResponseHeadersHook,
    HttpResponseHook,
)
from mitmproxy.test import tflow

from bench.targets import REQUEST_PATH, UPSTREAM_PATH, generated_policy
from stagedoor.auth import parse_jwks
from stagedoor.devkeys import generate_dev_keys, mint_user_token
from stagedoor.runtime import Runtime

UPSTREAM = "http://127.0.0.1:9"
FORBIDDEN = ((re, "_compile"), (json, "loads"), (yaml, "safe_load"), (yaml, "load"),
             (logging, "basicConfig"), (logging, "getLogger"), (logging.config, "dictConfig"))


def _runtime(tmp_path: Path, routes: int) -> tuple[Runtime, str]:
    keys = generate_dev_keys(tmp_path / "keys")
    config = tmp_path / "app-config.yaml"
    config.write_text(f"backend:\n  baseUrl: {UPSTREAM}\ninsights:\n  externalApiUrl: {UPSTREAM}\n")
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "insights.yaml").write_text(generated_policy(routes))
    runtime = Runtime.load([str(config)], str(policies))
    assert runtime.state.verifier is not None and runtime.state.verifier.user_source is not None
    runtime.state.verifier.user_source.set_keys(parse_jwks(keys.user_jwks()), time.time())
    return runtime, mint_user_token(keys.user, issuer=f"{UPSTREAM}/api/auth")


def _flow(token: str) -> http.HTTPFlow:
    flow = tflow.tflow()
    flow.request = http.Request.make("GET", f"http://127.0.0.1:7007{REQUEST_PATH}", b"",
                                     {"Host": "127.0.0.1:7007",
                                      "Authorization": f"Bearer {token}"})
    flow.request.data.authority = b""
    flow.request.path = REQUEST_PATH
    return flow


@pytest.mark.parametrize("routes", [2, 2000])
def test_requests_do_no_parsing_compiling_or_logging_setup(tmp_path, monkeypatch, routes):
    runtime, token = _runtime(tmp_path, routes)
    calls: Counter[str] = Counter()
    armed = [False]

    def counting(module, name):
        original = getattr(module, name)

        def wrapper(*args, **kwargs):
            if armed[0]:
                calls[f"{module.__name__}.{name}"] += 1
            return original(*args, **kwargs)
        return wrapper

    for module, name in FORBIDDEN:
        monkeypatch.setattr(module, name, counting(module, name))
    # build_lean_master drops mitmproxy's debug type checks process-wide: restore them after.
    monkeypatch.setattr(http.MessageData, "__post_init__", http.MessageData.__post_init__)

    async def serve_requests() -> None:
        from stagedoor_addons.master import build_lean_master

        m = build_lean_master(runtime, "127.0.0.1", 0, admin=None)
        m.addons.get("tlsconfig").configure({"confdir"})
        m.addons.get("accesslog").stream = io.StringIO()
        for number in range(50):
            armed[0] = number > 0  # the first request may warm caches
            flow = _flow(token)
            for hook in (HttpRequestHeadersHook, HttpRequestHook):
                await m.addons.handle_lifecycle(hook(flow))
            assert flow.response is None and flow.request.path == UPSTREAM_PATH
            flow.response = http.Response.make(200, b"{}", {"Content-Type": "application/json"})
            for hook in (HttpResponseHeadersHook, HttpResponseHook):
                await m.addons.handle_lifecycle(hook(flow))
            assert flow.response.headers["X-Content-Type-Options"] == "nosniff"
        armed[0] = False

    asyncio.run(serve_requests())
    assert dict(calls) == {}
    stats = runtime.state.verifier.stats
    assert stats["verified_ok"] == 1 and stats["verified_cached"] == 49
