"""`pareto.png`: one panel per pair of chosen metrics, every row labelled, the front of that pair
joined for each kind of row (schemes, fusion points) in its own colour, the rows Pareto-optimal
over all chosen metrics filled, the oracle as a star.

matplotlib is imported only when a plot is drawn (it is the optional `upweight[report]` extra),
so reading runs and building a report work without it.
"""

from __future__ import annotations

import io
import math
from itertools import combinations

from train.pareto import front_path
from train.report.runs import ReportError
from train.report.table import ARROW, Report


def plot_pareto(report: Report) -> bytes:
    """The PNG: one panel per pair of chosen metrics (a single chosen metric: one strip)."""
    try:
        import matplotlib
    except ImportError as err:
        raise ReportError("pareto.png needs matplotlib: pip install 'upweight[report]'") from err
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    chosen, directions = report.chosen, report.directions
    pairs: list[tuple[int, int]] = list(combinations(range(len(chosen)), 2))
    panels = max(1, len(pairs))
    ncols = min(3, panels)
    nrows = math.ceil(panels / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.4 * ncols, 4.6 * nrows), squeeze=False)
    kinds = list(dict.fromkeys(r.kind for r in report.rows if r.kind != "oracle"))
    colours = {k: f"C{n}" for n, k in enumerate(kinds)}

    def value(i: int, c: str) -> float:
        return report.rows[i].values.get(c, math.nan)

    for ax in axes.flat[panels:]:
        ax.set_visible(False)
    if not pairs:  # one metric: each row on a line, best at the top
        ax, c = axes.flat[0], chosen[0]
        shown = [i for i, r in enumerate(report.rows) if not math.isnan(value(i, c))]
        shown.sort(key=lambda i: value(i, c) * (1 if directions[0] == "max" else -1))
        for y, i in enumerate(shown):
            row = report.rows[i]
            style = (
                {"marker": "*", "color": "black", "s": 160}
                if row.kind == "oracle"
                else {
                    "color": colours[row.kind],
                    "facecolors": colours[row.kind] if report.pareto[i] else "none",
                }
            )
            ax.scatter([value(i, c)], [y], **style)
        ax.set_yticks(range(len(shown)), [report.rows[i].label for i in shown])
        ax.set_xlabel(f"{c} {ARROW[directions[0]]}")
    for ax, (a, b) in zip(axes.flat, pairs, strict=False):
        ca, cb = chosen[a], chosen[b]
        for kind in kinds:
            idx = [
                i
                for i, r in enumerate(report.rows)
                if r.kind == kind and not (math.isnan(value(i, ca)) or math.isnan(value(i, cb)))
            ]
            if not idx:
                continue
            xs, ys = [value(i, ca) for i in idx], [value(i, cb) for i in idx]
            path = front_path(xs, ys, (directions[a], directions[b]))
            ax.plot([xs[p] for p in path], [ys[p] for p in path], "-", color=colours[kind], lw=1.2)
            filled = [colours[kind] if report.pareto[i] else "none" for i in idx]
            ax.scatter(xs, ys, s=36, facecolors=filled, edgecolors=colours[kind], zorder=3)
            # A grid of many points (the fusion sweep) labels only its front, to stay readable.
            labelled = set(path) if len(idx) > 12 else set(range(len(idx)))
            for n, (i, x, y) in enumerate(zip(idx, xs, ys, strict=True)):
                if n not in labelled:
                    continue
                ax.annotate(
                    report.rows[i].label,
                    (x, y),
                    xytext=(4, 3),
                    textcoords="offset points",
                    fontsize=7,
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
                )
        ax.set_xlabel(f"{ca} {ARROW[directions[a]]}")
        ax.set_ylabel(f"{cb} {ARROW[directions[b]]}")
        ax.grid(alpha=0.3)
    label = "front of the pair" if pairs else "Pareto-optimal"
    handles = [Line2D([], [], color=colours[k], marker="o", label=f"{k}: {label}") for k in kinds]
    grey = {"color": "grey", "marker": "o", "ls": ""}
    handles.append(Line2D([], [], **grey, label="filled: Pareto-optimal over all chosen metrics"))
    handles.append(Line2D([], [], **grey, markerfacecolor="none", label="hollow: dominated"))
    if any(r.kind == "oracle" for r in report.rows):
        star = {"color": "black", "marker": "*", "ls": "", "markersize": 10}
        handles.append(Line2D([], [], **star, label="oracle (simulator truth)"))
    # A narrow figure stacks the legend; keep room for it below the panels.
    legend_cols = 4 if ncols >= 3 else 2 if ncols == 2 else 1
    legend_rows = math.ceil(len(handles) / legend_cols)
    fig_height = 4.6 * nrows
    bottom = min(0.4, (0.22 * legend_rows + 0.1) / fig_height)
    fig.legend(handles=handles, loc="lower center", ncol=legend_cols, fontsize=8, frameon=False)
    fig.suptitle(f"Pareto fronts on {report.split}", fontsize=11)
    fig.tight_layout(rect=(0, bottom, 1, 1 - 0.25 / fig_height))
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return buffer.getvalue()
