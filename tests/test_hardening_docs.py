"""docs/security.md publishes the suite's counts; they are generated from the test tables
(``python -m tests.hardening --write``) and must not drift from them."""

from __future__ import annotations

from .hardening import BEGIN, DOC, END, render_counts


def test_security_doc_counts_match_the_tables():
    text = DOC.read_text()
    assert BEGIN in text and END in text
    published = text[text.index(BEGIN): text.index(END) + len(END)]
    assert published == render_counts(), \
        "docs/security.md is out of date: run `python -m tests.hardening --write`"
