"""gc.freeze() after start and after every reload (stagedoor/gcfreeze.py): what was frozen is
collected at the next reload if it became cyclic garbage, so nothing frozen leaks for good."""

from __future__ import annotations

import asyncio
import gc
import weakref

from stagedoor.gcfreeze import freeze_loaded
from stagedoor_addons import reload as reload_addon
from stagedoor_addons.reload import Reloader

from .test_live_units import Files


class _Node:
    def __init__(self) -> None:
        self.me = self  # a reference cycle: only the collector frees it


def test_frozen_cyclic_garbage_is_collected_at_the_next_reload():
    try:
        node = _Node()
        gone = weakref.ref(node)
        assert freeze_loaded() > 0
        del node
        gc.collect()
        assert gone() is not None  # frozen: the collector does not look at it
        freeze_loaded(reload=True)
        assert gone() is None
    finally:
        gc.unfreeze()


def test_a_reload_freezes_the_new_state(tmp_path, monkeypatch):
    calls: list[bool] = []
    monkeypatch.setattr(reload_addon, "freeze_loaded", lambda *, reload=False: calls.append(
        reload) or 0)
    runtime = Files(tmp_path).runtime()
    assert asyncio.run(Reloader(runtime).reload("SIGHUP", force=True)) is True
    assert calls == [True]
