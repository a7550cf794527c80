"""``./run.sh bench --profile``: a sampling profile of the full-policy proxy under load.

py-spy (the ``bench`` extra) attaches to the running ``stagedoor run`` process by pid and
samples its Python stacks (``--nonblocking``: the proxy is never paused) while the bench's load
runs; it writes collapsed stacks ("frame;frame;frame count" lines). From those this module
renders a flame graph (an SVG of its own, coloured by where the code lives: stagedoor, mitmproxy,
the event loop, the standard library) and the table of the top costs that docs/performance.md
shows. Pure functions, except :func:`record`.
"""

from __future__ import annotations

import html
import shutil
import subprocess
import sys
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

Stack = tuple[str, ...]

#: Where a frame's code lives, first match wins: (category, path fragments).
CATEGORIES = (
    ("stagedoor", ("/stagedoor/", "/addons/")),
    ("mitmproxy", ("/mitmproxy/",)),
    ("h11", ("/h11/",)),
    ("event loop", ("/asyncio/", "uvloop", "/selectors.py")),
    ("prometheus", ("/prometheus_client/",)),
    ("jwt/crypto", ("/jwt/", "/cryptography/")),
)
COLOURS = {"stagedoor": "#e8743b", "mitmproxy": "#5b8ff9", "h11": "#61ddaa",
           "event loop": "#9e9e9e", "prometheus": "#f6bd16", "jwt/crypto": "#7262fd",
           "python": "#c2c8d5"}


def py_spy() -> str | None:
    """The py-spy executable: next to this Python (the venv) or on PATH."""
    return shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy")


def record(pid: int, seconds: float, output: Path, rate: int = 200) -> subprocess.Popen[bytes]:
    """Start py-spy on ``pid`` for ``seconds`` (it stops by itself); collapsed stacks into
    ``output``. The caller runs the load meanwhile and waits on the process."""
    exe = py_spy()
    if exe is None:
        raise RuntimeError("py-spy is not installed: pip install 'py-spy>=0.4' (the bench extra: "
                           "pip install -e '.[bench]')")
    return subprocess.Popen(
        [exe, "record", "--pid", str(pid), "--duration", str(max(1, round(seconds))),
         "--rate", str(rate), "--format", "raw", "--nolineno", "--nonblocking",
         "--output", str(output)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)


#: Leaf frames of helper threads that wait in native code, which py-spy counts as running:
#: watchfiles' file watcher (an anyio worker thread). /proc shows them at 0 CPU under load.
WAITING_LEAVES = ("WorkerThread.run (",)


def drop_waiting(stacks: list[tuple[Stack, int]]) -> tuple[list[tuple[Stack, int]], int]:
    """(the stacks without helper threads waiting in native code, how many samples that was)."""
    kept = [(frames, count) for frames, count in stacks
            if not (frames and frames[-1].startswith(WAITING_LEAVES))]
    return kept, sum(c for _, c in stacks) - sum(c for _, c in kept)


def parse_collapsed(text: str) -> list[tuple[Stack, int]]:
    """``a (f.py);b (g.py) 12`` lines -> [(("a (f.py)", "b (g.py)"), 12)], outermost first."""
    stacks = []
    for line in text.splitlines():
        frames, _, count = line.rstrip().rpartition(" ")
        if frames and count.isdigit():
            stacks.append((tuple(frames.split(";")), int(count)))
    return stacks


def frame_parts(frame: str) -> tuple[str, str]:
    """``_run_once (asyncio/base_events.py)`` -> (``_run_once``, ``asyncio/base_events.py``)."""
    name, _, where = frame.partition(" (")
    return name, where.rstrip(")")


#: Frames that start the process and stay on every stack: not per-request work of anyone.
ENTRY = ("/stagedoor/cli.py", "/addons/main.py", "/addons/__main__.py", "/bench/floor.py",
         "<frozen runpy>")


def category(frame: str) -> str:
    _, where = frame_parts(frame)
    where = "/" + where.replace("\\", "/")
    if where.endswith(ENTRY):
        return "python"
    for name, fragments in CATEGORIES:
        if any(f in where for f in fragments):
            return name
    return "python"


def short_frame(frame: str) -> str:
    """``request (/…/addons/gateway.py)`` -> ``request (addons/gateway.py)``."""
    name, where = frame_parts(frame)
    parts = where.replace("\\", "/").split("/")
    for anchor in ("site-packages", "stagedoor", "addons", "bench", "asyncio"):
        if anchor in parts[:-1]:
            i = len(parts) - 1 - parts[::-1].index(anchor)
            keep = parts[i + 1:] if anchor == "site-packages" else parts[i:]
            return f"{name} ({'/'.join(keep)})"
    return f"{name} ({'/'.join(parts[-2:])})" if where else name


def summarize(stacks: list[tuple[Stack, int]], top: int = 15) -> dict[str, Any]:
    """Self and total (inclusive) share of the samples per function, and per category."""
    total = sum(count for _, count in stacks) or 1
    own: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    by_category: Counter[str] = Counter()
    stagedoor_incl = 0
    for frames, count in stacks:
        if not frames:
            continue
        own[frames[-1]] += count
        by_category[category(frames[-1])] += count
        for frame in set(frames):
            incl[frame] += count
        if any(category(f) == "stagedoor" for f in frames):
            stagedoor_incl += count

    def rows(counter: Counter[str]) -> list[dict[str, Any]]:
        return [{"function": short_frame(frame), "category": category(frame),
                 "self_pct": round(own[frame] * 100 / total, 1),
                 "total_pct": round(incl[frame] * 100 / total, 1)}
                for frame, _ in counter.most_common(top)]

    return {
        "samples": total,
        "top_self": rows(own),
        "top_total": [r for r in rows(incl) if r["total_pct"] < 99.5][:top],
        "by_category_pct": {k: round(v * 100 / total, 1) for k, v in by_category.most_common()},
        "stagedoor_inclusive_pct": round(stagedoor_incl * 100 / total, 1),
    }


# -- the flame graph ------------------------------------------------------------------------------
class _Node:
    __slots__ = ("children", "count", "name")

    def __init__(self, name: str) -> None:
        self.name = name
        self.count = 0
        self.children: dict[str, _Node] = {}


def _tree(stacks: Iterable[tuple[Stack, int]]) -> _Node:
    root = _Node("all")
    for frames, count in stacks:
        node = root
        node.count += count
        for frame in frames:
            node = node.children.setdefault(frame, _Node(frame))
            node.count += count
    return root


def flamegraph_svg(stacks: list[tuple[Stack, int]], title: str, width: int = 1200,
                   row: int = 16, min_width: float = 0.5) -> str:
    """An SVG flame graph (root at the bottom; width = share of samples; hover for detail)."""
    root = _tree(stacks)
    total = root.count or 1
    rects: list[tuple[int, float, float, _Node]] = []  # depth, x, w, node
    depth_max = 0

    def walk(node: _Node, depth: int, x: float) -> None:
        nonlocal depth_max
        w = node.count / total * (width - 20)
        if w < min_width:
            return
        rects.append((depth, x, w, node))
        depth_max = max(depth_max, depth)
        cx = x
        for child in sorted(node.children.values(), key=lambda n: n.name):
            walk(child, depth + 1, cx)
            cx += child.count / total * (width - 20)

    walk(root, 0, 10.0)
    top_margin, legend = 40, 24
    height = top_margin + (depth_max + 1) * row + legend + 10
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" font-family="Verdana, sans-serif" font-size="11">',
           f'<rect width="{width}" height="{height}" fill="#ffffff"/>',
           f'<text x="{width / 2:.0f}" y="20" text-anchor="middle" font-size="15">'
           f'{html.escape(title)}</text>',
           f'<text x="{width / 2:.0f}" y="34" text-anchor="middle" fill="#555">'
           f'{total:,} samples; width = share of the samples; hover a frame for its name and '
           f'share</text>']
    base = top_margin + depth_max * row
    for depth, x, w, node in rects:
        y = base - depth * row
        name = "all" if node is root else short_frame(node.name)
        cat = "python" if node is root else category(node.name)
        pct = node.count * 100 / total
        out.append(f'<g><title>{html.escape(name)}: {node.count:,} samples ({pct:.1f}%)</title>'
                   f'<rect x="{x:.1f}" y="{y}" width="{w:.1f}" height="{row - 1}" '
                   f'fill="{COLOURS[cat]}" rx="2"/>')
        chars = int(w / 6.5)
        if chars >= 4:
            label = name if len(name) <= chars else name[: chars - 2] + ".."
            out.append(f'<text x="{x + 3:.1f}" y="{y + row - 4}">{html.escape(label)}</text>')
        out.append("</g>")
    lx, ly = 10.0, base + row + 18
    for cat, colour in COLOURS.items():
        out.append(f'<rect x="{lx:.0f}" y="{ly - 10}" width="12" height="12" fill="{colour}"/>'
                   f'<text x="{lx + 16:.0f}" y="{ly}">{html.escape(cat)}</text>')
        lx += 30 + 7 * len(cat)
    out.append("</svg>")
    return "\n".join(out) + "\n"
