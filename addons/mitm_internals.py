"""The only place stagedoor reaches into mitmproxy's private parts. Two needs, no public API:

1. **Error pages.** When an upstream refuses, resets or times out, mitmproxy writes an HTML 502
   from ``mitmproxy.proxy.layers.http._http1.make_error_response`` (it also renders the 400 for a
   malformed request line); a ``flow.response`` set in the ``error`` hook is ignored. We replace
   that function with one that writes SPEC.md's JSON error body. The ``error`` hook registers the
   body it wants (method, url, status 502/504) keyed by the identity of the error message object,
   which is the very object mitmproxy passes on to ``make_error_response`` right after the hook.
2. **Upstream timeouts.** mitmproxy awaits a slow upstream forever and ``flow.kill()`` does not
   abort it. We close the flow's server connection through its connection handler, which ends
   the flow with an error that (1) turns into a 504.

``tests/test_mitm_internals.py`` fails loudly if an upgrade moves any of this.
"""

from __future__ import annotations

import logging
from collections import OrderedDict

from mitmproxy import http, version
from mitmproxy.net.http import http1
from mitmproxy.proxy.layers.http import _http1

from stagedoor.errors import ERROR_NAMES, JSON_CONTENT_TYPE, SECURITY_HEADERS, error_body

log = logging.getLogger("stagedoor.gateway")

_MAX_PENDING = 4096
# id(message) -> (message, status, body, extra headers). The message object is kept alive here,
# so its id cannot be reused while the entry exists.
_pending: OrderedDict[int, tuple[str, int, bytes, tuple[tuple[str, str], ...]]] = OrderedDict()
_installed = False
_security_headers: dict[str, str] = dict(SECURITY_HEADERS)


def register_error(message: str, status: int, body: bytes,
                   headers: tuple[tuple[str, str], ...] = ()) -> None:
    """Say which JSON error to write when mitmproxy reports ``message`` to the client."""
    _pending[id(message)] = (message, status, body, headers)
    while len(_pending) > _MAX_PENDING:
        _pending.popitem(last=False)


def json_error_response(status_code: int, message: str = "") -> bytes:
    """Drop-in replacement for ``_http1.make_error_response``: JSON, never HTML."""
    entry = _pending.pop(id(message), None)
    extra: tuple[tuple[str, str], ...] = ()
    if entry is not None and entry[0] is message:
        _, status_code, body, extra = entry
    else:
        # No flow context (e.g. a malformed request line): still SPEC-shaped, no internals.
        name = ERROR_NAMES.get(status_code, "Error")
        public = {400: "Malformed request", 502: "Bad gateway", 504: "Gateway timeout"}.get(
            status_code, name)
        if status_code == 400 and message:
            log.debug("malformed request rejected by the HTTP parser: %s", message)
        body = error_body(status_code, name, public, "", "")
    headers = http.Headers(
        Server=version.MITMPROXY,
        Connection="close",
        Content_Type=JSON_CONTENT_TYPE,
    )
    for key, value in _security_headers.items():
        headers[key] = value
    for key, value in extra:
        headers[key] = value
    response = http.Response.make(status_code, body, headers)
    return http1.assemble_response(response)


def install_error_pages(security_headers: dict[str, str] | None = None) -> None:
    """Replace mitmproxy's HTML error page writer (idempotent)."""
    global _installed
    if security_headers is not None:
        _security_headers.clear()
        _security_headers.update(security_headers)
    if _installed:
        return
    if not callable(getattr(_http1, "make_error_response", None)):  # pragma: no cover
        raise RuntimeError("mitmproxy internals changed: _http1.make_error_response is gone; "
                           "see addons/mitm_internals.py")
    _http1.make_error_response = json_error_response  # type: ignore[assignment]
    _installed = True


def close_server_connection(flow: http.HTTPFlow) -> bool:
    """Abort the upstream connection a flow is waiting on. False if it could not be found."""
    from mitmproxy import ctx

    proxyserver = ctx.master.addons.get("proxyserver")
    handler = getattr(proxyserver, "connections", {}).get(flow.client_conn.id)
    if handler is None:
        return False
    transports = getattr(handler, "transports", {})
    if flow.server_conn not in transports:
        return False
    handler.close_connection(flow.server_conn)
    return True
