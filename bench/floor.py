"""The floor: stagedoor's lean mitmproxy master with none of stagedoor's addons, forwarding only.

``python -m bench.floor --upstream http://127.0.0.1:PORT`` listens on 127.0.0.1 (a free port
unless ``--port``), logs ``floor listening on http://HOST:PORT`` on stderr and forwards every
request to the upstream as it is (mitmproxy's reverse mode). Same mitmproxy, same event loop
choice (``stagedoor/eventloop.py``), same lean hook dispatch (``addons/lean.py``), same proxy
options and ``gc.freeze()`` after start as ``stagedoor run``, and like it without mitmproxy's
``__debug__``-only per-message type check (``lean.skip_debug_type_checks``, which
``build_lean_master`` applies);
no gateway, token verification, header policy, access log, metrics, lifecycle or reload.
What stagedoor costs above this is its own. Stops on SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys

from mitmproxy import master, options
from mitmproxy.addons import core, errorcheck, next_layer, proxyserver

from stagedoor import eventloop
from stagedoor.gcfreeze import freeze_loaded
from stagedoor.runtime import Limits
from stagedoor_addons import lean
from stagedoor_addons.master import PolicyOnlyTlsConfig, proxy_options


class _Ready:
    def running(self) -> None:
        from mitmproxy import ctx

        freeze_loaded()  # as addons/master.py does once the proxy runs
        server = ctx.master.addons.get("proxyserver")
        for host, port, *_ in server.listen_addrs():
            print(f"floor listening on http://{host}:{port}", file=sys.stderr, flush=True)


async def serve(upstream: str, host: str, port: int) -> None:
    m = master.Master(options.Options(), event_loop=asyncio.get_running_loop(),
                      with_termlog=False)
    lean.install(m)
    lean.skip_debug_type_checks()  # as build_lean_master does for stagedoor run
    m.addons.add(core.Core(), proxyserver.Proxyserver(), next_layer.NextLayer(),
                 PolicyOnlyTlsConfig(), errorcheck.ErrorCheck(repeat_errors_on_stderr=True),
                 _Ready())
    # stagedoor's own mitmproxy options, and the response-streaming threshold its gateway sets
    # at start (stagedoor.limits.streamResponseBytes, 1 MiB by default).
    m.options.update(**{**proxy_options(host, port), "mode": [f"reverse:{upstream}"]},
                     stream_large_bodies=str(Limits().stream_response_bytes))
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, m.shutdown)
    await m.run()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.floor", description=__doc__)
    parser.add_argument("--upstream", required=True, help="http://127.0.0.1:PORT")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args(argv)
    if not args.upstream.startswith(("http://127.", "http://localhost")):
        parser.error("--upstream must be a loopback http:// URL")
    choice = eventloop.choose()  # STAGEDOOR_EVENT_LOOP applies here too
    print(f"floor event loop: {choice.reason}", file=sys.stderr, flush=True)
    asyncio.run(serve(args.upstream, "127.0.0.1", args.port), loop_factory=choice.factory)
    return 0


if __name__ == "__main__":
    sys.exit(main())
