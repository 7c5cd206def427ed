"""The feed's change log: every committed insert and delete of feed_data, in commit-safe order.

A row is new to the service because it was committed after the last change the service read, not
because of its timestamp. The database itself keeps the log: triggers on feed_data append each inserted
(+1) and deleted (-1) row to `feed_change_log`, in the writer's own transaction, so a change is in the
log exactly when it is in the table. `install` creates it (`python main_script.py change-log`;
`import-csv` and `demo-data` run it).

Reading it without losing rows:
- SQLite has one writer at a time, so log ids commit in id order: everything after the last id read.
- PostgreSQL writers commit out of id order (a transaction that took id 5 may commit after one that
  took id 6), so "id > last id" would lose id 5. Each log row carries its writer's transaction id
  (xid8); a snapshot tells which transactions have committed (pg_visible_in_snapshot), and a
  transaction's rows become visible all at once, when it commits. The position is a snapshot
  (xmin:xmax:in-flight ids) of the transactions whose rows have been read: each read, in one snapshot
  of its own, takes the rows that snapshot shows and the position does not hold, and the position then
  holds the union of both (no waiting for the oldest running transaction to end).
The model file records the position its training read was taken at (`read_feed`: the feed and the
position in one transaction), so a worker that starts later begins exactly there.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from sqlalchemy import Connection, Engine, bindparam, inspect, text

import get_features_table
from serving import FeedRows
from times import to_seconds

LOG_TABLE = "feed_change_log"
META_TABLE = "feed_change_log_meta"
TRIGGERS = ("feed_change_log_insert", "feed_change_log_delete", "feed_change_log_update")
log = logging.getLogger("recommender")


@dataclass(frozen=True)
class LogPosition:
    """What of the log has been read. `token` names the log (a reinstalled log is another log);
    SQLite: every id <= last_id; PostgreSQL: every transaction the snapshot xmin:xmax:in_flight
    counts as visible (below xmin, or below xmax and not in flight)."""

    token: str
    last_id: int = 0
    xmin: int = 0
    xmax: int = 0
    in_flight: tuple[int, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """Plain containers, for the model file."""
        return {
            "token": self.token,
            "last_id": self.last_id,
            "xmin": self.xmin,
            "xmax": self.xmax,
            "in_flight": list(self.in_flight),
        }

    @classmethod
    def from_dict(cls, saved: dict[str, Any]) -> LogPosition:
        return cls(
            token=str(saved["token"]),
            last_id=int(saved["last_id"]),
            xmin=int(saved["xmin"]),
            xmax=int(saved["xmax"]),
            in_flight=tuple(int(x) for x in saved["in_flight"]),
        )

    @property
    def snapshot(self) -> str:
        """As PostgreSQL's pg_snapshot text."""
        return f"{self.xmin}:{self.xmax}:{','.join(map(str, self.in_flight))}"


# ----------------------------------------------------------------------------- installing


def is_installed(conn: Connection) -> bool:
    """Whether the log, its token and its triggers on feed_data are all in place."""
    names = set(inspect(conn).get_table_names())
    if not {LOG_TABLE, META_TABLE, "feed_data"} <= names:
        return False
    if conn.dialect.name == "sqlite":
        query = "SELECT count(*) FROM sqlite_master WHERE type = 'trigger' AND name IN :names"
    else:
        query = "SELECT count(*) FROM pg_trigger WHERE tgrelid = 'feed_data'::regclass AND tgname IN :names"
    statement = text(query).bindparams(bindparam("names", expanding=True))
    return conn.execute(statement, {"names": list(TRIGGERS)}).scalar_one() == len(TRIGGERS)


def install(engine: Engine) -> bool:
    """Create the log and its triggers unless they are all there; True when it created them. A log
    whose triggers are gone (feed_data was recreated) is recreated under a new token: its rows no
    longer describe the table, and a model file's position in it no longer holds."""
    with engine.begin() as conn:
        if is_installed(conn):
            return False
        statements = _sqlite_ddl() if conn.dialect.name == "sqlite" else _postgres_ddl()
        for statement in statements:
            conn.exec_driver_sql(statement)
        conn.execute(text(f"INSERT INTO {META_TABLE} (token) VALUES (:token)"), {"token": uuid.uuid4().hex})
    return True


def _sqlite_ddl() -> list[str]:
    columns = "timestamp, user_id, post_id, action"
    return [
        *(f"DROP TRIGGER IF EXISTS {name}" for name in TRIGGERS),
        f"DROP TABLE IF EXISTS {LOG_TABLE}",
        f"DROP TABLE IF EXISTS {META_TABLE}",
        f"CREATE TABLE {META_TABLE} (token TEXT NOT NULL)",
        # AUTOINCREMENT: an id is never reused, even after the last rows are deleted
        f"CREATE TABLE {LOG_TABLE} (id INTEGER PRIMARY KEY AUTOINCREMENT, op INTEGER NOT NULL,"
        " timestamp DATETIME, user_id INTEGER, post_id INTEGER, action VARCHAR)",
        f"CREATE TRIGGER {TRIGGERS[0]} AFTER INSERT ON feed_data BEGIN INSERT INTO {LOG_TABLE}"
        f" (op, {columns}) VALUES (1, NEW.timestamp, NEW.user_id, NEW.post_id, NEW.action); END",
        f"CREATE TRIGGER {TRIGGERS[1]} AFTER DELETE ON feed_data BEGIN INSERT INTO {LOG_TABLE}"
        f" (op, {columns}) VALUES (-1, OLD.timestamp, OLD.user_id, OLD.post_id, OLD.action); END",
        f"CREATE TRIGGER {TRIGGERS[2]} AFTER UPDATE ON feed_data BEGIN INSERT INTO {LOG_TABLE}"
        f" (op, {columns}) VALUES (-1, OLD.timestamp, OLD.user_id, OLD.post_id, OLD.action),"
        " (1, NEW.timestamp, NEW.user_id, NEW.post_id, NEW.action); END",
    ]


def _postgres_ddl() -> list[str]:
    columns = "timestamp, user_id, post_id, action"
    # Statement-level triggers with transition tables: one INSERT into the log per statement (a COPY
    # of a million rows appends them in one go), in the writer's transaction, with its transaction id.
    function = f"""
        CREATE OR REPLACE FUNCTION feed_change_log_capture() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF TG_OP IN ('DELETE', 'UPDATE') THEN
                INSERT INTO {LOG_TABLE} (xid, op, {columns})
                SELECT pg_current_xact_id(), -1, {columns} FROM old_rows;
            END IF;
            IF TG_OP IN ('INSERT', 'UPDATE') THEN
                INSERT INTO {LOG_TABLE} (xid, op, {columns})
                SELECT pg_current_xact_id(), 1, {columns} FROM new_rows;
            END IF;
            RETURN NULL;
        END $$"""
    capture = "FOR EACH STATEMENT EXECUTE FUNCTION feed_change_log_capture()"
    return [
        *(f"DROP TRIGGER IF EXISTS {name} ON feed_data" for name in TRIGGERS),
        f"DROP TABLE IF EXISTS {LOG_TABLE}",
        f"DROP TABLE IF EXISTS {META_TABLE}",
        f"CREATE TABLE {META_TABLE} (token TEXT NOT NULL)",
        f"CREATE TABLE {LOG_TABLE} (id BIGSERIAL PRIMARY KEY, xid xid8 NOT NULL, op SMALLINT NOT NULL,"
        " timestamp TIMESTAMP, user_id INTEGER, post_id INTEGER, action VARCHAR)",
        f"CREATE INDEX ix_{LOG_TABLE}_xid ON {LOG_TABLE} (xid)",  # each read is a range of xids
        function,
        f"CREATE TRIGGER {TRIGGERS[0]} AFTER INSERT ON feed_data REFERENCING NEW TABLE AS new_rows {capture}",
        f"CREATE TRIGGER {TRIGGERS[1]} AFTER DELETE ON feed_data REFERENCING OLD TABLE AS old_rows {capture}",
        f"CREATE TRIGGER {TRIGGERS[2]} AFTER UPDATE ON feed_data"
        f" REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows {capture}",
    ]


# ----------------------------------------------------------------------------- reading


def current_position(conn: Connection) -> LogPosition | None:
    """Everything this connection's transaction sees of the log, as a position; None without a log.
    Taken in the transaction that reads the feed, it is exactly the rows that read holds."""
    if not is_installed(conn):
        return None
    token = conn.execute(text(f"SELECT token FROM {META_TABLE}")).scalar_one()
    if conn.dialect.name == "sqlite":
        last = conn.execute(text(f"SELECT coalesce(max(id), 0) FROM {LOG_TABLE}")).scalar_one()
        return LogPosition(token=token, last_id=int(last))
    snapshot = conn.execute(text("SELECT pg_current_snapshot()::text")).scalar_one()
    return _parse_snapshot(token, snapshot)


def _parse_snapshot(token: str, snapshot: str) -> LogPosition:
    xmin, xmax, in_flight = snapshot.split(":")
    return LogPosition(
        token=token,
        xmin=int(xmin),
        xmax=int(xmax),
        in_flight=tuple(int(x) for x in in_flight.split(",") if x),
    )


def read_feed(engine: Engine, *, progress: bool = False) -> pd.DataFrame:
    """The whole feed_data, with the log position it was read at in `.attrs["log_position"]` (a dict,
    None without a log): the read and the position share one transaction (REPEATABLE READ on
    PostgreSQL), so the rows after the position are exactly the rows the read did not see."""
    with engine.connect() as conn:
        if conn.dialect.name == "postgresql":
            conn = conn.execution_options(isolation_level="REPEATABLE READ")
        with conn.begin():
            position = current_position(conn)
            feed = get_features_table.read_table(engine, "feed_data", progress=progress, connection=conn)
    feed.attrs["log_position"] = None if position is None else position.to_dict()
    return feed


@dataclass(frozen=True)
class LogRead:
    """One read of the log: rows inserted and deleted since the position, the position after them."""

    added: FeedRows
    removed: FeedRows
    position: LogPosition


def token_of(engine: Engine) -> str | None:
    """The installed log's token; None without a log."""
    with engine.connect() as conn:
        if not is_installed(conn):
            return None
        return conn.execute(text(f"SELECT token FROM {META_TABLE}")).scalar_one()


def read_since(engine: Engine, position: LogPosition) -> LogRead:
    """The log's changes after `position` that are safe to read (committed by finished transactions)."""
    with engine.connect() as conn:
        if conn.dialect.name == "sqlite":
            with conn.begin():
                frame = _log_frame(conn, f"id > {int(position.last_id)}", {})
            last = int(frame["id"].max()) if len(frame) else position.last_id
            return LogRead(*_split(frame), LogPosition(token=position.token, last_id=last))
        # One snapshot for both statements: the rows it shows are exactly those of the transactions it
        # counts as committed, so "seen" grows by that snapshot, whatever order writers commit in.
        conn = conn.execution_options(isolation_level="REPEATABLE READ")
        with conn.begin():
            now = conn.execute(text("SELECT pg_current_snapshot()::text")).scalar_one()
            frame = _log_frame(
                conn,
                "xid >= CAST(:low AS text)::xid8"
                " AND NOT pg_visible_in_snapshot(xid, CAST(:seen AS pg_snapshot))",
                {"low": str(position.xmin), "seen": position.snapshot},
            )
    return LogRead(*_split(frame), union(position, _parse_snapshot(position.token, now)))


def count_since(engine: Engine, position: LogPosition) -> int:
    """How many log rows committed now lie after `position` (the refresh's lag, for /health)."""
    with engine.connect() as conn:
        if conn.dialect.name == "sqlite":
            query = text(f"SELECT count(*) FROM {LOG_TABLE} WHERE id > :last")
            return int(conn.execute(query, {"last": position.last_id}).scalar_one())
        query = text(
            f"SELECT count(*) FROM {LOG_TABLE} WHERE xid >= CAST(:low AS text)::xid8"
            " AND NOT pg_visible_in_snapshot(xid, CAST(:seen AS pg_snapshot))"
        )
        return int(conn.execute(query, {"low": str(position.xmin), "seen": position.snapshot}).scalar_one())


def union(seen: LogPosition, now: LogPosition) -> LogPosition:
    """The position holding every transaction either position holds (both are snapshots: visible =
    below xmin, or below xmax and not in flight). Below the larger xmin every transaction is held by
    one of them; above it, a transaction is unheld when neither counts it as visible."""
    xmin, xmax = max(seen.xmin, now.xmin), max(seen.xmax, now.xmax)

    def unheld(position: LogPosition, xid: int) -> bool:
        return xid >= position.xmax or xid in position.in_flight

    candidates = set(seen.in_flight) | set(now.in_flight)
    in_flight = sorted(x for x in candidates if xmin <= x < xmax and unheld(seen, x) and unheld(now, x))
    return LogPosition(token=seen.token, xmin=xmin, xmax=xmax, in_flight=tuple(in_flight))


def _log_frame(conn: Connection, where: str, params: dict[str, Any]) -> pd.DataFrame:
    columns = ["id", "op", "timestamp", "user_id", "post_id", "action"]
    query = text(f"SELECT {', '.join(columns)} FROM {LOG_TABLE} WHERE {where} ORDER BY id")
    # plain tuples: pandas probes each SQLAlchemy Row for fields it lacks, 30x slower
    rows = [tuple(row) for row in conn.execute(query, params)]
    return pd.DataFrame.from_records(rows, columns=columns)


def _split(frame: pd.DataFrame) -> tuple[FeedRows, FeedRows]:
    """(inserted rows, deleted rows) of log rows; rows without a user or post are left out (no
    history can hold them), as the table reads leave them out."""
    if not len(frame):
        return FeedRows.empty(), FeedRows.empty()
    frame = frame[frame["user_id"].notna() & frame["post_id"].notna() & frame["timestamp"].notna()]
    seconds = to_seconds(_naive_utc(frame["timestamp"]))
    rows = FeedRows(
        seconds,
        frame["user_id"].to_numpy(np.int64),
        frame["post_id"].to_numpy(np.int64),
        (frame["action"] == "like").to_numpy(),
    )
    op = frame["op"].to_numpy()
    return rows.select(op > 0), rows.select(op < 0)


def _naive_utc(values: pd.Series) -> pd.Series:
    """Log timestamps (SQLite text in any writer's form, PostgreSQL datetimes) as naive UTC."""
    parsed = pd.to_datetime(
        values.astype(str) if values.dtype == object else values, format="ISO8601", utc=True
    )
    return parsed.dt.tz_localize(None)
