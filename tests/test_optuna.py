"""Searching the weights with Hydra's Optuna sweeper (README, "Searching weights with Optuna"):
a real NSGA-II study of 4 trials over one knob on a tiny simulated feed, whose trials return the
validation metrics of `objectives` and leave ordinary run folders the report reads; and the
`objectives` key refused, before anything is written, wherever a search would optimise the
wrong thing (a typo, a test metric, a direction that picks the worst weights)."""

from __future__ import annotations

import csv
import json
import re

import pytest
import torch
import yaml
from omegaconf import OmegaConf

from tests.helpers import TINY, compose, train_in_process
from tests.returns import RETURNED, RecordReturns
from train import config_checks, objectives
from train.errors import ConfigError
from train.heads import HeadOutputs
from train.metrics import BehaviourMetrics

OBJECTIVES = ["val/click/auc", "val/finish/auc"]
SEARCH = [
    "-m",
    "hydra/sweeper=pareto",
    "hydra.sweeper.n_trials=4",
    f"objectives=[{','.join(OBJECTIVES)}]",
    "weights=seed",
    "weights.finish=interval(0,10)",
    *TINY,
    "trainer.max_epochs=1",
]


def report_rows(*argv: str) -> list[dict[str, str]]:
    from train.report.__main__ import main

    written = main(list(argv))
    with open(next(w for w in written if w.endswith(".csv"))) as handle:
        return [row for row in csv.DictReader(handle) if row["kind"] == "scheme"]


@pytest.mark.e2e
def test_a_search_returns_validation_objectives_and_leaves_runs_the_report_reads(tmp_path, zygote):
    pytest.importorskip("optuna", reason="needs pip install -e '.[optuna]'")
    sweep = tmp_path / "sweep"
    done = zygote.run(
        *SEARCH,
        f"hydra.sweep.dir={sweep}",
        f"+hydra.callbacks.returns._target_={RecordReturns.__module__}.RecordReturns",
        cwd=tmp_path,
        timeout=300,
        check=True,
    )
    assert "Sampler: NSGAIISampler" in done.stdout
    assert "Directions: ['maximize', 'maximize']" in done.stdout
    assert "setup plugin" not in done.stdout + done.stderr  # alembic's import chatter

    # Each trial is an ordinary run folder whose job returned its validation metrics, in the
    # objectives' order (the test metrics stay out of the choice).
    runs = {}
    for number in range(4):
        run = sweep / f"{number}_seed"
        metrics = json.loads((run / "metrics.json").read_text())
        returned = json.loads((run / RETURNED).read_text())
        assert returned == [metrics[name] for name in OBJECTIVES]
        assert returned != [metrics[name.replace("val/", "test/")] for name in OBJECTIVES]
        finish = yaml.safe_load((run / "config.yaml").read_text())["weights"]["finish"]
        assert 0 <= finish <= 10
        runs[str(run)] = (finish, returned)
    assert len({finish for finish, _ in runs.values()}) == 4  # the sampler moved the knob

    # Optuna's Pareto solutions are trials with the values their jobs returned.
    results = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    solutions = {s["params"]["weights.finish"]: s["values"] for s in results["solutions"]}
    assert solutions
    assert all(
        solutions[finish] == returned for finish, returned in runs.values() if finish in solutions
    )

    # The report lists the 4 trials (optimization_results.yaml is no run), and on the
    # validation split over the objectives its Pareto rows are Optuna's solutions.
    rows = report_rows(str(sweep))
    assert sorted(row["run"] for row in rows) == sorted(runs)
    rows = report_rows(
        str(sweep), "--split", "val", "--metrics", "click/auc", "finish/auc",
        "--out", str(tmp_path / "val"),
    )  # fmt: skip
    assert {runs[row["run"]][0] for row in rows if row["pareto"] == "1"} == set(solutions)


@pytest.mark.e2e
def test_a_search_with_a_bad_objective_stops_at_its_first_trial(tmp_path, zygote):
    pytest.importorskip("optuna", reason="needs pip install -e '.[optuna]'")
    sweep = tmp_path / "sweep"
    bad = [o for o in SEARCH if not o.startswith("objectives=")]
    done = zygote.run(
        *bad, "objectives=[val/click/auc,val/clik/auc]", f"hydra.sweep.dir={sweep}", cwd=tmp_path
    )
    assert done.returncode == 1
    assert "error: objectives[1]: 'val/clik/auc' is not a metric this run logs; expected one of " \
        "val/click/auc, val/click/gauc" in done.stderr  # fmt: skip
    assert "Traceback" not in done.stderr
    assert done.stdout.count("Launching 1 jobs") == 1
    assert not sweep.exists() or not any(sweep.iterdir())  # no run folder


@pytest.fixture(scope="module")
def job_config(tmp_path_factory) -> dict:
    """The plain config of a tiny `python -m train` (composed once: each test sets objectives)."""
    folder = tmp_path_factory.mktemp("unused")
    return OmegaConf.to_container(compose(*TINY, f"paths.output_dir={folder}"), resolve=True)


def checked(config: dict, names: object, directions: list[str] | None = None) -> None:
    """The job's config checks with `objectives=names` (under a search: `directions`)."""
    config_checks.check({**config, "objectives": names}, directions)


@pytest.mark.parametrize(
    ("names", "message"),
    [
        (
            ["val/click/auc", "val/clik/auc"],
            "objectives[1]: 'val/clik/auc' is not a metric this run logs; expected one of "
            "val/click/auc, val/click/gauc, val/click/xauc, val/click/logloss, val/click/ndcg@10, "
            "val/finish/auc",
        ),
        (
            ["test/click/auc"],
            "objectives[0]: 'test/click/auc' is a test metric; objectives must come from "
            "validation metrics (val/...), never test",
        ),
        ("val/click/auc", "objectives='val/click/auc': expected a list of validation metric"),
        ({"click": "auc"}, "objectives={'click': 'auc'}: expected a list of validation metric"),
        ([], "objectives=[]: expected at least one validation metric name"),
        ([1], "objectives[0]=1: expected a metric name such as val/click/auc"),
        (["val/click/auc", "val/click/auc"], "objectives[1]: 'val/click/auc' is named twice"),
        (["val/click/oracle_auc"], "'val/click/oracle_auc' is the oracle's"),
        (["val/click/calibration"], "is best at 1, neither highest nor lowest"),
        (["val/finish/logloss"], "'val/finish/logloss' is not a metric this run"),
        (["val/like/head_auc"], "'val/like/head_auc' is not a metric this run"),
    ],
)
def test_objectives_are_checked_before_the_data_is_read(job_config, names, message):
    with pytest.raises(ConfigError) as err:
        checked(job_config, names)
    assert message in str(err.value), err.value


def test_objectives_of_a_multitask_model_include_its_heads(tmp_path):
    mmoe = compose(*TINY, "model=mmoe", f"paths.output_dir={tmp_path}")
    checked(
        OmegaConf.to_container(mmoe, resolve=True), ["val/like/head_auc", "val/click/head_logloss"]
    )
    with pytest.raises(ConfigError, match="'val/watch_time/head_calibration' is best at 1"):
        objectives.check(
            ["val/watch_time/head_calibration"],
            objectives.logged(["click", "watch_time"], "click", heads=["click", "watch_time"]),
        )


@pytest.mark.parametrize(
    ("given", "names", "message"),
    [
        (["minimize"], None, "objectives=null under an Optuna search: expected the validation"),
        (["maximize"], OBJECTIVES, "hydra.sweeper.direction=['maximize'] with objectives="),
        (["maximize", "minimize"], OBJECTIVES, "hydra.sweeper.direction[1]=minimize with object"),
        (["maximize"], ["val/click/logloss"], "expected minimize (a lower logloss is better)"),
    ],
)
def test_the_search_directions_must_be_the_objectives_own(job_config, given, names, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        checked(job_config, names, directions=given)
    checked(job_config, names)  # outside an Optuna search (a run, a grid sweep): no direction


def test_pareto_preset_directions_follow_the_objectives():
    assert objectives.directions(["val/click/auc", "val/click/logloss"]) == [
        "maximize",
        "minimize",
    ]
    assert objectives.directions(["val/watch_time/head_xauc"]) == ["maximize"]
    assert objectives.directions(None) == ["maximize"]  # the first trial then says why
    assert objectives.values(["val/a/auc"], {"val/a/auc": 0.5}) == 0.5
    assert objectives.values(OBJECTIVES, dict.fromkeys(OBJECTIVES, 0.5)) == (0.5, 0.5)


@pytest.mark.parametrize(
    ("objective", "listed"),
    [
        # Stops before the data is read: it names no behaviour.
        ("val/clik/auc", "val/click/auc, val/click/gauc, val/click/xauc, val/click/logloss,"),
        # Passes before the data (a behaviour of either kind); click is then measured binary:
        # stops after the statistics pass, before training, and lists the exact names.
        (
            "val/click/xauc",
            "val/click/auc, val/click/gauc, val/click/logloss, val/click/ndcg@10, val/finish/auc,",
        ),
    ],
)
def test_a_bad_objective_stops_the_job_before_anything_is_written(objective, listed, tmp_path):
    run = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_:
        train_in_process(f"objectives=[{objective}]", *TINY, output_dir=run)
    message = str(exit_.value.code)
    assert message.startswith(f"error: objectives[0]: {objective!r} is not a metric this run logs")
    assert f"expected one of {listed}" in message
    assert not run.exists()


def test_logged_names_are_what_the_metrics_compute():
    """`objectives.logged` against the metrics themselves (train.metrics, train.heads) on a
    few random rows: every name a run can log and no other."""
    torch.manual_seed(0)
    behaviours, continuous, label = ["click", "finish", "watch_time"], ["watch_time"], "click"
    rows = 64
    values = torch.stack(
        [torch.randint(0, 2, (rows,)), torch.randint(0, 2, (rows,)), torch.rand(rows) * 30],
        dim=1,
    ).double()
    groups = torch.randint(0, 4, (rows,))
    probs = torch.rand(rows)
    oracle = ["click", "watch_time"]
    metrics = BehaviourMetrics(behaviours, continuous, label, oracle, xauc_pairs=100)
    metrics.update(probs, values, groups, torch.rand(rows, 2), torch.rand(rows, 2))
    logged = {f"val/{k}" for k in metrics.compute()}
    heads = ["click", "watch_time"]
    outputs = HeadOutputs(heads, behaviours, continuous, label, oracle, xauc_pairs=100)
    outputs.update(torch.rand(rows, 2), values, groups, torch.rand(rows, 2), torch.rand(rows, 2))
    with_heads = logged | {f"val/{k}" for k in outputs.metrics(outputs.compute())}

    ndcg = "click/ndcg@10"
    assert set(objectives.logged(behaviours, label, oracle, (), continuous, ndcg)) == logged
    assert set(objectives.logged(behaviours, label, oracle, heads, continuous, ndcg)) == with_heads
    # Before the data is measured: every name either kind could log, a superset.
    assert set(objectives.logged(behaviours, label, oracle, heads, ndcg=ndcg)) >= with_heads
