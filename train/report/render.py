"""A computed `Report` as text for people (`report.md`) and for machines (`report.csv`), and
`write_report`, which renders everything (the plot too) before writing a single file, so an
error never leaves a half-written report.

    report.md   the table (best of each column in bold, Pareto-optimal rows ✓), the change of
                each chosen metric against the baseline, the verdict of each metric pair
                (`fronts.verdicts`), notes, the run folders, the plot and its key (the number
                of each point that is not labelled in a panel)
    report.csv  the same table: `pareto` (1/0, empty for the oracle) and `best_in` (the
                columns where the row is best) as columns
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence

from train.layout import join
from train.report.fronts import layout, verdicts
from train.report.plot import plot_pareto
from train.report.table import ARROW, Report
from train.storage import write_bytes, write_text


def _cell(value: float | None) -> str:
    if value is None:
        return ""
    return "n/a" if math.isnan(value) else f"{value:.4f}"


def _md_table(header: Sequence[str], body: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    return lines


def to_markdown(report: Report, image: str | None = "pareto.png") -> str:
    chosen = ", ".join(
        f"`{c}` {ARROW[d]}" for c, d in zip(report.chosen, report.directions, strict=True)
    )
    n_runs = sum(1 for r in report.rows if r.kind != "oracle")
    lines = [
        "# Sweep report",
        "",
        f"{n_runs} rows from {', '.join(f'`{r}`' for r in report.roots) or 'the given runs'}; "
        f"split `{report.split}`.",
        f"Pareto-optimal (✓) over {chosen}: no other row is at least as good on all of them "
        "and better on one. **Bold**: best in the column (calibration and odds factor: closest to 1)"
        + (
            "; the oracle row (the simulator's true probabilities and expected watch time, "
            "scored like a model) is shown for reference, not ranked."
            if any(r.kind == "oracle" for r in report.rows)
            else "."
        ),
        "",
    ]
    header = ["scheme", "pareto", *report.columns]
    body = []
    for i, row in enumerate(report.rows):
        cells = [row.label if row.kind == "scheme" else f"*{row.label}*"]
        cells.append({True: "✓", False: "", None: "—"}[report.pareto[i]])
        for c in report.columns:
            text = _cell(row.values.get(c))
            cells.append(f"**{text}**" if i in report.best.get(c, ()) else text)
        body.append(cells)
    lines += _md_table(header, body)

    if report.baseline is not None:
        base = report.rows[report.baseline]
        lines += ["", f"## Change against `{base.label}`", ""]
        delta_body = []
        for row in report.rows:
            if row.kind == "oracle" or row is base:
                continue
            cells = [row.label]
            for c in report.chosen:
                a, b = row.values.get(c, math.nan), base.values.get(c, math.nan)
                cells.append("n/a" if math.isnan(a - b) else f"{a - b:+.4f}")
            delta_body.append(cells)
        header = [
            "scheme",
            *(f"Δ {c} {ARROW[d]}" for c, d in zip(report.chosen, report.directions, strict=True)),
        ]
        lines += _md_table(header, delta_body) if delta_body else ["(no other row)"]

    lines += _verdict_lines(report)
    if report.notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in report.notes]
    lines += ["", "## Runs", ""]
    lines += _md_table(
        ["scheme", "folder"],
        [[r.label, f"`{r.source}`"] for r in report.rows if r.source],
    )
    if image:
        lines += ["", f"![Pareto fronts]({image})"]
    numbers = layout(report).numbers
    if numbers:
        lines += [
            "",
            "## Plot key",
            "",
            "In each panel of the plot only the points on that pair's front carry their label "
            "(where it fits clear of the others); every other point carries its number:",
            "",
        ]
        lines += _md_table(
            ["#", "row"], [[str(n), report.rows[i].label] for i, n in numbers.items()]
        )
    return "\n".join(lines) + "\n"


def _verdict_lines(report: Report) -> list[str]:
    """Per pair (x = the first chosen metric): the front, and fusion against the schemes at
    equal x."""
    found = verdicts(report)
    if not found:
        return []
    arrow = dict(zip(report.chosen, report.directions, strict=True))
    x = found[0].x
    lines = [
        "",
        "## Verdict per pair",
        "",
        f"`{x}` (x) with each other chosen metric (y): the rows on that pair's Pareto front.",
    ]
    if any(v.comparisons for v in found):
        lines[-1] += (
            f' "At equal `{x}`": each multi-task run\'s fusion front (its Pareto front of the '
            "pair) interpolated piecewise-linearly at a scheme's x; outside the front's x-range "
            "the two are not comparable."
        )
    for v in found:
        front = ", ".join(f"`{report.rows[i].label}`" for i in v.front) or "none"
        lines += ["", f"**`{v.x}` {ARROW[arrow[v.x]]} vs `{v.y}` {ARROW[arrow[v.y]]}**", ""]
        lines.append(f"- on the front: {front}")
        if not v.comparisons:
            continue
        win, loss = v.fusion_best, v.scheme_best
        if win is not None:
            lines.append(
                f"- best fusion gain: `{win.front}` beats `{win.point}` by {win.gain:+.4f} "
                f"`{v.y}` at `{v.x}` = {win.x:.4f} ({win.front_y:.4f} vs {win.y:.4f})"
            )
        if loss is not None:
            lines.append(
                f"- best scheme gain: `{loss.point}` beats `{loss.front}` by {-loss.gain:+.4f} "
                f"`{v.y}` at `{v.x}` = {loss.x:.4f} ({loss.y:.4f} vs {loss.front_y:.4f})"
            )
        if win is None and loss is None and len(v.not_comparable) < len(v.comparisons):
            lines.append(f"- fusion and schemes tie at equal `{v.x}`")
        if v.not_comparable:
            shown = "; ".join(
                f"`{c.point}` vs `{c.front}` ({c.x:.4f} outside {c.span[0]:.4f}–{c.span[1]:.4f})"
                for c in v.not_comparable
            )
            lines.append(f"- not comparable (`{v.x}` outside the fusion front): {shown}")
    return lines


def to_csv(report: Report) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["scheme", "kind", "pareto", *report.columns, "best_in", "run"])
    for i, row in enumerate(report.rows):
        values = [
            "" if (v := row.values.get(c)) is None or math.isnan(v) else repr(v)
            for c in report.columns
        ]
        flag = {True: "1", False: "0", None: ""}[report.pareto[i]]
        best = ";".join(c for c in report.columns if i in report.best.get(c, ()))
        writer.writerow([row.label, row.kind, flag, *values, best, row.source])
    return buffer.getvalue()


def write_report(report: Report, out: str) -> list[str]:
    """Render everything first, then write report.md, report.csv and pareto.png into `out`."""
    md, table, png = to_markdown(report), to_csv(report), plot_pareto(report)
    written = [join(out, "report.md"), join(out, "report.csv"), join(out, "pareto.png")]
    write_text(written[0], md)
    write_text(written[1], table)
    write_bytes(written[2], png)
    return written
