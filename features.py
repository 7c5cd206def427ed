"""Tables -> model inputs: vocabularies, user and post features, post statistics, the training set.

Times are int64 seconds since the Unix epoch everywhere below. Leakage rules, each tested:
- a history used for an event or a request at time t holds only events with timestamp < t;
- every aggregate (post statistics) is computed from the events before the given cutoff only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from histories import ACTION_LIKE, Histories, histories_from_rows
from times import DAY_SECONDS, to_seconds

UNKNOWN = "<unk>"  # index 0 of every vocabulary: a category never seen in training lands here
USER_CATEGORICALS = ("gender", "country", "city", "exp_group", "os", "source", "age_bucket")
AGE_BUCKETS = np.array([18, 22, 26, 30, 35, 40, 50, 60])  # right edges; 9 buckets
POST_STAT_NAMES = (
    "log_views_per_day",
    "log_likes_per_day",
    "like_rate",
    "log_views_per_day_7d",
    "log_likes_per_day_7d",
)
RECENT_DAYS = 7  # the recent window of the post statistics: exposure drifts over weeks
LIKE_RATE_PRIOR_VIEWS = 20.0  # shrink the like rate of rarely seen posts / users towards a prior rate
PRIOR_LIKE_RATE = 0.12  # a typical share of liked views, the prior of a user's like rate


# ----------------------------------------------------------------------------- request time and vocabularies


def time_features(seconds: np.ndarray) -> np.ndarray:
    """[n, 4] float32: hour of day and day of week on the unit circle (the request-time features)."""
    seconds = np.asarray(seconds, dtype=np.int64)
    angles = np.empty((len(seconds), 2))
    angles[:, 0] = (seconds % DAY_SECONDS) * (2 * np.pi / DAY_SECONDS)  # hour of day
    angles[:, 1] = ((seconds // DAY_SECONDS + 3) % 7) * (2 * np.pi / 7)  # 1970-01-01 was a Thursday
    out = np.empty((len(seconds), 4), dtype=np.float32)
    out[:, :2], out[:, 2:] = np.sin(angles), np.cos(angles)
    return out


def build_vocab(values: pd.Series, *, min_count: int = 1) -> list[str]:
    """Categories seen at least min_count times, most frequent first, after the UNKNOWN bucket."""
    counts = values.astype(str).value_counts(sort=False)
    counts = counts[counts >= min_count]
    ordered = counts.sort_index().sort_values(ascending=False, kind="stable")
    return [UNKNOWN, *ordered.index.tolist()]


def encode(values: pd.Series | np.ndarray, vocab: list[str]) -> np.ndarray:
    """Category strings -> int64 indices into vocab; unseen values -> 0 (UNKNOWN)."""
    return pd.Index(vocab).get_indexer(pd.Series(values).astype(str)).clip(min=0).astype(np.int64)


def age_bucket(age: pd.Series | np.ndarray) -> np.ndarray:
    return np.searchsorted(AGE_BUCKETS, np.asarray(age), side="right").astype(str)


# ----------------------------------------------------------------------------- users


@dataclass
class UserFeatures:
    """Static user features, rows aligned with user_ids (sorted ascending)."""

    user_ids: np.ndarray  # int64 [n_users], sorted
    categorical: np.ndarray  # int64 [n_users, len(USER_CATEGORICALS)]
    numeric: np.ndarray  # float32 [n_users, 1] (standardised age)

    def index_of(self, user_ids: np.ndarray) -> np.ndarray:
        """Row index of each user id; -1 where the id is unknown."""
        return lookup(self.user_ids, user_ids)


def fit_user_vocabs(users: pd.DataFrame, *, min_city_count: int = 3) -> dict[str, list[str]]:
    """Vocabularies for the user categoricals; rare cities share the UNKNOWN bucket."""
    frame = users.assign(age_bucket=age_bucket(users["age"]))
    return {
        name: build_vocab(frame[name], min_count=min_city_count if name == "city" else 1)
        for name in USER_CATEGORICALS
    }


def fit_age_scaler(users: pd.DataFrame) -> tuple[float, float]:
    age = users["age"].to_numpy(dtype=np.float64)
    return float(age.mean()), float(age.std() or 1.0)


def user_features(
    users: pd.DataFrame, vocabs: dict[str, list[str]], age_scaler: tuple[float, float]
) -> UserFeatures:
    frame = users.sort_values("user_id").assign(age_bucket=lambda f: age_bucket(f["age"]))
    categorical = np.stack([encode(frame[name], vocabs[name]) for name in USER_CATEGORICALS], axis=1)
    mean, std = age_scaler
    numeric = ((frame["age"].to_numpy(dtype=np.float32) - mean) / std)[:, None].astype(np.float32)
    return UserFeatures(frame["user_id"].to_numpy(dtype=np.int64), categorical, numeric)


def lookup(sorted_ids: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Position of each id in sorted_ids, -1 where absent."""
    ids = np.asarray(ids, dtype=np.int64)
    if len(sorted_ids) == 0:
        return np.full(len(ids), -1, dtype=np.int64)
    pos = np.searchsorted(sorted_ids, ids).clip(max=len(sorted_ids) - 1)
    return np.where(sorted_ids[pos] == ids, pos, -1)


# ----------------------------------------------------------------------------- posts


def post_stats_from_counts(
    n_views: np.ndarray,
    n_likes: np.ndarray,
    recent_views: np.ndarray,
    recent_likes: np.ndarray,
    *,
    window_days: float,
) -> np.ndarray:
    """[n_posts, 5] float32 (POST_STAT_NAMES) from each post's view and like counts: over the whole
    window (window_days long) and over its last RECENT_DAYS (a post's current exposure).

    Counts become rates per day, so statistics from windows of different lengths are comparable; the
    like rate is shrunk towards the window's overall rate. A post never seen has zero counts.
    """
    n_views, n_likes = np.asarray(n_views, np.float64), np.asarray(n_likes, np.float64)
    global_rate = n_likes.sum() / max(n_views.sum(), 1.0)
    like_rate = (n_likes + LIKE_RATE_PRIOR_VIEWS * global_rate) / (n_views + LIKE_RATE_PRIOR_VIEWS)
    stats = np.stack(
        [
            np.log1p(n_views / window_days),
            np.log1p(n_likes / window_days),
            like_rate,
            np.log1p(np.asarray(recent_views, np.float64) / RECENT_DAYS),
            np.log1p(np.asarray(recent_likes, np.float64) / RECENT_DAYS),
        ],
        axis=1,
    )
    return stats.astype(np.float32)


def post_counts(
    post_rows: np.ndarray, is_like: np.ndarray, seconds: np.ndarray, n_posts: int, *, cutoff: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(views, likes, recent views, recent likes) per post row from events strictly before `cutoff`;
    recent = the RECENT_DAYS before it. Rows < 0 (unknown posts) are ignored."""
    before = (seconds < cutoff) & (post_rows >= 0)
    recent = before & (seconds >= cutoff - RECENT_DAYS * DAY_SECONDS)
    return tuple(  # type: ignore[return-value]
        np.bincount(post_rows[window & like_or_not], minlength=n_posts)
        for window in (before, recent)
        for like_or_not in (~is_like, is_like)
    )


def window_days(first: int, cutoff: int) -> float:
    """The length of the statistics' window in days (at least one)."""
    return max((cutoff - first) / DAY_SECONDS, 1.0)


def post_statistics(
    feed: pd.DataFrame, post_ids: np.ndarray, *, cutoff: int, first: int | None = None
) -> np.ndarray:
    """[n_posts, 5] float32 (POST_STAT_NAMES) from the feed's events strictly before `cutoff` only; the
    window starts at `first` (default: the first event)."""
    seconds = to_seconds(feed["timestamp"])
    before = seconds < cutoff
    if first is None:
        first = int(seconds[before].min()) if before.any() else cutoff
    counts = post_counts(
        lookup(post_ids, feed["post_id"].to_numpy()),
        feed["action"].to_numpy() == "like",
        seconds,
        len(post_ids),
        cutoff=cutoff,
    )
    return post_stats_from_counts(*counts, window_days=window_days(first, cutoff))


def fit_scaler(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mean = matrix.mean(axis=0)
    std = matrix.std(axis=0)
    return mean.astype(np.float32), np.where(std > 0, std, 1.0).astype(np.float32)


def build_user_histories(feed: pd.DataFrame, user_ids: np.ndarray, post_ids: np.ndarray) -> Histories:
    """Views and likes per user, in time order, as Histories (rows follow user_ids, sorted ascending).

    A view's `target` is not used: it reveals a like that may happen after the history's cutoff. The
    like itself enters as its own event at its own time. Events naming an unknown user or post are
    dropped.
    """
    user_rows = lookup(user_ids, feed["user_id"].to_numpy())
    post_rows = lookup(post_ids, feed["post_id"].to_numpy())
    keep = (user_rows >= 0) & (post_rows >= 0)
    is_like = feed["action"].to_numpy()[keep] == "like"
    seconds = to_seconds(feed["timestamp"])[keep]
    return histories_from_rows(user_rows[keep], post_rows[keep], seconds, is_like, len(user_ids))


# ----------------------------------------------------------------------------- the training set


@dataclass
class Interactions:
    """(user row, post row, time, label) samples; labels are like targets of views, or 1 for likes."""

    user_rows: np.ndarray  # int64
    post_rows: np.ndarray  # int64
    times: np.ndarray  # int64 seconds
    labels: np.ndarray  # float32

    def __len__(self) -> int:
        return len(self.user_rows)

    def subset(self, index: np.ndarray) -> Interactions:
        return Interactions(
            self.user_rows[index], self.post_rows[index], self.times[index], self.labels[index]
        )

    def sample(self, n: int, *, seed: int = 0) -> Interactions:
        """At most n samples, drawn without replacement, kept in their original order."""
        if len(self) <= n:
            return self
        return self.subset(np.sort(np.random.default_rng(seed).choice(len(self), n, replace=False)))


@dataclass
class Dataset:
    """Everything the model trains and is evaluated on, in three windows by time (seconds):
    training [start, val_cutoff), validation [val_cutoff, cutoff), test [cutoff, end]."""

    start: int
    val_cutoff: int
    cutoff: int
    end: int
    vocabs: dict[str, list[str]]  # user categoricals and "topic"
    age_scaler: tuple[float, float]
    users: UserFeatures
    post_ids: np.ndarray  # int64, sorted
    post_topic: np.ndarray  # int64 topic index per post row
    post_stats: np.ndarray  # float32 [n_posts, len(POST_STAT_NAMES)], standardised, training window only
    stats_scaler: tuple[np.ndarray, np.ndarray]
    histories: Histories  # all events, every window (windows never look past their time)
    train_views: Interactions
    train_likes: Interactions  # the liked views of the training window, at their view time
    val_views: Interactions
    test_views: Interactions

    def window(self, name: str) -> tuple[int, int, Interactions]:
        """(cutoff, end, views) of the "validation" or "test" window: scored at its cutoff, from the
        events before it; its views and likes are those in [cutoff, end)."""
        if name == "validation":
            return self.val_cutoff, self.cutoff, self.val_views
        if name == "test":
            return self.cutoff, self.end + 1, self.test_views
        raise ValueError(f"unknown window {name!r}: 'validation' or 'test'")

    def post_stats_by_day(self, until: int) -> np.ndarray:
        """[n_days, n_posts, n_post_stats] standardised: row k = post_stats_at(start + k days), for every
        day start up to `until`. Training reads each sample's statistics at the start of its day."""
        h, n_posts = self.histories, len(self.post_ids)
        n_days = (until - self.start) // DAY_SECONDS + 1
        day = (h.ev_time - self.start) // DAY_SECONDS
        keep = day < n_days - 1  # row k counts the days before k
        is_like = h.ev_action == ACTION_LIKE

        def before_each_day(mask: np.ndarray) -> np.ndarray:
            cells = np.bincount(day[mask] * n_posts + h.ev_post[mask], minlength=n_days * n_posts)
            daily = cells.reshape(n_days, n_posts)
            return np.concatenate([np.zeros((1, n_posts)), np.cumsum(daily, axis=0)[:-1]])

        views, likes = before_each_day(keep & ~is_like), before_each_day(keep & is_like)
        week_ago = np.maximum(np.arange(n_days) - RECENT_DAYS, 0)
        raw = np.stack(
            [
                post_stats_from_counts(
                    views[k],
                    likes[k],
                    views[k] - views[week_ago[k]],
                    likes[k] - likes[week_ago[k]],
                    window_days=window_days(self.start, self.start + k * DAY_SECONDS),
                )
                for k in range(n_days)
            ]
        )
        return ((raw - self.stats_scaler[0]) / self.stats_scaler[1]).astype(np.float32)

    def post_stats_at(self, cutoff: int) -> np.ndarray:
        """The standardised post statistics from the events before `cutoff` (the training window's at
        val_cutoff; later cutoffs see the later events, as the service does)."""
        h = self.histories
        counts = post_counts(
            h.ev_post, h.ev_action == ACTION_LIKE, h.ev_time, len(self.post_ids), cutoff=cutoff
        )
        raw = post_stats_from_counts(*counts, window_days=window_days(self.start, cutoff))
        return ((raw - self.stats_scaler[0]) / self.stats_scaler[1]).astype(np.float32)


class NotEnoughDataError(ValueError):
    """The tables are too small for the settings; the message names the setting to change and the minimum
    the data must have (main_script prints it as one line, exit code 2)."""


MIN_WINDOW_LIKES = 20  # below this many likes a window's ranking metrics are noise (warned, not refused)


def split_windows(feed: pd.DataFrame, *, test_days: float, val_days: float) -> tuple[int, int, int, int]:
    """(start, val_cutoff, cutoff, end) seconds: the last test_days of the feed are the test window, the
    val_days before them the validation window, the rest the training window."""
    seconds = to_seconds(feed["timestamp"])
    if not len(seconds):
        raise NotEnoughDataError("the feed is empty: nothing to train on")
    start, end = int(seconds.min()), int(seconds.max())
    cutoff = end - int(test_days * DAY_SECONDS)
    val_cutoff = cutoff - int(val_days * DAY_SECONDS)
    if start >= val_cutoff:
        span = (end - start) / DAY_SECONDS
        raise NotEnoughDataError(
            f"the feed spans {span:.1f} days, not more than TEST_DAYS={test_days:g} + VAL_DAYS={val_days:g}: "
            f"no training window is left; lower TEST_DAYS and VAL_DAYS (e.g. TEST_DAYS={span / 4:.2g} "
            f"VAL_DAYS={span / 8:.2g}) or import a longer feed"
        )
    return start, val_cutoff, cutoff, end


def thin_windows(data: Dataset, *, minimum: int = MIN_WINDOW_LIKES) -> list[str]:
    """Warnings for windows that hold too few liked views to choose or report anything reliably."""
    windows = (
        ("training", data.train_views, "the training window"),
        ("validation", data.val_views, "VAL_DAYS"),
        ("test", data.test_views, "TEST_DAYS"),
    )
    out = []
    for name, views, setting in windows:
        likes = int(views.labels.sum())
        if likes < minimum:
            fix = (
                "import more feed rows" if name == "training" else f"widen {setting} or import more feed rows"
            )
            out.append(
                f"the {name} window holds {len(views):,} views and {likes:,} liked ones (fewer than "
                f"{minimum}): its metrics are noise; {fix}"
            )
    return out


def _interactions(frame: pd.DataFrame, users: UserFeatures, post_ids: np.ndarray, labels: np.ndarray):
    user_rows, post_rows = (
        users.index_of(frame["user_id"].to_numpy()),
        lookup(post_ids, frame["post_id"].to_numpy()),
    )
    known = (user_rows >= 0) & (post_rows >= 0)
    return Interactions(
        user_rows[known],
        post_rows[known],
        to_seconds(frame["timestamp"])[known],
        labels[known].astype(np.float32),
    )


def build_dataset(
    users: pd.DataFrame,
    posts: pd.DataFrame,
    feed: pd.DataFrame,
    *,
    test_days: float = 14.0,
    val_days: float = 7.0,
    train_sample: int = 1_500_000,
    test_sample: int = 300_000,
    label_margin_s: int = 3600,
    seed: int = 0,
    vocabs: dict[str, list[str]] | None = None,
    age_scaler: tuple[float, float] | None = None,
    stats_scaler: tuple[np.ndarray, np.ndarray] | None = None,
) -> Dataset:
    """Vocabularies, features, histories and the three windows, all fitted on the training window.

    Training views end label_margin_s before val_cutoff, validation views label_margin_s before the
    cutoff, so no label of theirs depends on a like that happened in a later window. Pass vocabs and
    scalers of a trained model to rebuild its inputs exactly.
    """
    start, val_cutoff, cutoff, end = split_windows(feed, test_days=test_days, val_days=val_days)
    seconds = to_seconds(feed["timestamp"])
    if vocabs is None:
        vocabs = fit_user_vocabs(users) | {"topic": build_vocab(posts["topic"])}
    age_scaler = age_scaler or fit_age_scaler(users)
    user_table = user_features(users, vocabs, age_scaler)
    post_frame = posts.sort_values("post_id")
    post_ids = post_frame["post_id"].to_numpy(dtype=np.int64)
    raw_stats = post_statistics(feed, post_ids, cutoff=val_cutoff)
    stats_scaler = stats_scaler or fit_scaler(raw_stats)
    histories = build_user_histories(feed, user_table.user_ids, post_ids)

    views = (feed["action"] == "view").to_numpy()
    targets = feed["target"].fillna(0).to_numpy(dtype=np.float32)

    def window_views(rows: np.ndarray) -> Interactions:
        return _interactions(feed[rows], user_table, post_ids, targets[rows])

    # Likes are taken at the time of the view they follow: a like row's own history would already hold
    # that view, and the model would learn "the post just seen is the one liked".
    train_views = window_views(views & (seconds < val_cutoff - label_margin_s))
    return Dataset(
        start=start,
        val_cutoff=val_cutoff,
        cutoff=cutoff,
        end=end,
        vocabs=vocabs,
        age_scaler=age_scaler,
        users=user_table,
        post_ids=post_ids,
        post_topic=encode(post_frame["topic"], vocabs["topic"]),
        post_stats=(raw_stats - stats_scaler[0]) / stats_scaler[1],
        stats_scaler=stats_scaler,
        histories=histories,
        train_views=train_views.sample(train_sample, seed=seed),
        train_likes=train_views.subset(np.flatnonzero(train_views.labels == 1)),
        val_views=window_views(views & (seconds >= val_cutoff) & (seconds < cutoff - label_margin_s)).sample(
            test_sample, seed=seed + 2
        ),
        test_views=window_views(views & (seconds >= cutoff)).sample(test_sample, seed=seed + 1),
    )
