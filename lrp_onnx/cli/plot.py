"""Perturbation curves drawn with Pillow (``lrp-onnx evaluate --plot``): one colour per method,
MoRF solid, LeRF dashed, the target score against the step."""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

import numpy as np

#: Tableau's 10 colours (matplotlib's default cycle).
COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
           "#7f7f7f", "#bcbd22", "#17becf")
SIZE = (860, 500)
MARGIN = (70, 30, 290, 50)  # left, top, right, bottom


def _dashed(draw: Any, points: Sequence[tuple[float, float]], fill: str) -> None:
    for i, (a, b) in enumerate(zip(points[:-1], points[1:])):
        if i % 2 == 0:
            draw.line([a, b], fill=fill, width=2)


def plot_curves(results: Sequence[Any], title: str) -> bytes:
    """A PNG of each result's ``morf`` (solid) and ``lerf`` (dashed) curves."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", SIZE, "white")
    draw = ImageDraw.Draw(img)
    left, top, right, bottom = MARGIN
    x0, x1, y0, y1 = left, SIZE[0] - right, SIZE[1] - bottom, top
    values = np.concatenate([np.r_[r.morf, r.lerf] for r in results])
    lo, hi = float(values.min()), float(values.max())
    hi = hi if hi > lo else lo + 1.0
    steps = len(results[0].morf) - 1

    def at(k: float, v: float) -> tuple[float, float]:
        return (x0 + (x1 - x0) * k / max(steps, 1), y0 + (y1 - y0) * (v - lo) / (hi - lo))

    draw.rectangle([x0, y1, x1, y0], outline="black")
    for i in range(5):
        v = lo + (hi - lo) * i / 4
        _, y = at(0, v)
        draw.line([(x0 - 4, y), (x0, y)], fill="black")
        draw.text((5, y - 6), f"{v:.3g}", fill="black")
        k = steps * i / 4
        x, _ = at(k, lo)
        draw.line([(x, y0), (x, y0 + 4)], fill="black")
        draw.text((x - 8, y0 + 8), f"{k:g}", fill="black")
    draw.text((x0, SIZE[1] - 20), "step (features replaced); y: mean target score", fill="black")
    draw.text((x0, 8), title, fill="black")
    for i, r in enumerate(results):
        colour = COLOURS[i % len(COLOURS)]
        draw.line([at(k, v) for k, v in enumerate(r.morf)], fill=colour, width=2)
        _dashed(draw, [at(k, v) for k, v in enumerate(r.lerf)], colour)
        ly = top + 18 * i
        draw.line([(x1 + 10, ly + 6), (x1 + 30, ly + 6)], fill=colour, width=3)
        draw.text((x1 + 35, ly), r.method[:40], fill="black")
    draw.text((x1 + 10, top + 18 * len(results) + 10), "solid: MoRF, dashed: LeRF",
              fill="black")
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()
