"""Starting mitmproxy for stagedoor: a lean master for ``run``, mitmweb's for ``inspect``.

``DumpMaster`` loads ~35 addons and dispatches every hook to each of them; a reverse proxy needs
five (core, proxy server, next layer, TLS config, error check). The lean master loads only those
plus ours, which roughly doubles throughput (docs/mitmproxy.md).
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable
from typing import Any

from mitmproxy import master, options
from mitmproxy.addons import core, errorcheck, next_layer, proxyserver

from stagedoor import outbound
from stagedoor.gcfreeze import freeze_loaded
from stagedoor.runtime import Runtime

from . import lean
from .accesslog import AccessLog
from .admin import AdminServer, Metrics
from .edge import Edge, PlainListenerOnly
from .gateway import Gateway
from .lifecycle import Lifecycle
from .reload import Reloader
from .upstream_tls import UpstreamTlsConfig

log = logging.getLogger("stagedoor")

# Where reverse mode would send a flow that no addon re-routed. Nothing should ever get there
# (the gateway answers or re-routes every request); port 9 is "discard", refused on loopback.
UNROUTED_TARGET = "http://127.0.0.1:9"
_UNROUTED_ADDRESS = ("127.0.0.1", 9)


class UnroutedGuard:
    """Fail closed if a flow ever leaves the gateway neither answered nor re-routed: the
    connection to ``UNROUTED_TARGET`` is refused here (a 502), whatever listens there."""

    def server_connect(self, data: Any) -> None:
        if data.server.address == _UNROUTED_ADDRESS and data.server.error is None:
            log.error("refusing to connect a flow the gateway did not route (a bug)")
            data.server.error = "stagedoor: the gateway did not route this request"


class ReadyAnnouncer:
    """Logs the listening address once the proxy is up; calls ``on_ready`` for the CLI."""

    def __init__(self, on_ready: Callable[[list[tuple[str, int]]], None] | None) -> None:
        self.on_ready = on_ready

    def running(self) -> None:
        from mitmproxy import ctx

        # What is loaded by now (policies and their compiled routes, mitmproxy, the certificate
        # store): out of the collector's full passes (stagedoor/gcfreeze.py; again on reload).
        freeze_loaded()
        server = ctx.master.addons.get("proxyserver")
        addrs = [(a[0], a[1]) for a in server.listen_addrs()] if server else []
        if self.on_ready is not None:
            self.on_ready(addrs)


# -- wiring ----------------------------------------------------------------------------------------
def operations_addons(runtime: Runtime, admin: tuple[str, int] | bool | None = True,
                      ) -> list[Any]:
    """The addons that go right after the gateway, in order.

    ``admin``: True for ``stagedoor.admin.listen``, an address (``--admin``), or None/False for
    no admin listener.
    """
    lifecycle = Lifecycle(runtime)
    reloader = Reloader(runtime)
    metrics = Metrics(runtime, lifecycle=lifecycle, reloader=reloader)
    address = runtime.state.operations.admin_listen if admin is True else admin or None
    return [lifecycle, AccessLog(runtime), metrics, reloader,
            AdminServer(metrics, lifecycle, address)]


def install_signal_handlers(master: Any) -> None:
    """SIGTERM/SIGINT: graceful shutdown (plain shutdown without a Lifecycle); SIGHUP: reload.

    Call inside the running event loop, on the main thread.
    """
    loop = asyncio.get_running_loop()
    lifecycle = master.addons.get("lifecycle")
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, lifecycle.shutdown if lifecycle else master.shutdown)
    reloader = master.addons.get("reloader")
    if reloader is not None:
        loop.add_signal_handler(signal.SIGHUP, reloader.trigger)


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


#: mitmproxy's TLS addon without its CRL-answering ``request`` hook (no per-upstream settings:
#: the bench's floor scenario uses it as is).
PolicyOnlyTlsConfig = UpstreamTlsConfig


def _tls_config(runtime: Runtime) -> UpstreamTlsConfig:
    """mitmproxy's TLS addon with per-upstream TLS from the current policies
    (addons/upstream_tls.py) and without its CRL-answering ``request`` hook."""
    return UpstreamTlsConfig(lambda address: runtime.state.policies.upstream_tls.get(address))


def build_lean_master(runtime: Runtime, host: str, port: int,
                      on_ready: Callable[[list[tuple[str, int]]], None] | None = None,
                      extra_addons: list[Any] | None = None,
                      admin: tuple[str, int] | bool | None = True) -> master.Master:
    """Must be called inside a running event loop. ``admin``: the admin listener's address
    (True: ``stagedoor.admin.listen``; None: none)."""
    opts = options.Options()
    m = master.Master(opts, event_loop=asyncio.get_running_loop(), with_termlog=False)
    lean.install(m)  # per-request hook dispatch at a tenth of the cost (addons/lean.py)
    lean.skip_debug_type_checks()  # -10% CPU per request, measured; guarded (addons/lean.py)
    edge = Edge(runtime)
    m.addons.add(
        core.Core(),
        proxyserver.Proxyserver(),
        PlainListenerOnly(edge),  # before NextLayer: a TLS handshake is refused, not answered
        next_layer.NextLayer(),
        _tls_config(runtime),
        errorcheck.ErrorCheck(repeat_errors_on_stderr=True),
        Gateway(runtime),
        edge,  # right after the gateway (addons/edge.py)
        *operations_addons(runtime, admin),  # lifecycle, access log, metrics, reload, admin
        *(extra_addons or []),
        UnroutedGuard(),
        ReadyAnnouncer(on_ready),
    )
    m.options.update(**proxy_options(host, port))
    return m


async def serve(runtime: Runtime, host: str, port: int,
                on_ready: Callable[[list[tuple[str, int]]], None] | None = None,
                extra_addons: list[Any] | None = None,
                admin: tuple[str, int] | bool | None = True) -> None:
    """Run the sidecar until SIGINT/SIGTERM (a graceful drain, addons/lifecycle.py); SIGHUP
    reloads policies and config."""
    m = build_lean_master(runtime, host, port, on_ready, extra_addons, admin)
    install_signal_handlers(m)
    try:
        await m.run()
    finally:
        await outbound.aclose()  # the pooled control-plane connections (JWKS, permissions)


# -- inspect: mitmweb's master ---------------------------------------------------------------------
def build_web_master(runtime: Runtime, host: str, port: int, web_host: str, web_port: int,
                     settings: Any,
                     on_ready: Callable[[list[tuple[str, int]], str], None] | None = None,
                     extra_addons: list[Any] | None = None,
                     admin: tuple[str, int] | bool | None = None) -> Any:
    """mitmweb's ``WebMaster`` with the same stagedoor addons, for ``inspect``: decisions on
    every flow, secrets redacted from the UI and ``--save`` (``addons/inspect.py``; ``settings``
    is its ``InspectSettings``). ``on_ready`` gets the proxy addresses and the web UI's URL,
    token included. No admin listener unless ``admin`` says so. Must be called inside a running
    event loop."""
    from mitmproxy.tools.web.master import WebMaster

    from . import inspect

    m = WebMaster(options.Options(), with_termlog=False)
    m.addons.remove(m.addons.get("tlsconfig"))
    m.addons.add(_tls_config(runtime))
    edge = Edge(runtime)
    # A TLS handshake on the plain listener is refused before mitmweb's NextLayer answers it.
    m.addons.remove(m.addons.get("nextlayer"))
    m.addons.add(PlainListenerOnly(edge), next_layer.NextLayer())
    m.addons.add(Gateway(runtime), edge, *operations_addons(runtime, admin), UnroutedGuard())
    inspect.install(m, settings)  # after the gateway: annotations need its decision
    m.addons.add(
        *(extra_addons or []),
        ReadyAnnouncer(None if on_ready is None else lambda addrs: on_ready(addrs, m.web_url)),
    )
    m.options.update(
        **proxy_options(host, port),
        web_host=web_host,
        web_port=web_port,
        web_open_browser=False,
        web_columns=inspect.WEB_COLUMNS,
        # Behave like the lean master: no onboarding app, no client blocking, no header edits.
        onboarding=False,
        block_global=False,
        keep_alt_svc_header=True,
    )
    return m


async def serve_web(runtime: Runtime, host: str, port: int, web_host: str, web_port: int,
                    settings: Any,
                    on_ready: Callable[[list[tuple[str, int]], str], None] | None = None,
                    extra_addons: list[Any] | None = None,
                    admin: tuple[str, int] | bool | None = None) -> None:
    """Run the sidecar under mitmweb until SIGINT/SIGTERM (graceful, as ``serve``)."""
    m = build_web_master(runtime, host, port, web_host, web_port, settings, on_ready,
                         extra_addons, admin)
    install_signal_handlers(m)
    try:
        await m.run()
    finally:
        await outbound.aclose()
