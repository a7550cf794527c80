"""The composition root: the ``stagedoor`` command with its mitmproxy side plugged in.

The core (``stagedoor``) parses the command line and loads the state; the commands that start a
proxy get it from :class:`MitmproxyStarter`. This is the installed ``stagedoor`` script and
``python -m stagedoor_addons``. mitmproxy is imported only when a proxy starts, so ``check`` and
``token`` stay fast.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Coroutine
from typing import Any

from stagedoor import cli

MODULE = __package__ or "stagedoor_addons"


class MitmproxyStarter:
    """:class:`stagedoor.cli.ProxyStarter` on the lean master (``run``, ``demo``) and mitmweb's
    master (``inspect``), from ``master.py``."""

    module = MODULE

    def serve(self, runtime: Any, host: str, port: int, *,
              on_ready: Callable[[list[tuple[str, int]]], None] | None,
              admin: tuple[str, int] | bool | None) -> Coroutine[Any, Any, None]:
        from .master import serve

        return serve(runtime, host, port, on_ready=on_ready, admin=admin)

    def serve_web(self, runtime: Any, host: str, port: int, web_host: str, web_port: int,
                  settings: Any, *, on_ready: Callable[[list[tuple[str, int]], str], None]
                  ) -> Coroutine[Any, Any, None]:
        from .master import serve_web

        return serve_web(runtime, host, port, web_host, web_port, settings, on_ready=on_ready)

    def inspect_settings(self, config: Any, settings: Any, *, max_flows: int | None,
                         save_path: str | None) -> Any:
        from .inspect import InspectSettings

        return InspectSettings.from_config(config, settings, max_flows=max_flows,
                                           save_path=save_path)


def main(argv: list[str] | None = None) -> int:
    return cli.main(argv, proxy=MitmproxyStarter())


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
