"""Inline SVG line charts for report.html: an epoch axis with integer ticks, a value axis with round ticks and
gridlines, a legend, markers on short series. Plain SVG text: no JavaScript, no plotting library, nothing to fetch.

Usage: line_chart("loss", {"train/loss": [(1, 0.9), (2, 0.5)], "val/loss": [(1, 1.1), (2, 0.7)]}, y_label="loss")
"""
import html
import math

COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b")
WIDTH, HEIGHT = 460, 260  # px, the whole chart
LEFT, RIGHT, TOP, BOTTOM = 62, 14, 30, 40  # px margins: value ticks and label | legend above | epoch ticks and label
MARKERS_UP_TO = 40  # points in a series: at most this many are drawn as dots too (a single epoch: the dot alone)
STEPS = (1, 2, 2.5, 5)  # round tick steps, times a power of ten


def nice_ticks(lo: float, hi: float) -> list[float]:
    """4 to 6 round values (steps of 1, 2, 2.5 or 5 times a power of ten) from at or below lo to at or above hi."""
    if not hi > lo:  # one value (a constant lr, a single epoch): a band around it
        pad = abs(lo) * 0.1 or 1.0
        lo, hi = lo - pad, hi + pad
    power = math.floor(math.log10((hi - lo) / 5))
    fits = []
    for step in (m * 10.0 ** p for p in range(power - 1, power + 3) for m in STEPS):
        first, last = math.floor(lo / step + 1e-9), math.ceil(hi / step - 1e-9)
        if 4 <= last - first + 1 <= 6:
            fits.append((abs(last - first + 1 - 5), -step, first, last))
    _, step, first, last = min(fits)  # nearest to 5 ticks; of those, the coarser step
    return [round(n * -step, 12) for n in range(first, last + 1)]  # 0.3, not 0.30000000000000004


def epoch_ticks(lo: int, hi: int) -> list[int]:
    """Every epoch up to 12 of them, else a round integer step."""
    if hi - lo < 12:
        return list(range(lo, hi + 1))
    step = next(m * 10 ** p for p in range(0, 6) for m in (1, 2, 5) if (hi - lo) / (m * 10 ** p) <= 10)
    return [t for t in range(math.ceil(lo / step) * step, hi + 1, step)]


def label(value: float) -> str:
    """A tick label: 0.25, 1.5, 12, 0.00025, 2.5e-05 (small learning rates)."""
    return f"{value:.6g}"


def _widened(low: float, high: float) -> tuple[float, float]:
    """A range of some width: one value (a constant lr, a single epoch) is drawn in the middle of one."""
    if high > low:
        return low, high
    pad = abs(low) * 0.1 or 1.0
    return low - pad, high + pad


class Frame:
    """The plot area: data coordinates to pixels."""

    def __init__(self, x_range: tuple[float, float], y_range: tuple[float, float]):
        self.x0, self.x1 = _widened(*x_range)
        self.y0, self.y1 = _widened(*y_range)

    def x(self, value: float) -> float:
        return LEFT + (value - self.x0) / (self.x1 - self.x0) * (WIDTH - LEFT - RIGHT)

    def y(self, value: float) -> float:
        return HEIGHT - BOTTOM - (value - self.y0) / (self.y1 - self.y0) * (HEIGHT - TOP - BOTTOM)


def _axes(frame: Frame, x_ticks: list, y_ticks: list, x_label: str, y_label: str) -> str:
    """Gridlines at the value ticks, both axes' ticks and labels."""
    bottom, right = HEIGHT - BOTTOM, WIDTH - RIGHT
    parts = [f'<line class="grid" x1="{LEFT}" x2="{right}" y1="{frame.y(t):.1f}" y2="{frame.y(t):.1f}" '
             f'stroke="#e3e3e3"/><text class="ytick" x="{LEFT - 6}" y="{frame.y(t) + 4:.1f}" '
             f'text-anchor="end">{label(t)}</text>' for t in y_ticks]
    parts += [f'<line x1="{frame.x(t):.1f}" x2="{frame.x(t):.1f}" y1="{bottom}" y2="{bottom + 5}" stroke="#555"/>'
              f'<text class="xtick" x="{frame.x(t):.1f}" y="{bottom + 18}" text-anchor="middle">{t}</text>'
              for t in x_ticks]
    parts.append(f'<line x1="{LEFT}" x2="{right}" y1="{bottom}" y2="{bottom}" stroke="#555"/>'
                 f'<line x1="{LEFT}" x2="{LEFT}" y1="{TOP}" y2="{bottom}" stroke="#555"/>'
                 f'<text class="xlabel" x="{(LEFT + right) / 2:.0f}" y="{HEIGHT - 6}" text-anchor="middle">'
                 f'{html.escape(x_label)}</text>'
                 f'<text class="ylabel" transform="translate(14 {(TOP + bottom) / 2:.0f}) rotate(-90)" '
                 f'text-anchor="middle">{html.escape(y_label)}</text>')
    return "".join(parts)


def _lines(frame: Frame, series: dict[str, list[tuple[float, float]]]) -> str:
    """One polyline per series with points; dots on its points when they are few (one point: the dot alone)."""
    parts = []
    for color, (name, points) in zip(COLORS, series.items()):
        xy = " ".join(f"{frame.x(x):.1f},{frame.y(y):.1f}" for x, y in points)
        parts.append(f'<polyline class="series" data-series="{html.escape(name)}" fill="none" stroke="{color}" '
                     f'stroke-width="2" points="{xy}"/>')
        if len(points) <= MARKERS_UP_TO:
            parts += [f'<circle class="marker" cx="{frame.x(x):.1f}" cy="{frame.y(y):.1f}" r="3.5" fill="{color}">'
                      f'<title>{html.escape(name)} epoch {x}: {y:.6g}</title></circle>' for x, y in points]
    return "".join(parts)


def _legend(series: dict) -> str:
    """A swatch and the name of each series, in a row above the plot area."""
    parts, x = [], LEFT
    for color, name in zip(COLORS, series):
        parts.append(f'<g class="legend"><line x1="{x}" x2="{x + 16}" y1="12" y2="12" stroke="{color}" '
                     f'stroke-width="3"/><text x="{x + 20}" y="16">{html.escape(name)}</text></g>')
        x += 30 + 7 * len(name)
    return "".join(parts)


def line_chart(title: str, series: dict[str, list[tuple[float, float]]], y_label: str = "",
               x_label: str = "epoch") -> str:
    """A figure with an inline SVG of each series' (epoch, value) points, series without points left out; "" when
    none has any. Integer x values (epochs) get a tick each (or a round step past 12)."""
    series = {name: points for name, points in series.items() if points}
    if not series:
        return ""
    xs = [x for points in series.values() for x, _ in points]
    ys = [y for points in series.values() for _, y in points]
    x_ticks = epoch_ticks(int(min(xs)), int(max(xs)))
    y_ticks = nice_ticks(min(ys), max(ys))
    x_range = (min(xs) - 0.5, max(xs) + 0.5) if max(xs) - min(xs) < 1 else (min(xs), max(xs))  # one epoch: centred
    frame = Frame(x_range, (y_ticks[0], y_ticks[-1]))
    name = html.escape(title)
    return (f'<figure class="chart" id="chart-{name}"><figcaption>{name}</figcaption>'
            f'<svg width="{WIDTH}" height="{HEIGHT}" '
            f'viewBox="0 0 {WIDTH} {HEIGHT}" font-size="11" font-family="system-ui,sans-serif" role="img">'
            f'<title>{name}</title>{_axes(frame, x_ticks, y_ticks, x_label, y_label)}{_lines(frame, series)}'
            f'{_legend(series)}</svg></figure>')
