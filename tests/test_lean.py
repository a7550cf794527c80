"""addons/lean.py: the lean master's hook dispatch (same handlers, same order, same error
handling as mitmproxy's AddonManager), the dropped debug-only type checks, and tripwires for the
mitmproxy internals both rely on."""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import logging

import pytest
from mitmproxy import addonmanager, exceptions, hooks, master, options
from mitmproxy.proxy.layers.http import HttpRequestHook, HttpResponseHook
from mitmproxy.test import tflow

from stagedoor_addons import lean


class Recorder:
    def __init__(self, name: str, calls: list[str], children: list[object] | None = None) -> None:
        self.name = name
        self.calls = calls
        if children is not None:
            self.addons = children

    def request(self, flow) -> None:
        self.calls.append(f"{self.name}.request")

    async def response(self, flow) -> None:
        await asyncio.sleep(0)
        self.calls.append(f"{self.name}.response")


class Updater:
    name = "updater"

    def __init__(self, calls: list[str]) -> None:
        self.calls = calls

    def update(self, flows) -> None:
        self.calls.append(f"update:{len(flows)}")


class Halter:
    name = "halter"

    def request(self, flow) -> None:
        raise exceptions.AddonHalt()


class Broken:
    name = "broken"

    def request(self, flow) -> None:
        raise ValueError("broken addon")


def _run(manager_factory, addons_factory, event_factory) -> list[str]:
    calls: list[str] = []

    async def go() -> None:
        m = master.Master(options.Options(), event_loop=asyncio.get_running_loop())
        if manager_factory is not None:
            manager_factory(m)
        m.addons.add(*addons_factory(calls))
        flow = tflow.tflow(resp=True)
        for make in event_factory:
            await m.addons.handle_lifecycle(make(flow))

    asyncio.run(go())
    return calls


EVENTS = (HttpRequestHook, HttpResponseHook, HttpRequestHook)


def _chain(calls: list[str]) -> list[object]:
    return [Recorder("a", calls), Updater(calls),
            Recorder("b", calls, children=[Recorder("b_child", calls)]), Recorder("c", calls)]


def test_same_handlers_in_the_same_order_as_mitmproxy():
    stock = _run(None, _chain, EVENTS)
    fast = _run(lean.install, _chain, EVENTS)
    assert fast == stock
    assert fast[:5] == ["a.request", "b.request", "b_child.request", "c.request", "update:1"]


def test_update_is_skipped_only_when_nobody_listens():
    def chain(calls):
        return [Recorder("a", calls)]

    assert _run(lean.install, chain, EVENTS) == _run(None, chain, EVENTS)


def test_addon_halt_stops_the_event_like_mitmproxy():
    def chain(calls):
        return [Recorder("a", calls), Halter(), Recorder("c", calls)]

    fast = _run(lean.install, chain, EVENTS)
    assert fast == _run(None, chain, EVENTS)
    assert "c.request" not in fast and "c.response" in fast


def test_a_failing_handler_is_logged_and_the_others_still_run(caplog):
    def chain(calls):
        return [Broken(), Recorder("c", calls)]

    with caplog.at_level(logging.ERROR):
        fast = _run(lean.install, chain, (HttpRequestHook,))
    assert fast == ["c.request"]
    assert any("Addon error: broken addon" in r.getMessage() for r in caplog.records)


def test_handler_lists_follow_addons_added_and_removed_later():
    calls: list[str] = []

    async def go() -> None:
        m = master.Master(options.Options(), event_loop=asyncio.get_running_loop())
        lean.install(m)
        first = Recorder("first", calls)
        m.addons.add(first)
        flow = tflow.tflow(resp=True)
        await m.addons.handle_lifecycle(HttpRequestHook(flow))
        m.addons.add(Recorder("second", calls))
        await m.addons.handle_lifecycle(HttpRequestHook(flow))
        m.addons.remove(first)
        await m.addons.handle_lifecycle(HttpRequestHook(flow))

    asyncio.run(go())
    assert calls == ["first.request", "first.request", "second.request", "second.request"]


def test_install_refuses_a_master_that_already_has_addons():
    async def go() -> None:
        m = master.Master(options.Options(), event_loop=asyncio.get_running_loop())
        m.addons.add(Recorder("a", []))
        with pytest.raises(RuntimeError):
            lean.install(m)

    asyncio.run(go())


def test_options_changes_still_reach_addons_once():
    seen: list[set[str]] = []

    class Configurable:
        def configure(self, updated) -> None:
            seen.append(set(updated))

    async def go() -> None:
        m = master.Master(options.Options(), event_loop=asyncio.get_running_loop())
        lean.install(m)
        m.addons.add(Configurable())
        seen.clear()
        m.options.update(listen_port=1234)

    asyncio.run(go())
    assert seen == [{"listen_port"}]


# -- tripwires: what addons/lean.py relies on inside mitmproxy (behaviour, not source text) -----
def test_stock_handle_lifecycle_dispatches_and_follows_with_update():
    """What FastAddonManager reproduces: the stock manager runs a flow hook, then ``update``."""
    calls: list[str] = []

    class Probe:
        def request(self, flow: object) -> None:
            calls.append("request")

        def update(self, flows: object) -> None:
            calls.append("update")

    async def go() -> None:
        m = master.Master(options.Options())
        m.addons.add(Probe())
        await m.addons.handle_lifecycle(HttpRequestHook(tflow.tflow()))

    asyncio.run(go())
    assert calls == ["request", "update"]


def test_addon_manager_internals_exist():
    for name in ("_iter_hooks", "register", "remove", "clear", "_configure_all"):
        assert callable(getattr(addonmanager.AddonManager, name, None)), name
    assert callable(addonmanager.cut_traceback)
    assert isinstance(addonmanager.logger, logging.Logger)
    assert list(inspect.signature(addonmanager.AddonManager._iter_hooks).parameters) == [
        "self", "addon", "event"]
    assert hooks.UpdateHook([]).name == "update"


def test_a_new_master_has_a_stock_manager_that_install_replaces():
    async def go() -> None:
        m = master.Master(options.Options())
        assert type(m.addons) is addonmanager.AddonManager
        assert isinstance(lean.install(m), lean.FastAddonManager) and m.addons.master is m

    asyncio.run(go())


def test_message_data_type_check_refuses_a_wrong_type_until_skipped(monkeypatch):
    from mitmproxy import http

    assert lean.STOCK_POST_INIT is not None and lean.STOCK_POST_INIT is not lean._no_type_check
    monkeypatch.setattr(http.MessageData, "__post_init__", lean.STOCK_POST_INIT)
    data = http.Request.make("GET", "http://example.com/").data
    with pytest.raises((TypeError, ValueError)):  # str where mitmproxy wants bytes
        dataclasses.replace(data, method="GET")
    assert lean.skip_debug_type_checks() is True
    dataclasses.replace(data, method="GET")  # no check any more


def test_the_skip_is_refused_when_post_init_does_more_than_check(monkeypatch, caplog):
    from mitmproxy import http

    def normalising(self: object) -> None:  # a future mitmproxy that also normalises
        self.method = self.method.upper()  # type: ignore[attr-defined]

    monkeypatch.setattr(http.MessageData, "__post_init__", normalising)
    with caplog.at_level(logging.WARNING):
        assert lean.skip_debug_type_checks() is False
    assert http.MessageData.__post_init__ is normalising
    assert "keeping mitmproxy's message type checks" in caplog.text


def test_skipping_type_checks_keeps_requests_and_responses_working(monkeypatch):
    from mitmproxy import http

    # Restored after the test: the rest of this pytest process keeps mitmproxy's checks.
    monkeypatch.setattr(http.MessageData, "__post_init__", http.MessageData.__post_init__)
    lean.skip_debug_type_checks()
    lean.skip_debug_type_checks()  # idempotent
    assert http.MessageData.__post_init__ is lean._no_type_check
    request = http.Request.make("GET", "http://example.com/a?b=c", b"", {"X-A": "1"})
    response = http.Response.make(201, b"{}", {"Content-Type": "application/json"})
    assert request.path == "/a?b=c" and request.headers["x-a"] == "1"
    assert response.status_code == 201 and response.content == b"{}"
