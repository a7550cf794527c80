"""The soak (tests/soak.py) in small: 2,000 mixed requests, zero unexpected statuses, nothing
refused reaches the upstream, no file descriptors left behind. The full 100,000-request run is
``python -m tests.soak`` (see docs/security.md for its last figures)."""

from __future__ import annotations

import pytest

from .soak import run_soak

pytestmark = pytest.mark.e2e

SMALL_SOAK_REQUESTS = 2000


def test_small_soak():
    result = run_soak(SMALL_SOAK_REQUESTS, concurrency=8)
    summary = result.summary()
    assert result.requests == SMALL_SOAK_REQUESTS, summary
    assert result.ok, summary
