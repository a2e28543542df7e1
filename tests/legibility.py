"""What makes a figure hard to read, found from its own artists once it is drawn.

`problems(fig)` lists, in words:
- a text cut at the figure's edge;
- two texts that overlap (titles, axis and tick labels, annotations, legend entries,
  colour-bar ticks);
- an annotation that runs past its axes;
- a legend box over a data point (a vertex of a data line, a scatter point) of any axes;
- a data point on or outside its axes' frame, where the frame or the edge hides it (a
  marker needs its radius inside).
Only drawn things count: tick labels out of the view are ignored, as are empty texts.
"""

from __future__ import annotations

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.collections import PathCollection
from matplotlib.container import BarContainer
from matplotlib.figure import Figure
from matplotlib.text import Annotation, Text
from matplotlib.transforms import Bbox

EDGE_PX = 1.0  # a text may touch the figure's edge by this much
OVERLAP_PX2 = 2.0  # two texts may share this many square pixels (anti-aliased corners)
FRAME_PX = 1.5  # a point closer than this to the frame is drawn on it


def _drawn_texts(fig: Figure) -> list[tuple[str, Text]]:
    found: list[tuple[str, Text]] = []

    def add(kind: str, text: Text | None) -> None:
        if any(text is seen for _, seen in found):  # a suptitle is also in fig.texts
            return
        if text is not None and text.get_visible() and text.get_text().strip():
            found.append((f"{kind} {text.get_text().strip()[:40]!r}", text))

    add("suptitle", getattr(fig, "_suptitle", None))
    for t in fig.texts:
        add("figure text", t)
    for legend in fig.legends:
        for t in legend.get_texts():
            add("figure legend entry", t)
    for ax in fig.axes:
        for title in (ax.title, ax._left_title, ax._right_title):
            add("title", title)
        for axis in (ax.xaxis, ax.yaxis):
            if not axis.get_visible():  # a twin's shared axis
                continue
            add("axis label", axis.label)
            lo, hi = sorted(axis.get_view_interval())
            span = (hi - lo) or 1.0
            for tick in [*axis.get_major_ticks(), *axis.get_minor_ticks()]:
                if lo - 1e-9 * span <= tick.get_loc() <= hi + 1e-9 * span:
                    add("tick label", tick.label1)
                    add("tick label", tick.label2)
            add("axis offset", axis.get_offset_text())
        for t in ax.texts:
            add("annotation" if isinstance(t, Annotation) else "text", t)
        legend = ax.get_legend()
        if legend is not None:
            add("legend title", legend.get_title())
            for t in legend.get_texts():
                add("legend entry", t)
    return found


def _data_points(ax: Axes) -> list[tuple[np.ndarray, float]]:
    """Display coordinates of the axes' data points, each set with its marker's radius
    (pixels). Lines that are not in data coordinates (axvline, axhline) are reference
    lines, not data."""
    px_per_pt = ax.figure.dpi / 72.0
    out = []
    for line in ax.lines:
        if not line.get_visible() or line.get_transform() != ax.transData:
            continue
        xy = np.asarray(line.get_xydata(), dtype=float)
        xy = xy[np.isfinite(xy).all(1)]
        if len(xy):
            marker = line.get_marker() not in (None, "None", "none", "", " ")
            out.append((line.get_transform().transform(xy),
                        line.get_markersize() * px_per_pt / 2 if marker else 0.0))
    for coll in ax.collections:
        if isinstance(coll, PathCollection) and coll.get_visible() and len(coll.get_offsets()):
            sizes = coll.get_sizes()
            radius = float(np.sqrt(sizes.max()) * px_per_pt / 2) if len(sizes) else 0.0
            xy = np.asarray(coll.get_offsets(), dtype=float)
            xy = xy[np.isfinite(xy).all(1)]
            out.append((coll.get_offset_transform().transform(xy), radius))
    for container in ax.containers:  # bars: the middle of each bar's top
        if isinstance(container, BarContainer):
            tops = [(r.get_x() + r.get_width() / 2, r.get_y() + r.get_height())
                    for r in container.patches if r.get_visible()]
            if tops:
                out.append((ax.transData.transform(np.asarray(tops, dtype=float)), 0.0))
    return out


def _inside(box: Bbox, xy: np.ndarray, margin: float) -> np.ndarray:
    return ((xy[:, 0] > box.x0 + margin) & (xy[:, 0] < box.x1 - margin)
            & (xy[:, 1] > box.y0 + margin) & (xy[:, 1] < box.y1 - margin))


def problems(fig: Figure) -> list[str]:
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    renderer = canvas.get_renderer()
    width, height = fig.bbox.width, fig.bbox.height
    found: list[str] = []
    texts = [(name, t, t.get_window_extent(renderer)) for name, t in _drawn_texts(fig)]
    for name, _, box in texts:
        if (box.x0 < -EDGE_PX or box.y0 < -EDGE_PX or box.x1 > width + EDGE_PX
                or box.y1 > height + EDGE_PX):
            found.append(f"{name} is cut at the figure's edge")
    for i, (name_a, _, a) in enumerate(texts):
        for name_b, _, b in texts[i + 1:]:
            w = min(a.x1, b.x1) - max(a.x0, b.x0)
            h = min(a.y1, b.y1) - max(a.y0, b.y0)
            if w > 0 and h > 0 and w * h > OVERLAP_PX2:
                found.append(f"{name_a} overlaps {name_b}")
    for ax in fig.axes:
        box = ax.bbox
        for t in ax.texts:
            if isinstance(t, Annotation) and t.get_visible() and t.get_text().strip():
                ext = t.get_window_extent(renderer)
                if ext.x0 < box.x0 - 1 or ext.x1 > box.x1 + 1 or ext.y0 < box.y0 - 1 or (
                        ext.y1 > box.y1 + 1):
                    found.append(f"annotation {t.get_text()[:40]!r} runs past its axes "
                                 f"{ax.get_title()[:30]!r}")
        for xy, radius in _data_points(ax):
            off = ~_inside(box, xy, max(FRAME_PX, radius) - 0.5)
            if off.any():
                found.append(f"{int(off.sum())} data point(s) of axes {ax.get_title()[:40]!r} "
                             "on or outside its frame")
    legends = [(ax.get_legend(), ax) for ax in fig.axes if ax.get_legend() is not None]
    legends += [(legend, None) for legend in fig.legends]
    for legend, owner in legends:
        lbox = legend.get_window_extent(renderer)
        for ax in fig.axes:
            for xy, radius in _data_points(ax):
                hidden = _inside(lbox, xy, -radius)
                if hidden.any():
                    where = "its" if ax is owner else f"{ax.get_title()[:30]!r}'s"
                    found.append(f"a legend covers {int(hidden.sum())} of {where} data points")
    return found
