"""Users' events in time order, read at any moment: the structure training and serving share.

`Histories` holds every user's events as flat arrays (CSR by user row) and answers "the last k events
strictly before t" for one request or a whole batch. `LayeredHistories` reads two of them as one: the
service's snapshot (the model file's events, memory-mapped, read-only) and its delta (the feed rows
merged since). A history used for an event or a request at time t holds only events with timestamp < t.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from times import DAY_SECONDS

ACTION_VIEW, ACTION_LIKE = 0, 1
# recency buckets of a history event (right edges, seconds before the request): one token per bucket
RECENCY_BUCKETS = np.array(
    [60, 600, 3600, 3 * 3600, 12 * 3600, DAY_SECONDS, 3 * DAY_SECONDS, 7 * DAY_SECONDS, 21 * DAY_SECONDS]
)


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

    def events_before(
        self, user_rows: np.ndarray, times: np.ndarray, *, valid: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(query index, post row, action) of every event strictly before each query's time, flat (the
        whole history, for the user tower's profile); rows where `valid` is False have none."""
        user_rows = np.asarray(user_rows, dtype=np.int64)
        start = self.user_ptr[user_rows]
        lengths = self.last_before(user_rows, times) - start
        if valid is not None:
            lengths = np.where(valid, lengths, 0)
        owner = np.repeat(np.arange(len(user_rows)), lengths)
        index = np.arange(len(owner)) + np.repeat(start - np.cumsum(lengths) + lengths, lengths)
        return owner, self.ev_post[index].astype(np.int64), self.ev_action[index].astype(np.int64)

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

    def events_before(
        self, user_rows: np.ndarray, times: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Histories.events_before over both layers (their order does not matter: the profile is a mean)."""
        user_rows = np.asarray(user_rows, dtype=np.int64)
        base_rows, inside = self._in_base(user_rows)
        base = self.base.events_before(base_rows, times, valid=inside)
        delta = self.delta.events_before(user_rows, times)
        return tuple(np.concatenate(pair) for pair in zip(base, delta, strict=True))  # type: ignore[return-value]

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
