"""gc.freeze() after start and after every reload (stagedoor/gcfreeze.py): a reload freezes the
new state without a full collection, the replaced state is freed by reference counting, and
young cyclic garbage is collected before the freeze."""

from __future__ import annotations

import asyncio
import gc
import weakref

from stagedoor.gcfreeze import freeze_loaded
from stagedoor.runtime import load_state
from stagedoor_addons import reload as reload_addon
from stagedoor_addons.reload import Reloader

from .test_live_units import Files


class _Node:
    def __init__(self) -> None:
        self.me = self  # a reference cycle: only the collector frees it


def test_reloads_freeze_the_new_state_and_free_the_old_one(tmp_path):
    files = Files(tmp_path)
    inputs = ([str(files.config)], str(files.policies))
    try:
        state = load_state(*inputs)
        freeze_loaded()
        for _ in range(3):
            old_config = weakref.ref(state.config)  # frozen with the state it belongs to
            state = load_state(*inputs)  # the old state is dropped here
            young = _Node()
            young_gone = weakref.ref(young)
            del young
            freeze_loaded(reload=True)
            assert young_gone() is None  # young cyclic garbage: collected before the freeze
            assert old_config() is None  # the replaced state: freed although it was frozen
        assert state is not None
    finally:
        gc.unfreeze()


def test_a_reload_freezes_the_new_state(tmp_path, monkeypatch):
    calls: list[bool] = []
    monkeypatch.setattr(reload_addon, "freeze_loaded", lambda *, reload=False: calls.append(
        reload) or 0)
    runtime = Files(tmp_path).runtime()
    assert asyncio.run(Reloader(runtime).reload("SIGHUP", force=True)) is True
    assert calls == [True]
