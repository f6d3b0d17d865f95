"""Tests for the seeded short-video feed simulator (train.data.synthetic)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import fsspec
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.preprocessing import OneHotEncoder

from train.data.synthetic import LIST_DELIMITER, FeedSimulator, World, main

EXPECTED_SCHEMA = [
    ("user_id", pa.int64()),
    ("video_id", pa.int64()),
    ("author_id", pa.int64()),
    ("category", pa.int64()),
    ("hour", pa.int64()),
    ("device", pa.string()),
    ("video_len_s", pa.float32()),
    ("user_activity", pa.float32()),
    ("video_age_days", pa.float32()),
    ("author_followers_log", pa.float32()),
    ("click", pa.int8()),
    ("finish", pa.int8()),
    ("like", pa.int8()),
    ("watch_s", pa.float32()),
    ("p_click", pa.float32()),
    ("p_finish", pa.float32()),
    ("p_like", pa.float32()),
    ("e_watch_s", pa.float32()),
    ("hist_videos", pa.list_(pa.int64())),
    ("tags", pa.list_(pa.string())),
    ("hist_categories", pa.list_(pa.int64())),
]
LIST_COLUMNS = ["hist_videos", "tags", "hist_categories"]
ID_COLUMNS = ["user_id", "video_id", "author_id", "category", "hour", "device"]
DENSE_COLUMNS = ["video_len_s", "user_activity", "video_age_days", "author_followers_log"]
BEHAVIOURS = ["click", "finish", "like", "watch_s"]
ORACLES = ["p_click", "p_finish", "p_like", "e_watch_s"]

SMALL = {"n_train": 5_000, "n_val": 2_000, "n_test": 2_000, "n_users": 300, "n_videos": 800}
SMALL.update(n_authors=100, n_categories=10)


def small(**overrides: object) -> FeedSimulator:
    return FeedSimulator(**{**SMALL, **overrides})


def assert_tables_equal(a: pa.Table, b: pa.Table) -> None:
    # Via pandas because Arrow equality treats NaN != NaN.
    assert a.schema == b.schema
    pd.testing.assert_frame_equal(a.to_pandas(), b.to_pandas())


@pytest.fixture(scope="module")
def big() -> FeedSimulator:
    """The default universe with a 200k-row train split, for the statistical checks."""
    return FeedSimulator(n_train=200_000, n_val=50_000, n_test=50_000)


@pytest.fixture(scope="module")
def big_train(big: FeedSimulator) -> pd.DataFrame:
    return big.table("train").to_pandas()


# ---------------------------------------------------------------- determinism and universe


def test_same_seed_gives_identical_tables() -> None:
    for split in ("train", "val", "test"):
        assert_tables_equal(small().table(split), small().table(split))


def test_different_seed_gives_different_tables() -> None:
    a, b = small(seed=0).table("train"), small(seed=1).table("train")
    assert not np.array_equal(a["user_id"].to_numpy(), b["user_id"].to_numpy())
    # The universe changes too, not only the impressions.
    assert not np.array_equal(small(seed=0).world().video_len_s, small(seed=1).world().video_len_s)


def test_splits_differ_but_share_the_universe() -> None:
    sim = small(n_val=5_000, n_test=5_000)
    frames = {split: sim.table(split).to_pandas() for split in ("train", "val", "test")}
    assert not np.array_equal(frames["train"]["user_id"], frames["val"]["user_id"])
    assert not np.array_equal(frames["val"]["user_id"], frames["test"]["user_id"])
    per_video = [
        f.groupby("video_id")[["video_len_s", "author_id", "category"]].agg(["min", "max"])
        for f in frames.values()
    ]
    for table in per_video:
        # A video has one length/author/category within a split...
        for col in ("video_len_s", "author_id", "category"):
            assert (table[(col, "min")] == table[(col, "max")]).all()
    # ...and the same ones in every split.
    joined = (
        per_video[0]
        .join(per_video[1], rsuffix="_val", how="inner")
        .join(per_video[2], rsuffix="_test", how="inner")
    )
    assert len(joined) > 100
    for col in ("video_len_s", "author_id", "category"):
        np.testing.assert_array_equal(joined[(col, "min")], joined[(f"{col}_val", "min")])
        np.testing.assert_array_equal(joined[(col, "min")], joined[(f"{col}_test", "min")])
    # Users keep their activity feature across splits as well.
    users = [f.groupby("user_id")["user_activity"].first() for f in frames.values()]
    common = users[0].index.intersection(users[1].index)
    np.testing.assert_array_equal(users[0][common], users[1][common])


def test_split_sizes_and_table_validation() -> None:
    sim = small(n_train=123, n_val=45, n_test=6)
    assert [sim.table(s).num_rows for s in ("train", "val", "test")] == [123, 45, 6]
    with pytest.raises(ValueError, match="split must be one of"):
        sim.table("validation")


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("n_train", 0),
        ("n_val", -1),
        ("n_test", 0),
        ("n_users", 0),
        ("n_videos", 0),
        ("n_authors", 0),
        ("n_categories", 0),
        ("n_users", 2.5),
        ("clickbait_share", 1.0),
        ("clickbait_share", -0.1),
        ("clickbait_share", "0.1"),
        ("seed", -1),
        ("history_len", -1),
        ("history_len", 2.0),
        ("history_len", True),
        ("n_tags", 0),
        ("interest_scale", -0.1),
        ("interest_scale", float("inf")),
        ("interest_scale", "0.5"),
    ],
)
def test_post_init_rejects_bad_fields(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=rf"^data\.simulator\.{field}="):
        FeedSimulator(**{field: value})


def test_zero_clickbait_share_is_allowed() -> None:
    assert not small(clickbait_share=0.0).world().is_clickbait.any()


def test_list_sizes_change_only_the_list_columns() -> None:
    # Histories and tags draw from streams of their own.
    base = small().table("train")
    other = small(history_len=5, n_tags=7).table("train")
    rest = [name for name in base.column_names if name not in LIST_COLUMNS]
    assert_tables_equal(base.select(rest), other.select(rest))
    # A shorter window is the tail of the longer one, with the same nulls.
    long, short = base["hist_videos"].to_pylist(), other["hist_videos"].to_pylist()
    for a, b in zip(long, short, strict=True):
        assert b is None if a is None else b == a[-5:]
    assert {tag for tags in other["tags"].to_pylist() for tag in tags} <= {
        f"t{i}" for i in range(7)
    }
    empty = small(history_len=0).table("val")["hist_videos"].to_pylist()
    assert [] in empty and all(h is None or h == [] for h in empty)


def test_interest_scale_zero_only_drops_the_interest_term() -> None:
    on, off = small().table("train"), small(interest_scale=0.0).table("train")
    kept = [*ID_COLUMNS, *DENSE_COLUMNS, "tags"]
    assert_tables_equal(on.select(kept), off.select(kept))
    w = small().world()
    user, video = on["user_id"].to_numpy(), on["video_id"].to_numpy()

    def logit(table: pa.Table) -> np.ndarray:
        p = table["p_click"].to_numpy().astype(np.float64)
        return np.log(p / (1 - p))

    # The oracle knows the terms: the click logits differ by exactly them.
    term = w.interest[user, w.video_topic[video]] + w.user_bait[user] * w.is_clickbait[video]
    np.testing.assert_allclose(logit(on) - logit(off), term, atol=1e-4)
    assert 0.4 < w.interest.std() < 0.8 and 0.4 < w.user_bait.std() < 0.8
    zero = small(interest_scale=0.0).world()
    assert not zero.interest.any() and not zero.user_bait.any()


# ---------------------------------------------------------------- columns and behaviours


def test_columns_and_dtypes_are_exact() -> None:
    table = small().table("val")
    assert [(f.name, f.type) for f in table.schema] == EXPECTED_SCHEMA


def world_history(w: World, user: int) -> tuple[np.ndarray, np.ndarray]:
    """User's clicked videos and their days in the universe's log, oldest first."""
    part = slice(w.log_offsets[user], w.log_offsets[user + 1])
    return w.log_video[part], w.log_day[part]


def test_history_is_the_users_latest_clicks_before_the_impression() -> None:
    sim = small(history_len=8)
    w = sim.world()
    assert (np.diff(w.log_offsets) >= 0).all() and w.log_offsets[-1] == len(w.log_video)
    assert ((w.log_video >= 0) & (w.log_video < sim.n_videos)).all()
    checked = 0
    for split in ("train", "val", "test"):
        d = sim.table(split).to_pandas()
        # The impression's day, recovered from the video's age (float32, so a tolerance).
        day = d["video_age_days"].to_numpy(np.float64) - w.video_base_age_days[d["video_id"]]
        for user, when, hist in zip(d["user_id"], day, d["hist_videos"], strict=True):
            if hist is None or np.isnan(when):
                continue
            videos, days = world_history(w, user)
            assert (np.diff(days) >= 0).all()
            end = np.searchsorted(days, when)
            if np.abs(days - when).min(initial=1.0) < 1e-3:
                continue  # a click too close to the impression to tell the order
            # The most recent clicks before the impression, at most history_len, latest last.
            np.testing.assert_array_equal(hist, videos[max(0, end - 8) : end])
            checked += 1
    assert checked > 8_000


def test_history_categories_are_the_history_videos_categories() -> None:
    """hist_categories is hist_videos' side information, item by item: same nulls, same
    lengths (also when shortened), each item its video's category."""
    for sim in (small(), small(history_len=3)):
        table = sim.table("test")
        videos = table["hist_videos"].combine_chunks()
        categories = table["hist_categories"].combine_chunks()
        np.testing.assert_array_equal(videos.is_null(), categories.is_null())
        np.testing.assert_array_equal(videos.value_lengths(), categories.value_lengths())
        category_of = sim.world().video_category
        flat = videos.flatten().to_numpy()
        np.testing.assert_array_equal(categories.flatten().to_numpy(), category_of[flat])
        assert len(flat) > 0


def test_tags_are_per_video_and_follow_the_topic() -> None:
    sim = small()
    d = pd.concat([sim.table(split).to_pandas() for split in ("train", "val", "test")])
    tags = d["tags"].map(list)
    assert tags.map(len).between(1, 4).all()
    assert (tags.map(lambda t: len(set(t))) == tags.map(len)).all()
    assert set(tags.explode()) <= {f"t{i}" for i in range(sim.n_tags)}
    # Tags belong to the video, the same in every split...
    per_video = tags.map(tuple).groupby(d["video_id"].to_numpy()).nunique()
    assert (per_video == 1).all()
    # ...and the first names the video's topic: one category per first tag.
    first = tags.map(lambda t: t[0])
    assert (d.groupby(first.to_numpy())["category"].nunique() == 1).all()
    topic = sim.world().video_topic[d["video_id"]]
    assert (pd.Series(topic).groupby(first.to_numpy()).nunique() == 1).all()


def test_value_ranges_and_missing_values(big_train: pd.DataFrame) -> None:
    d = big_train
    for col in ID_COLUMNS + BEHAVIOURS + ORACLES:
        assert not d[col].isna().any(), col
    assert set(d["device"].unique()) == {"ios", "android", "web", "tablet"}
    assert d["hour"].between(0, 23).all()
    assert d["user_id"].between(0, 19_999).all() and d["video_id"].between(0, 49_999).all()
    assert d["author_id"].between(0, 4_999).all() and d["category"].between(0, 29).all()
    assert d["video_len_s"].between(5, 300).all()
    # Median over videos (not impressions) is the world's ~30 s.
    lengths = d.groupby("video_id")["video_len_s"].first()
    assert 20 <= lengths.median() <= 40
    # A sprinkle of NaNs in dense features for downstream NaN handling, and no more.
    assert 0.003 < d["video_age_days"].isna().mean() < 0.008
    assert d["author_followers_log"].isna().any()
    assert not d["video_len_s"].isna().any() and not d["user_activity"].isna().any()
    # Null histories are a logging artefact too; tags are never missing.
    assert 0.007 < d["hist_videos"].isna().mean() < 0.013
    assert not d["tags"].isna().any()
    lengths = d["hist_videos"].dropna().map(len)
    assert lengths.max() == 30 and (lengths == 0).any() and lengths.mean() > 15
    for col in ("click", "finish", "like"):
        assert set(d[col].unique()) <= {0, 1}
    for col in ORACLES[:3]:
        assert d[col].between(0, 1).all()
    assert 0.10 <= d["click"].mean() <= 0.20


def test_behaviour_consistency(big_train: pd.DataFrame) -> None:
    d = big_train
    click, finish, like = d["click"] == 1, d["finish"] == 1, d["like"] == 1
    assert (d["watch_s"] >= 0).all()
    assert not (finish & ~click).any()
    assert not (like & ~click).any()
    assert ((d["watch_s"] > 0) == click).all()
    assert (d.loc[finish, "watch_s"] == d.loc[finish, "video_len_s"]).all()
    # Abandoned views stop strictly before the end.
    abandoned = click & ~finish
    assert (d.loc[abandoned, "watch_s"] < d.loc[abandoned, "video_len_s"]).all()
    # Oracles are nested the same way the behaviours are.
    assert (d["p_finish"] <= d["p_click"] + 1e-7).all()
    assert (d["p_like"] <= d["p_click"] + 1e-7).all()
    assert (d["e_watch_s"] <= d["p_click"] * d["video_len_s"] * (1 + 1e-6)).all()


def test_oracles_match_observed_rates(big_train: pd.DataFrame) -> None:
    d = big_train
    n = len(d)
    for behaviour, oracle in [("click", "p_click"), ("finish", "p_finish"), ("like", "p_like")]:
        p = d[oracle].to_numpy(np.float64)
        # Bernoulli given p: the sum of (y - p) has variance sum p(1-p).
        se = np.sqrt((p * (1 - p)).sum()) / n
        gap = d[behaviour].mean() - p.mean()
        assert abs(gap) < 4 * se, (behaviour, gap, se)
    residual = d["watch_s"].to_numpy(np.float64) - d["e_watch_s"].to_numpy(np.float64)
    se = residual.std() / np.sqrt(n)
    assert abs(residual.mean()) < 4 * se, (residual.mean(), se)


# ---------------------------------------------------------------- quality targets


def test_oracle_aucs_are_realistic_and_the_seesaw_exists(big_train: pd.DataFrame) -> None:
    d = big_train
    click_auc = roc_auc_score(d["click"], d["p_click"])
    assert 0.70 <= click_auc <= 0.80
    finish_auc = roc_auc_score(d["finish"], d["p_finish"])
    finish_by_click = roc_auc_score(d["finish"], d["p_click"])
    # Ranking by click probability is a clearly worse finish ranking than the finish oracle.
    assert finish_auc - finish_by_click > 0.03
    like_auc = roc_auc_score(d["like"], d["p_like"])
    assert like_auc > roc_auc_score(d["like"], d["p_click"]) + 0.03
    # Showing the top 10% by expected watch time yields more watch time than by click.
    top = len(d) // 10
    by_watch = d["watch_s"].to_numpy()[np.argsort(-d["e_watch_s"].to_numpy())[:top]].sum()
    by_click = d["watch_s"].to_numpy()[np.argsort(-d["p_click"].to_numpy())[:top]].sum()
    assert by_watch > 1.3 * by_click


def test_clickbait_is_clicked_then_abandoned(big: FeedSimulator, big_train: pd.DataFrame) -> None:
    d = big_train
    bait = big.world().is_clickbait[d["video_id"].to_numpy()]
    assert 0.05 < bait.mean() < 0.30
    clicked = d["click"] == 1
    assert d.loc[bait, "click"].mean() > 1.5 * d["click"].mean()
    finish_rate = d.loc[clicked, "finish"].mean()
    assert d.loc[clicked & bait, "finish"].mean() < 0.6 * finish_rate
    assert d.loc[clicked & bait, "like"].mean() < d.loc[clicked, "like"].mean()


def test_history_reveals_the_categories_a_user_clicks(
    big: FeedSimulator, big_train: pd.DataFrame
) -> None:
    d = big_train
    w = big.world()
    # Full histories only: their length says nothing of how click-happy the user is.
    full = d.loc[d["hist_videos"].map(len, na_action="ignore") == big.history_len]
    items = np.concatenate(full["hist_videos"].to_numpy())
    row = np.repeat(np.arange(len(full)), big.history_len)
    category = full["category"].to_numpy()
    same = w.video_category[items] == category[row]
    x = pd.DataFrame(
        {
            "share": np.bincount(row, weights=same, minlength=len(full)) / big.history_len,
            "click": full["click"].to_numpy(),
        }
    )
    # Within a category (its popularity and click pull taken out), users who clicked it more
    # often before click it more now: the history shows what the click logit's user terms do.
    centred = x - x.groupby(category).transform("mean")
    corr = np.corrcoef(centred["share"], centred["click"])[0, 1]
    assert corr > 0.03, corr


def test_id_bias_model_gets_close_to_the_oracle() -> None:
    # A logistic regression on one-hot ids can only learn per-id biases; without the interests
    # that only a history reveals (interest_scale=0) it must come close to the oracle, otherwise
    # the world is not learnable by the real model either.
    sim = FeedSimulator(
        n_train=200_000,
        n_val=100_000,
        n_test=1,
        n_users=2_000,
        n_videos=5_000,
        n_authors=500,
        interest_scale=0.0,
    )
    train = sim.table("train").select([*ID_COLUMNS, "click"]).to_pandas()
    val = sim.table("val").select([*ID_COLUMNS, "click", "p_click"]).to_pandas()
    encoder = OneHotEncoder(handle_unknown="ignore")
    x_train = encoder.fit_transform(train[ID_COLUMNS])
    model = LogisticRegression(C=0.3, max_iter=300).fit(x_train, train["click"])
    scores = model.predict_proba(encoder.transform(val[ID_COLUMNS]))[:, 1]
    model_auc = roc_auc_score(val["click"], scores)
    oracle_auc = roc_auc_score(val["click"], val["p_click"])
    assert model_auc < oracle_auc
    assert oracle_auc - model_auc < 0.03, (model_auc, oracle_auc)


# ---------------------------------------------------------------- files and CLI


def read_parquet(paths: list[str]) -> pa.Table:
    return pa.concat_tables(pq.read_table(p) for p in paths)


def read_csv(paths: list[str]) -> pa.Table:
    """Read CSV shards back to the simulator's schema, splitting list cells on the delimiter."""
    text = {name: pa.string() for name in LIST_COLUMNS}
    options = pacsv.ConvertOptions(
        column_types={**dict(EXPECTED_SCHEMA), **text},
        # An empty field is a null list, a quoted "" an empty one.
        strings_can_be_null=True,
        quoted_strings_can_be_null=False,
    )
    table = pa.concat_tables(pacsv.read_csv(p, convert_options=options) for p in paths)
    for name, kind in EXPECTED_SCHEMA:
        if name in LIST_COLUMNS:
            cells = table[name].to_pylist()
            items = [c if c is None else c.split(LIST_DELIMITER) if c else [] for c in cells]
            column = pa.array(items, pa.list_(pa.string())).cast(kind)
            table = table.set_column(table.schema.get_field_index(name), name, column)
    return table


def test_write_parquet_shards_round_trip(tmp_path: Path) -> None:
    sim = small()
    paths = sim.write(str(tmp_path), format="parquet", shards=3)
    assert set(paths) == {"train", "val", "test"}
    for split, files in paths.items():
        assert [Path(f).name for f in files] == [f"part-{i:05d}.parquet" for i in range(3)]
        assert all(Path(f).parent == tmp_path / split for f in files)
        assert_tables_equal(read_parquet(files), sim.table(split))


def test_write_csv_round_trip(tmp_path: Path) -> None:
    sim = small()
    paths = sim.write(str(tmp_path), format="csv", shards=2)
    with open(paths["train"][0]) as f:
        assert f.readline().strip().replace('"', "").split(",") == [n for n, _ in EXPECTED_SCHEMA]
    hist = sim.table("train")["hist_videos"].to_pylist()
    # Both kinds of "no history" are there to tell apart, and histories of several items.
    assert None in hist and [] in hist and max(map(len, filter(None, hist))) > 1
    for split, files in paths.items():
        back = read_csv(files)
        # CSV writes NaN as text that reads back as null; pandas shows both as NaN.
        assert_tables_equal(back, sim.table(split))


def test_write_to_fsspec_url_and_drop_stale_shards() -> None:
    url = "memory://synthetic-test/out"
    sim = small(n_train=1_000, n_val=300, n_test=300)
    sim.write(url, shards=4)
    paths = sim.write(url, shards=2)
    fs = fsspec.filesystem("memory")
    try:
        names = fs.ls("/synthetic-test/out/train", detail=False)
        assert sorted(p.rsplit("/", 1)[-1] for p in names) == [
            "part-00000.parquet",
            "part-00001.parquet",
        ]
        for split, files in paths.items():
            assert all(f.startswith(f"{url}/{split}/") for f in files)
            tables = []
            for f in files:
                with fsspec.open(f, "rb") as handle:
                    tables.append(pq.read_table(handle))
            assert_tables_equal(pa.concat_tables(tables), sim.table(split))
    finally:
        fs.rm("/synthetic-test", recursive=True)


def test_write_validates_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="format"):
        small().write(str(tmp_path), format="json")
    with pytest.raises(ValueError, match="shards"):
        small().write(str(tmp_path), shards=0)


def test_more_shards_than_rows(tmp_path: Path) -> None:
    sim = small(n_train=3, n_val=1, n_test=1)
    paths = sim.write(str(tmp_path), shards=4)
    assert read_parquet(paths["val"]).num_rows == 1
    assert_tables_equal(read_parquet(paths["train"]), sim.table("train"))


def test_cli_scales_val_and_test_with_rows(tmp_path: Path) -> None:
    paths = main([str(tmp_path), "--rows", "1000", "--shards", "2", "--format", "csv"])
    rows = {split: read_csv(files).num_rows for split, files in paths.items()}
    assert rows == {"train": 1_000, "val": 200, "test": 200}


def test_cli_runs_as_module(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "train.data.synthetic", str(tmp_path), "--rows", "500"],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert pq.read_table(tmp_path / "test" / "part-00000.parquet").num_rows == 100
