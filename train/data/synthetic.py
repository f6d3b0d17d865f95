"""Seeded simulator of a short-video feed, for training and testing sample-weighted ranking.

The world
---------
A fixed universe (drawn from ``seed`` alone, shared by every split) of

* **users** with an activity level (how many impressions they get), a personal click
  propensity, a patience (how far they watch), a like propensity and a low-rank taste
  vector over categories;
* **authors** with a popularity (how often their videos are shown), a click bias and a
  follower count;
* **videos** with a category (mostly their author's main one), an author, a length in whole
  seconds (lognormal, median ~30 s, clipped to 5–300 s), an upload age, a quality, a click
  appeal and a popularity.

Each split (``train``/``val``/``test``) draws its impressions from its own RNG stream
``(seed, split)``: a user by activity, a video by popularity, an hour of day (evening
heavy) and a device (string ids, so string hashing is exercised downstream). Behaviours
then follow a simple causal chain, and the exact probabilities are returned next to them
as oracle columns:

* ``p_click`` = sigmoid of main effects (user, video, author, category, hour, device,
  freshness) plus a moderate user×category taste interaction;
* given a click the user finishes with ``q_finish`` (rises with quality and patience, falls
  with length), otherwise watches a Beta-distributed fraction whose mean rises with quality;
* given a click the user likes with a probability that rises with quality and is much
  higher after finishing.

The conflict
------------
A ``clickbait_share`` of videos have a much higher click appeal but a low quality: they are
clicked and then abandoned. Ranking by click probability therefore promotes exactly the
videos that finish, watch time and likes punish, so the click objective and the
finish/watch-time objectives really disagree (the "seesaw" that sample weighting has to
trade off). Everything else is mostly main effects so that an embedding+MLP model over the
id columns can get close to the oracle.

Each impression also carries list columns: ``hist_videos``, the user's last ``history_len``
clicks before it in a click log that starts a month before train (so a user with few
impressions still has a long history), ``hist_categories``, those videos' categories item by
item (side information per history item), and ``tags``, the video's tags.

Run ``python -m train.data.synthetic OUT_FOLDER [--rows N] [--shards K] [--format F]`` to
write the three splits as files (e.g. to try ``data=files``).

Longer than 450 lines because the world, its click log and the splits drawn from it are one
causal model: every column's generator reads the same universe.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Sequence
from dataclasses import dataclass

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from train.errors import ConfigError

SPLITS: tuple[str, ...] = ("train", "val", "test")
DEVICES: tuple[str, ...] = ("ios", "android", "web", "tablet")
FORMATS: tuple[str, ...] = ("parquet", "csv")

SCHEMA = pa.schema(
    [
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
)
# CSV has no list type: a list cell is its items joined by this (empty list -> "", null -> null).
LIST_DELIMITER = "|"

# RNG stream keys: the universe uses 0 so no split can ever share its stream. The click log
# and the tags came later and have streams of their own (as do the splits' list columns), so
# every earlier column keeps its values for a given seed.
_WORLD_STREAM = 0
_SPLIT_STREAM = {"train": 1, "val": 2, "test": 3}
_LOG_STREAM = 4
_TAG_STREAM = 5
_INTEREST_STREAM = 6
_SPLIT_LIST_STREAM = 10
# Impressions of val/test happen after train, so videos are a bit older there (days).
_SPLIT_DAYS = {"train": (0.0, 7.0), "val": (7.0, 8.0), "test": (8.0, 9.0)}

_DEVICE_SHARE = np.array([0.35, 0.45, 0.10, 0.10])
_DEVICE_EFFECT = np.array([0.10, 0.0, -0.30, 0.05])
_CLICK_BASE = -2.45
_TASTE_RANK = 4
# Interests: each category splits into topics, and users like topics along a few latent axes.
_TOPICS_PER_CATEGORY = 4
_INTEREST_RANK = 4
_INTEREST_CATEGORY_SHARE = 0.75
_BAIT_SUSCEPTIBILITY = 1.0  # std of a user's clickbait term, relative to interest_scale
# A non-finished watch is a fraction in [_WATCH_LO, _WATCH_HI]: it keeps watch_s > 0 exactly
# when clicked (float32 cannot underflow) and strictly below the length when not finished.
_WATCH_LO, _WATCH_HI = 0.02, 0.98
_WATCH_CONCENTRATION = 3.0
_NAN_AGE_SHARE = 0.005
_NAN_FOLLOWERS_SHARE = 0.002
# The click log runs from a month before train until the end of test; a user's history at an
# impression is the tail of their log before that impression's day, so it grows over the splits.
_LOG_START_DAY, _LOG_END_DAY = -30.0, _SPLIT_DAYS["test"][1]
_PAST_CLICKS = 30.0  # mean clicks per user in the month before train
# The logged past came from a personalised feed, which showed users more of what they like:
# exposure ~ exp(_PAST_PERSONALISATION * user terms), on top of the clicks' own preference.
_PAST_PERSONALISATION = 1.0
_NULL_HISTORY_SHARE = 0.01
# Tags: a tenth of the vocabulary marks hooky (high click appeal) videos, a tenth high quality
# ones, the rest are topics owned by categories.
_MARKER_TAG_SHARE = 0.1
_OWN_TOPIC_SHARE = 0.8
# Rows per chunk of a list column: keeps Arrow's int32 list offsets far from overflowing.
_LIST_CHUNK_ROWS = 1 << 24


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


@dataclass
class World:
    """The universe behind every split; arrays are indexed by id."""

    user_log_activity: np.ndarray
    user_weight: np.ndarray
    user_propensity: np.ndarray
    user_patience: np.ndarray
    user_like: np.ndarray
    taste: np.ndarray  # (n_users, n_categories) logit contribution
    interest: np.ndarray  # (n_users, n_topics) logit contribution, scaled by interest_scale
    user_bait: np.ndarray  # logit contribution of a clickbait video, scaled by interest_scale
    category_effect: np.ndarray
    author_bias: np.ndarray
    author_followers_log: np.ndarray
    video_author: np.ndarray
    video_category: np.ndarray
    video_topic: np.ndarray  # category * _TOPICS_PER_CATEGORY + topic within the category
    video_len_s: np.ndarray
    video_base_age_days: np.ndarray
    video_quality: np.ndarray
    video_appeal: np.ndarray
    video_weight: np.ndarray
    is_clickbait: np.ndarray
    hour_weight: np.ndarray
    hour_effect: np.ndarray
    # The click log, sorted by user then day: user u's clicks are rows
    # log_offsets[u]:log_offsets[u + 1], oldest first.
    log_offsets: np.ndarray
    log_video: np.ndarray
    log_day: np.ndarray
    # Tags of video v are tag ids tag_values[tag_offsets[v]:tag_offsets[v + 1]].
    tag_offsets: np.ndarray
    tag_values: np.ndarray


@dataclass
class FeedSimulator:
    """Seeded short-video feed; ``table(split)`` returns that split's impressions."""

    n_train: int = 1_000_000
    n_val: int = 200_000
    n_test: int = 200_000
    n_users: int = 20_000
    n_videos: int = 50_000
    n_authors: int = 5_000
    n_categories: int = 30
    clickbait_share: float = 0.15
    seed: int = 0
    interest_scale: float = 0.6
    history_len: int = 30
    n_tags: int = 200

    def __post_init__(self) -> None:
        # Named as the job's config spells them (`data.simulator.n_val=0`); ConfigError is a
        # ValueError, so callers outside the job see the usual type.
        sizes = ("n_train", "n_val", "n_test", "n_users", "n_videos", "n_authors", "n_categories")
        for name in sizes:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ConfigError(f"data.simulator.{name}={value!r}: expected an integer >= 1")
        share = self.clickbait_share
        if (
            isinstance(share, bool)
            or not isinstance(share, (int, float, np.number))
            or not 0 <= share < 1
        ):
            raise ConfigError(
                f"data.simulator.clickbait_share={share!r}: expected a number in [0, 1)"
            )
        # 0 switches the interest term off, which gives back the columns of the simulator
        # before histories existed, bit for bit.
        scale = self.interest_scale
        if (
            isinstance(scale, bool)
            or not isinstance(scale, (int, float, np.number))
            or not 0 <= scale < np.inf
        ):
            raise ConfigError(
                f"data.simulator.interest_scale={scale!r}: expected a finite number >= 0"
            )
        # 0 is allowed: every history is then an empty list, a clean "no history" baseline.
        for name, low in (("history_len", 0), ("n_tags", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
                raise ConfigError(f"data.simulator.{name}={value!r}: expected an integer >= {low}")
        # SeedSequence needs a non-negative integer; reject early with the field's name.
        seed = self.seed
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ConfigError(f"data.simulator.seed={seed!r}: expected an integer >= 0")

    def split_size(self, split: str) -> int:
        """Number of impressions in ``split``."""
        _check_split(split)
        return {"train": self.n_train, "val": self.n_val, "test": self.n_test}[split]

    def world(self) -> World:
        """Draw the universe; depends only on the seed and the universe sizes."""
        rng = np.random.default_rng([self.seed, _WORLD_STREAM])
        nu, nv, na, nc = self.n_users, self.n_videos, self.n_authors, self.n_categories

        # Users. Heavy users click a bit more, so activity is a useful dense feature.
        log_act = rng.normal(0.0, 1.2, nu)
        user_propensity = 0.2 * log_act + rng.normal(0.0, 0.5, nu)
        user_patience = rng.normal(0.0, 0.4, nu)
        user_like = rng.normal(0.0, 0.5, nu)
        # Low-rank taste: a real interaction that id main effects cannot express.
        u_fac = rng.normal(0.0, 1.0, (nu, _TASTE_RANK))
        c_fac = rng.normal(0.0, 1.0, (nc, _TASTE_RANK))
        taste = 0.3 / np.sqrt(_TASTE_RANK) * (u_fac @ c_fac.T)
        category_effect = rng.normal(0.0, 0.35, nc)

        # Authors: popularity drives both exposure and followers; bias is their click pull.
        author_log_pop = rng.normal(0.0, 1.0, na)
        author_bias = 0.1 * author_log_pop + rng.normal(0.0, 0.5, na)
        author_followers_log = np.log1p(np.exp(7.0 + 1.5 * author_log_pop + rng.normal(0, 0.5, na)))
        author_main_category = rng.integers(0, nc, na)
        # Content farms: clickbait and quality are largely an author's trait, as on real feeds,
        # which is also what lets a model learn them from few impressions per video.
        author_clickbait = rng.random(na) < self.clickbait_share
        author_quality = rng.normal(0.0, 0.8, na)

        # Videos.
        video_author = rng.integers(0, na, nv)
        own_category = rng.random(nv) < 0.3
        video_category = np.where(
            own_category, rng.integers(0, nc, nv), author_main_category[video_author]
        )
        video_len_s = np.clip(np.round(np.exp(rng.normal(np.log(30.0), 0.9, nv))), 5.0, 300.0)
        video_base_age_days = rng.exponential(30.0, nv)
        # 80% of a farm's videos are clickbait; others rarely, keeping the overall share.
        share = self.clickbait_share
        other_rate = 0.2 * share / (1.0 - share)
        is_clickbait = rng.random(nv) < np.where(author_clickbait[video_author], 0.8, other_rate)
        quality = np.where(
            is_clickbait,
            rng.normal(-1.8, 0.5, nv),
            author_quality[video_author] + rng.normal(0.0, 0.6, nv),
        )
        # Good videos are only mildly more appealing; clickbait is far more appealing.
        appeal = 0.15 * quality + rng.normal(0.0, 0.45, nv) + np.where(is_clickbait, 1.4, 0.0)
        video_weight = np.exp(0.8 * author_log_pop[video_author] + rng.normal(0.0, 1.8, nv))

        hours = np.arange(24)
        # Evening-heavy traffic with evening-heavy clicking: both peak around 21h.
        hour_phase = np.cos(2.0 * np.pi * (hours - 21) / 24.0)
        hour_weight = 1.0 + 0.7 * hour_phase
        hour_effect = 0.2 * hour_phase

        # Topics and interests come from their own stream, after the rest of the universe.
        interest_rng = np.random.default_rng([self.seed, _INTEREST_STREAM])
        video_topic = video_category * _TOPICS_PER_CATEGORY + interest_rng.integers(
            0, _TOPICS_PER_CATEGORY, nv
        )
        # A stronger, finer interaction than taste, and one that a user's few impressions
        # hardly reveal but their click history does.
        z_user = interest_rng.normal(0.0, 1.0, (nu, _INTEREST_RANK))
        # Mostly the topic's category (which models see), partly the topic itself (its tag).
        z_category = interest_rng.normal(0.0, 1.0, (nc, _INTEREST_RANK))
        z_own = interest_rng.normal(0.0, 1.0, (nc * _TOPICS_PER_CATEGORY, _INTEREST_RANK))
        z_topic = (
            np.sqrt(_INTEREST_CATEGORY_SHARE) * np.repeat(z_category, _TOPICS_PER_CATEGORY, axis=0)
            + np.sqrt(1.0 - _INTEREST_CATEGORY_SHARE) * z_own
        )
        interest = self.interest_scale / np.sqrt(_INTEREST_RANK) * (z_user @ z_topic.T)
        # Some users fall for clickbait far more than others.
        user_bait = _BAIT_SUSCEPTIBILITY * self.interest_scale * interest_rng.normal(0.0, 1.0, nu)
        user_topic = np.repeat(taste, _TOPICS_PER_CATEGORY, axis=1) + interest

        log_offsets, log_video, log_day = _click_log(
            np.random.default_rng([self.seed, _LOG_STREAM]),
            user_weight=np.exp(log_act),
            user_propensity=user_propensity,
            # What the user brings to the click logit, per topic and clickbait or not.
            user_group=(user_topic[:, :, None] + user_bait[:, None, None] * [0.0, 1.0]).reshape(
                nu, -1
            ),
            video_group=video_topic * 2 + is_clickbait,
            # A video's own pull on clicks, as in the click logit of `table`.
            video_logit=_CLICK_BASE
            + appeal
            + author_bias[video_author]
            + category_effect[video_category],
            video_weight=video_weight,
        )
        tag_offsets, tag_values = _video_tags(
            np.random.default_rng([self.seed, _TAG_STREAM]),
            n_tags=self.n_tags,
            n_categories=nc,
            video_topic=video_topic,
            appeal=appeal,
            quality=quality,
        )

        return World(
            user_log_activity=log_act,
            user_weight=np.exp(log_act),
            user_propensity=user_propensity,
            user_patience=user_patience,
            user_like=user_like,
            taste=taste,
            interest=interest,
            user_bait=user_bait,
            category_effect=category_effect,
            author_bias=author_bias,
            author_followers_log=author_followers_log,
            video_author=video_author,
            video_category=video_category,
            video_topic=video_topic,
            video_len_s=video_len_s,
            video_base_age_days=video_base_age_days,
            video_quality=quality,
            video_appeal=appeal,
            video_weight=video_weight,
            is_clickbait=is_clickbait,
            hour_weight=hour_weight / hour_weight.sum(),
            hour_effect=hour_effect,
            log_offsets=log_offsets,
            log_video=log_video,
            log_day=log_day,
            tag_offsets=tag_offsets,
            tag_values=tag_values,
        )

    def table(self, split: str) -> pa.Table:
        """Impressions of ``split`` ("train", "val" or "test") with behaviours and oracles."""
        n = self.split_size(split)
        w = self.world()
        rng = np.random.default_rng([self.seed, _SPLIT_STREAM[split]])

        user = _draw(rng, w.user_weight, n)
        video = _draw(rng, w.video_weight, n)
        hour = rng.choice(24, size=n, p=w.hour_weight)
        device = rng.choice(len(DEVICES), size=n, p=_DEVICE_SHARE)
        lo, hi = _SPLIT_DAYS[split]
        day = rng.uniform(lo, hi, n)
        age = w.video_base_age_days[video] + day

        author = w.video_author[video]
        category = w.video_category[video]
        length = w.video_len_s[video]
        quality = w.video_quality[video]

        click_logit = (
            _CLICK_BASE
            + w.user_propensity[user]
            + w.video_appeal[video]
            + w.author_bias[author]
            + w.category_effect[category]
            + w.taste[user, category]
            + w.interest[user, w.video_topic[video]]
            + w.user_bait[user] * w.is_clickbait[video]
            + w.hour_effect[hour]
            + _DEVICE_EFFECT[device]
            # Fresh videos pull a little more; small, so ids still carry almost everything.
            - 0.1 * np.log1p(age)
        )
        p_click = _sigmoid(click_logit)
        patience = w.user_patience[user]
        q_finish = _sigmoid(0.3 + 1.5 * quality - 1.0 * np.log(length / 30.0) + patience)
        watch_mean = 0.1 + 0.6 * _sigmoid(0.8 * quality + patience)
        like_logit = 0.7 * quality + w.user_like[user]
        q_like_finished = _sigmoid(-1.0 + like_logit)
        q_like_abandoned = _sigmoid(-3.2 + like_logit)

        click = rng.random(n) < p_click
        finish = click & (rng.random(n) < q_finish)
        fraction = rng.beta(
            watch_mean * _WATCH_CONCENTRATION, (1.0 - watch_mean) * _WATCH_CONCENTRATION
        )
        fraction = _WATCH_LO + (_WATCH_HI - _WATCH_LO) * fraction
        watch_s = np.where(finish, length, np.where(click, length * fraction, 0.0))
        q_like = np.where(finish, q_like_finished, q_like_abandoned)
        like = click & (rng.random(n) < q_like)

        mean_fraction = _WATCH_LO + (_WATCH_HI - _WATCH_LO) * watch_mean
        p_finish = p_click * q_finish
        e_watch_s = p_click * length * (q_finish + (1.0 - q_finish) * mean_fraction)
        p_like = p_click * (q_finish * q_like_finished + (1.0 - q_finish) * q_like_abandoned)

        # Missing values are a logging artefact: they blank features, never the truth.
        age_obs = np.where(rng.random(n) < _NAN_AGE_SHARE, np.nan, age)
        followers = w.author_followers_log[author]
        followers_obs = np.where(rng.random(n) < _NAN_FOLLOWERS_SHARE, np.nan, followers)

        columns = {
            "user_id": user.astype(np.int64),
            "video_id": video.astype(np.int64),
            "author_id": author.astype(np.int64),
            "category": category.astype(np.int64),
            "hour": hour.astype(np.int64),
            "device": pa.array(DEVICES, pa.string()).take(pa.array(device.astype(np.int32))),
            "video_len_s": length.astype(np.float32),
            "user_activity": w.user_log_activity[user].astype(np.float32),
            "video_age_days": age_obs.astype(np.float32),
            "author_followers_log": followers_obs.astype(np.float32),
            "click": click.astype(np.int8),
            "finish": finish.astype(np.int8),
            "like": like.astype(np.int8),
            "watch_s": watch_s.astype(np.float32),
            "p_click": p_click.astype(np.float32),
            "p_finish": p_finish.astype(np.float32),
            "p_like": p_like.astype(np.float32),
            "e_watch_s": e_watch_s.astype(np.float32),
            **self._history(w, split, user, day),
            "tags": _list_column(
                w.tag_offsets[video],
                np.diff(w.tag_offsets)[video],
                w.tag_values,
                np.zeros(n, bool),
                names=pa.array([f"t{i}" for i in range(self.n_tags)], pa.string()),
            ),
        }
        return pa.table(columns, schema=SCHEMA)

    def _history(
        self, w: World, split: str, user: np.ndarray, day: np.ndarray
    ) -> dict[str, pa.ChunkedArray]:
        """Each impression's ``hist_videos`` (the user's last clicks before its day, oldest
        first) and ``hist_categories`` (those videos' categories, item by item: the side
        information of each history item, as DIN's click logs pair item and category ids)."""
        n = len(user)
        # The log sorted by (user, day) is sorted by this key too, so one search finds, for
        # every impression, the end of its user's clicks before that day.
        span = _LOG_END_DAY - _LOG_START_DAY
        log_user = np.repeat(np.arange(self.n_users), np.diff(w.log_offsets))
        log_key = log_user * span + (w.log_day - _LOG_START_DAY)
        end = np.searchsorted(log_key, user * span + (day - _LOG_START_DAY), side="left")
        start = np.maximum(w.log_offsets[user], end - self.history_len)
        # Own stream per split: the nulls never shift the draws of the other columns.
        rng = np.random.default_rng([self.seed, _SPLIT_LIST_STREAM + _SPLIT_STREAM[split]])
        null = rng.random(n) < _NULL_HISTORY_SHARE
        length = np.where(null, 0, end - start)
        return {
            "hist_videos": _list_column(start, length, w.log_video, null),
            # Placed after `tags` in the schema: a later column, so every earlier one is kept.
            "hist_categories": _list_column(start, length, w.video_category[w.log_video], null),
        }

    def write(self, folder: str, format: str = "parquet", shards: int = 1) -> dict[str, list[str]]:
        """Write every split as ``folder/<split>/part-XXXXX.<ext>``; return the paths per split.

        ``folder`` may be any fsspec URL. Stale ``part-*`` files of the same format left by an
        earlier write with more shards are removed, so globbing a split never mixes runs.
        """
        if format not in FORMATS:
            raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
        if isinstance(shards, bool) or not isinstance(shards, (int, np.integer)) or shards < 1:
            raise ValueError(f"shards must be a positive integer, got {shards!r}")
        fs, root = fsspec.core.url_to_fs(folder)
        base = folder.rstrip("/")
        root = root.rstrip("/")
        stale = re.compile(rf"part-\d{{5}}\.{format}$")
        paths: dict[str, list[str]] = {}
        for split in SPLITS:
            table = self.table(split)
            fs.makedirs(f"{root}/{split}", exist_ok=True)
            names = [f"part-{i:05d}.{format}" for i in range(shards)]
            for old in fs.ls(f"{root}/{split}", detail=False):
                name = old.rstrip("/").rsplit("/", 1)[-1]
                if stale.fullmatch(name) and name not in names:
                    fs.rm(old)
            bounds = np.linspace(0, table.num_rows, shards + 1).round().astype(int)
            for name, start, stop in zip(names, bounds[:-1], bounds[1:], strict=True):
                part = table.slice(int(start), int(stop - start))
                with fs.open(f"{root}/{split}/{name}", "wb") as f:
                    if format == "parquet":
                        pq.write_table(part, f)
                    else:
                        pacsv.write_csv(csv_compatible(part), f)
            paths[split] = [f"{base}/{split}/{name}" for name in names]
        return paths


def csv_compatible(table: pa.Table) -> pa.Table:
    """``table`` with every list column as strings joined by ``LIST_DELIMITER``, for CSV.

    Arrow's CSV writer has no list type. An empty list becomes ``""`` and a null list stays
    null; Arrow writes the two apart (a quoted ``""`` and an empty field).
    """
    for i, field in enumerate(table.schema):
        if pa.types.is_list(field.type) or pa.types.is_large_list(field.type):
            as_text = table.column(i).cast(pa.list_(pa.string()))
            table = table.set_column(i, field.name, pc.binary_join(as_text, LIST_DELIMITER))
    return table


def _click_log(
    rng: np.random.Generator,
    *,
    user_weight: np.ndarray,
    user_propensity: np.ndarray,
    user_group: np.ndarray,
    video_group: np.ndarray,
    video_logit: np.ndarray,
    video_weight: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every user's clicks from ``_LOG_START_DAY`` to ``_LOG_END_DAY``: offsets, videos, days."""
    n_users, n_groups = user_group.shape
    # Heavy and click-happy users click more often, so their histories are longer.
    propensity = np.exp(user_propensity)
    rate = user_weight / user_weight.mean() * propensity / propensity.mean()
    span = _LOG_END_DAY - _LOG_START_DAY
    counts = rng.poisson(_PAST_CLICKS * span / -_LOG_START_DAY * rate)
    user = np.repeat(np.arange(n_users), counts)
    # A clicked video is drawn by popularity x click probability. For the small click
    # probabilities here sigmoid(user + video) ~ exp(user) * sigmoid(video), which factorises
    # into a group (topic, clickbait or not) per click by the user's terms for it, and a video
    # within it by its own pull: the history reveals the interactions that the click logit uses.
    pull = video_weight * _sigmoid(video_logit)
    group_pull = np.bincount(video_group, weights=pull, minlength=n_groups)
    user_weight_by_group = (np.exp((1.0 + _PAST_PERSONALISATION) * user_group) * group_pull).ravel()
    group = (
        _draw_grouped(rng, user_weight_by_group, np.arange(n_users + 1) * n_groups, user)
        - user * n_groups
    )
    by_group = np.argsort(video_group, kind="stable")
    group_offsets = np.concatenate([[0], np.cumsum(np.bincount(video_group, minlength=n_groups))])
    video = by_group[_draw_grouped(rng, pull[by_group], group_offsets, group)]
    # A user's clicks are exchangeable, so sorted days can be handed out in draw order: one
    # sort of user + uniform in [0, 1) (users already ascend) instead of a lexsort.
    when = np.sort(user + rng.random(len(user)))
    day = _LOG_START_DAY + (when - user) * span
    offsets = np.concatenate([[0], np.cumsum(counts)])
    return offsets, video.astype(np.int64), day


def _video_tags(
    rng: np.random.Generator,
    *,
    n_tags: int,
    n_categories: int,
    video_topic: np.ndarray,
    appeal: np.ndarray,
    quality: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """1-4 distinct tag ids per video: offsets and flat ids (see the module docstring)."""
    n_videos = len(video_topic)
    video_category = video_topic // _TOPICS_PER_CATEGORY
    n_marker = int(n_tags * _MARKER_TAG_SHARE)
    n_topic_tags = n_tags - 2 * n_marker
    # Each category owns a block of topic tags (blocks wrap when tags are fewer).
    per_category = max(1, n_topic_tags // n_categories)

    def own_tag(index: np.ndarray) -> np.ndarray:
        return 2 * n_marker + (video_category * per_category + index) % n_topic_tags

    def extra_tag() -> np.ndarray:
        own = rng.random(n_videos) < _OWN_TOPIC_SHARE
        anywhere = 2 * n_marker + rng.integers(0, n_topic_tags, n_videos)
        return np.where(own, own_tag(rng.integers(0, per_category, n_videos)), anywhere)

    # Noisy markers: most hooky videos (clickbait above all) carry a hook tag and most good
    # ones a quality tag, but not all, and a few others do too. Drawn whatever n_marker is,
    # so the draws do not depend on it.
    hook = rng.random(n_videos) < 0.7 * _sigmoid(3.0 * (appeal - 0.8))
    good = rng.random(n_videos) < 0.7 * _sigmoid(3.0 * (quality - 0.8))
    hook_tag = rng.integers(0, max(n_marker, 1), n_videos)
    good_tag = n_marker + rng.integers(0, max(n_marker, 1), n_videos)
    extra = rng.random((n_videos, 2)) < 0.35
    slots = np.stack(
        [
            # The first tag names the video's topic, so tags reveal what interests act on.
            own_tag(video_topic % _TOPICS_PER_CATEGORY),
            np.where(hook & (n_marker > 0), hook_tag, -1),
            np.where(good & (n_marker > 0), good_tag, -1),
            np.where(extra[:, 0], extra_tag(), -1),
            np.where(extra[:, 1], extra_tag(), -1),
        ],
        axis=1,
    )
    for j in range(1, slots.shape[1]):
        repeated = (slots[:, :j] == slots[:, j : j + 1]).any(axis=1)
        slots[repeated, j] = -1
    keep = (slots >= 0) & (np.cumsum(slots >= 0, axis=1) <= 4)
    offsets = np.concatenate([[0], np.cumsum(keep.sum(axis=1))])
    return offsets, slots[keep].astype(np.int64)


def _list_column(
    start: np.ndarray,
    length: np.ndarray,
    values: np.ndarray,
    null: np.ndarray,
    names: pa.Array | None = None,
) -> pa.ChunkedArray:
    """Row i is ``values[start[i]:start[i] + length[i]]`` (null where ``null``), as a list column.

    ``names`` maps the values (ids) to strings. Chunked so that int32 list offsets never overflow.
    """
    chunks = []
    for lo in range(0, len(start), _LIST_CHUNK_ROWS):
        part = slice(lo, lo + _LIST_CHUNK_ROWS)
        offsets = np.concatenate([[0], np.cumsum(length[part])]).astype(np.int32)
        index = np.repeat(start[part] - offsets[:-1], length[part]) + np.arange(offsets[-1])
        items = values[index]
        flat = pa.array(items) if names is None else names.take(pa.array(items))
        chunks.append(pa.ListArray.from_arrays(offsets, flat, mask=pa.array(null[part])))
    kind = pa.list_(pa.int64() if names is None else pa.string())
    return pa.chunked_array(chunks, kind)


def _draw_grouped(
    rng: np.random.Generator, weight: np.ndarray, offsets: np.ndarray, group: np.ndarray
) -> np.ndarray:
    """One index per entry of ``group``, drawn in ``offsets[g]:offsets[g + 1]`` by ``weight``.

    Every drawn group must have positive total weight; zero-weight entries are never drawn.
    """
    cdf = np.cumsum(weight)
    below = np.concatenate([[0.0], cdf])
    lo, hi = below[offsets[group]], below[offsets[group + 1]]
    index = np.searchsorted(cdf, lo + rng.random(len(group)) * (hi - lo), side="right")
    # Round-off at a group's edge must not leak into its neighbour.
    return np.clip(index, offsets[group], offsets[group + 1] - 1)


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


def _draw(rng: np.random.Generator, weight: np.ndarray, n: int) -> np.ndarray:
    # Inverse-CDF sampling on raw weights: no normalisation, so no "p must sum to 1" failures
    # from float round-off on heavy-tailed weights.
    cdf = np.cumsum(weight)
    return np.searchsorted(cdf, rng.random(n) * cdf[-1], side="right").clip(max=len(weight) - 1)


def main(argv: Sequence[str] | None = None) -> dict[str, list[str]]:
    """CLI: write the three splits to ``OUT_FOLDER`` for benchmarks or ``data=files``."""
    parser = argparse.ArgumentParser(
        prog="python -m train.data.synthetic",
        description="Write a synthetic short-video feed (train/val/test) as parquet or csv.",
    )
    parser.add_argument("out_folder", help="output folder (local path or any fsspec URL)")
    parser.add_argument(
        "--rows",
        type=int,
        default=FeedSimulator.n_train,
        help="train rows; val/test keep their ratio to train (default %(default)s)",
    )
    parser.add_argument("--shards", type=int, default=1, help="files per split")
    parser.add_argument("--format", choices=FORMATS, default="parquet")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.rows < 1:
        parser.error("--rows must be a positive integer")
    if args.shards < 1:
        parser.error("--shards must be a positive integer")

    default = FeedSimulator()
    scale = args.rows / default.n_train
    sim = FeedSimulator(
        n_train=args.rows,
        n_val=max(1, round(default.n_val * scale)),
        n_test=max(1, round(default.n_test * scale)),
        seed=args.seed,
    )
    paths = sim.write(args.out_folder, format=args.format, shards=args.shards)
    for split, files in paths.items():
        print(
            f"{split}: {sim.split_size(split)} rows in {len(files)} file(s) under "
            f"{args.out_folder.rstrip('/')}/{split}/"
        )
    return paths


if __name__ == "__main__":
    main()
