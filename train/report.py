"""`python -m train.report DIR_OR_URL ...`: compare the runs of a sweep.

Finds every run below the given folders (local paths or fsspec URLs; a run is a folder holding
the `metrics.json` and `config.yaml` the job writes), and writes next to them:

* `report.md`  — scheme x per-behaviour metrics of one split (default `test`), the best value of
  each column in bold, the Pareto-optimal schemes marked, the change of each chosen metric
  against a baseline scheme, and the oracle row on simulated data;
* `report.csv` — the same table for machines: `pareto` (1/0) and `best_in` (the columns where
  the row is best) as columns;
* `pareto.png` — one panel per pair of chosen metrics: every scheme labelled, the front of that
  pair joined, Pareto-optimal schemes (over all chosen metrics) filled, the oracle as a star.

Pipeline (each step a function, so other row sources can join without touching the rest):

    find_runs(roots) -> [Run]                      read metrics.json + config.yaml
    ROW_SOURCES: (runs, split) -> [Row]            one Row per point of the comparison
    build_report(runs, ...) -> Report              chosen metrics, Pareto marks, best, baseline
    to_markdown / to_csv / plot_pareto -> text/bytes; write_report(report, out)

ROW_SOURCES: `scheme_rows` (one row per sample-weighting run) and `train.fusion.fusion_rows`
(for each `model=multihead` run, one row per α of a grid swept over its saved test predictions,
kind `fusion`; `--fusion-grid 0,0.5,1` sets the α values of the non-label heads).

Adding rows of another kind (e.g. the no-retrain fusion baseline of `model=multihead`): write a
function `(runs, split) -> list[Row]` that picks the runs it understands (for fusion: those whose
folder holds `predictions.parquet` with per-head probabilities and the behaviours; read it with
the run's `url` through fsspec), returns one Row per point with its own `kind` (e.g.
`"fusion"`), a readable `label` (e.g. `fusion a_finish=0.5`) and `values` keyed
`"<behaviour>/<metric>"` like the scheme rows, and append it to ROW_SOURCES (or pass
`sources=` to build_report). Pareto marks and best-in-column are computed over all non-oracle
rows together, so schemes and fusion points compete on one front; the plot draws one front per
kind, in its own colour. `scheme_rows` labels a run by its `weights` config; a source that
claims runs (e.g. multihead ones) should have `scheme_rows` skip them via `is_scheme_run`.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import sys
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from itertools import combinations
from pathlib import Path
from typing import Any

import fsspec
import yaml
from fsspec.core import url_to_fs

from train import fusion, outputs
from train.pareto import Direction, default_direction, front_path, pareto_mask

METRICS_FILE = "metrics.json"
CONFIG_FILE = "config.yaml"
METRIC_ORDER = outputs.METRIC_ORDER
CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
# Keys of a weights config that are not named coefficients (see train.weights.build_scheme).
STANDARD_KEYS = frozenset(
    {"_target_", "name", "label", "terms", "combine", "negative_weight", "normalize"}
)
# Standard keys worth naming in a label when a run changed them from the scheme's YAML.
LABELLED_STANDARD_KEYS = ("label", "combine", "negative_weight", "normalize")
BASELINE = "click_only"


class ReportError(ValueError):
    """Input the report cannot use; raised before anything is written."""


@dataclass(frozen=True)
class Run:
    """One finished training run: its folder and what the job wrote there."""

    url: str
    """The run folder: a local path or an fsspec URL (read other files of the run from it)."""
    metrics: Mapping[str, float]
    """metrics.json: flat `"<split>/<behaviour>/<metric>"` keys; null read as NaN."""
    config: Mapping[str, Any]
    """config.yaml: the resolved (redacted) job config."""

    @property
    def weights(self) -> Mapping[str, Any]:
        return self.config.get("weights") or {}

    @property
    def scheme_name(self) -> str:
        return str(self.weights.get("name", "custom"))


@dataclass(frozen=True)
class Row:
    """One point of the comparison: a scheme's run, the oracle, or (later) a fusion setting."""

    label: str
    kind: str
    """`scheme`, `oracle`, or the kind a new row source adds (e.g. `fusion`)."""
    values: Mapping[str, float]
    """`"<behaviour>/<metric>"` -> value on the report's split."""
    source: str = ""
    """The run folder the row comes from (empty for the oracle)."""


RowSource = Callable[[Sequence[Run], str], list[Row]]


@dataclass
class Report:
    rows: list[Row]
    columns: list[str]
    """Every `"<behaviour>/<metric>"` column, behaviour by behaviour."""
    chosen: list[str]
    """The columns the Pareto marks are computed over."""
    directions: list[Direction]
    pareto: list[bool | None]
    """Per row: Pareto-optimal over `chosen` (None for the oracle, never compared)."""
    best: dict[str, set[int]]
    """Column -> indices of the rows holding its best value (ties: all of them)."""
    baseline: int | None
    split: str
    roots: list[str]
    notes: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------------------------
# Finding and reading runs
# --------------------------------------------------------------------------------------------


def find_runs(
    roots: Sequence[str], storage_options: Mapping[str, Any] | None = None
) -> tuple[list[Run], list[str]]:
    """Every run below `roots` (deduplicated, sorted by folder), and notes on folders that hold
    only one of metrics.json / config.yaml (unfinished or failed runs), which are skipped."""
    runs: dict[str, Run] = {}
    notes: list[str] = []
    for root in roots:
        fs, path = url_to_fs(root, **(storage_options or {}))
        path = path.rstrip("/") or "/"
        if not fs.isdir(path):
            what = "is a file, not a folder" if fs.exists(path) else "does not exist"
            raise ReportError(f"{root}: {what}; give the folder a sweep or run wrote into")
        names: dict[str, set[str]] = defaultdict(set)
        for file in fs.find(path):
            folder, _, base = file.rpartition("/")
            if base in (METRICS_FILE, CONFIG_FILE):
                names[folder].add(base)
        remote = "://" in root

        def url(p: str, fs: Any = fs, remote: bool = remote) -> str:
            return fs.unstrip_protocol(p) if remote else p

        complete = sorted(d for d, n in names.items() if len(n) == 2)
        partial = sorted(d for d, n in names.items() if len(n) == 1)
        for folder in partial:
            missing = ({METRICS_FILE, CONFIG_FILE} - names[folder]).pop()
            notes.append(f"skipped {url(folder)}: no {missing} (unfinished or failed run?)")
        wanted = [f"{d}/{f}" for d in complete for f in (METRICS_FILE, CONFIG_FILE)]
        blobs = fs.cat(wanted) if wanted else {}
        for folder in complete:
            where = url(folder)
            if where in runs:
                continue
            metrics = _parse_metrics(blobs[f"{folder}/{METRICS_FILE}"], f"{where}/{METRICS_FILE}")
            config = _parse_config(blobs[f"{folder}/{CONFIG_FILE}"], f"{where}/{CONFIG_FILE}")
            runs[where] = Run(where, metrics, config)
    if not runs:
        raise ReportError(
            f"no run found below {', '.join(roots)}: a run is a folder holding both "
            f"{METRICS_FILE} and {CONFIG_FILE} (written by `python -m train` when it finishes)"
            + (f"; {len(notes)} folder(s) hold only one of them" if notes else "")
        )
    return [runs[k] for k in sorted(runs)], notes


def _parse_metrics(blob: bytes, where: str) -> dict[str, float]:
    try:
        raw = json.loads(blob)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ReportError(f"{where}: not valid JSON ({err})") from err
    if not isinstance(raw, dict):
        raise ReportError(f"{where}: expected an object of metric -> number")
    metrics = {}
    for key, value in raw.items():
        if value is None:  # the job writes NaN (undefined metric) as null
            value = math.nan
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ReportError(f"{where}: key {key!r} holds {value!r}, expected a number or null")
        metrics[str(key)] = float(value)
    return metrics


def _parse_config(blob: bytes, where: str) -> dict[str, Any]:
    try:
        config = yaml.safe_load(blob)
    except yaml.YAMLError as err:
        raise ReportError(f"{where}: not valid YAML ({err})") from err
    if not isinstance(config, dict):
        raise ReportError(f"{where}: expected a mapping (the resolved job config)")
    if "weights" in config and not isinstance(config["weights"], dict):
        raise ReportError(f"{where}: `weights` should be a mapping, got {config['weights']!r}")
    return config


# --------------------------------------------------------------------------------------------
# Labels: the scheme name plus what the run changed
# --------------------------------------------------------------------------------------------


def knobs(weights: Mapping[str, Any]) -> dict[str, float]:
    """The named coefficients of a weights config: top-level numbers other than the standard
    keys (what `weights.finish=10` overrides)."""
    return {
        str(k): v
        for k, v in weights.items()
        if k not in STANDARD_KEYS and isinstance(v, int | float) and not isinstance(v, bool)
    }


def scheme_defaults(name: str, conf_dir: Path = CONF_DIR) -> dict[str, Any] | None:
    """The shipped `conf/weights/<name>.yaml` as written (knobs are plain numbers there), or
    None for a scheme that is not shipped."""
    path = conf_dir / "weights" / f"{name}.yaml"
    if not path.is_file():
        return None
    loaded = yaml.safe_load(path.read_text())
    return loaded if isinstance(loaded, dict) else None


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def label_runs(runs: Sequence[Run], conf_dir: Path = CONF_DIR) -> list[str]:
    """`weights.name` plus the run's non-default knobs, e.g. `seed finish=10`.

    Defaults come from the shipped `conf/weights/<name>.yaml`; for a scheme that is not shipped,
    the knobs that vary between the runs of that name are named instead. Runs that still share a
    label get the config keys that tell them apart (e.g. `[seed=1]`), so no two rows look alike.
    """
    labels: list[str] = []
    by_name: dict[str, list[int]] = defaultdict(list)
    for i, run in enumerate(runs):
        by_name[run.scheme_name].append(i)
    for run in runs:
        w = run.weights
        defaults = scheme_defaults(run.scheme_name, conf_dir)
        if defaults is not None:
            keys = [k for k in knobs(w) if k not in defaults or defaults[k] != w[k]]
            keys += [k for k in LABELLED_STANDARD_KEYS if k in defaults and defaults[k] != w.get(k)]
            changed = " ".join(f"{k}={_fmt(w[k])}" for k in keys if k in w)
        else:
            peers = [runs[j].weights for j in by_name[run.scheme_name]]
            candidates = list(knobs(w)) + [k for k in LABELLED_STANDARD_KEYS if k in w]
            keys = [k for k in candidates if any(p.get(k) != w.get(k) for p in peers)]
            changed = " ".join(f"{k}={_fmt(w[k])}" for k in keys)
        labels.append(f"{run.scheme_name} {changed}".strip())
    return _disambiguate(labels, runs)


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out |= _flatten(v, f"{prefix}{k}.")
        return out
    if isinstance(value, list):
        out = {}
        for i, v in enumerate(value):
            out |= _flatten(v, f"{prefix}{i}.")
        return out
    return {prefix.rstrip("."): value}


def _run_config(run: Run) -> dict[str, Any]:
    """The flattened config with the run's own folder replaced, so paths that embed it (logger,
    checkpoint folder) do not count as a difference."""
    flat = _flatten(run.config)
    own = (run.config.get("paths") or {}).get("output_dir")
    if not own:
        return flat
    return {k: v.replace(own, "<run>") if isinstance(v, str) else v for k, v in flat.items()}


def _disambiguate(labels: list[str], runs: Sequence[Run]) -> list[str]:
    groups: dict[str, list[int]] = defaultdict(list)
    for i, label in enumerate(labels):
        groups[label].append(i)
    out = list(labels)
    for label, members in groups.items():
        if len(members) < 2:
            continue
        flats = [_run_config(runs[i]) for i in members]
        # Only keys every run has: a key some lack is drift between versions of the job (a new
        # trainer default), not something the user varied.
        shared = set.intersection(*(set(f) for f in flats))
        keys = sorted(k for k in shared if len({repr(f[k]) for f in flats}) > 1)
        for n, (i, flat) in enumerate(zip(members, flats, strict=True), start=1):
            shown = ", ".join(f"{k}={_fmt(flat[k])}" for k in keys[:3])
            shown += ", ..." if len(keys) > 3 else ""
            out[i] = f"{label} [{shown}]" if shown else f"{label} #{n}"
    # Identical configs under different folders (a rerun): number what is still equal.
    seen: dict[str, int] = defaultdict(int)
    counts: dict[str, int] = defaultdict(int)
    for label in out:
        counts[label] += 1
    for i, label in enumerate(out):
        if counts[label] > 1:
            seen[label] += 1
            out[i] = f"{label} #{seen[label]}"
    return out


def _sort_key(run: Run, label: str) -> tuple:
    # Grids read in order of their knob values (finish=1,3,5,10), not as strings.
    return (run.scheme_name, sorted((k, float(v)) for k, v in knobs(run.weights).items()), label)


# --------------------------------------------------------------------------------------------
# Rows
# --------------------------------------------------------------------------------------------


def is_scheme_run(run: Run) -> bool:
    """Whether `scheme_rows` reports this run: one with a weights config, except multi-head runs
    (trained unweighted), which `fusion.fusion_rows` reports."""
    return bool(run.weights) and not fusion.is_multihead(run.config)


def _split_values(metrics: Mapping[str, float], split: str, oracle: bool) -> dict[str, float]:
    values = {}
    for key, value in metrics.items():
        parts = key.split("/")
        if len(parts) != 3 or parts[0] != split:
            continue
        _, behaviour, metric = parts
        if metric.startswith("oracle_") == oracle:
            values[f"{behaviour}/{metric.removeprefix('oracle_')}"] = value
    return values


def scheme_rows(runs: Sequence[Run], split: str) -> list[Row]:
    """One row per sample-weighting run, labelled by its scheme and changed knobs."""
    mine = [r for r in runs if is_scheme_run(r)]
    labels = label_runs(mine)
    order = sorted(range(len(mine)), key=lambda i: _sort_key(mine[i], labels[i]))
    return [
        Row(labels[i], "scheme", _split_values(mine[i].metrics, split, False), mine[i].url)
        for i in order
    ]


# fusion_rows: the α sweep over the saved test predictions of `model=multihead` runs.
ROW_SOURCES: tuple[RowSource, ...] = (scheme_rows, fusion.fusion_rows)


def oracle_row(runs: Sequence[Run], split: str) -> tuple[Row | None, list[str]]:
    """The oracle (the simulator's true probabilities scored like a model), or None on data
    without one. Runs on the same data share it; if they disagree, the runs saw different test
    data and the note says so."""
    found = [v for v in (_split_values(r.metrics, split, True) for r in runs) if v]
    if not found:
        return None, []
    columns = sorted(set().union(*found))
    values, notes = {}, []
    differs = []
    for c in columns:
        seen = [v[c] for v in found if c in v and not math.isnan(v[c])]
        values[c] = sum(seen) / len(seen) if seen else math.nan
        if seen and max(seen) - min(seen) > 1e-9:
            differs.append(c)
    label = "oracle"
    if differs:
        label = "oracle (mean)"
        shown = ", ".join(differs[:4]) + (", ..." if len(differs) > 4 else "")
        if all(c.endswith("/xauc") for c in differs):
            notes.append(
                f"the oracle's XAUC differs between runs ({shown}): XAUC is estimated on random "
                "pairs drawn with the run's `seed`, so XAUC differences of that size are noise; "
                "the oracle row is the mean"
            )
        else:
            notes.append(
                f"the oracle's metrics differ between runs ({shown}): the runs were evaluated "
                "on different test data, so their rows are not directly comparable; the oracle "
                "row is the mean"
            )
    return Row(label, "oracle", values), notes


def _data_differences(runs: Sequence[Run]) -> list[str]:
    flats = [_flatten(r.config.get("data") or {}) for r in runs]
    if len(flats) < 2:
        return []
    shared = set.intersection(*(set(f) for f in flats))  # as in _disambiguate
    keys = sorted(k for k in shared if len({repr(f[k]) for f in flats}) > 1)
    if not keys:
        return []
    return [
        "the runs differ in their data config ("
        + ", ".join(f"data.{k}" for k in keys[:5])
        + (", ..." if len(keys) > 5 else "")
        + "): compare rows with care"
    ]


# --------------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------------


def behaviour_order(runs: Sequence[Run], rows: Sequence[Row]) -> list[str]:
    """The data's behaviour order (config `data.behaviours`), then any other seen, sorted."""
    order: list[str] = []
    for run in runs:
        declared = (run.config.get("data") or {}).get("behaviours") or {}
        for b in declared:
            if b not in order:
                order.append(str(b))
    seen = sorted({c.split("/")[0] for row in rows for c in row.values} - set(order))
    present = {c.split("/")[0] for row in rows for c in row.values}
    return [b for b in order if b in present] + seen


def columns_of(rows: Sequence[Row], behaviours: Sequence[str]) -> list[str]:
    present = {c for row in rows for c in row.values}
    extra = sorted({c.split("/", 1)[1] for c in present} - set(METRIC_ORDER))
    return [
        f"{b}/{m}" for b in behaviours for m in (*METRIC_ORDER, *extra) if f"{b}/{m}" in present
    ]


def default_metrics(rows: Sequence[Row], behaviours: Sequence[str]) -> list[str]:
    """AUC of every binary behaviour and XAUC of every continuous one (a continuous behaviour is
    one with an `xauc` metric)."""
    present = {c for row in rows if row.kind != "oracle" for c in row.values}
    chosen = []
    for b in behaviours:
        if f"{b}/xauc" in present:
            chosen.append(f"{b}/xauc")
        elif f"{b}/auc" in present:
            chosen.append(f"{b}/auc")
    return chosen


def parse_metrics(
    specs: Sequence[str], rows: Sequence[Row], behaviours: Sequence[str]
) -> tuple[list[str], list[Direction]]:
    """`click/auc`, `click/logloss:min`, or a bare metric (`auc`: that metric of every behaviour
    that has it) -> columns and directions."""
    present = {c for row in rows if row.kind != "oracle" for c in row.values}
    columns: list[str] = []
    directions: list[Direction] = []
    for spec in specs:
        name, _, direction = spec.partition(":")
        if direction and direction not in ("max", "min"):
            raise ReportError(f"--metrics {spec!r}: direction must be 'max' or 'min'")
        if "/" in name:
            names = [name.removeprefix("test/").removeprefix("val/")]
        else:
            names = [f"{b}/{name}" for b in behaviours if f"{b}/{name}" in present]
        missing = [n for n in names if n not in present]
        if not names or missing:
            raise ReportError(
                f"--metrics {spec!r}: no run has {missing[0] if missing else name!r}; "
                f"available: {', '.join(sorted(present))}"
            )
        for n in names:
            try:
                d: Direction = direction or default_direction(n)  # type: ignore[assignment]
            except ValueError as err:
                raise ReportError(f"--metrics {spec!r}: {err}") from err
            if n not in columns:
                columns.append(n)
                directions.append(d)
    return columns, directions


def _goodness(column: str, value: float) -> float:
    """Larger is better: AUCs as they are, logloss negated, calibration by its distance to 1."""
    metric = column.rsplit("/", 1)[-1]
    if metric == "calibration":
        return -abs(math.log(value)) if value > 0 else -math.inf
    try:
        return value if default_direction(metric) == "max" else -value
    except ValueError:
        return value


def build_report(
    runs: Sequence[Run],
    metrics: Sequence[str] | None = None,
    split: str = "test",
    baseline: str | None = None,
    roots: Sequence[str] = (),
    sources: Sequence[RowSource] = ROW_SOURCES,
    notes: Sequence[str] = (),
) -> Report:
    """Rows from every source (plus the oracle), Pareto marks over the chosen metrics (default:
    `default_metrics`), the best row of every column, and the baseline row."""
    rows = [row for source in sources for row in source(runs, split)]
    rows = [r for r in rows if r.values]
    if not rows:
        splits = sorted({k.split("/")[0] for r in runs for k in r.metrics})
        raise ReportError(f"no run has metrics of split {split!r}; the runs have {splits}")
    oracle, oracle_notes = oracle_row(runs, split)
    if oracle is not None:
        rows.append(oracle)
    behaviours = behaviour_order(runs, rows)
    columns = columns_of(rows, behaviours)
    if metrics:
        chosen, directions = parse_metrics(metrics, rows, behaviours)
    else:
        chosen = default_metrics(rows, behaviours)
        directions = [default_direction(c) for c in chosen]
    if not chosen:
        raise ReportError("no metric to compare on: the runs have no auc/xauc; pass --metrics")

    compared = [i for i, r in enumerate(rows) if r.kind != "oracle"]
    points = [[rows[i].values.get(c, math.nan) for c in chosen] for i in compared]
    mask = pareto_mask(points, directions)
    pareto: list[bool | None] = [None] * len(rows)
    for i, m in zip(compared, mask, strict=True):
        pareto[i] = m

    best: dict[str, set[int]] = {}
    for c in columns:
        scored = [
            (_goodness(c, rows[i].values[c]), i)
            for i in compared
            if not math.isnan(rows[i].values.get(c, math.nan))
        ]
        if scored:
            top = max(s for s, _ in scored)
            best[c] = {i for s, i in scored if s >= top - 1e-12}

    base_index = None
    wanted = baseline or BASELINE
    matches = [i for i in compared if rows[i].label == wanted]
    if baseline and not matches:
        labels = ", ".join(rows[i].label for i in compared)
        raise ReportError(f"--baseline {baseline!r} is not a row label; the rows are: {labels}")
    if len(matches) == 1:
        base_index = matches[0]

    all_notes = list(notes) + oracle_notes + _data_differences(runs)
    unusable = [
        rows[i].label for i, p in zip(compared, points, strict=True) if any(map(math.isnan, p))
    ]
    if unusable:
        all_notes.append("not ranked (a chosen metric is missing or NaN): " + ", ".join(unusable))
    return Report(
        rows, columns, chosen, directions, pareto, best, base_index, split, list(roots), all_notes
    )


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------

ARROW = {"max": "↑", "min": "↓"}


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
        "and better on one. **Bold**: best in the column (calibration: closest to 1)"
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

    if report.notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in report.notes]
    lines += ["", "## Runs", ""]
    lines += _md_table(
        ["scheme", "folder"],
        [[r.label, f"`{r.source}`"] for r in report.rows if r.source],
    )
    if image:
        lines += ["", f"![Pareto fronts]({image})"]
    return "\n".join(lines) + "\n"


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


def write_bytes(url: str, data: bytes) -> None:
    """Like outputs.write_text, for bytes: a temporary name and a rename on local disks."""
    fs, path = url_to_fs(url)
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    if "file" in fs.protocol or "local" in fs.protocol:
        with fs.open(f"{path}.tmp", "wb") as handle:
            handle.write(data)
        fs.mv(f"{path}.tmp", path)
    else:
        with fsspec.open(url, "wb") as handle:
            handle.write(data)


def write_report(report: Report, out: str) -> list[str]:
    """Render everything first, then write report.md, report.csv and pareto.png into `out`."""
    out = out.rstrip("/")
    md, table, png = to_markdown(report), to_csv(report), plot_pareto(report)
    written = [f"{out}/report.md", f"{out}/report.csv", f"{out}/pareto.png"]
    outputs.write_text(written[0], md)
    outputs.write_text(written[1], table)
    write_bytes(written[2], png)
    return written


def main(argv: Sequence[str] | None = None) -> list[str]:
    parser = argparse.ArgumentParser(
        prog="python -m train.report",
        description="Compare the runs below the given folders (paths or fsspec URLs): "
        "report.md, report.csv and pareto.png.",
    )
    parser.add_argument("roots", nargs="+", metavar="DIR_OR_URL")
    parser.add_argument(
        "--metrics",
        nargs="+",
        metavar="METRIC",
        help="Pareto metrics: BEHAVIOUR/METRIC[:max|:min] or a bare metric for every behaviour "
        "(default: auc of every binary behaviour, xauc of every continuous one)",
    )
    parser.add_argument("--split", default="test", help="which split's metrics (default: test)")
    parser.add_argument(
        "--baseline", help=f"row label the changes are measured against (default: {BASELINE})"
    )
    parser.add_argument("--out", help="output folder (default: the first DIR_OR_URL)")
    parser.add_argument(
        "--fusion-grid",
        default=",".join(f"{a:g}" for a in fusion.GRID),
        help="α values of each non-label head swept over a multihead run's test predictions "
        "(the label head keeps α=1; default: %(default)s)",
    )
    args = parser.parse_args(argv)
    try:
        grid = fusion.parse_grid(args.fusion_grid)
        sources = (scheme_rows, partial(fusion.fusion_rows, grid=grid))
        runs, notes = find_runs(args.roots)
        report = build_report(
            runs, args.metrics, args.split, args.baseline, args.roots, sources, notes
        )
        written = write_report(report, args.out or args.roots[0])
    except (ReportError, FileNotFoundError, fusion.FusionError) as err:
        sys.exit(f"error: {err}")
    print(to_markdown(report, image=None))
    print("wrote " + ", ".join(written))
    return written


if __name__ == "__main__":
    main()
