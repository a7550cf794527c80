"""What makes the lean master lean, inside mitmproxy: a cheaper hook dispatch, and no debug-only
type checks on every request and response.

**Hook dispatch.** Every request fires four flow hooks (``requestheaders``, ``request``,
``responseheaders``, ``response``), and mitmproxy's ``AddonManager.handle_lifecycle`` follows each
with an ``update`` hook. For each of those eight events the stock manager walks the whole addon
chain: a ``safecall`` context manager, an ``invoke_addon`` coroutine and a ``traverse`` generator
per addon, most of which have no handler for the event. With the lean master's addons that was
~120 µs per request (measured), an eighth of stagedoor's per-request CPU.

:class:`FastAddonManager` answers the same ``handle_lifecycle`` calls from a per-event list of
the handlers that exist (built on first use, dropped whenever an addon is registered or removed)
and skips ``update`` when no addon listens to it. Handlers run in chain order; ``AddonHalt`` stops
the event, ``OptionsError`` propagates, any other exception is logged as "Addon error" exactly as
``safecall`` does. Everything else (``trigger_event`` for lifecycle hooks such as ``running``,
``configure``, ``done``; commands; lookup) is mitmproxy's own code.

Two details differ, both irrelevant to the addons a lean master carries: children an addon adds
to its ``addons`` list *without* calling ``register`` are seen on the next registration, not
immediately; and an exception in a parent's handler no longer skips its children's handlers.

**Debug-only type checks.** ``mitmproxy.http.MessageData`` defines, under ``if __debug__:``, a
``__post_init__`` that type-checks every field of every request and response it builds.
``python -O`` would drop it, and every ``assert`` with it; :func:`skip_debug_type_checks` drops
only it. Kept after a bounded loopback A/B (docs/security.md, "mitmproxy fenced in"): 4,000
requests over 8 connections, three alternating pairs, best of each: 708 -> 635 µs of proxy CPU
per request (-10%), and more requests/s in every pair. Its risk is bounded by a behavioural
guard: it is applied only while mitmproxy's ``__post_init__`` still behaves as a pure check
(refuses a wrongly typed field, leaves a well-typed message unchanged); otherwise it is left in
place and a warning says why.

Both rely on mitmproxy internals; ``tests/test_lean.py`` fails loudly if an upgrade moves them.
"""

from __future__ import annotations

import inspect
import logging
import sys
from collections.abc import Callable
from typing import Any

from mitmproxy import addonmanager, exceptions, flow, hooks
from mitmproxy import http as mitmproxy_http

_Handlers = tuple[Callable[..., Any], ...]


class FastAddonManager(addonmanager.AddonManager):
    """``AddonManager`` with cached per-event handler lists for ``handle_lifecycle``."""

    def __init__(self, master: Any) -> None:
        super().__init__(master)
        self._handlers: dict[str, _Handlers] = {}
        self._chain_key: tuple[int, int] = (0, -1)

    # -- cache maintenance -----------------------------------------------------------------------
    def _invalidate(self) -> None:
        self._handlers = {}

    def register(self, addon: Any) -> Any:
        self._invalidate()
        try:
            return super().register(addon)
        finally:
            self._invalidate()

    def remove(self, addon: Any) -> None:
        self._invalidate()
        try:
            super().remove(addon)
        finally:
            self._invalidate()

    def clear(self) -> None:
        super().clear()
        self._invalidate()

    def handlers_for(self, event: hooks.Hook) -> _Handlers:
        """Every callable for ``event.name``, in chain order (children after their parent)."""
        key = (id(self.chain), len(self.chain))
        if key != self._chain_key:  # the chain was replaced or grown behind our back
            self._handlers = {}
            self._chain_key = key
        found = self._handlers.get(event.name)
        if found is None:
            found = tuple(func for addon in self.chain
                          for _, func in self._iter_hooks(addon, event))
            self._handlers[event.name] = found
        return found

    # -- dispatch --------------------------------------------------------------------------------
    async def handle_lifecycle(self, event: hooks.Hook) -> None:
        args = event.args()
        await self._dispatch(self.handlers_for(event), args)
        if isinstance(args[0], flow.Flow):
            update = self._handlers.get("update")
            if update is None:
                update = self.handlers_for(hooks.UpdateHook([]))
            if update:
                await self._dispatch(update, [[args[0]]])

    @staticmethod
    async def _dispatch(handlers: _Handlers, args: list[Any]) -> None:
        for func in handlers:
            try:
                result = func(*args)
                if result is not None and inspect.isawaitable(result):
                    await result
            except exceptions.AddonHalt:
                return
            except exceptions.OptionsError:
                raise
            except Exception:
                _log_addon_error()


def _log_addon_error() -> None:
    """What ``mitmproxy.addonmanager.safecall`` logs for an exception in a handler."""
    etype, value, tb = sys.exc_info()
    assert etype is not None and value is not None
    tb = addonmanager.cut_traceback(tb, "_dispatch")
    addonmanager.logger.error(f"Addon error: {value}", exc_info=(etype, value, tb))


def install(master: Any) -> FastAddonManager:
    """Give a freshly built ``master`` (no addons yet) a :class:`FastAddonManager`."""
    old = master.addons
    if old.chain:
        raise RuntimeError("install the fast addon manager before adding addons")
    master.options.changed.disconnect(old._configure_all)
    master.addons = FastAddonManager(master)
    return master.addons


#: mitmproxy's own ``__post_init__`` as it was when this module was imported (for the tests).
STOCK_POST_INIT = getattr(mitmproxy_http.MessageData, "__post_init__", None)


def _no_type_check(self: Any) -> None:
    """Replaces ``MessageData.__post_init__`` (see the module docstring)."""


def skip_debug_type_checks() -> bool:
    """Drop mitmproxy's ``__debug__``-only per-message type checks (idempotent, process-wide).

    Dataclass ``__init__`` methods call ``__post_init__`` when the class had one at creation, so
    it is replaced by a no-op rather than deleted. Returns whether the checks are off.
    """
    current = getattr(mitmproxy_http.MessageData, "__post_init__", None)
    if current is None or current is _no_type_check:
        return current is _no_type_check
    problem = _not_a_pure_type_check(current)
    if problem:
        logging.getLogger("stagedoor").warning(
            "keeping mitmproxy's message type checks: %s (addons/lean.py)", problem)
        return False
    mitmproxy_http.MessageData.__post_init__ = _no_type_check  # type: ignore[attr-defined]
    return True


def _not_a_pure_type_check(post_init: Callable[..., Any]) -> str:
    """'' when ``post_init`` refuses a wrongly typed field and leaves a well-typed request as it
    was; else what it did instead."""
    request = mitmproxy_http.Request.make("GET", "http://example.com/a?b=c", b"x", {"X-A": "1"})
    before = request.data.get_state()
    try:
        post_init(request.data)
    except Exception as exc:
        return f"it refuses a well-typed request ({exc!r})"
    if request.data.get_state() != before:
        return "it changes a well-typed request"
    bad = mitmproxy_http.Request.make("GET", "http://example.com/", b"", {})
    bad.data.method = "GET"  # type: ignore[assignment]  # str where bytes belong
    try:
        post_init(bad.data)
    except (TypeError, ValueError):
        return ""
    return "it accepts a wrongly typed field, so it is not (only) the debug type check"
