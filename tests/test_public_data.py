"""The public multi-behaviour data configs on data in their original layouts: the ICME 2019 and
Ali-CCP samples in ../shared/data (skipped without it) and a KuaiRand-layout file written here
(no KuaiRand sample ships). Each trains a few steps through the `python -m train` entry point,
called in this process with the composed config (one Lightning import for all three)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

import train
from train import resolvers

CONF = Path(train.__file__).resolve().parent / "conf"  # the configs the package ships
# Tiny bucket counts: the shipped sizes suit the full data sets (a 600 MB checkpoint here).
SMALL = {
    "icme2019": ["uid", "item_id", "author_id", "music_id", "device"],
    "ali_ccp": ["101", "205", "207", "210", "216", "509", "702", "853", "109_14", "110_14",
                "127_14", "150_14"],
    "kuairand": ["user_id", "video_id"],
}  # fmt: skip
KUAIRAND_COLUMNS = [
    "user_id", "video_id", "date", "hourmin", "time_ms", "is_click", "is_like", "is_follow",
    "is_comment", "is_forward", "is_hate", "long_view", "play_time_ms", "duration_ms",
    "profile_stay_time", "comment_stay_time", "is_profile_enter", "is_rand", "tab",
]  # fmt: skip


def train_on(tmp_path: Path, name: str, train: Path, val: Path, test: Path, *extra: str):
    """`python -m train data=NAME ...` (its `main`, with the config Hydra would compose)."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    from train.__main__ import main

    overrides = [
        f"data={name}",
        f"data.train={train}",
        f"data.val={val}",
        f"data.test={test}",
        *[f"data.categorical.{c}=1000" for c in SMALL[name]],
        "data.batch_size=32",
        "hardware=cpu",
        "logger=csv",
        "trainer.max_epochs=1",
        "trainer.limit_train_batches=3",
        "trainer.enable_progress_bar=false",
        *extra,
    ]
    resolvers.register()
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
        HydraConfig.instance().set_config(cfg)
        with open_dict(cfg):
            cfg.paths.output_dir = str(tmp_path / "run")
            del cfg.hydra
        main(cfg)
    run = tmp_path / "run"
    return json.loads((run / "stats.json").read_text()), json.loads(
        (run / "metrics.json").read_text()
    )


def test_icme2019_sample_trains(tmp_path, shared_data):
    sample = shared_data / "byterec_icme2019" / "byterec_sample.txt"
    stats, metrics = train_on(
        tmp_path, "icme2019", sample, sample, sample, "weights=click_only", "weights.label=finish"
    )
    assert stats["rows"] == 200
    assert stats["positive_rate"] == {"finish": 76 / 200, "like": 7 / 200}
    assert {"test/finish/auc", "test/like/auc"} <= metrics.keys()


def test_ali_ccp_sample_trains(tmp_path, shared_data):
    folder = shared_data / "ali_ccp"
    stats, metrics = train_on(
        tmp_path,
        "ali_ccp",
        folder / "ali_ccp_train_sample.csv",
        folder / "ali_ccp_val_sample.csv",
        folder / "ali_ccp_test_sample.csv",
    )
    assert stats["rows"] == 100
    assert stats["positive_rate"] == {"click": 0.07, "purchase": 0.01}
    assert {"val/click/auc", "test/click/auc", "test/purchase/auc"} <= metrics.keys()


def kuairand_log(path: Path, rows: int = 400, seed: int = 0) -> np.ndarray:
    """A log in KuaiRand's `log_standard_*.csv` layout (made-up values); returns play_time_ms."""
    rng = np.random.default_rng(seed)
    click = rng.random(rows) < 0.4
    duration = rng.integers(5_000, 120_000, rows)
    play = np.where(click, (duration * rng.random(rows)).astype(int), 0)
    values = {
        "user_id": rng.integers(0, 30, rows),
        "video_id": rng.integers(0, 200, rows),
        "date": np.full(rows, 20220408),
        "hourmin": rng.integers(0, 24, rows) * 100,
        "time_ms": 1649376000000 + np.arange(rows) * 1000,
        "is_click": click.astype(int),
        "is_like": (click & (rng.random(rows) < 0.1)).astype(int),
        "is_follow": (click & (rng.random(rows) < 0.02)).astype(int),
        "is_comment": (click & (rng.random(rows) < 0.03)).astype(int),
        "is_forward": (click & (rng.random(rows) < 0.02)).astype(int),
        "is_hate": np.zeros(rows, dtype=int),
        "long_view": (play > 18_000).astype(int),
        "play_time_ms": play,
        "duration_ms": duration,
        "profile_stay_time": np.zeros(rows, dtype=int),
        "comment_stay_time": np.zeros(rows, dtype=int),
        "is_profile_enter": np.zeros(rows, dtype=int),
        "is_rand": np.zeros(rows, dtype=int),
        "tab": rng.integers(0, 15, rows),
    }
    lines = [",".join(KUAIRAND_COLUMNS)]
    lines += [",".join(str(values[c][i]) for c in KUAIRAND_COLUMNS) for i in range(rows)]
    path.write_text("\n".join(lines) + "\n")
    return play


def test_kuairand_layout_trains_with_watch_time_in_seconds(tmp_path):
    play = kuairand_log(tmp_path / "log_standard.csv")
    kuairand_log(tmp_path / "log_random.csv", rows=200, seed=1)
    stats, metrics = train_on(
        tmp_path,
        "kuairand",
        tmp_path / "log_standard.csv",
        tmp_path / "log_random.csv",
        tmp_path / "log_random.csv",
        "weights=engagement",  # click, like and log seconds watched
    )
    assert stats["rows"] == 400
    assert stats["behaviour_mean"]["watch_time"] == pytest.approx(play.mean() / 1000, rel=1e-5)
    assert "watch_time" in stats["continuous"]
    assert {"test/click/auc", "test/watch_time/xauc", "test/long_view/auc"} <= metrics.keys()


@pytest.mark.parametrize("mode", ["memory", "stream"])
def test_icme2019_tab_separated_without_header_in_both_modes(shared_data, mode):
    sample = shared_data / "byterec_icme2019" / "byterec_sample.txt"
    resolvers.register()
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose(
            "train",
            overrides=[
                "data=icme2019",
                f"data.train={sample}",
                f"data.val={sample}",
                f"data.test={sample}",
                f"data.mode={mode}",
                "data.num_workers=0",
                "weights.label=finish",
            ],
        )
    data = instantiate(cfg.data)
    stats = data.prepare(instantiate(cfg.weights))
    assert stats.rows == 200 and stats.dense_mean[0] == pytest.approx(
        np.loadtxt(sample, usecols=11).mean()
    )
    batch = next(iter(data.test_dataloader()))
    assert batch.categorical.shape == (200, 8) and batch.behaviours.shape == (200, 2)
