"""Charts drawn on the server as SVG: a page needs no charting script, and a chart shows
before any script runs. Values are numbers and labels are escaped, so nothing a user typed
reaches the markup unescaped."""

from __future__ import annotations

from collections.abc import Sequence
from html import escape

from markupsafe import Markup

__all__ = ["bars"]

_WIDTH, _HEIGHT, _PAD = 640, 180, 28


def bars(
    points: Sequence[tuple[str, float]], *, title: str, unit: str = "", colour: str = "#c2410c"
) -> Markup:
    """A bar chart of `points` (label, value), with its title and the largest value marked."""
    top = max((value for _, value in points), default=0.0) or 1.0
    inner_w, inner_h = _WIDTH - 2 * _PAD, _HEIGHT - 2 * _PAD
    step = inner_w / max(1, len(points))
    parts = [
        f'<svg class="chart" viewBox="0 0 {_WIDTH} {_HEIGHT}" role="img" '
        f'aria-label="{escape(title)}" xmlns="http://www.w3.org/2000/svg">',
        f"<title>{escape(title)}</title>",
        f'<text x="{_PAD}" y="18" font-size="13" fill="#5f6368">{escape(title)} (max '
        f"{top:g}{escape(unit)})</text>",
        f'<line x1="{_PAD}" y1="{_HEIGHT - _PAD}" x2="{_WIDTH - _PAD}" y2="{_HEIGHT - _PAD}" '
        'stroke="#d9dce1"/>',
    ]
    for i, (label, value) in enumerate(points):
        height = inner_h * value / top
        x = _PAD + i * step
        parts.append(
            f'<rect x="{x + step * 0.1:.1f}" y="{_HEIGHT - _PAD - height:.1f}" '
            f'width="{step * 0.8:.1f}" height="{height:.1f}" fill="{colour}">'
            f"<title>{escape(label)}: {value:g}{escape(unit)}</title></rect>"
        )
    if points:
        for i in (0, len(points) - 1):
            parts.append(
                f'<text x="{_PAD + i * step + step / 2:.1f}" y="{_HEIGHT - 8}" font-size="11" '
                f'text-anchor="middle" fill="#5f6368">{escape(points[i][0])}</text>'
            )
    else:
        parts.append(
            f'<text x="{_WIDTH / 2}" y="{_HEIGHT / 2}" text-anchor="middle" fill="#5f6368">'
            "no calls in this span</text>"
        )
    parts.append("</svg>")
    return Markup("".join(parts))  # noqa: S704 - built from numbers and escaped text only
