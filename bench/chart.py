"""The chart in docs/performance.md: requests/s and p99 latency per scenario, as an SVG the bench
writes from its own figures (no plotting library). Pure: a run's dict in, SVG text out.

Bars are on a linear scale fitted to the Python proxies; scenarios far beyond it (the upstream
itself, nginx) are drawn to the edge, marked as cut, with their value written next to them.
"""

from __future__ import annotations

import html
from typing import Any

_OFF_SCALE = ("direct", "nginx")
_COLOURS = {"direct": "#9e9e9e", "nginx": "#9e9e9e", "mitmdump": "#5b8ff9",
            "floor": "#61ddaa"}
_STAGEDOOR = "#e8743b"


def _nice(value: float) -> float:
    """A round axis maximum at or above ``value``."""
    if value <= 0:
        return 1.0
    magnitude = 10 ** (len(str(int(value))) - 1)
    for step in (1, 1.5, 2, 2.5, 3, 4, 5, 6, 8, 10):
        if step * magnitude >= value:
            return step * magnitude
    return 10.0 * magnitude


def chart_svg(run: dict[str, Any], order: tuple[str, ...]) -> str:
    scenarios = [(name, run["scenarios"][name]) for name in order if name in run["scenarios"]]
    label_w, panel_w, gap, row = 330, 300, 40, 22
    width = label_w + 2 * panel_w + gap + 30
    top = 56
    height = top + row * max(1, len(scenarios)) + 40
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" font-family="Verdana, sans-serif" font-size="11">',
           f'<rect width="{width}" height="{height}" fill="#ffffff"/>',
           f'<text x="{width / 2:.0f}" y="18" text-anchor="middle" font-size="14">'
           f'Requests/s and p99 latency per scenario ({html.escape(run.get("date", ""))}, '
           f'{run["machine"].get("nproc", "?")} cores)</text>']
    panels = (("rps", "requests/s (more is better)", label_w, "{:,.0f}"),
              ("p99_ms", "p99 latency, ms (less is better)", label_w + panel_w + gap, "{:.1f}"))
    for key, title, x0, fmt in panels:
        in_scale = [s[key] for n, s in scenarios if n not in _OFF_SCALE] or \
            [s[key] for _, s in scenarios] or [1.0]
        axis = _nice(max(in_scale) * 1.05)
        out.append(f'<text x="{x0 + panel_w / 2:.0f}" y="40" text-anchor="middle">'
                   f'{html.escape(title)}</text>')
        for i in range(5):
            gx = x0 + panel_w * i / 4
            out.append(f'<line x1="{gx:.1f}" y1="{top - 4}" x2="{gx:.1f}" '
                       f'y2="{top + row * len(scenarios)}" stroke="#e0e0e0"/>')
            out.append(f'<text x="{gx:.1f}" y="{top + row * len(scenarios) + 14}" '
                       f'text-anchor="middle" fill="#555">{fmt.format(axis * i / 4)}</text>')
        for index, (name, s) in enumerate(scenarios):
            y = top + index * row
            value = float(s[key])
            cut = value > axis
            w = panel_w * min(value, axis) / axis
            colour = _COLOURS.get(name, _STAGEDOOR)
            out.append(f'<rect x="{x0}" y="{y + 3}" width="{w:.1f}" height="{row - 7}" '
                       f'fill="{colour}"><title>{html.escape(s["label"])}: '
                       f'{fmt.format(value)}</title></rect>')
            text = fmt.format(value) + (" (off the scale)" if cut else "")
            if cut or w > panel_w - 60:
                out.append(f'<text x="{x0 + w - 4:.1f}" y="{y + row - 8}" text-anchor="end" '
                           f'fill="#ffffff">{html.escape(text)}</text>')
            else:
                out.append(f'<text x="{x0 + w + 4:.1f}" y="{y + row - 8}">'
                           f'{html.escape(text)}</text>')
    for index, (_, s) in enumerate(scenarios):
        y = top + index * row
        label = s["label"] if len(s["label"]) <= 52 else s["label"][:50] + ".."
        out.append(f'<text x="{label_w - 8}" y="{y + row - 8}" text-anchor="end">'
                   f'{html.escape(label)}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"
