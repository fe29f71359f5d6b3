"""Metric series from `metrics.jsonl`, and the inline SVG line charts the page draws them with."""

from __future__ import annotations

import math
from html import escape
from typing import Any

Points = list[tuple[float, float]]

# Colour-blind-safe (Okabe-Ito), in the order lines are drawn.
PALETTE = ("#0072b2", "#e69f00", "#009e73", "#cc79a7", "#56b4e9", "#d55e00", "#f0e442", "#000000")
TRAINING_PREFIXES = ("sft/", "rollout/", "train/", "perf/")


def training_groups(metrics: list[dict[str, Any]]) -> dict[str, dict[str, Points]]:
    """Every numeric `sft/*`, `rollout/*`, `train/*` and `perf/*` series, grouped by the key's
    folder (`sft`, `rollout`, `rollout/dropped`, `train`, ...): `{group: {key: [(x, value), ...]}}`.
    x is the RL step, or the SFT step for the warm start's records (all logged at RL step 0)."""
    groups: dict[str, dict[str, Points]] = {}
    for record in metrics:
        x = record.get("sft/step", record.get("sft/steps", record["step"]))  # the SFT summary: its last step
        for key, value in record.items():
            if key.startswith(TRAINING_PREFIXES) and key != "sft/step" and _is_number(value):
                group = key.rpartition("/")[0]
                groups.setdefault(group, {}).setdefault(key, []).append((x, float(value)))
    return dict(sorted(groups.items(), key=lambda kv: (TRAINING_PREFIXES.index(kv[0].split("/")[0] + "/"), kv[0])))


def eval_curves(metrics: list[dict[str, Any]]) -> dict[str, dict[str, Points]]:
    """Held-out figures by step: `{metric: {mode: [(step, value), ...]}}` over every evaluation
    (`eval/<tag>/<mode>/<metric>`; the paired change, `eval/change/...`, is not a curve)."""
    curves: dict[str, dict[str, Points]] = {}
    for record in metrics:
        for key, value in record.items():
            parts = key.split("/")
            if len(parts) == 4 and parts[0] == "eval" and parts[1] != "change" and _is_number(value):
                curves.setdefault(parts[3], {}).setdefault(parts[2], []).append((record["step"], float(value)))
    return curves


def line_chart(title: str, lines: dict[str, Points], *, width: int = 260, height: int = 160) -> str:
    """An SVG chart of `lines` (label -> points), with its range on each axis and a legend;
    every point carries a tooltip with its step and value."""
    pad_l, pad_r, pad_t, pad_b = 46, 10, 24, 34
    xs = [x for pts in lines.values() for x, _ in pts]
    ys = [y for pts in lines.values() for _, y in pts]
    x0, x1 = _span(min(xs), max(xs))
    y0, y1 = _span(min(ys), max(ys))

    def px(x: float) -> float:
        return pad_l + (x - x0) / (x1 - x0) * (width - pad_l - pad_r)

    def py(y: float) -> float:
        return height - pad_b - (y - y0) / (y1 - y0) * (height - pad_t - pad_b)

    out = [f'<svg class="chart" viewBox="0 0 {width} {height}" width="{width}" height="{height}" role="img" '
           f'aria-label="{escape(title)}"><title>{escape(title)}</title>',
           f'<text class="title" x="{pad_l}" y="14">{escape(title)}</text>',
           f'<rect class="frame" x="{pad_l}" y="{pad_t}" width="{width - pad_l - pad_r}" '
           f'height="{height - pad_t - pad_b}"/>']
    for y in (y0, (y0 + y1) / 2, y1):
        out.append(f'<text class="tick" x="{pad_l - 4}" y="{py(y) + 3:.1f}" text-anchor="end">{_fmt(y)}</text>')
    for x, anchor in ((x0, "start"), (x1, "end")):
        out.append(f'<text class="tick" x="{px(x):.1f}" y="{height - pad_b + 12}" text-anchor="{anchor}">{_fmt(x)}</text>')
    out.append(f'<text class="tick" x="{(pad_l + width - pad_r) / 2}" y="{height - pad_b + 12}" '
               f'text-anchor="middle">step</text>')
    for i, (label, pts) in enumerate(lines.items()):
        colour = PALETTE[i % len(PALETTE)]
        coords = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in pts)
        out.append(f'<polyline points="{coords}" fill="none" stroke="{colour}" stroke-width="1.6"/>')
        for x, y in pts:
            out.append(f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="2.2" fill="{colour}">'
                       f'<title>{escape(label)} · step {_fmt(x)}: {_fmt(y, 5)}</title></circle>')
        if len(lines) > 1:
            out.append(f'<text class="legend" x="{pad_l + 4 + 70 * i}" y="{height - 6}" fill="{colour}">'
                       f'■ {escape(label)}</text>')
    out.append("</svg>")
    return "".join(out)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _span(lo: float, hi: float) -> tuple[float, float]:
    """A non-empty axis range: a constant series is drawn mid-height."""
    if hi > lo:
        return lo, hi
    margin = abs(lo) * 0.1 or 1.0
    return lo - margin, hi + margin


def is_constant(points: Points) -> bool:
    """A series that never moved (a drop counter at 0, a fixed lr): listed, not drawn."""
    return len({y for _, y in points}) == 1


def _fmt(v: float, digits: int = 3) -> str:
    """Short tick text: `1.2k`, `3.4M`, `6.4e-04`, `0.25`."""
    a = abs(v)
    if a >= 1e6:
        return f"{v / 1e6:.{digits}g}M"
    if a >= 1e4:
        return f"{v / 1e3:.{digits}g}k"
    if 0 < a < 1e-3:
        return f"{v:.{max(1, digits - 2)}e}"
    return f"{v:.{digits}g}"
