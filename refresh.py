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
from sqlalchemy import ColumnElement, Engine, Integer, cast, func, inspect, select
from sqlalchemy.exc import DBAPIError, OperationalError

import changelog
import get_features_table
from changelog import LogPosition
from schema import RefreshGet
from serving import FUTURE_TOLERANCE_SECONDS, Changes, FeedRows, Recommender, ServingState, latest_plausible
from table_feed import Feed
from table_post import Post
from table_post_embedding import PostEmbedding, clean_text, text_key
from table_user import User
from times import DAY_SECONDS, format_time, to_seconds

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
    removed_rows: int = 0  # merged rows found deleted from the table

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
        self.first_day = first_day  # the snapshot's first day: snapshot_days[0]
        self.snapshot_days = np.bincount(history.ev_time // DAY_SECONDS - first_day)  # rows per day
        self.snapshot_day_seconds = np.bincount(  # sum of the rows' seconds per day: the day's signature
            history.ev_time // DAY_SECONDS - first_day, weights=history.ev_time % DAY_SECONDS
        )
        self.audit_floor = first_day  # the table's first day (rows may predate the snapshot's first day)
        self.audit_day: int | None = None
        self.absent_users: set[int] = set()  # named by feed rows, not in user_data at the last look
        self.sqlite = engine.dialect.name == "sqlite"
        self.attempts, self.failures = 0, 0  # cycles tried; failed in a row
        self.last_success: float | None = None
        self.last_error: str | None = None
        self.log_position: LogPosition | None = None  # following the change log from here, when set
        self.path: str | None = None  # "log" or "timestamps", chosen at the first look (choose_path)

    def choose_path(self) -> str:
        """The change log when it is installed and the model file holds a position in this very log
        (exact: every committed row once); else the timestamps, with a warning saying why."""
        if self.path is not None:
            return self.path
        token = changelog.token_of(self.engine)
        saved = self.recommender.snapshot.log_position
        if token is not None and saved is not None and saved["token"] == token:
            self.log_position, self.path = LogPosition.from_dict(saved), "log"
            log.info("refresh: following the feed's change log from the model file's position")
            return self.path
        why = (
            "the database has no change log (`python main_script.py change-log` installs it)"
            if token is None
            else "the model file holds no position in this database's change log (retrain to get one)"
        )
        log.warning(
            "refresh: %s: following feed_data by timestamp (a window of REFRESH_LOOKBACK_SECONDS and a "
            "day-by-day audit: rows committed later than that arrive late)",
            why,
        )
        self.path = "timestamps"
        return self.path

    def health(self, *, database_up: bool = True) -> RefreshGet:
        """The refresh as /health reports it (the lag only when the database answers: no second wait)."""
        when = None if self.last_success is None else datetime.fromtimestamp(self.last_success, UTC)
        return RefreshGet(
            last_success=None if when is None else when.isoformat(timespec="seconds"),
            consecutive_failures=self.failures,
            last_error=self.last_error,
            lag_rows=self._lag() if database_up else None,
        )

    def _lag(self) -> int | None:
        """Log rows committed and not merged yet; None on the timestamp path or with the database down."""
        if self.path != "log" or self.log_position is None:
            return None
        try:
            return changelog.count_since(self.engine, self.log_position)
        except (OperationalError, DBAPIError):
            return None

    # --- one cycle ---

    def cycle(self) -> CycleReport:
        """One look at the tables; counts failures in a row for /health (the exception goes on)."""
        self.attempts += 1
        try:
            report = self._cycle()
        except Exception as exc:
            self.failures += 1
            first_line = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
            self.last_error = f"{exc.__class__.__name__}: {first_line}"
            raise
        self.failures, self.last_success = 0, time.time()
        return report

    def _cycle(self) -> CycleReport:
        """One look at the tables. Its bookkeeping (watermark, window, audit day) moves on only once the
        recommender took the changes: a cycle that fails half way leaves it as it was, for the next."""
        report = CycleReport()
        state = self.recommender.state
        with self.engine.connect() as conn:
            post_ids = np.array(conn.execute(select(Post.post_id)).scalars().all(), dtype=np.int64)
        texts = self._posts(state.texts_missing()) if len(state.texts_missing()) else None
        new_posts, report.waiting_posts = self._new_posts(state, post_ids)
        if self.choose_path() == "log":
            read = changelog.read_since(self.engine, self.log_position)
            rows, removed = read.added.without(read.removed), read.removed.without(read.added)
            merged = state.rows.without(removed).concat(rows)
            watermark, window, audit_day, floor = (
                self.watermark,
                self.window,
                self.audit_day,
                self.audit_floor,
            )
        else:
            fresh, gone, watermark, window = self._window_rows(report)
            merged = state.rows.without(gone).concat(fresh)
            late, gone_late, audit_day, floor = self._late_rows(merged, watermark, report)
            rows, removed = fresh.concat(late), gone.concat(gone_late)
            merged = merged.concat(late)
        held = len(state.rows) - len(state.rows.without(removed))  # of the merged rows
        unheld = len(removed) - held
        if unheld:
            log.warning(
                "refresh: %d deleted feed rows are in the model's snapshot: they count until the next "
                "training",
                unheld,
            )
        new_users, absent = self._new_users(state, merged, rows)
        changes = Changes(
            rows=rows, removed=removed, users=new_users, posts=new_posts, texts=texts, live_post_ids=post_ids
        )
        self.recommender.apply(changes)
        self.watermark, self.window, self.audit_day, self.absent_users = watermark, window, audit_day, absent
        self.audit_floor = floor
        if self.path == "log":
            self.log_position = read.position
        report.removed_rows = held
        report.feed_rows, report.posts = len(rows), 0 if new_posts is None else len(new_posts)
        report.users = 0 if new_users is None else len(new_users)
        return report

    def _window_rows(self, report: CycleReport) -> tuple[FeedRows, FeedRows, int, FeedRows]:
        """(new rows of the lookback window, rows deleted from it, the watermark after them, the rows
        then held in the window); the window is read only when its signature (count and sum of seconds:
        a delete plus an insert moves the sum) moved. A row dated beyond the clock (plus a day) is merged
        but does not move the watermark: one wrong clock must not age every other row."""
        since = self.watermark - self.lookback
        in_window = self._at_or_after(since)
        if self._signature(in_window, since) == _signature(self.window, since):
            return FeedRows.empty(), FeedRows.empty(), self.watermark, self.window
        report.window_read = True
        table = self._read_feed(in_window)
        fresh, gone = unseen(table, self.window), unseen(self.window, table)
        ahead = int((fresh.seconds > time.time() + FUTURE_TOLERANCE_SECONDS).sum())
        if ahead:
            log.warning("refresh: %d feed rows dated after the clock: merged, the watermark stays", ahead)
        watermark = max(self.watermark, latest_plausible(fresh.seconds))
        return fresh, gone, watermark, table.select(table.seconds >= watermark - self.lookback)

    def _at_or_after(self, seconds: int) -> ColumnElement[bool]:
        """feed_data.timestamp >= seconds, compared as times: SQLite stores text, and a row written as
        '2021-12-20T10:00:00' or '2021-12-20 10:00:00' must land where its time says (datetime()
        normalises both; the expression index ix_feed_data_sqlite_time serves it)."""
        if self.sqlite:
            return func.datetime(Feed.timestamp) >= format_time(seconds)
        return Feed.timestamp >= _time(seconds)

    def _before(self, seconds: int) -> ColumnElement[bool]:
        if self.sqlite:
            return func.datetime(Feed.timestamp) < format_time(seconds)
        return Feed.timestamp < _time(seconds)

    def _signature(self, where: ColumnElement[bool], origin: int) -> tuple[int, int]:
        """(rows, sum of their seconds after `origin`) of the feed rows matching `where`."""
        if self.sqlite:
            seconds = cast(func.strftime("%s", func.datetime(Feed.timestamp)), Integer)
        else:
            seconds = cast(func.extract("epoch", Feed.timestamp), Integer)
        query = select(func.count(), func.coalesce(func.sum(seconds - origin), 0)).where(where)
        with self.engine.connect() as conn:
            count, total = conn.execute(query).one()
        return int(count), int(total)

    def _late_rows(
        self, merged: FeedRows, watermark: int, report: CycleReport
    ) -> tuple[FeedRows, FeedRows, int | None, int]:
        """(rows of one day the service lacks, rows of it deleted, the next day to audit, the first day
        of the table): days in rotation, newest first, from the day where the lookback window starts
        (whole: rows earlier that day are in no window) back to the table's first day; `merged` = every
        row merged since the snapshot, this cycle's included."""
        last_day = (watermark - self.lookback) // DAY_SECONDS  # the window starts within this day
        floor = self.audit_floor
        if self.audit_day is None or self.audit_day < floor:  # a new rotation: where does the table start
            floor = min(self.first_day, self._first_day())
        if last_day < floor:
            return FeedRows.empty(), FeedRows.empty(), self.audit_day, floor
        day = last_day if self.audit_day is None or self.audit_day < floor else min(self.audit_day, last_day)
        start, end = day * DAY_SECONDS, (day + 1) * DAY_SECONDS
        day_rows = self._at_or_after(start) & self._before(end)
        stored = self._signature(day_rows, start)
        offset = day - self.first_day
        inside = 0 <= offset < len(self.snapshot_days)
        in_day = (merged.seconds >= start) & (merged.seconds < end)
        held = (
            (int(self.snapshot_days[offset]) if inside else 0) + int(in_day.sum()),
            (int(self.snapshot_day_seconds[offset]) if inside else 0)
            + int((merged.seconds[in_day] - start).sum()),
        )
        if stored == held:
            return FeedRows.empty(), FeedRows.empty(), day - 1, floor
        history = self.recommender.snapshot.histories
        known = _snapshot_rows(
            self.recommender, np.flatnonzero((history.ev_time >= start) & (history.ev_time < end))
        ).concat(merged.select(in_day))
        table = self._read_feed(day_rows)
        late, gone = unseen(table, known), unseen(known, table)
        if len(late):
            log.warning(
                "refresh: %d feed rows of %s arrived after the lookback window (%d s): merged now; "
                "raise REFRESH_LOOKBACK_SECONDS if writers lag that much",
                len(late),
                datetime.fromtimestamp(start, UTC).date(),
                self.lookback,
            )
        report.late_rows = len(late)
        return late, gone, day - 1, floor

    def _first_day(self) -> int:
        """The day of the table's earliest row (on the timestamp index); the snapshot's when empty."""
        column = func.min(func.datetime(Feed.timestamp)) if self.sqlite else func.min(Feed.timestamp)
        with self.engine.connect() as conn:
            first = conn.execute(select(column)).scalar_one()
        if first is None:
            return self.first_day
        return int(to_seconds(pd.to_datetime(pd.Series([first]), format="ISO8601"))[0]) // DAY_SECONDS

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


def _signature(rows: FeedRows, origin: int) -> tuple[int, int]:
    """What _signature counts in the table, of rows held in memory."""
    return len(rows), int((rows.seconds - origin).sum())


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
