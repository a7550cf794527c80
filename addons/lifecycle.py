"""The process's life: requests in flight, readiness, and a graceful shutdown on SIGTERM.

Shutdown (SIGTERM or SIGINT): ``/readyz`` turns 503 at once, the listening socket is closed (new
connections are refused), every response still to go out says ``Connection: close``, and the
process exits 0 when the last request in flight has been answered or when
``stagedoor.shutdown.gracePeriod`` (default 10s) is over, whichever comes first. A second signal
ends it at once.

The wiring (which addons run, in which order, and the signal handlers) is in ``master.py``.
"""

from __future__ import annotations

import asyncio
import logging
import weakref

from mitmproxy import ctx, http

from stagedoor.runtime import Runtime

log = logging.getLogger("stagedoor")

#: After the last response left the hook, how long to let it reach the socket before exiting.
FLUSH_DELAY = 0.1


class Lifecycle:
    """mitmproxy addon: counts requests in flight, answers "ready?", drains on shutdown."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        # Flows between their request headers and their response/error. A WeakSet, so a flow
        # that ends without either hook (it should not happen) cannot pin the count forever.
        self._flows: weakref.WeakSet[http.HTTPFlow] = weakref.WeakSet()
        self._idle: asyncio.Event | None = None
        self._drain_task: asyncio.Task[None] | None = None
        self.draining = False
        self._started = False

    # -- hooks -----------------------------------------------------------------------------------
    def running(self) -> None:
        self._started = True

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        self._flows.add(flow)

    def response(self, flow: http.HTTPFlow) -> None:
        if self.draining and flow.response is not None:
            flow.response.headers["Connection"] = "close"  # the client reconnects elsewhere
        self._finished(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        self._finished(flow)

    def _finished(self, flow: http.HTTPFlow) -> None:
        self._flows.discard(flow)
        if self._idle is not None and not self._flows:
            self._idle.set()

    # -- state -----------------------------------------------------------------------------------
    @property
    def in_flight(self) -> int:
        return len(self._flows)

    def not_ready_reasons(self) -> list[str]:
        """Empty when ready: policies loaded, the proxy listening, not shutting down."""
        reasons = []
        if self.draining:
            reasons.append("shutting down")
        if not self.runtime.state.policies.plugins:
            reasons.append("no policies loaded")
        server = ctx.master.addons.get("proxyserver") if self._started else None
        if server is None or not server.listen_addrs():
            reasons.append("proxy not listening")
        return reasons

    # -- shutdown --------------------------------------------------------------------------------
    def shutdown(self) -> None:
        """Signal handler: start draining; a second call exits at once."""
        if self._drain_task is not None:
            log.warning("stagedoor: second shutdown signal, exiting now")
            ctx.master.shutdown()
            return
        self.draining = True
        self._drain_task = asyncio.get_running_loop().create_task(self._drain(),
                                                                 name="stagedoor-drain")

    async def _drain(self) -> None:
        grace = self.runtime.state.operations.grace_period
        log.info("stagedoor shutting down: refusing new connections, waiting up to %gs for %d "
                 "request(s) in flight", grace, self.in_flight)
        # mitmproxy's public "server" option, off, stops every proxy server instance: the
        # listening sockets close, connections already accepted carry on.
        ctx.options.update(server=False)
        if self._flows:
            self._idle = asyncio.Event()
            try:
                await asyncio.wait_for(self._idle.wait(), grace)
            except TimeoutError:
                log.warning("stagedoor: grace period of %gs over, %d request(s) still in flight "
                            "are cut off", grace, self.in_flight)
            else:
                await asyncio.sleep(FLUSH_DELAY)
        log.info("stagedoor stopped")
        ctx.master.shutdown()
