"""The request-head limit's end-of-head search (addons/mitm_internals.py ``_head_end``) gives
exactly the regex's answer, on any mix of CR, LF and other bytes."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from stagedoor_addons import mitm_internals


def _by_regex(data: bytes) -> int:
    match = mitm_internals._HEAD_END.search(data)
    return match.start() if match else -1


@settings(max_examples=400, deadline=None)
@given(st.lists(st.sampled_from([b"\r", b"\n", b"a", b" ", b"\r\n", b"\n\r"]), max_size=40))
def test_head_end_matches_the_regex(parts):
    data = b"".join(parts)
    assert mitm_internals._head_end(data) == _by_regex(data)


def test_head_end_on_real_heads():
    for data in (b"GET / HTTP/1.1\r\nHost: x\r\n\r\nbody", b"GET / HTTP/1.1\nA: b\n\n",
                 b"GET / HTTP/1.1\r\nA: b\n\r\n", b"\r\n\r\n", b"\n\n", b"GET /", b"",
                 b"GET / HTTP/1.1\r\nA: b\r\n"):
        assert mitm_internals._head_end(data) == _by_regex(data), data
