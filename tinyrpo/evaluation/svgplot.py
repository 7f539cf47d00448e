"""Line charts as inline SVG, for the report pages (tinyrpo/evaluation/pages.py).

Why our own ~150 lines and not matplotlib: the report is rebuilt after every validation of every run, so
it must cost nothing to import and never be missing. With a plotting library as an optional extra, the
page of a user without it would show tables only, and the plots would be a second code path to test. An
SVG line chart needs only axes, ticks, polylines and a legend; the browser draws it, crisp at any zoom,
with the value of each validation point on hover (an SVG <title>), and the page stays one text file.

    svg = line_chart([Series("reward", [(0, 0.61), (40, 0.64)], markers=True)], title="validation",
                     mark_x=40, mark_label="best")
"""
import math
from dataclasses import dataclass
from html import escape

PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf",
           "#7f7f7f", "#bcbd22")
CHAR_W = 6.5  # rough width of one 11-px character, for laying out the legend


@dataclass
class Series:
    name: str
    points: list[tuple[float, float]]  # (x, y); non-finite values are skipped
    color: str | None = None           # default: the palette, in order
    faint: bool = False                # thin and light: raw values behind their smoothed curve
    markers: bool = False              # a dot at every point, its value shown on hover
    legend: bool = True


def nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """About n round tick values (1, 2, 2.5, 5 × 10^k apart) covering [lo, hi]."""
    if hi - lo <= 1e-9 * max(1.0, abs(lo), abs(hi)):  # a constant series (up to rounding): a range around it
        lo, hi = lo - 0.5 * (abs(lo) or 1), hi + 0.5 * (abs(hi) or 1)
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    first = math.floor(lo / step + 1e-9) * step
    ticks, k = [], 0
    while not ticks or ticks[-1] < hi - 1e-9 * step:
        ticks.append(round(first + k * step, 3 - math.floor(math.log10(step))))  # 0.1 + 0.2 -> 0.3
        k += 1
    return ticks


def tick_label(v: float) -> str:
    """Compact tick and tooltip numbers: 0.6132, 1.2e-05, 400."""
    if v == 0:
        return "0"
    return f"{v:.4g}" if 1e-3 <= abs(v) < 1e5 else f"{v:.2e}"


def ema(values: list[float], weight: float = 0.9) -> list[float]:
    """Debiased exponential moving average, as TensorBoard's smoothing slider (0.9 ≈ a 10-step window)."""
    out, acc = [], 0.0
    for k, v in enumerate(values, 1):
        acc = weight * acc + (1 - weight) * v
        out.append(acc / (1 - weight ** k))
    return out


def line_chart(series: list[Series], title: str = "", xlabel: str = "step", ylabel: str = "",
               mark_x: float | None = None, mark_label: str = "", width: int = 520, height: int = 240,
               y_range: tuple[float, float] | None = None) -> str:
    """One chart as an <svg> element; `mark_x` draws a dashed vertical line (the best step)."""
    series = [Series(s.name, [(x, y) for x, y in s.points if math.isfinite(x) and math.isfinite(y)],
                     s.color or PALETTE[k % len(PALETTE)], s.faint, s.markers, s.legend)
              for k, s in enumerate(series)]
    xs = [x for s in series for x, _ in s.points] + ([mark_x] if mark_x is not None else [])
    ys = [y for s in series for _, y in s.points]
    if not ys:
        return f'<p class="empty">{escape(title)}: nothing logged yet</p>'
    xt = nice_ticks(min(xs), max(max(xs), min(xs) + 1), 6)  # one point (a step-0 validation) sits at the left
    yt = nice_ticks(*(y_range or (min(ys), max(ys))), 5)
    legend = [s for s in series if s.legend]
    # legend rows under the axis label: entries laid left to right, wrapped at the chart's width
    rows, x_at = [[]], 0.0
    for s in legend:
        w = 24 + CHAR_W * len(s.name)
        if x_at + w > width - 20 and rows[-1]:
            rows.append([])
            x_at = 0.0
        rows[-1].append((x_at, s))
        x_at += w
    left, right, top, bottom = 58, 14, 24, 38 + 16 * len(rows) * bool(legend)
    pw, ph = width - left - right, height - top - bottom
    px = lambda x: left + (x - xt[0]) / (xt[-1] - xt[0]) * pw  # noqa: E731
    py = lambda y: top + (yt[-1] - y) / (yt[-1] - yt[0]) * ph  # noqa: E731

    out = [f'<svg class="chart" xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" '
           f'width="{width}" height="{height}" role="img" aria-label="{escape(title)}">',
           f'<text x="{left}" y="15" class="title">{escape(title)}</text>']
    for t in yt:
        out.append(f'<line x1="{left}" x2="{left + pw}" y1="{py(t):.1f}" y2="{py(t):.1f}" class="grid"/>'
                   f'<text x="{left - 5}" y="{py(t) + 4:.1f}" text-anchor="end">{tick_label(t)}</text>')
    for t in xt:
        out.append(f'<line x1="{px(t):.1f}" x2="{px(t):.1f}" y1="{top}" y2="{top + ph}" class="grid"/>'
                   f'<text x="{px(t):.1f}" y="{top + ph + 14}" text-anchor="middle">{tick_label(t)}</text>')
    out.append(f'<text x="{left + pw / 2}" y="{top + ph + 28}" text-anchor="middle">{escape(xlabel)}</text>')
    if ylabel:
        out.append(f'<text transform="translate(12 {top + ph / 2}) rotate(-90)" text-anchor="middle">'
                   f'{escape(ylabel)}</text>')
    if mark_x is not None:
        right_half = px(mark_x) > left + pw / 2  # the label goes on the side with room for it
        out.append(f'<line x1="{px(mark_x):.1f}" x2="{px(mark_x):.1f}" y1="{top}" y2="{top + ph}" class="mark"/>'
                   f'<text x="{px(mark_x) + (-4 if right_half else 4):.1f}" y="{top + 11}" class="mark" '
                   f'text-anchor="{"end" if right_half else "start"}">{escape(mark_label)}</text>')
    for s in series:
        pts = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in s.points)
        style = f'stroke="{s.color}" stroke-width="{1 if s.faint else 2}"' + (' opacity="0.3"' if s.faint else "")
        out.append(f'<polyline data-series="{escape(s.name)}" points="{pts}" fill="none" {style}/>')
        if s.markers:
            out += [f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="3" fill="{s.color}">'
                    f'<title>{escape(s.name)} at {tick_label(x)}: {y:.4f}</title></circle>' for x, y in s.points]
    for r, row in enumerate(rows if legend else []):
        y = top + ph + 44 + 16 * r
        for x_at, s in row:
            out.append(f'<rect x="{left + x_at}" y="{y - 8}" width="14" height="4" fill="{s.color}"/>'
                       f'<text x="{left + x_at + 18}" y="{y - 3}">{escape(s.name)}</text>')
    out.append("</svg>")
    return "\n".join(out)
