"""tests/breakage.py stays applicable: each breakage's text is in the code exactly once."""

from __future__ import annotations

import pytest

from .breakage import BREAKAGES, ROOT, apply


@pytest.mark.parametrize("breakage", BREAKAGES, ids=lambda b: b.what)
def test_each_breakage_applies_to_the_current_code(breakage):
    original = (ROOT / breakage.file).read_text()
    assert apply(breakage, original) != original


def test_the_breakages_are_many_and_distinct():
    assert len(BREAKAGES) >= 28
    assert len({b.what for b in BREAKAGES}) == len(BREAKAGES)
