"""The one fetch-and-ask-again loop: every caller that meets :class:`KeysNeeded` goes through it.

Verification never does I/O; it raises :class:`KeysNeeded` naming the key sets it needs
fetched. :func:`fetch_until_settled` calls the attempt, fetches what it asks for, and calls it
again, within two bounds that hold for one request:

- each key source is fetched **at most once** (a slow or broken source costs one timeout, not
  one per round; a source that still lacks the key after its fetch settles nothing);
- at most ``rounds`` fetch-and-ask-again rounds, whatever new sources each attempt names.

Used by ``stagedoor.resolve.resolve`` (the gateway, ``stagedoor explain`` and the in-process
tables, which also pass the permission and membership fetches), by
``TokenVerifier.authenticate`` and by ``JwksClient.get_signing_key_async``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from .model import KeysNeeded

if TYPE_CHECKING:
    from .jwks import JwksClient

#: Fetch-and-ask-again rounds before giving up with a 503. A token names its key sources in
#: one go (they are fetched together), a ``memberOf`` needs one userinfo answer, a route one
#: permission: four rounds settle any request; a fifth covers a rotation race.
MAX_ROUNDS = 5


class Unsettled(Exception):
    """The attempt still needs a fetch after every fetch this request was allowed."""

    def __init__(self, reason: str, source: JwksClient | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.source = source  # the key source still needed, when keys were what was missing


async def fetch_until_settled[T](
    attempt: Callable[[], T],
    refresh: Callable[[JwksClient], Awaitable[None]],
    *,
    rounds: int = MAX_ROUNDS,
    other: tuple[type[Exception], ...] = (),
    fetch_other: Callable[[Exception], Awaitable[None]] | None = None,
    first: Exception | None = None,
) -> T:
    """``attempt()``'s answer, fetching what it asks for in between; see the module docstring.

    ``refresh(source)`` fetches a key set (it must not raise for I/O). Exceptions of a type
    in ``other`` are other fetches (a permission, a membership): ``fetch_other(exc)`` does
    them, then the attempt runs again. ``first``: the need the caller's own first attempt
    raised (a caller on a hot path tries once inline and comes here only for I/O). Raises
    :class:`Unsettled` when the bounds are reached.
    """
    needs = (KeysNeeded, *other)
    fetched: list[JwksClient] = []  # the key sources fetched (kept, compared by identity)
    needed = first
    for round_ in range(rounds + 1):
        if needed is None:
            try:
                return attempt()
            except needs as exc:
                needed = exc
        source = needed.source if isinstance(needed, KeysNeeded) else None
        if isinstance(needed, KeysNeeded):
            fresh = [s for s in needed.sources if not any(s is f for f in fetched)]
            if not fresh:  # fetched once already and still not enough: a slow or broken source
                raise Unsettled(f"keys still needed from {needed.source.url} after fetching it",
                                source)
        if round_ == rounds:
            raise Unsettled(f"still unresolved after {rounds} rounds", source)
        if isinstance(needed, KeysNeeded):
            fetched += fresh
            await asyncio.gather(*(refresh(s) for s in fresh))
        elif fetch_other is not None:
            await fetch_other(needed)
        else:  # pragma: no cover - a caller passing ``other`` passes ``fetch_other``
            raise Unsettled(f"no way to fetch {type(needed).__name__}")
        needed = None
    raise AssertionError("unreachable")  # pragma: no cover
