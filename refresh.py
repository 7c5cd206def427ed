"""Following the tables: what reaches the service between two trainings, and how.

One cycle (every REFRESH_SECONDS, in a worker thread, never on a request's path) reads what changed in
the tables and hands it to Recommender.apply, which swaps in the next state:
- posts: the post_ids of post_text_df (a few thousand integers). A post that appeared joins the item
  matrix once `python main_script.py embed-posts` has stored its text embedding in post_embedding (the
  service applies the model file's autoencoder and item tower to it); a post that disappeared is no
  longer recommended.
- users: those named by merged feed rows whom the service lacks are read from user_data (a user without
  feed rows needs no state: a request reads their user_data row and serves them at once).
- feed: every row committed since, whatever its timestamp. The watermark is the latest event time
  merged. Each cycle counts the rows of the lookback window (timestamp >= watermark - lookback, on the
  index ix_feed_data_timestamp) and reads them only when the count differs from the rows the service
  holds there; what it merges is the multiset difference, so a row read twice, or two equal rows, are
  counted exactly as often as the table holds them. Rows older than the window: each cycle also counts
  one earlier day, in rotation (newest first); a day that gained rows is read, its difference merged
  and logged as late.
Posts, users and feed rows reach recommendations within one cycle; post statistics follow at the
latest event time (Recommender.apply).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import UTC, datetime

import numpy as np
import pandas as pd
from sqlalchemy import ColumnElement, Engine, func, inspect, select

import get_features_table
from serving import FUTURE_TOLERANCE_SECONDS, Changes, FeedRows, Recommender, ServingState, latest_plausible
from table_feed import Feed
from table_post import Post
from table_post_embedding import PostEmbedding, clean_text, text_key
from table_user import User
from times import DAY_SECONDS, to_seconds

IN_CHUNK = 1000  # ids per `IN (...)` list
log = logging.getLogger("recommender")


@dataclass
class CycleReport:
    """What one cycle merged (for the log and the tests)."""

    feed_rows: int = 0  # new feed rows merged
    late_rows: int = 0  # of those, rows older than the lookback window (found by the day audit)
    users: int = 0  # users added
    posts: int = 0  # posts added to the item matrix
    waiting_posts: int = 0  # posts in post_text_df still without an embedding
    window_read: bool = False  # whether the lookback window's rows were read (its count had moved)

    def __bool__(self) -> bool:
        return bool(self.feed_rows or self.users or self.posts)


class TableFollower:
    """Reads the tables' changes into a Recommender; one instance per service process."""

    def __init__(self, engine: Engine, recommender: Recommender, *, lookback_seconds: int):
        self.engine, self.recommender, self.lookback = engine, recommender, int(lookback_seconds)
        snapshot = recommender.snapshot
        self.watermark = snapshot.end - 1  # the latest event time merged
        history = snapshot.histories
        in_window = np.flatnonzero(history.ev_time >= self.watermark - self.lookback)
        self.window = _snapshot_rows(recommender, in_window)  # rows held in the lookback window
        first_day = snapshot.start // DAY_SECONDS
        self.first_day = first_day
        self.snapshot_days = np.bincount(history.ev_time // DAY_SECONDS - first_day)  # rows per day
        self.audit_day: int | None = None
        self.absent_users: set[int] = set()  # named by feed rows, not in user_data at the last look

    # --- one cycle ---

    def cycle(self) -> CycleReport:
        """One look at the tables. Its bookkeeping (watermark, window, audit day) moves on only once the
        recommender took the changes: a cycle that fails half way leaves it as it was, for the next."""
        report = CycleReport()
        state = self.recommender.state
        with self.engine.connect() as conn:
            post_ids = np.array(conn.execute(select(Post.post_id)).scalars().all(), dtype=np.int64)
        texts = self._posts(state.texts_missing()) if len(state.texts_missing()) else None
        new_posts, report.waiting_posts = self._new_posts(state, post_ids)
        fresh, watermark, window = self._window_rows(report)
        late, audit_day = self._late_rows(state.rows.concat(fresh), watermark, report)
        rows = fresh.concat(late)
        new_users, absent = self._new_users(state, state.rows.concat(rows), rows)
        changes = Changes(rows=rows, users=new_users, posts=new_posts, texts=texts, live_post_ids=post_ids)
        self.recommender.apply(changes)
        self.watermark, self.window, self.audit_day, self.absent_users = watermark, window, audit_day, absent
        report.feed_rows, report.posts = len(rows), 0 if new_posts is None else len(new_posts)
        report.users = 0 if new_users is None else len(new_users)
        return report

    def _window_rows(self, report: CycleReport) -> tuple[FeedRows, int, FeedRows]:
        """(new rows of the lookback window, the watermark after them, the rows then held in the
        window); the window is read only when its count moved. A row dated beyond the clock (plus a
        day) is merged but does not move the watermark: one wrong clock must not age every other row."""
        since = self.watermark - self.lookback
        with self.engine.connect() as conn:
            held = conn.execute(select(func.count()).select_from(Feed).where(Feed.timestamp >= _time(since)))
        if held.scalar_one() == len(self.window):
            return FeedRows.empty(), self.watermark, self.window
        report.window_read = True
        fresh = unseen(self._read_feed(Feed.timestamp >= _time(since)), self.window)
        ahead = int((fresh.seconds > time.time() + FUTURE_TOLERANCE_SECONDS).sum())
        if ahead:
            log.warning("refresh: %d feed rows dated after the clock: merged, the watermark stays", ahead)
        watermark = max(self.watermark, latest_plausible(fresh.seconds))
        window = self.window.concat(fresh)
        return fresh, watermark, window.select(window.seconds >= watermark - self.lookback)

    def _late_rows(
        self, merged: FeedRows, watermark: int, report: CycleReport
    ) -> tuple[FeedRows, int | None]:
        """(rows of one day before the lookback window that the service lacks, the next day to audit):
        days in rotation, newest first; `merged` = every row merged since the snapshot, this cycle's
        included."""
        last_day = (watermark - self.lookback) // DAY_SECONDS - 1  # whole days before the window
        if last_day < self.first_day:
            return FeedRows.empty(), self.audit_day
        day = last_day if self.audit_day is None or self.audit_day < self.first_day else self.audit_day
        start, end = day * DAY_SECONDS, (day + 1) * DAY_SECONDS
        day_rows = (Feed.timestamp >= _time(start)) & (Feed.timestamp < _time(end))
        with self.engine.connect() as conn:
            stored = conn.execute(select(func.count()).select_from(Feed).where(day_rows)).scalar_one()
        offset = day - self.first_day
        held = int(self.snapshot_days[offset]) if 0 <= offset < len(self.snapshot_days) else 0
        in_day = (merged.seconds >= start) & (merged.seconds < end)
        held += int(in_day.sum())
        if stored <= held:
            return FeedRows.empty(), day - 1
        history = self.recommender.snapshot.histories
        known = _snapshot_rows(
            self.recommender, np.flatnonzero((history.ev_time >= start) & (history.ev_time < end))
        )
        late = unseen(self._read_feed(day_rows), known.concat(merged.select(in_day)))
        if len(late):
            log.warning(
                "refresh: %d feed rows of %s arrived after the lookback window (%d s): merged now; "
                "raise REFRESH_LOOKBACK_SECONDS if writers lag that much",
                len(late),
                datetime.fromtimestamp(start, UTC).date(),
                self.lookback,
            )
        report.late_rows = len(late)
        return late, day - 1

    def _read_feed(self, where: ColumnElement[bool]) -> FeedRows:
        frame = get_features_table.read_table(
            self.engine, "feed_data", columns=["timestamp", "user_id", "post_id", "action"], where=where
        )
        broken = frame[["user_id", "post_id"]].isna().any(axis=1)
        if broken.any():  # the users' own table may allow them; no history can hold such a row
            log.warning("refresh: %d feed rows without a user_id or post_id are left out", int(broken.sum()))
            frame = frame[~broken]
        return FeedRows(
            to_seconds(frame["timestamp"]),
            frame["user_id"].to_numpy(np.int64),
            frame["post_id"].to_numpy(np.int64),
            (frame["action"] == "like").to_numpy(),
        )

    def _new_users(
        self, state: ServingState, merged: FeedRows, fresh: FeedRows
    ) -> tuple[pd.DataFrame | None, set[int]]:
        """(user_data rows of the users that merged feed rows name and the state lacks, the ids still
        absent from user_data). An id found absent is asked again only when a new row names it: a feed
        row may name a user who is never added."""
        named = np.unique(merged.user_id)
        lacking = set(named[_missing(state.user_index, named)].tolist())
        asked = (lacking - self.absent_users) | (lacking & set(fresh.user_id.tolist()))
        again = lacking - asked
        new = np.array(sorted(asked), dtype=np.int64)
        if not len(new):
            return None, again
        frames = []
        for start in range(0, len(new), IN_CHUNK):
            chunk = new[start : start + IN_CHUNK].tolist()
            frames.append(
                get_features_table.read_table(self.engine, "user_data", where=User.user_id.in_(chunk))
            )
        found = pd.concat(frames, ignore_index=True)
        absent = again | (set(new.tolist()) - set(found["user_id"].tolist()))
        return (found if len(found) else None), absent

    def _new_posts(self, state: ServingState, post_ids: np.ndarray) -> tuple[pd.DataFrame | None, int]:
        """(new posts with their text embedding, how many new posts still have none)."""
        new = post_ids[_missing(state.post_index, post_ids)]
        if not len(new):
            return None, 0
        posts = self._posts(new)
        vectors = self._vectors(new)
        posts["text_sha256"] = [text_key(clean_text(text)) for text in posts["text"]]
        ready = posts.merge(vectors, on=["post_id", "text_sha256"])  # the embedding of the current text
        waiting = len(new) - len(ready)
        if waiting:
            log.info("refresh: %d new posts wait for `python main_script.py embed-posts`", waiting)
        return (ready if len(ready) else None), waiting

    def _posts(self, ids: np.ndarray) -> pd.DataFrame:
        """post_id, text, topic of the given posts."""
        frames = [
            get_features_table.read_table(
                self.engine, "post_text_df", where=Post.post_id.in_(ids[start : start + IN_CHUNK].tolist())
            )
            for start in range(0, len(ids), IN_CHUNK)
        ]
        return pd.concat(frames, ignore_index=True)

    def _vectors(self, ids: np.ndarray) -> pd.DataFrame:
        """post_id, text_sha256, vector of the stored embeddings (of the model's encoder) of these posts."""
        columns = ["post_id", "text_sha256", "vector"]
        if not inspect(self.engine).has_table(PostEmbedding.__tablename__):
            return pd.DataFrame(columns=columns).astype({"post_id": "int64", "text_sha256": "str"})
        rows = []
        with self.engine.connect() as conn:
            for start in range(0, len(ids), IN_CHUNK):
                query = select(PostEmbedding.post_id, PostEmbedding.text_sha256, PostEmbedding.vector).where(
                    PostEmbedding.post_id.in_(ids[start : start + IN_CHUNK].tolist()),
                    PostEmbedding.encoder == self.recommender.encoder_key,
                )
                rows += [(pid, sha, np.frombuffer(vector, "<f4")) for pid, sha, vector in conn.execute(query)]
        return pd.DataFrame(rows, columns=columns).astype({"post_id": "int64", "text_sha256": "str"})


# ----------------------------------------------------------------------------- helpers


def unseen(fetched: FeedRows, held: FeedRows) -> FeedRows:
    """The rows of `fetched` beyond those `held` already has: a multiset difference, so equal rows count
    as often as the table holds them and rows read again never count twice."""
    if not len(fetched):
        return fetched
    keys = list(FeedRows.__dataclass_fields__)
    counts = fetched.to_frame().value_counts(keys)
    have = held.to_frame().value_counts(keys).reindex(counts.index, fill_value=0)
    extra = (counts - have).clip(lower=0)
    extra = extra[extra > 0]
    rows = extra.index.to_frame(index=False)
    return FeedRows.from_frame(rows.loc[rows.index.repeat(extra.to_numpy())].sort_values(keys))


def _snapshot_rows(recommender: Recommender, events: np.ndarray) -> FeedRows:
    """The snapshot's events at these indices as feed rows (ids, not rows)."""
    snapshot = recommender.snapshot
    history = snapshot.histories
    owner = np.searchsorted(history.user_ptr, events, side="right") - 1
    return FeedRows(
        history.ev_time[events].astype(np.int64),
        snapshot.users.user_ids[owner],
        recommender.state.post_ids[history.ev_post[events]],
        history.ev_action[events] == 1,
    )


def _missing(index: tuple[np.ndarray, np.ndarray], ids: np.ndarray) -> np.ndarray:
    sorted_ids, _ = index
    return ~np.isin(ids, sorted_ids)


def _time(seconds: int) -> datetime:
    """Naive datetime of int seconds, as the feed stores timestamps."""
    return datetime.fromtimestamp(seconds, UTC).replace(tzinfo=None)
