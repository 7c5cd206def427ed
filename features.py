"""Tables -> model inputs: vocabularies, user and post features, user histories. Plain numpy, vectorised.

Times are int64 seconds since the Unix epoch everywhere below. Leakage rules, each tested:
- a history used for an event or a request at time t holds only events with timestamp < t;
- every aggregate (post statistics) is computed from the events before the given cutoff only.
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import ClassVar

import numpy as np
import pandas as pd

TIME_FORMAT = "%Y-%m-%d %H:%M:%S"  # the feed's timestamps and the API's `time`: naive, one-second steps
TIME_HINT = "YYYY-mm-dd HH:MM:SS"
TIME_RANGE = ("1678-01-01 00:00:00", "2261-12-31 23:59:59")  # inside datetime64[ns], which pandas uses
_YEAR = r"(?:16(?:7[89]|[89]\d)|1[7-9]\d\d|2[01]\d\d|22(?:[0-5]\d|6[01]))"  # 1678..2261
_LEAP_YEAR = (  # the leap years among them: 1700, 1800, 1900, 2100 and 2200 are not, 2000 is
    r"(?:16(?:8[048]|9[26])|(?:1[7-9]|2[01])(?:0[48]|[2468][048]|[13579][26])|2000"
    r"|22(?:0[48]|[24][048]|[13][26]|5[26]|60))"
)
# Exactly the strings parse_time accepts (a test walks every day of the range), for the OpenAPI schema.
TIME_PATTERN = (
    rf"^(?:{_YEAR}-(?:(?:0[13578]|1[02])-(?:0[1-9]|[12]\d|3[01])|(?:0[469]|11)-(?:0[1-9]|[12]\d|30)"
    rf"|02-(?:0[1-9]|1\d|2[0-8]))|{_LEAP_YEAR}-02-29) (?:[01]\d|2[0-3]):[0-5]\d:[0-5]\d$"
)
_EPOCH = datetime(1970, 1, 1)
_TIME_DIGITS = re.compile(r"(\d{4})-(\d{2})-(\d{2}) (\d{2}):(\d{2}):(\d{2})", re.ASCII)
_FIRST, _LAST = (datetime.strptime(t, TIME_FORMAT) for t in TIME_RANGE)
UNKNOWN = "<unk>"  # index 0 of every vocabulary: a category never seen in training lands here
USER_CATEGORICALS = ("gender", "country", "city", "exp_group", "os", "source", "age_bucket")
AGE_BUCKETS = np.array([18, 22, 26, 30, 35, 40, 50, 60])  # right edges; 9 buckets
RECENCY_BUCKETS = np.array([60, 600, 3600, 3 * 3600, 12 * 3600, 86400, 3 * 86400, 7 * 86400, 21 * 86400])
ACTION_VIEW, ACTION_LIKE = 0, 1
POST_STAT_NAMES = (
    "log_views_per_day",
    "log_likes_per_day",
    "like_rate",
    "log_views_per_day_7d",
    "log_likes_per_day_7d",
)
DAY_SECONDS = 86_400
RECENT_DAYS = 7  # the recent window of the post statistics: exposure drifts over weeks
LIKE_RATE_PRIOR_VIEWS = 20.0  # shrink the like rate of rarely seen posts / users towards a prior rate
PRIOR_LIKE_RATE = 0.12  # a typical share of liked views, the prior of a user's like rate


# ----------------------------------------------------------------------------- time and vocabularies


def to_seconds(timestamps: pd.Series | np.ndarray | pd.DatetimeIndex) -> np.ndarray:
    """datetime64 values -> int64 seconds since the epoch."""
    values = np.asarray(timestamps, dtype="datetime64[ns]")
    assert not np.isnat(values).any(), "timestamps must not be missing"
    return values.astype("datetime64[s]").astype(np.int64)


def parse_time(value: str) -> int:
    """'YYYY-mm-dd HH:MM:SS' in TIME_RANGE -> int64 seconds since the epoch; ValueError otherwise.

    Accepts exactly what TIME_PATTERN describes (a test walks every day of the range), by a shorter
    route: the digits' layout, then datetime's own calendar check, then the range."""
    digits = _TIME_DIGITS.fullmatch(value)
    try:
        moment = datetime(*map(int, digits.groups()))  # type: ignore[union-attr]
        if not _FIRST <= moment <= _LAST:
            raise ValueError(value)
    except (AttributeError, ValueError):
        raise ValueError(
            f"{value!r} is not a time {TIME_HINT} between {TIME_RANGE[0]} and {TIME_RANGE[1]}"
        ) from None
    return (moment - _EPOCH) // timedelta(seconds=1)


def format_time(seconds: int) -> str:
    """int64 seconds since the epoch -> 'YYYY-mm-dd HH:MM:SS'."""
    return (_EPOCH + timedelta(seconds=int(seconds))).strftime(TIME_FORMAT)


def clean_text(text: object) -> str:
    """None and NaN (a missing value in pandas) become "", so they embed as an empty text; else str()."""
    if text is None or (isinstance(text, float) and math.isnan(text)):
        return ""
    return str(text)


def text_key(text: str) -> str:
    """Hex SHA-256 of the text: the cache key, so an edited post text is embedded again.

    Hex, not the raw digest: numpy's fixed-width bytes drop trailing NUL bytes, which would lose keys.
    """
    return hashlib.sha256(text.encode("utf-8", errors="surrogatepass")).hexdigest()


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
    recent = before & (seconds >= cutoff - RECENT_DAYS * 86400)
    return tuple(  # type: ignore[return-value]
        np.bincount(post_rows[window & like_or_not], minlength=n_posts)
        for window in (before, recent)
        for like_or_not in (~is_like, is_like)
    )


def window_days(first: int, cutoff: int) -> float:
    """The length of the statistics' window in days (at least one)."""
    return max((cutoff - first) / 86400.0, 1.0)


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


# ----------------------------------------------------------------------------- histories


@dataclass
class Histories:
    """Every user's events in time order, as flat arrays (CSR by user row).

    Events of user row u are ev_*[user_ptr[u]:user_ptr[u + 1]], sorted by time. ev_seen / ev_liked count
    the user's events / likes up to and including each event over the WHOLE history, so they stay right
    in a subset of the events (select). `likes` holds the like events alone (all of them): the
    long-term memory the user tower reads beside the recent events, and the serving exclusions.
    """

    user_ptr: np.ndarray  # int64 [n_users + 1]
    ev_time: np.ndarray  # int64 seconds
    ev_post: np.ndarray  # int32 post row
    ev_action: np.ndarray  # int8: ACTION_VIEW | ACTION_LIKE
    ev_seen: np.ndarray  # int32
    ev_liked: np.ndarray  # int32
    likes: Histories | None = None

    @property
    def n_events(self) -> int:
        return len(self.ev_time)

    @property
    def n_users(self) -> int:
        return len(self.user_ptr) - 1

    @classmethod
    def empty(cls, n_users: int) -> Histories:
        """No events for n_users users (and no likes)."""
        histories = cls(
            np.zeros(n_users + 1, np.int64),
            *(np.zeros(0, t) for t in (np.int64, np.int32)),
            np.zeros(0, np.int8),
            np.zeros(0, np.int32),
            np.zeros(0, np.int32),
        )
        histories.likes = cls(*(getattr(histories, name) for name in cls.ARRAYS))
        return histories

    def owner(self) -> np.ndarray:
        """The user row of every event."""
        return np.repeat(np.arange(self.n_users), np.diff(self.user_ptr))

    def last_before(self, user_rows: np.ndarray, times: np.ndarray) -> np.ndarray:
        """Per query, the index one past the user's last event with time < the query time."""
        user_rows = np.asarray(user_rows, dtype=np.int64)
        times = np.asarray(times, dtype=np.int64)
        lo, hi = self.user_ptr[user_rows].copy(), self.user_ptr[user_rows + 1].copy()
        if len(user_rows) <= 8:  # the serving path: a direct search per query beats the vectorised loop
            return np.array(
                [s + np.searchsorted(self.ev_time[s:e], t) for s, e, t in zip(lo, hi, times, strict=True)],
                dtype=np.int64,
            )
        # Binary search inside each user's segment, all queries at once: O(log n) numpy steps.
        while self.n_events:
            active = lo < hi
            if not active.any():
                break
            mid = (lo + hi) // 2
            go_right = active & (self.ev_time[np.minimum(mid, self.n_events - 1)] < times)
            lo = np.where(go_right, mid + 1, lo)
            hi = np.where(active & ~go_right, mid, hi)
        return lo

    def window(
        self, user_rows: np.ndarray, times: np.ndarray, max_history: int
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """The last max_history events strictly before each (user, time), oldest first, right-aligned.

        Returns post rows [n, H] (int64), actions [n, H] (int64), recency buckets [n, H] (int64) and
        the validity mask [n, H] (bool); padded slots are masked and hold zeros.
        """
        user_rows = np.asarray(user_rows, dtype=np.int64)
        times = np.asarray(times, dtype=np.int64)
        return _window(times, *self.last_events(user_rows, times, max_history))

    def last_events(
        self, user_rows: np.ndarray, times: np.ndarray, k: int, *, valid: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(times, post rows, actions, mask), each [n, k]: the last k events strictly before each time,
        oldest first, right-aligned; masked slots hold zeros. Rows where `valid` is False get none."""
        end = self.last_before(user_rows, times)
        index = end[:, None] - k + np.arange(k)[None, :]
        mask = index >= self.user_ptr[user_rows][:, None]
        if valid is not None:
            mask &= valid[:, None]
        if self.n_events == 0:
            zeros = np.zeros(mask.shape, dtype=np.int64)
            return zeros, zeros, zeros, mask
        safe = np.where(mask, index, 0)
        return (
            np.where(mask, self.ev_time[safe], 0),
            np.where(mask, self.ev_post[safe], 0).astype(np.int64),
            np.where(mask, self.ev_action[safe], 0).astype(np.int64),
            mask,
        )

    def counts_before(self, user_rows: np.ndarray, times: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(events, likes) each user had strictly before each time, over the whole history."""
        user_rows = np.asarray(user_rows, dtype=np.int64)
        end = self.last_before(user_rows, times)
        has_any = end > self.user_ptr[user_rows]
        last = np.maximum(end - 1, 0)
        if self.n_events == 0:
            return np.zeros(len(end), np.int64), np.zeros(len(end), np.int64)
        return (
            np.where(has_any, self.ev_seen[last], 0).astype(np.int64),
            np.where(has_any, self.ev_liked[last], 0).astype(np.int64),
        )

    def recent(self, user_row: int, time: int, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, int, int]:
        """One user's last k events strictly before `time`, oldest first, unpadded: (times, post rows,
        actions), and the whole-history (events, likes) counts before it. The serving path's window."""
        start, stop = self.user_ptr[user_row], self.user_ptr[user_row + 1]
        end = start + int(np.searchsorted(self.ev_time[start:stop], time))
        low = max(start, end - k)
        counts = (int(self.ev_seen[end - 1]), int(self.ev_liked[end - 1])) if end > start else (0, 0)
        return self.ev_time[low:end], self.ev_post[low:end], self.ev_action[low:end], *counts

    def posts_before(self, user_row: int, time: int) -> np.ndarray:
        """Post rows of the user's events strictly before `time` (on `likes`: the posts liked before it)."""
        start, end = self.user_ptr[user_row], self.user_ptr[user_row + 1]
        stop = start + np.searchsorted(self.ev_time[start:end], time, side="left")
        return self.ev_post[start:stop]

    ARRAYS: ClassVar[tuple[str, ...]] = ("user_ptr", "ev_time", "ev_post", "ev_action", "ev_seen", "ev_liked")

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Plain arrays (the model file's serving snapshot); the likes under "likes_" names."""
        arrays = {name: getattr(self, name) for name in self.ARRAYS}
        if self.likes is not None:
            arrays |= {f"likes_{name}": getattr(self.likes, name) for name in self.ARRAYS}
        return arrays

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> Histories:
        histories = cls(*(np.asarray(arrays[name]) for name in cls.ARRAYS))
        if "likes_user_ptr" in arrays:
            histories.likes = cls(*(np.asarray(arrays[f"likes_{name}"]) for name in cls.ARRAYS))
        return histories

    def select(self, keep: np.ndarray) -> Histories:
        """The events where keep is True (counts stay those of the whole history)."""
        counts = np.bincount(self.owner()[keep], minlength=self.n_users)
        return Histories(
            np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
            self.ev_time[keep],
            self.ev_post[keep],
            self.ev_action[keep],
            self.ev_seen[keep],
            self.ev_liked[keep],
            self.likes,
        )


def _window(
    times: np.ndarray, ev_time: np.ndarray, posts: np.ndarray, actions: np.ndarray, mask: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(posts, actions, recency buckets, mask) of last_events' output, the user tower's history inputs."""
    age = times[:, None] - ev_time
    recency = np.where(mask, np.searchsorted(RECENCY_BUCKETS, age, side="right"), 0).astype(np.int64)
    return posts, actions, recency, mask


class LayeredHistories:
    """A snapshot's Histories and a delta's, read as one (the serving state: the model file's events, and
    the feed rows merged since). The delta may have more users (users added after training) and events
    older than the snapshot's last ones (late rows); at equal times snapshot events come first, like
    after view. Offers what make_user_batch and the exclusions read: window, counts_before,
    posts_before, likes.
    """

    def __init__(self, base: Histories, delta: Histories) -> None:
        assert delta.n_users >= base.n_users, "the delta covers every user of the snapshot"
        self.base, self.delta = base, delta
        both = base.likes is not None and delta.likes is not None
        self.likes = LayeredHistories(base.likes, delta.likes) if both else None

    @property
    def n_users(self) -> int:
        return self.delta.n_users

    def _in_base(self, user_rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        inside = user_rows < self.base.n_users
        return np.where(inside, user_rows, 0), inside

    def window(
        self, user_rows: np.ndarray, times: np.ndarray, max_history: int
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Histories.window over both layers."""
        user_rows = np.asarray(user_rows, dtype=np.int64)
        times = np.asarray(times, dtype=np.int64)
        base_rows, inside = self._in_base(user_rows)
        base = self.base.last_events(base_rows, times, max_history, valid=inside)
        delta = self.delta.last_events(user_rows, times, max_history)
        if not delta[3].any():  # the usual case: nothing merged since the snapshot for these users
            return _window(times, *base)
        ev_time, posts, actions, mask = (
            np.concatenate(pair, axis=1) for pair in zip(base, delta, strict=True)
        )
        layer = np.repeat([0, 1], max_history)[None, :]
        key = np.where(mask, ev_time * 4 + actions * 2 + layer, np.iinfo(np.int64).min)
        last = np.argsort(key, axis=1, kind="stable")[:, -max_history:]
        picked = (np.take_along_axis(part, last, axis=1) for part in (ev_time, posts, actions, mask))
        return _window(times, *picked)

    def counts_before(self, user_rows: np.ndarray, times: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        user_rows = np.asarray(user_rows, dtype=np.int64)
        base_rows, inside = self._in_base(user_rows)
        base_events, base_likes = self.base.counts_before(base_rows, times)
        events, likes = self.delta.counts_before(user_rows, times)
        return events + np.where(inside, base_events, 0), likes + np.where(inside, base_likes, 0)

    def recent(self, user_row: int, time: int, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, int, int]:
        """Histories.recent over both layers (at equal times snapshot events first, like after view)."""
        delta = self.delta.recent(user_row, time, k)
        if user_row >= self.base.n_users:
            return delta
        base = self.base.recent(user_row, time, k)
        if not len(delta[0]):
            return (*base[:3], base[3] + delta[3], base[4] + delta[4])
        ev_time, posts, actions = (np.concatenate([b, d]) for b, d in zip(base[:3], delta[:3], strict=True))
        layer = np.repeat([0, 1], [len(base[0]), len(delta[0])])
        last = np.lexsort((layer, actions, ev_time))[-k:]
        return ev_time[last], posts[last], actions[last], base[3] + delta[3], base[4] + delta[4]

    def posts_before(self, user_row: int, time: int) -> np.ndarray:
        delta = self.delta.posts_before(user_row, time)
        if user_row >= self.base.n_users:
            return delta
        return np.concatenate([self.base.posts_before(user_row, time), delta])


def histories_from_rows(
    user_rows: np.ndarray, post_rows: np.ndarray, seconds: np.ndarray, is_like: np.ndarray, n_users: int
) -> Histories:
    """Histories (with `likes`) of events given as user rows, post rows, times and like flags."""
    actions = np.where(is_like, ACTION_LIKE, ACTION_VIEW).astype(np.int8)
    user_rows, seconds = np.asarray(user_rows, np.int64), np.asarray(seconds, np.int64)
    histories = _from_arrays(user_rows, seconds, np.asarray(post_rows), actions, n_users)
    histories.likes = histories.select(histories.ev_action == ACTION_LIKE)
    return histories


def _from_arrays(
    owner: np.ndarray,
    seconds: np.ndarray,
    post_rows: np.ndarray,
    actions: np.ndarray,
    n_users: int,
    *,
    seen: np.ndarray | None = None,
    liked: np.ndarray | None = None,
) -> Histories:
    """Sort events by (user, time, like after view) into Histories; counts computed unless given."""
    order = np.lexsort((actions, seconds, owner))
    owner, actions = owner[order], actions[order]
    counts = np.bincount(owner, minlength=n_users)
    ptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    if seen is None or liked is None:
        seen = np.arange(len(owner)) - ptr[owner] + 1
        cumulative = np.cumsum(actions == ACTION_LIKE)
        before_user = np.concatenate([[0], cumulative])[ptr[:-1]]
        liked = cumulative - before_user[owner]
    else:
        seen, liked = seen[order], liked[order]
    return Histories(
        ptr,
        seconds[order].astype(np.int64),
        post_rows[order].astype(np.int32),
        actions.astype(np.int8),
        seen.astype(np.int32),
        liked.astype(np.int32),
    )


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


def split_windows(feed: pd.DataFrame, *, test_days: float, val_days: float) -> tuple[int, int, int, int]:
    """(start, val_cutoff, cutoff, end) seconds: the last test_days of the feed are the test window, the
    val_days before them the validation window, the rest the training window."""
    seconds = to_seconds(feed["timestamp"])
    assert len(seconds), "the feed is empty: nothing to train on"
    start, end = int(seconds.min()), int(seconds.max())
    cutoff = end - int(test_days * 86400)
    val_cutoff = cutoff - int(val_days * 86400)
    assert start < val_cutoff, (
        f"the feed spans {(end - start) / 86400:.1f} days, not more than TEST_DAYS={test_days} + "
        f"VAL_DAYS={val_days}: no training window is left"
    )
    return start, val_cutoff, cutoff, end


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
