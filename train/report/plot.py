"""`pareto.png`: one panel per pair of chosen metrics, with every series of points (the weighting
schemes; each multi-task run's fusion points) in its own colour and marker and its front of the
pair joined, the rows Pareto-optimal over all chosen metrics filled, the oracle as a star.

Readable with dozens of fusion points (the rule is `train.report.fronts`): only the points on
the pair's front carry their label, placed where it overlaps no other text when one of a few
spots allows (else the point shows its number: labels never overlap); every other point carries
its number from the key in report.md.

matplotlib is imported only when a plot is drawn (it is the optional `upweight[report]` extra),
so reading runs and building a report work without it.
"""

from __future__ import annotations

import io
import math
from typing import Any

from train.pareto import front_path
from train.report.fronts import Layout, layout
from train.report.runs import ReportError
from train.report.table import ARROW, Report

MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "h")
# Label spots tried in turn (offset in points, horizontal alignment): beside the point first,
# then above/below, then further out; the first that overlaps nothing wins.
SPOTS = (
    (4, 3, "left"),
    (4, -9, "left"),
    (-4, 3, "right"),
    (-4, -9, "right"),
    (4, 11, "left"),
    (-4, 11, "right"),
    (4, -17, "left"),
    (-4, -17, "right"),
    (4, 19, "left"),
    (4, -25, "left"),
)


def plot_pareto(report: Report) -> bytes:
    """The PNG: one panel per pair of chosen metrics (a single chosen metric: one strip)."""
    fig, _ = draw_pareto(report)
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return buffer.getvalue()


def draw_pareto(report: Report) -> tuple[Any, Layout]:
    """The matplotlib Figure and the layout it follows. Texts carry a gid: `label` (a point on
    its pair's front), `number` (any other point; the key is in report.md), `oracle`."""
    try:
        import matplotlib
    except ImportError as err:
        raise ReportError("pareto.png needs matplotlib: pip install 'upweight[report]'") from err
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    plan = layout(report)
    chosen, directions = report.chosen, report.directions
    panels = max(1, len(plan.panels))
    ncols = min(3, panels)
    nrows = math.ceil(panels / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.4 * ncols, 4.6 * nrows), squeeze=False)
    style = {
        s.name: {"color": f"C{n % 10}", "marker": MARKERS[n % len(MARKERS)]}
        for n, s in enumerate(plan.series)
    }
    series_of_row = {i: s.name for s in plan.series for i in s.rows}

    def value(i: int, c: str) -> float:
        return report.rows[i].values.get(c, math.nan)

    for ax in axes.flat[panels:]:
        ax.set_visible(False)
    if not plan.panels:  # one metric: each row on a line, best at the top
        ax, c = axes.flat[0], chosen[0]
        shown = [i for i, r in enumerate(report.rows) if not math.isnan(value(i, c))]
        shown.sort(key=lambda i: value(i, c) * (1 if directions[0] == "max" else -1))
        for y, i in enumerate(shown):
            if report.rows[i].kind == "oracle":
                ax.scatter([value(i, c)], [y], marker="*", color="black", s=160)
                continue
            look = style[series_of_row[i]]
            filled = look["color"] if report.pareto[i] else "none"
            ax.scatter([value(i, c)], [y], **look, facecolors=filled)
        ax.set_yticks(range(len(shown)), [report.rows[i].label for i in shown])
        ax.set_xlabel(f"{c} {ARROW[directions[0]]}")
    placements = []
    for ax, panel in zip(axes.flat, plan.panels, strict=False):
        a, b = panel.x, panel.y
        ca, cb = chosen[a], chosen[b]
        drawn = set(panel.labelled) | set(panel.numbered)
        for s in plan.series:
            idx = [i for i in s.rows if i in drawn]
            if not idx:
                continue
            look = style[s.name]
            xs, ys = [value(i, ca) for i in idx], [value(i, cb) for i in idx]
            path = front_path(xs, ys, (directions[a], directions[b]))
            ax.plot([xs[p] for p in path], [ys[p] for p in path], "-", color=look["color"], lw=1.2)
            filled = [look["color"] if report.pareto[i] else "none" for i in idx]
            ax.scatter(
                xs,
                ys,
                s=30,
                marker=look["marker"],
                facecolors=filled,
                edgecolors=look["color"],
                zorder=3,
            )
        for i in panel.numbered:
            ax.annotate(
                str(plan.numbers[i]),
                (value(i, ca), value(i, cb)),
                xytext=(2, 2),
                textcoords="offset points",
                fontsize=6,
                color="dimgrey",
                gid="number",
            )
        for i, r in enumerate(report.rows):
            if r.kind == "oracle" and not (math.isnan(value(i, ca)) or math.isnan(value(i, cb))):
                ax.scatter(
                    [value(i, ca)], [value(i, cb)], marker="*", s=160, color="black", zorder=4
                )
                ax.annotate(
                    r.label,
                    (value(i, ca), value(i, cb)),
                    xytext=(4, 3),
                    textcoords="offset points",
                    fontsize=7,
                    gid="oracle",
                )
        ax.set_xlabel(f"{ca} {ARROW[directions[a]]}")
        ax.set_ylabel(f"{cb} {ARROW[directions[b]]}")
        ax.grid(alpha=0.3)
        labelled = sorted(panel.labelled, key=lambda i: (value(i, ca), value(i, cb)))
        placements.append((ax, [(i, value(i, ca), value(i, cb)) for i in labelled]))

    handles = [
        Line2D([], [], color=style[s.name]["color"], marker=style[s.name]["marker"], label=s.name)
        for s in plan.series
    ]
    grey = {"color": "grey", "marker": "o", "ls": ""}
    handles.append(Line2D([], [], **grey, label="filled: Pareto-optimal over all chosen metrics"))
    handles.append(Line2D([], [], **grey, markerfacecolor="none", label="hollow: dominated"))
    if any(r.kind == "oracle" for r in report.rows):
        star = {"color": "black", "marker": "*", "ls": "", "markersize": 10}
        handles.append(Line2D([], [], **star, label="oracle (simulator truth)"))
    if plan.numbers:
        blank = {"color": "none", "marker": "", "ls": ""}
        handles.append(Line2D([], [], **blank, label="text: front of the pair; n: see report.md"))
    # A narrow figure stacks the legend; keep room for it below the panels.
    legend_cols = 4 if ncols >= 3 else 2 if ncols == 2 else 1
    legend_rows = math.ceil(len(handles) / legend_cols)
    fig_height = 4.6 * nrows
    bottom = min(0.4, (0.22 * legend_rows + 0.1) / fig_height)
    fig.legend(handles=handles, loc="lower center", ncol=legend_cols, fontsize=8, frameon=False)
    fig.suptitle(f"Pareto fronts on {report.split}", fontsize=11)
    fig.tight_layout(rect=(0, bottom, 1, 1 - 0.25 / fig_height))
    # Labels go in last, once the axes have their final place: overlap is judged in pixels.
    renderer = fig.canvas.get_renderer()
    for ax, points in placements:
        _place_labels(
            ax,
            renderer,
            [(report.rows[i].label, str(plan.numbers[i]), x, y) for i, x, y in points],
        )
    return fig, plan


def _place_labels(ax: Any, renderer: Any, points: list[tuple[str, str, float, float]]) -> None:
    """One text per point (label, number, x, y), each at the first spot of SPOTS that overlaps
    no text already there and stays inside the panel; where none does (a crowded front), the
    point shows its number instead, so no two labels ever overlap."""
    taken = [t.get_window_extent(renderer) for t in ax.texts]
    inside = ax.get_window_extent(renderer)

    def overlap(box: Any) -> float:
        area = sum(
            max(0.0, min(box.x1, o.x1) - max(box.x0, o.x0))
            * max(0.0, min(box.y1, o.y1) - max(box.y0, o.y0))
            for o in taken
        )
        outside = box.width * box.height - max(
            0.0, min(box.x1, inside.x1) - max(box.x0, inside.x0)
        ) * max(0.0, min(box.y1, inside.y1) - max(box.y0, inside.y0))
        return area + 0.5 * outside

    for text, number, x, y in points:
        note = ax.annotate(
            text, (x, y), xytext=SPOTS[0][:2], textcoords="offset points", fontsize=7, gid="label"
        )
        for dx, dy, ha in SPOTS:
            note.xyann = (dx, dy)
            note.set_horizontalalignment(ha)
            if overlap(note.get_window_extent(renderer)) == 0:
                break
        else:
            note.remove()
            note = ax.annotate(
                number,
                (x, y),
                xytext=(2, 2),
                textcoords="offset points",
                fontsize=6,
                color="dimgrey",
                gid="number",
            )
        taken.append(note.get_window_extent(renderer))
