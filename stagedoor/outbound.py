"""One pooled HTTP client for stagedoor's own calls to the control plane.

Key-set fetches (``stagedoor/auth/jwks.py``), permission delegation (``permissions.py``) and any
other request the sidecar itself makes to a Backstage backend or an identity provider share one
``httpx.AsyncClient`` per event loop: connections are pooled and kept alive between calls, every
timeout is bounded, redirects are never followed. (Proxied traffic never goes through here:
mitmproxy forwards that.)

Use it from inside the running loop::

    response = await outbound.client().get(url, timeout=outbound.timeout(3.0))
    body = await outbound.read_capped(response, max_bytes=1 << 20)  # with client().stream(...)

The client is created on first use and closed by :func:`aclose` when the proxy shuts down
(``addons/master.py``). Do not close it yourself and do not keep it beyond the loop it was made
on: :func:`client` gives a fresh one when the loop changes (tests run many short loops).
"""

from __future__ import annotations

import asyncio

import httpx

#: Longest wait for a TCP connection to a control-plane service.
CONNECT_TIMEOUT = 2.0
#: Used when a caller gives no timeout of its own.
DEFAULT_TIMEOUT = 5.0
#: Pool bounds: control-plane calls are few (cached answers, one in-flight fetch per source).
LIMITS = httpx.Limits(max_connections=64, max_keepalive_connections=16, keepalive_expiry=30.0)
USER_AGENT = "stagedoor"

_current: tuple[asyncio.AbstractEventLoop, httpx.AsyncClient] | None = None


def timeout(seconds: float) -> httpx.Timeout:
    """A bounded timeout for one call: ``seconds`` for each phase, connecting at most
    :data:`CONNECT_TIMEOUT`. (The caller bounds the whole call with ``asyncio.timeout``.)"""
    return httpx.Timeout(seconds, connect=min(seconds, CONNECT_TIMEOUT))


def _new_client() -> httpx.AsyncClient:
    return httpx.AsyncClient(timeout=timeout(DEFAULT_TIMEOUT), limits=LIMITS,
                             follow_redirects=False, headers={"User-Agent": USER_AGENT})


def client() -> httpx.AsyncClient:
    """The shared client of the running event loop (created on first use)."""
    global _current
    loop = asyncio.get_running_loop()
    if _current is None or _current[0] is not loop or _current[1].is_closed:
        _current = (loop, _new_client())
    return _current[1]


async def aclose() -> None:
    """Close the running loop's shared client and its pooled connections (at shutdown)."""
    global _current
    if _current is not None and _current[0] is asyncio.get_running_loop():
        current, _current = _current[1], None
        await current.aclose()


class ResponseTooLarge(Exception):
    """An answer longer than the caller's limit; nothing past the limit was read."""


async def read_capped(response: httpx.Response, max_bytes: int) -> bytes:
    """The body of a streamed ``response``, refusing more than ``max_bytes``."""
    body = bytearray()
    async for chunk in response.aiter_bytes():
        body += chunk
        if len(body) > max_bytes:
            raise ResponseTooLarge(f"response larger than {max_bytes} bytes")
    return bytes(body)
