"""Which asyncio event loop the proxy runs on: uvloop where it is installed, else asyncio's own.

uvloop (libuv underneath, a Linux dependency of the package) runs mitmproxy's connection tasks,
transports and timers with less Python in between; docs/performance.md has the measured gain.
Elsewhere, or when it cannot be imported, asyncio's default loop runs and nothing else changes.

Force one with the config key ``stagedoor.eventLoop`` (``auto``, the default; ``uvloop``;
``asyncio``) or the environment variable ``STAGEDOOR_EVENT_LOOP``, which wins over the config
(an operator or a CI pass can override a shipped config file). Asking for ``uvloop`` where it
is not installed is an error, not a silent fallback.

``--workers N``: each worker's loop passes ``SO_REUSEPORT`` to the server it opens on the shared
port (:func:`choose` with ``reuse_port``), on either loop; see stagedoor/supervisor.py.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

ENV_VAR = "STAGEDOOR_EVENT_LOOP"
CONFIG_KEY = "stagedoor.eventLoop"
CHOICES = ("auto", "uvloop", "asyncio")


class EventLoopError(ValueError):
    """An unknown ``stagedoor.eventLoop`` / ``STAGEDOOR_EVENT_LOOP``, or uvloop asked for but
    not installed."""


@dataclass(frozen=True)
class LoopChoice:
    """The loop to run and why: ``factory`` is for ``asyncio.run(..., loop_factory=...)``."""

    name: str  # "uvloop" or "asyncio"
    reason: str  # for the start-up log line
    factory: Callable[[], asyncio.AbstractEventLoop]


class _ReusePortMixin:
    """``create_server`` on ``reuse_port`` (the workers' shared port) adds ``SO_REUSEPORT``."""

    reuse_port = 0

    async def create_server(self, protocol_factory: Any, host: Any = None,
                            port: Any = None, *args: Any, **kwargs: Any) -> Any:
        if port == self.reuse_port and self.reuse_port and kwargs.get("sock") is None:
            kwargs["reuse_port"] = True
        return await super().create_server(  # type: ignore[misc]
            protocol_factory, host, port, *args, **kwargs)


class ReusePortSelectorLoop(_ReusePortMixin, asyncio.SelectorEventLoop):
    """asyncio's selector loop whose servers on ``port`` share it with other processes."""

    def __init__(self, port: int) -> None:
        super().__init__()
        self.reuse_port = port


def _uvloop() -> Any | None:
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop


def _uvloop_factory(uvloop: Any, reuse_port: int) -> Callable[[], asyncio.AbstractEventLoop]:
    if not reuse_port:
        return uvloop.new_event_loop  # type: ignore[no-any-return]
    loop_class = type("ReusePortUvloop", (_ReusePortMixin, uvloop.Loop),
                      {"reuse_port": reuse_port})
    return loop_class  # type: ignore[no-any-return]


def _asyncio_factory(reuse_port: int) -> Callable[[], asyncio.AbstractEventLoop]:
    if reuse_port:
        return lambda: ReusePortSelectorLoop(reuse_port)
    return asyncio.new_event_loop


def requested(setting: str | None, env: Mapping[str, str] | None = None) -> tuple[str, str]:
    """(``auto`` | ``uvloop`` | ``asyncio``, where it came from); raises EventLoopError."""
    env = os.environ if env is None else env
    source, value = "default", "auto"
    if setting:
        source, value = CONFIG_KEY, setting
    if env.get(ENV_VAR):
        source, value = ENV_VAR, env[ENV_VAR]
    wanted = value.strip().lower()
    if wanted not in CHOICES:
        raise EventLoopError(f"{source} must be one of {', '.join(CHOICES)}, got {value!r}")
    return wanted, source


def choose(setting: str | None = None, env: Mapping[str, str] | None = None, *,
           reuse_port: int = 0) -> LoopChoice:
    """The loop for ``stagedoor run``: ``setting`` is ``stagedoor.eventLoop`` (or None)."""
    wanted, source = requested(setting, env)
    uvloop = _uvloop() if wanted != "asyncio" else None
    if uvloop is not None:
        reason = "the default where installed" if wanted == "auto" else f"set by {source}"
        return LoopChoice("uvloop", f"uvloop {uvloop.__version__} ({reason})",
                          _uvloop_factory(uvloop, reuse_port))
    if wanted == "uvloop":
        raise EventLoopError(f"{source} asks for uvloop, which is not installed here "
                             "(pip install uvloop, or use 'auto' or 'asyncio')")
    reason = "uvloop is not installed" if wanted == "auto" else f"set by {source}"
    return LoopChoice("asyncio", f"asyncio ({reason})", _asyncio_factory(reuse_port))


def running_loop_name() -> str:
    """``uvloop`` or ``asyncio``: what the running loop is (for logs and /metrics)."""
    loop = asyncio.get_running_loop()
    return "uvloop" if type(loop).__module__.startswith("uvloop") or any(
        c.__module__.startswith("uvloop") for c in type(loop).__mro__) else "asyncio"
