"""Side-by-side benchmark: stagedoor against the upstream itself, stock mitmdump and nginx.

``./run.sh bench`` (``python -m bench``) runs every scenario under the same load, prints a table
and the ratios, writes ``bench/results/latest.json`` and regenerates ``docs/performance.md``.
Everything listens on 127.0.0.1 only, is bounded in time and requests, and stops by itself.
"""
