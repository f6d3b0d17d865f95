"""The training job end to end on a small simulated feed: two runs in this process (their
run folders and closing tables), and bad schemes through `python -m train` (exit code, stderr,
no run folder)."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest

from tests.helpers import TINY, train_in_process

# Big enough that the model gets near the oracle, small enough for CI (2 cores).
SMALL = [
    *TINY,
    "trainer.max_epochs=4",
    "data.simulator.n_train=200000",
    "data.simulator.n_val=50000",
    "data.simulator.n_test=50000",
    "data.simulator.n_users=2000",
    "data.simulator.n_videos=5000",
    "data.simulator.n_authors=500",
    # Exact vocabularies: TINY's small hash tables put these ids together (the model then
    # stays ~0.04 AUC short of the oracle).
    "data.categorical=[user_id,video_id,author_id,category,hour,device]",
    # Batches of 4096 take a third of the CPU time of 1024.
    "data.batch_size=4096",
]
BEHAVIOURS = ["click", "finish", "watch_time", "like"]


def expected_keys() -> set[str]:
    keys = set()
    for split in ("val", "test"):
        for b in ("click", "finish", "like"):
            keys |= {f"{split}/{b}/{m}" for m in ("auc", "gauc", "oracle_auc", "oracle_gauc")}
        keys |= {f"{split}/watch_time/{m}" for m in ("xauc", "auc", "oracle_xauc", "oracle_auc")}
        keys |= {
            f"{split}/click/{m}"
            for m in ("logloss", "calibration", "oracle_logloss", "oracle_calibration")
        }
        keys |= {f"{split}/click/ndcg@10", f"{split}/click/oracle_ndcg@10"}
    return keys


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    folders = {}
    for scheme in ("click_only", "seed"):
        run = tmp_path_factory.mktemp(scheme) / "run"
        stdout = io.StringIO()
        with contextlib.redirect_stdout(stdout):
            train_in_process(*SMALL, f"weights={scheme}", output_dir=run)
        folders[scheme] = run
        folders[f"{scheme}.stdout"] = stdout.getvalue()
    return folders


def metrics(folder: Path) -> dict[str, float]:
    return json.loads((folder / "metrics.json").read_text())


@pytest.mark.e2e
def test_run_folder_has_everything(runs):
    folder = runs["click_only"]
    got = metrics(folder)
    assert expected_keys() <= set(got), sorted(expected_keys() - set(got))
    assert all(isinstance(v, float) for v in got.values())
    for name in ("config.yaml", "stats.json", "logs/metrics.csv"):
        assert (folder / name).stat().st_size > 0, name
    assert (folder / "checkpoints" / "last.ckpt").exists()
    assert (folder / "checkpoints" / "best.ckpt").exists()
    assert "train/loss" in (folder / "logs" / "metrics.csv").read_text().splitlines()[0]
    # the closing table: one row per behaviour, the oracle beside the model
    table = runs["click_only.stdout"]
    assert "oracle_auc" in table and all(f"\n{b} " in table for b in BEHAVIOURS)


@pytest.mark.e2e
def test_click_only_gets_near_the_oracle(runs):
    got = metrics(runs["click_only"])
    assert got["test/click/auc"] > 0.5
    assert got["test/click/oracle_auc"] - got["test/click/auc"] < 0.03
    # unweighted training is calibrated; the weighted scheme inflates the predicted rate
    assert abs(got["test/click/calibration"] - 1) < 0.1
    assert metrics(runs["seed"])["test/click/calibration"] > 1.5


@pytest.mark.e2e
def test_seed_scheme_trades_clicks_for_finishes(runs):
    base, seed = metrics(runs["click_only"]), metrics(runs["seed"])
    assert seed["test/finish/auc"] > base["test/finish/auc"]
    assert seed["test/click/auc"] < base["test/click/auc"]


@pytest.mark.e2e
@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            "weights.terms=[{behaviour:share,coef:2}]",
            "weights.terms[0] (2*[share > 0]) reads behaviour 'share'",
        ),
        ("weights.negative_weight=-1", "weights.negative_weight must be a finite number >= 0"),
        (
            "weights=watch_time weights.seconds=-2",
            "weight term for behaviour 'watch_time': coef must be a finite number >= 0",
        ),
    ],
)
def test_bad_scheme_fails_before_writing(override, message, tmp_path, zygote):
    done = zygote.run(*TINY, *override.split(" "), cwd=tmp_path)
    assert done.returncode != 0
    assert message in done.stderr, done.stderr[-2000:]
    assert not (tmp_path / "outputs").exists() or not any((tmp_path / "outputs").iterdir())
