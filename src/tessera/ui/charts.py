"""Inline SVG charts: geometry computed here (numbers only), markup in the templates.

Metric histories are reduced in DuckDB before they are drawn: a key with more points than a
chart has pixels keeps, per bucket of steps, the points with the lowest and the highest value
(so spikes survive), never more than ``2 * BUCKETS`` points.
"""

from __future__ import annotations

import math
from typing import Any

import duckdb
import pyarrow as pa

PALETTE = ["#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#be185d",
           "#4d7c0f", "#7c2d12", "#334155"]  # fmt: skip
BUCKETS = 240


def reduce_history(
    con: duckdb.DuckDBPyConnection, history: list[tuple[int, str, float | None]]
) -> dict[str, list[tuple[int, float]]]:
    """``{key: [(step, value), ...]}``, finite values only, at most 2 * BUCKETS per key."""
    if not history:
        return {}
    table = pa.table(
        {
            "step": pa.array([h[0] for h in history], pa.int64()),
            "key": pa.array([h[1] for h in history], pa.string()),
            "value": pa.array([h[2] for h in history], pa.float64()),
        }
    )
    name = f"hist_{id(table)}"
    con.register(name, table)
    try:
        rows = con.execute(
            f"WITH h AS (SELECT key, step, value FROM {name} WHERE isfinite(value)), "
            "r AS (SELECT key, min(step) AS lo, max(step) AS hi, count(*) AS n FROM h GROUP BY key), "
            "b AS (SELECT h.key, h.step, h.value, r.n, CASE WHEN r.n <= ? OR r.hi = r.lo THEN h.step "
            "ELSE floor((h.step - r.lo) * ? / (r.hi - r.lo + 1))::BIGINT END AS bucket "
            "FROM h JOIN r USING (key)), "
            "m AS (SELECT key, bucket, arg_min(step, value) AS s1, min(value) AS v1, "
            "arg_max(step, value) AS s2, max(value) AS v2 FROM b GROUP BY key, bucket) "
            "SELECT key, s1, v1 FROM m UNION SELECT key, s2, v2 FROM m ORDER BY 1, 2",
            [2 * BUCKETS, BUCKETS],
        ).fetchall()
    finally:
        con.unregister(name)
    out: dict[str, list[tuple[int, float]]] = {}
    for key, step, value in rows:
        out.setdefault(key, []).append((int(step), float(value)))
    return out


def nice_ticks(lo: float, hi: float, count: int = 4) -> list[float]:
    if not math.isfinite(lo) or not math.isfinite(hi):
        return []
    if hi == lo:
        return [lo]
    raw = (hi - lo) / count
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    start = math.ceil(lo / step) * step
    ticks = []
    value = start
    while value <= hi + step * 1e-9 and len(ticks) < 12:
        ticks.append(round(value, 12))
        value += step
    return ticks


def fmt_number(value: float) -> str:
    if value == 0:
        return "0"
    magnitude = abs(value)
    if magnitude >= 10_000 or magnitude < 0.001:
        return f"{value:.3g}"
    if magnitude >= 100:
        return f"{value:.0f}"
    return f"{value:.4g}"


def line_chart(
    points: list[tuple[int, float]], width: int = 460, height: int = 170
) -> dict[str, Any]:
    """Geometry of one metric's line chart."""
    left, right, top, bottom = 52, 12, 10, 26
    plot_w, plot_h = width - left - right, height - top - bottom
    steps = [p[0] for p in points]
    values = [p[1] for p in points]
    x_lo, x_hi = min(steps), max(steps)
    y_lo, y_hi = min(values), max(values)
    if y_hi == y_lo:
        pad = abs(y_lo) * 0.1 or 1.0
        y_lo, y_hi = y_lo - pad, y_hi + pad

    def x(step: float) -> float:
        return left + (plot_w * (step - x_lo) / (x_hi - x_lo) if x_hi != x_lo else plot_w / 2)

    def y(value: float) -> float:
        return top + plot_h * (1 - (value - y_lo) / (y_hi - y_lo))

    path = " ".join(
        f"{'M' if i == 0 else 'L'}{x(s):.1f},{y(v):.1f}" for i, (s, v) in enumerate(points)
    )
    x_ticks = [(x(v), fmt_number(v)) for v in nice_ticks(x_lo, x_hi) if x_lo <= v <= x_hi]
    y_ticks = [(y(v), fmt_number(v)) for v in nice_ticks(y_lo, y_hi) if y_lo <= v <= y_hi]
    last_step, last_value = points[-1]
    return {
        "width": width,
        "height": height,
        "left": left,
        "top": top,
        "plot_w": plot_w,
        "plot_h": plot_h,
        "path": path,
        "dots": [(x(s), y(v)) for s, v in points] if len(points) <= 30 else [],
        "x_ticks": x_ticks,
        "y_ticks": y_ticks,
        "n": len(points),
        "first_step": x_lo,
        "last_step": last_step,
        "last": fmt_number(last_value),
        "min": fmt_number(min(values)),
        "max": fmt_number(max(values)),
    }


def bar_chart(
    groups: list[str], series: list[str], values: list[list[float]], height: int = 260
) -> dict[str, Any]:
    """Grouped bars: ``values[series][group]`` in [0, 1] (per-class metrics per run)."""
    left, top, bottom = 40, 10, 64
    group_w = max(56, min(140, 20 * len(series) + 18))
    width = left + group_w * len(groups) + 10
    plot_h = height - top - bottom
    bar_w = max(3.0, (group_w - 10) / max(1, len(series)))
    bars = []
    for s, name in enumerate(series):
        for g, group in enumerate(groups):
            v = values[s][g]
            v = 0.0 if v is None or not math.isfinite(v) else max(0.0, min(1.0, float(v)))
            h = plot_h * v
            bars.append(
                {
                    "x": left + g * group_w + 5 + s * bar_w,
                    "y": top + plot_h - h,
                    "w": bar_w - 1,
                    "h": h,
                    "color": PALETTE[s % len(PALETTE)],
                    "title": f"{name} · {group}: {v:.3f}",
                }
            )
    labels = [
        {"x": left + g * group_w + group_w / 2, "y": top + plot_h + 14, "text": group}
        for g, group in enumerate(groups)
    ]
    ticks = [(top + plot_h * (1 - v), f"{v:.1f}") for v in (0, 0.25, 0.5, 0.75, 1.0)]
    return {
        "width": width,
        "height": height,
        "left": left,
        "top": top,
        "plot_h": plot_h,
        "bars": bars,
        "labels": labels,
        "ticks": ticks,
        "legend": [(name, PALETTE[i % len(PALETTE)]) for i, name in enumerate(series)],
    }


def heat(count: int, row_total: int) -> int:
    """Shade 0-10 of a confusion cell (a CSS class, so no inline styles are needed): darker
    for a larger share of its row; 0 only for an empty cell."""
    if not count or not row_total:
        return 0
    return max(1, min(10, round(10 * count / row_total)))
