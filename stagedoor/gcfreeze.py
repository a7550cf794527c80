"""Keep what a load builds out of the garbage collector's full passes (``gc.freeze()``).

Policies, their compiled routes, the config and mitmproxy's own objects live until the next
reload; a full collection walks every one of them (~190 ms per pass with 10,000 routes,
measured), and full passes come round while the proxy serves. Frozen objects are skipped by
the collector and still freed by reference counting once unused.

:func:`freeze_loaded` runs once the proxy listens (``addons/master.py``) and again after every
reload (``addons/reload.py``): then it first unfreezes and collects, so cyclic garbage frozen the
last time (the previous state's, or that of requests in flight back then) is collected, and
nothing frozen leaks for longer than one reload. That collection is one full pass per reload,
instead of full passes over the new policies for as long as they serve.
"""

from __future__ import annotations

import gc


def freeze_loaded(*, reload: bool = False) -> int:
    """Collect, then move every object tracked now out of future collections. Returns how
    many objects are frozen. ``reload``: unfreeze first (see the module docstring)."""
    if reload:
        gc.unfreeze()
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()
