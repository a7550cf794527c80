"""Starting mitmproxy for stagedoor: a lean master for ``run``, mitmweb's for ``inspect``.

``DumpMaster`` loads ~35 addons and dispatches every hook to each of them; a reverse proxy needs
five (core, proxy server, next layer, TLS config, error check). The lean master loads only those
plus ours, which roughly doubles throughput (MITMPROXY-NOTES.md).
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable
from typing import Any

from mitmproxy import master, options
from mitmproxy.addons import core, errorcheck, next_layer, proxyserver, tlsconfig

from stagedoor.runtime import Runtime

from .gateway import Gateway

log = logging.getLogger("stagedoor")

# Where reverse mode would send a flow that no addon re-routed. Nothing should ever get there
# (the gateway answers or re-routes every request); port 9 is "discard", refused on loopback.
UNROUTED_TARGET = "http://127.0.0.1:9"


class ReadyAnnouncer:
    """Logs the listening address once the proxy is up; calls ``on_ready`` for the CLI."""

    def __init__(self, on_ready: Callable[[list[tuple[str, int]]], None] | None) -> None:
        self.on_ready = on_ready

    def running(self) -> None:
        from mitmproxy import ctx

        server = ctx.master.addons.get("proxyserver")
        addrs = [(a[0], a[1]) for a in server.listen_addrs()] if server else []
        if self.on_ready is not None:
            self.on_ready(addrs)


def proxy_options(host: str, port: int) -> dict[str, Any]:
    return {
        "mode": [f"reverse:{UNROUTED_TARGET}"],
        "listen_host": host,
        "listen_port": port,
        "connection_strategy": "lazy",
        "keep_host_header": True,
        "http2": False,
        "websocket": False,
        "rawtcp": False,
        "ssl_insecure": False,
    }


def build_lean_master(runtime: Runtime, host: str, port: int,
                      on_ready: Callable[[list[tuple[str, int]]], None] | None = None,
                      extra_addons: list[Any] | None = None) -> master.Master:
    """Must be called inside a running event loop."""
    opts = options.Options()
    m = master.Master(opts, event_loop=asyncio.get_running_loop(), with_termlog=False)
    m.addons.add(
        core.Core(),
        proxyserver.Proxyserver(),
        next_layer.NextLayer(),
        tlsconfig.TlsConfig(),
        errorcheck.ErrorCheck(repeat_errors_on_stderr=True),
        Gateway(runtime),
        *(extra_addons or []),
        ReadyAnnouncer(on_ready),
    )
    m.options.update(**proxy_options(host, port))
    return m


async def serve(runtime: Runtime, host: str, port: int,
                on_ready: Callable[[list[tuple[str, int]]], None] | None = None,
                extra_addons: list[Any] | None = None) -> None:
    """Run the sidecar until SIGINT/SIGTERM."""
    m = build_lean_master(runtime, host, port, on_ready, extra_addons)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, m.shutdown)
    await m.run()
