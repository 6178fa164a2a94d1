"""Bar charts drawn as inline SVG on the server: no script, no chart library to fetch at run time."""

from __future__ import annotations

from dataclasses import dataclass
from html import escape

from markupsafe import Markup

WIDTH, HEIGHT, PAD_LEFT, PAD_BOTTOM, PAD_TOP = 720, 200, 8, 22, 8


@dataclass(frozen=True)
class Bar:
    """One bar: its axis label, its value (an exact integer), and the text of its tooltip."""

    label: str
    value: int
    tooltip: str


def bar_heights(values: list[int], height: int) -> list[int]:
    """Pixel heights proportional to the values, the largest filling ``height``; any non-zero value shows."""
    top = max(values, default=0)
    if top <= 0:
        return [0 for _ in values]
    return [0 if v <= 0 else max(1, v * height // top) for v in values]


def bar_chart(bars: list[Bar], title: str, label_every: int = 1) -> Markup:
    """An SVG bar chart; each bar carries its exact value in ``data-value`` and a ``<title>`` tooltip."""
    plot_h = HEIGHT - PAD_BOTTOM - PAD_TOP
    slot = (WIDTH - PAD_LEFT) / max(1, len(bars))
    heights = bar_heights([b.value for b in bars], plot_h)
    parts = [
        f'<svg class="chart" role="img" aria-label="{escape(title)}" viewBox="0 0 {WIDTH} {HEIGHT}" '
        f'xmlns="http://www.w3.org/2000/svg"><title>{escape(title)}</title>',
        f'<line x1="{PAD_LEFT}" y1="{HEIGHT - PAD_BOTTOM}" x2="{WIDTH}" y2="{HEIGHT - PAD_BOTTOM}" class="axis"/>',
    ]
    for i, (bar, h) in enumerate(zip(bars, heights)):
        x = PAD_LEFT + i * slot
        w = max(1.0, slot * 0.8)
        parts.append(
            f'<rect class="bar" x="{x:.1f}" y="{HEIGHT - PAD_BOTTOM - h}" width="{w:.1f}" height="{h}" '
            f'data-label="{escape(bar.label)}" data-value="{bar.value}"><title>{escape(bar.tooltip)}</title></rect>'
        )
        if i % max(1, label_every) == 0:
            parts.append(f'<text x="{x + w / 2:.1f}" y="{HEIGHT - 6}" text-anchor="middle">{escape(bar.label)}</text>')
    parts.append("</svg>")
    return Markup("".join(parts))
