"""`python -m train.report`: run discovery, labels, best/Pareto marks, the files it writes —
on hand-made run folders (fast), on a real three-scheme sweep (e2e), and from S3 (moto)."""

from __future__ import annotations

import csv
import io
import json
import math
import struct
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.conftest import S3Server
from tests.helpers import TINY, run_job
from tests.test_fusion import outputs as fusion_outputs
from train import report
from train.layout import PREDICTIONS_FILE
from train.pareto import pareto_mask
from train.report import Run, build_report, find_runs, fronts, fusion, label_runs, main
from train.storage import write_parquet

ROOT = Path(__file__).resolve().parents[1]
BEHAVIOURS = {"click": "click", "finish": "finish", "watch_time": "watch_s", "like": "like"}
SEED_TERMS = [
    {"behaviour": "click", "coef": 1, "transform": "indicator"},
    {"behaviour": "finish", "coef": 3, "transform": "indicator"},
]


# --------------------------------------------------------------------------------------------
# helpers: run folders as the job writes them
# --------------------------------------------------------------------------------------------


def weights(name: str, normalize: str = "none", **knobs) -> dict:
    return {
        "_target_": "train.weights.build_scheme",
        "name": name,
        "label": "click",
        **knobs,
        "terms": SEED_TERMS if knobs else [],
        "negative_weight": 1.0,
        "combine": "sum",
        "normalize": normalize,
    }


def metrics(click, finish, watch, like, oracle=True, split="test") -> dict:
    """The keys the job writes: binary behaviours have auc/gauc, the label logloss and
    calibration too, the continuous one (watch_time) auc and xauc."""
    out = {
        f"{split}/click/auc": click,
        f"{split}/click/gauc": click - 0.02,
        f"{split}/click/logloss": 1 - click,
        f"{split}/click/calibration": 1.0 + (0.8 - click),
        f"{split}/finish/auc": finish,
        f"{split}/finish/gauc": finish - 0.02,
        f"{split}/watch_time/auc": click,
        f"{split}/watch_time/xauc": watch,
        f"{split}/like/auc": like,
        f"{split}/like/gauc": like - 0.02,
        "val/click/auc": click,
    }
    if oracle:
        for key in list(out):
            split_, behaviour, metric = key.split("/")
            if split_ == split:
                out[f"{split}/{behaviour}/oracle_{metric}"] = 0.9 if metric != "logloss" else 0.3
    return out


def make_run(folder: Path, weights_config: dict, values: dict, seed: int = 0) -> Path:
    folder.mkdir(parents=True)
    config = {
        "data": {"behaviours": BEHAVIOURS, "simulator": {"seed": seed}},
        "weights": weights_config,
        "seed": seed,
        "paths": {"output_dir": str(folder)},
        "trainer": {"default_root_dir": str(folder), "max_epochs": 1},
    }
    (folder / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    (folder / "stats.json").write_text("{}")
    (folder / "metrics.json").write_text(json.dumps(values))
    return folder


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    """Three schemes on one test set: click_only is dominated by seed; seed and watch_time
    trade clicks against watch time (both Pareto-optimal)."""
    root = tmp_path / "sweep"
    make_run(root / "0_click_only", weights("click_only"), metrics(0.70, 0.60, 0.60, 0.55))
    make_run(root / "1_seed", weights("seed", click=1, finish=3), metrics(0.72, 0.65, 0.62, 0.57))
    make_run(
        root / "2_watch_time",
        weights("watch_time", normalize="mean", seconds=1),
        metrics(0.68, 0.63, 0.70, 0.56),
    )
    return root


def read_csv(text: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(text)))


def png_size(data: bytes) -> tuple[int, int]:
    """Width and height from a PNG's header, after checking it is one, and that it decodes to
    an image that is not blank."""
    import matplotlib.image

    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG signature"
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    pixels = matplotlib.image.imread(io.BytesIO(data), format="png")
    assert pixels.shape[:2] == (height, width)
    assert pixels.std() > 0.01, "the image is blank"
    return width, height


# --------------------------------------------------------------------------------------------
# fast: hand-made runs
# --------------------------------------------------------------------------------------------


def test_finds_runs_and_skips_unfinished_folders(sweep: Path):
    (sweep / "3_crashed").mkdir()
    (sweep / "3_crashed" / "config.yaml").write_text("weights: {name: seed}\n")
    (sweep / "multirun.yaml").write_text("hydra: {}\n")
    runs, notes = find_runs([str(sweep)])
    assert [Path(r.url).name for r in runs] == ["0_click_only", "1_seed", "2_watch_time"]
    assert len(notes) == 1 and "3_crashed" in notes[0] and "no metrics.json" in notes[0]
    # a run folder given directly, and overlapping roots, count each run once
    runs, _ = find_runs([str(sweep / "1_seed"), str(sweep)])
    assert len(runs) == 3


def test_labels_name_the_non_default_knobs(tmp_path: Path):
    def run(name: str, w: dict, seed: int = 0) -> Run:
        folder = str(tmp_path / name)
        config = {"weights": w, "seed": seed, "paths": {"output_dir": folder}}
        return Run(folder, {}, config)

    shipped = yaml.safe_load((ROOT / "train/conf/weights/seed.yaml").read_text())
    default_finish = shipped["finish"]
    runs = [
        run("a", weights("seed", click=1, finish=default_finish, long_watch=5, long_watch_s=30)),
        run("b", weights("seed", click=1, finish=10, long_watch=5, long_watch_s=30)),
        run("c", weights("seed", click=1, finish=2.5, long_watch=5, long_watch_s=30)),
        run("d", {**weights("click_only"), "negative_weight": 0.5}),
        # a scheme that is not shipped: the knobs that vary between its runs are named
        run("e", weights("mine", a=1, b=7)),
        run("f", weights("mine", a=2, b=7)),
    ]
    assert label_runs(runs) == [
        "seed",
        "seed finish=10",
        "seed finish=2.5",
        "click_only negative_weight=0.5",
        "mine a=1",
        "mine a=2",
    ]


def test_equal_labels_are_told_apart_by_config_or_number(tmp_path: Path):
    def run(name: str, seed: int) -> Run:
        folder = str(tmp_path / name)
        config = {
            "weights": weights("click_only"),
            "seed": seed,
            "paths": {"output_dir": folder},
            "trainer": {"default_root_dir": folder},  # differs only by the run's own folder
        }
        return Run(folder, {}, config)

    assert label_runs([run("a", 0), run("b", 1)]) == ["click_only [seed=0]", "click_only [seed=1]"]
    assert label_runs([run("a", 0), run("b", 0)]) == ["click_only #1", "click_only #2"]


def test_report_files_mark_best_and_pareto(sweep: Path):
    written = main([str(sweep)])
    assert written == [str(sweep / f) for f in ("report.md", "report.csv", "pareto.png")]

    rows = read_csv((sweep / "report.csv").read_text())
    by_label = {r["scheme"]: r for r in rows}
    assert list(by_label) == ["click_only", "seed", "watch_time", "oracle"]
    assert [by_label[s]["pareto"] for s in by_label] == ["0", "1", "1", ""]
    assert by_label["oracle"]["kind"] == "oracle"
    assert float(by_label["seed"]["click/auc"]) == 0.72
    assert float(by_label["oracle"]["click/auc"]) == 0.9  # from test/click/oracle_auc
    # best per column, oracle excluded; logloss is best when lowest, calibration nearest 1
    assert "click/auc" in by_label["seed"]["best_in"].split(";")
    assert "click/logloss" in by_label["seed"]["best_in"].split(";")
    assert "click/calibration" in by_label["seed"]["best_in"].split(";")
    assert by_label["watch_time"]["best_in"].split(";") == ["watch_time/xauc"]
    assert by_label["click_only"]["best_in"] == "" and by_label["oracle"]["best_in"] == ""
    assert by_label["seed"]["run"] == str(sweep / "1_seed")
    assert "val/click/auc" not in rows[0] and "click/oracle_auc" not in rows[0]

    md = (sweep / "report.md").read_text()
    assert "| seed | ✓ | **0.7200** |" in md
    assert "| click_only |  | 0.7000 |" in md
    assert "**0.7000**" in md  # watch_time/xauc of watch_time
    assert "`click/auc` ↑, `finish/auc` ↑, `watch_time/xauc` ↑, `like/auc` ↑" in md
    # changes against click_only, in the chosen metrics
    assert "| seed | +0.0200 | +0.0500 | +0.0200 | +0.0200 |" in md
    assert "![Pareto fronts](pareto.png)" in md
    width, height = png_size((sweep / "pareto.png").read_bytes())
    assert 800 <= width <= 4000 and 500 <= height <= 4000  # 4 metrics: 6 panels, 3 a row


def test_default_metrics_tell_binary_from_continuous(sweep: Path):
    runs, _ = find_runs([str(sweep)])
    rep = build_report(runs)
    # watch_time has xauc (continuous); its auc exists too but is not chosen
    assert rep.chosen == ["click/auc", "finish/auc", "watch_time/xauc", "like/auc"]
    assert rep.directions == ["max"] * 4
    assert rep.columns[:4] == ["click/auc", "click/gauc", "click/logloss", "click/calibration"]


def test_chosen_metrics_with_a_minimised_one(sweep: Path):
    runs, _ = find_runs([str(sweep)])
    # an extra run: worst AUC but lowest logloss -> optimal only when logloss is minimised
    extra = dict(runs[0].metrics)
    extra["test/click/auc"], extra["test/click/logloss"] = 0.60, 0.10
    runs.append(Run("x", extra, {"weights": weights("seed", click=1, finish=9)}))
    labels = ["click_only", "seed", "seed finish=9", "watch_time"]

    rep = build_report(runs, ["click/auc", "click/logloss"])
    assert rep.directions == ["max", "min"]
    assert [r.label for r in rep.rows[:-1]] == labels
    assert rep.pareto == [False, True, True, False, None]
    rep = build_report(runs, ["click/auc", "click/logloss:max"])
    # maximised, logloss trades off against AUC here (logloss = 1 - AUC): only the run low
    # on both is dominated
    assert rep.pareto == [True, True, False, True, None]
    # a bare metric means that metric of every behaviour that has it
    rep = build_report(runs, ["gauc"])
    assert rep.chosen == ["click/gauc", "finish/gauc", "like/gauc"]
    png_size(report.plot_pareto(build_report(runs, ["click/auc"])))  # one metric: one strip


def test_many_metrics_plot(sweep: Path):
    runs, _ = find_runs([str(sweep)])
    rep = build_report(runs, ["auc", "watch_time/xauc"])
    assert len(rep.chosen) == 5  # 10 panels, 3 a row
    width, height = png_size(report.plot_pareto(rep))
    assert height > width / 2


def test_nan_metric_is_not_ranked_nor_best(sweep: Path):
    values = metrics(0.99, 0.99, 0.99, 0.99)
    values["test/like/auc"] = None  # how the job writes NaN (e.g. one class only)
    make_run(sweep / "3_nan", weights("seed", click=1, finish=20), values)
    main([str(sweep)])
    rows = {r["scheme"]: r for r in read_csv((sweep / "report.csv").read_text())}
    assert rows["seed finish=20"]["pareto"] == "0"
    assert rows["seed finish=20"]["like/auc"] == ""
    assert "like/auc" not in rows["seed finish=20"]["best_in"]
    assert "click/auc" in rows["seed finish=20"]["best_in"]
    md = (sweep / "report.md").read_text()
    assert "not ranked (a chosen metric is missing or NaN): seed finish=20" in md


def test_notes_on_different_test_data(sweep: Path):
    other = metrics(0.71, 0.6, 0.6, 0.6)
    other["test/click/oracle_auc"] = 0.8
    make_run(sweep / "3_other", weights("seed", click=1, finish=7), other, seed=1)
    main([str(sweep)])
    md = (sweep / "report.md").read_text()
    assert "| *oracle (mean)* |" in md
    assert "evaluated on different test data" in md
    assert "data.simulator.seed" in md


def test_note_when_only_the_oracle_xauc_differs(sweep: Path):
    # same test data, another `seed`: only the sampled XAUC pairs differ
    other = metrics(0.71, 0.6, 0.6, 0.6)
    other["test/watch_time/oracle_xauc"] = 0.8995
    make_run(sweep / "3_other", weights("seed", click=1, finish=7), other)
    runs, _ = find_runs([str(sweep)])
    notes = build_report(runs).notes
    assert len(notes) == 1 and "XAUC is estimated on random pairs" in notes[0]


def test_out_and_baseline_options(sweep: Path, tmp_path: Path):
    out = tmp_path / "elsewhere" / "report"
    main([str(sweep), "--out", str(out), "--baseline", "seed", "--split", "test"])
    assert sorted(p.name for p in out.iterdir()) == ["pareto.png", "report.csv", "report.md"]
    assert not (sweep / "report.md").exists()
    md = (out / "report.md").read_text()
    assert "## Change against `seed`" in md
    assert "| click_only | -0.0200 | -0.0500 | -0.0200 | -0.0200 |" in md
    # a second report over a folder holding a report reads the same runs
    main([str(sweep), "--out", str(sweep)])
    main([str(sweep)])
    assert len(read_csv((sweep / "report.csv").read_text())) == 4


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--metrics", "click/ndcg"], "no run has 'click/ndcg'; available: click/auc"),
        (["--metrics", "click/calibration"], "has no default direction"),
        (["--metrics", "click/auc:up"], "direction must be 'max' or 'min'"),
        (["--baseline", "nope"], "'nope' is not a row label; the rows are: click_only, seed"),
        (
            ["--split", "train"],
            "no run has metrics of split 'train'; the runs have ['test', 'val']",
        ),
    ],
)
def test_bad_options_fail_clearly_and_write_nothing(sweep: Path, args, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([str(sweep), *args])
    assert message in str(exit_.value)
    assert not (sweep / "report.md").exists() and not (sweep / "pareto.png").exists()


def test_bad_folders_fail_clearly(tmp_path: Path, sweep: Path):
    with pytest.raises(SystemExit, match="does not exist"):
        main([str(tmp_path / "missing")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match=r"no run found below .*empty: a run is a folder"):
        main([str(tmp_path / "empty")])
    (sweep / "1_seed" / "metrics.json").write_text("{not json")
    with pytest.raises(SystemExit, match=r"1_seed/metrics.json: not valid JSON"):
        main([str(sweep)])
    (sweep / "1_seed" / "metrics.json").write_text('{"test/click/auc": "high"}')
    with pytest.raises(SystemExit, match=r"1_seed/metrics.json: key 'test/click/auc' holds 'high'"):
        main([str(sweep)])


# --------------------------------------------------------------------------------------------
# several multi-task runs: fusion fronts per run, the plot's labels and key, the verdict
# --------------------------------------------------------------------------------------------


def make_multitask_run(folder: Path, model: dict, seed: int) -> Path:
    """A run folder as a multi-task job leaves it: its own metrics and a predictions.parquet
    written by the real `HeadOutputs.table` (hand-made scores; see tests.test_fusion)."""
    make_run(folder, weights("click_only"), metrics(0.7, 0.6, 0.6, 0.6))
    config = yaml.safe_load((folder / "config.yaml").read_text())
    (folder / "config.yaml").write_text(yaml.safe_dump({**config, "model": model}))
    out, gathered = fusion_outputs(seed=seed)
    write_parquet(str(folder / PREDICTIONS_FILE), out.table(gathered, {"click": 1.0}))
    return folder


@pytest.fixture(scope="module")
def multitask(tmp_path_factory) -> tuple[Path, report.Report]:
    """The three-scheme sweep plus two multi-task runs: a multihead one and one of another model
    class whose config names no heads (only its predictions.parquet says it is multi-task)."""
    root = tmp_path_factory.mktemp("multitask") / "sweep"
    # Against the runs' click/finish fronts (click AUC 0.70-0.84): click_only lies past them
    # (not comparable), seed above them, watch_time below.
    make_run(root / "0_click_only", weights("click_only"), metrics(0.85, 0.70, 0.60, 0.55))
    make_run(root / "1_seed", weights("seed", click=1, finish=3), metrics(0.80, 0.80, 0.62, 0.57))
    make_run(
        root / "2_watch_time",
        weights("watch_time", normalize="mean", seconds=1),
        metrics(0.75, 0.70, 0.70, 0.56),
    )
    heads = list(BEHAVIOURS)
    make_multitask_run(root / "3_mh", {"_target_": "train.model.MultiHead", "heads": heads}, 0)
    make_multitask_run(root / "4_experts", {"_target_": "train.model.MMoE"}, 1)
    runs, _ = find_runs([str(root)])
    return root, build_report(runs)


def test_every_run_with_predictions_gets_its_own_fusion_series(multitask):
    root, rep = multitask
    runs, _ = find_runs([str(root)])
    assert [r.has_predictions for r in runs] == [False, False, False, True, True]
    # keyed on the file: the MMoE config names no heads, yet it is swept and not a scheme
    assert not runs[4].is_multihead and runs[4].is_multitask
    kinds = [r.kind for r in rep.rows]
    assert kinds.count("scheme") == 3 and kinds.count("fusion") == 2 * 30
    by_source = {}
    for row in rep.rows:
        by_source.setdefault(row.source, []).append(row)
    mh, experts = by_source[str(root / "3_mh")], by_source[str(root / "4_experts")]
    # several multi-task runs: every label and series starts with the run's model class
    assert {r.series for r in mh} == {"multihead fusion"}
    assert {r.series for r in experts} == {"mmoe fusion"}
    assert mh[0].label == "multihead fusion click=1"
    assert "mmoe fusion click=1 finish=0.5" in [r.label for r in experts]
    assert len({r.label for r in rep.rows}) == len(rep.rows)
    assert [s.name for s in fronts.series_of(rep)] == ["schemes", "multihead fusion", "mmoe fusion"]
    # two runs of one class are told apart by their folders
    names = fusion.run_names([runs[3], runs[4], Run(str(root / "5_mh"), {}, runs[3].config)])
    assert list(names.values()) == ["3_mh", "mmoe", "5_mh"]


def test_plot_labels_only_the_front_of_each_pair_and_numbers_the_rest(multitask):
    """Every point carries one text: its label if it is on the pair's front and the label fits
    clear of the others, else its number from the key in report.md."""
    _, rep = multitask
    fig, plan = report.draw_pareto(rep)
    try:
        panels = [ax for ax in fig.axes if ax.get_visible() and ax.get_xlabel()]
        assert len(panels) == len(plan.panels) == 6
        numbered_anywhere = set()
        for ax, panel in zip(panels, plan.panels, strict=True):
            ca, cb = rep.chosen[panel.x], rep.chosen[panel.y]
            rows = [i for i, r in enumerate(rep.rows) if r.kind != "oracle"]
            points = [(rep.rows[i].values[ca], rep.rows[i].values[cb]) for i in rows]
            on = [i for i, m in zip(rows, pareto_mask(points, ("max", "max")), strict=True) if m]
            texts = {g: [t for t in ax.texts if t.get_gid() == g] for g in ("label", "number")}
            # the rule: text only for points on the pair's front (where it fits), a number for
            # every other point: one text per point
            labelled = {t.get_text() for t in texts["label"]}
            assert labelled <= {rep.rows[i].label for i in on} and labelled
            assert len(texts["label"]) + len(texts["number"]) == len(rows)
            shown = {rep.rows[i].label for i in rows} - labelled
            assert sorted(int(t.get_text()) for t in texts["number"]) == sorted(
                plan.numbers[i] for i in rows if rep.rows[i].label in shown
            )
            numbered_anywhere |= set(rows)
            # each series is drawn in its own colour: schemes, and one per multi-task run
            colours = {tuple(c.get_edgecolor()[0]) for c in ax.collections if len(c.get_offsets())}
            assert len(colours) >= 3
            # the labels were placed apart: no two overlap
            renderer = fig.canvas.get_renderer()
            boxes = [t.get_window_extent(renderer) for t in texts["label"]]
            for n, box in enumerate(boxes):
                assert not any(box.overlaps(other) for other in boxes[n + 1 :])
        assert set(plan.numbers) == numbered_anywhere
        assert sorted(plan.numbers.values()) == list(range(1, len(numbered_anywhere) + 1))
        legend = [t.get_text() for t in fig.legends[0].get_texts()]
        assert legend[:3] == ["schemes", "multihead fusion", "mmoe fusion"]
    finally:
        import matplotlib.pyplot as plt

        plt.close(fig)
    # the key in report.md lists every numbered point, and nothing else
    md = report.to_markdown(rep)
    key = md[md.index("## Plot key") :]
    listed = [line.split(" | ") for line in key.splitlines() if line[:3].strip("| ").isdigit()]
    assert {int(n.strip("| ")): label.strip(" |") for n, label in listed} == {
        n: rep.rows[i].label for i, n in plan.numbers.items()
    }


def test_verdict_per_pair_names_the_front_and_the_gain_at_equal_x(multitask):
    _, rep = multitask
    found = fronts.verdicts(rep)
    assert [(v.x, v.y) for v in found] == [
        ("click/auc", "finish/auc"),
        ("click/auc", "watch_time/xauc"),
        ("click/auc", "like/auc"),
    ]
    md = report.to_markdown(rep)
    section = md[md.index("## Verdict per pair") : md.index("## Runs")]
    for v in found:
        assert f"**`{v.x}` ↑ vs `{v.y}` ↑**" in section
        front = [rep.rows[i].label for i in v.front]
        assert front == [
            rep.rows[i].label for i in fronts.pair_front(rep, 0, 1 + found.index(v))[0]
        ]
        # every scheme against both runs' fusion fronts, as the pure function computes it
        assert len(v.comparisons) == 3 * 2
        assert {(c.point, c.front) for c in v.comparisons} == {
            (s, f)
            for s in ("click_only", "seed", "watch_time")
            for f in ("multihead fusion", "mmoe fusion")
        }
    first = found[0]  # click/auc vs finish/auc
    win, loss = first.fusion_best, first.scheme_best
    assert (win.point, win.front) == ("watch_time", "multihead fusion")
    assert win.gain == max(c.gain for c in first.comparisons if c.gain is not None) > 0.05
    assert f"- best fusion gain: `multihead fusion` beats `watch_time` by {win.gain:+.4f}" in md
    assert (loss.point, loss.front) == ("seed", "mmoe fusion") and loss.gain < -0.01
    assert f"- best scheme gain: `seed` beats `mmoe fusion` by {-loss.gain:+.4f}" in md
    assert {(c.point, c.front) for c in first.not_comparable} == {
        ("click_only", "multihead fusion"),
        ("click_only", "mmoe fusion"),
    }
    assert "`click_only` vs `mmoe fusion` (0.8500 outside 0.70" in section


def test_one_multitask_run_keeps_the_plain_fusion_labels(multitask):
    root, _ = multitask
    runs, _ = find_runs([str(root / "0_click_only"), str(root / "4_experts")])
    rep = build_report(runs)
    labels = [r.label for r in rep.rows if r.kind == "fusion"]
    assert labels[0] == "fusion click=1" and all(lab.startswith("fusion ") for lab in labels)
    # a run with predictions reports them on the test split; on another its metrics.json row
    rows = fusion.fusion_rows(runs, "val")
    assert [(r.label, r.series) for r in rows] == [("fusion as trained", "fusion")]


# --------------------------------------------------------------------------------------------
# slow: a real sweep, and the same runs read back from S3
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real_sweep(tmp_path_factory, zygote) -> Path:
    """`python -m train -m weights=click_only,seed,watch_time` on tiny simulated data."""
    folder = tmp_path_factory.mktemp("sweep") / "schemes"
    overrides = ["-m", "weights=click_only,seed,watch_time", *TINY, "trainer.max_epochs=1"]
    zygote.run(*overrides, f"hydra.sweep.dir={folder}", cwd=folder.parent, check=True)
    return folder


def run_report(zygote, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return zygote.run(*args, module="train.report", cwd=ROOT, env=env, timeout=300, check=True)


@pytest.mark.e2e
def test_report_of_a_real_sweep(real_sweep: Path, zygote):
    done = run_report(zygote, str(real_sweep))
    assert "| scheme | pareto | click/auc |" in done.stdout
    rows = read_csv((real_sweep / "report.csv").read_text())
    assert [r["scheme"] for r in rows] == ["click_only", "seed", "watch_time", "oracle"]
    assert {r["kind"] for r in rows} == {"scheme", "oracle"}
    schemes = rows[:3]
    assert any(r["pareto"] == "1" for r in schemes)
    for column in ("click/auc", "finish/auc", "watch_time/xauc", "like/auc"):
        values = [float(r[column]) for r in schemes]
        assert all(0 < v < 1 for v in values)
        best = [r["scheme"] for r in schemes if column in r["best_in"].split(";")]
        assert best == [schemes[values.index(max(values))]["scheme"]]
        assert 0.5 < float(rows[3][column]) < 1  # the oracle ranks better than chance
    md = (real_sweep / "report.md").read_text()
    assert md.count("**") >= 2 * 4  # at least one best value per chosen column
    width, height = png_size((real_sweep / "pareto.png").read_bytes())
    assert 800 <= width <= 4000 and 500 <= height <= 4000


@pytest.mark.e2e
def test_parallel_sweep_with_the_joblib_launcher(tmp_path):
    """`hydra/launcher=joblib`: the runs of a sweep train at the same time (on a GPU machine one
    per GPU with hardware=free_gpu; here on the CPU), each in its own folder."""
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    folder = tmp_path / "parallel"
    overrides = [
        "-m",
        "hydra/launcher=joblib",
        "hydra.launcher.n_jobs=2",
        "weights=click_only,seed",
    ]
    run_job(
        *overrides,
        *TINY,
        # Long enough (~2 s an epoch) that the runs' training overlaps whatever the skew of
        # their starts (a few seconds on a loaded machine): 2 epochs once did not.
        "trainer.max_epochs=5",
        "callbacks.early_stopping=null",
        f"hydra.sweep.dir={folder}",
        cwd=tmp_path,
        check=True,
    )
    runs = {p.name: p for p in folder.iterdir() if p.is_dir()}
    assert sorted(runs) == ["0_click_only", "1_seed"]
    # config.yaml is written when training starts, metrics.json when it ends: they overlap.
    started = {name: (run / "config.yaml").stat().st_mtime for name, run in runs.items()}
    ended = {name: (run / "metrics.json").stat().st_mtime for name, run in runs.items()}
    assert max(started.values()) < min(ended.values()), (started, ended)
    for run in runs.values():
        assert 0.5 < json.loads((run / "metrics.json").read_text())["test/click/auc"] < 1


@pytest.mark.e2e
@pytest.mark.s3
def test_report_reads_runs_from_s3(real_sweep: Path, s3_server: S3Server, zygote):
    fs = s3_server.filesystem()
    bucket = s3_server.bucket("report").removeprefix("s3://")
    for run in sorted(p for p in real_sweep.iterdir() if p.is_dir()):
        # everything the run wrote but its checkpoints (tens of MB, not read by the report)
        for file in run.rglob("*"):
            if file.is_file() and "checkpoints" not in file.parts:
                fs.put_file(str(file), f"{bucket}/sweeps/x/{run.name}/{file.relative_to(run)}")
    fs.put_file(str(ROOT / "pyproject.toml"), f"{bucket}/sweeps/x/not-a-run/notes.txt")

    run_report(zygote, f"s3://{bucket}/sweeps/x", env=s3_server.env)
    fs.invalidate_cache()
    assert {p.rsplit("/", 1)[1] for p in fs.ls(f"{bucket}/sweeps/x")} >= {
        "report.md",
        "report.csv",
        "pareto.png",
    }
    remote = read_csv(fs.cat_file(f"{bucket}/sweeps/x/report.csv").decode())
    run_report(zygote, str(real_sweep), "--out", str(real_sweep / "local"))
    local = read_csv((real_sweep / "local" / "report.csv").read_text())
    # the same table, only the run folders differ
    assert [{k: v for k, v in r.items() if k != "run"} for r in remote] == [
        {k: v for k, v in r.items() if k != "run"} for r in local
    ]
    assert remote[0]["run"].startswith(f"s3://{bucket}/sweeps/x/0_")
    width, height = png_size(fs.cat_file(f"{bucket}/sweeps/x/pareto.png"))
    assert width > 500 and height > 300
    assert f"s3://{bucket}/sweeps/x" in fs.cat_file(f"{bucket}/sweeps/x/report.md").decode()
    assert not math.isnan(float(remote[0]["click/auc"]))
