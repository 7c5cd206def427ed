"""The live refresh at full scale: cost per cycle, the plan of its queries, and requests meanwhile.

    python -m bench.refresh [--json] [--cycles 20] [--rows 10000] [--seconds 30] [--path log|timestamps]
    python -m bench.refresh --log-only [--json] [--cycles 20] [--rows 10000]

Uses the bench's full demo and model (bench.harness builds them when missing) in a scratch copy of its
PostgreSQL database (CREATE DATABASE ... TEMPLATE, then VACUUM ANALYZE as autovacuum would; dropped at
the end), in one process as the service runs it: a Recommender loaded memory-mapped from the model
file and a refresh.TableFollower.
  (1) a refresh cycle with no new rows, --cycles times (median);
  (2) a cycle after --rows new feed rows were committed (timestamps spread over the hour before the
      watermark to the hour after it, 30% likes), --cycles times (median; the delta grows each time);
  (3) EXPLAIN ANALYZE of the cycle's feed queries: with --path log (the default) the change log read,
      else the window count, the window read, one audit day;
  (4) recommendations in-process for --seconds while cycles with new rows run back to back in a
      worker thread, as in the service: latency percentiles of the requests.
Targets (the live-service issue): (1) < 50 ms; (4) p99 < 5 ms; the exact live path: (1) < 20 ms,
(2) < 200 ms, and no plan in (3) reads feed_data.
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from bench.harness import DATA_DIR, DEFAULT_DATABASE_URL, build_or_reuse, log, percentiles_ms

if TYPE_CHECKING:
    from sqlalchemy import Engine

    from refresh import TableFollower


def scratch_copy(database_url: str, name: str) -> str:
    """A fresh copy of the bench database (PostgreSQL's template copy); returns its URL."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    url = make_url(database_url)
    admin = create_engine(
        url.set(drivername="postgresql+psycopg2", database="postgres"), isolation_level="AUTOCOMMIT"
    )
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        conn.execute(text(f'CREATE DATABASE "{name}" TEMPLATE "{url.database}"'))
    admin.dispose()
    copy = url.set(database=name)
    # The steady state of a live table: autovacuum has set its visibility map, so counting on the index
    # needs no heap visits (a table fresh from a bulk load has none until autovacuum passes).
    vacuum = create_engine(copy.set(drivername="postgresql+psycopg2"), isolation_level="AUTOCOMMIT")
    with vacuum.connect() as conn:
        conn.execute(text("VACUUM ANALYZE feed_data"))
    vacuum.dispose()
    return copy.render_as_string(hide_password=False)


def drop_database(database_url: str) -> None:
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    url = make_url(database_url)
    admin = create_engine(
        url.set(drivername="postgresql+psycopg2", database="postgres"), isolation_level="AUTOCOMMIT"
    )
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{url.database}" WITH (FORCE)'))
    admin.dispose()


def new_rows(
    rng: np.random.Generator, n: int, around: int, user_ids: np.ndarray, post_ids: np.ndarray
) -> pd.DataFrame:
    like = rng.random(n) < 0.3
    return pd.DataFrame(
        {
            "timestamp": pd.to_datetime(around + rng.integers(-3600, 3600, n), unit="s"),
            "user_id": rng.choice(user_ids, n),
            "post_id": rng.choice(post_ids, n),
            "action": np.where(like, "like", "view"),
            "target": np.zeros(n, dtype=np.int64),
        }
    )


def insert(engine: Engine, rows: pd.DataFrame) -> None:
    """COPY the rows in, as a writer beside the service would (no validation: the bench made them)."""
    from get_features_table import _copy_in  # the bulk path of write_tables
    from table_feed import Feed

    with engine.begin() as conn:
        _copy_in(conn, Feed.__table__, rows, _NullBar())


class _NullBar:
    def update(self, _n: int) -> None:
        pass


def explain(engine: Engine, follower: TableFollower) -> dict[str, list[str]]:
    """EXPLAIN ANALYZE of the cycle's feed queries, as PostgreSQL plans them now."""
    from sqlalchemy import func, select, text
    from sqlalchemy.dialects import postgresql

    from refresh import _time
    from table_feed import Feed
    from times import DAY_SECONDS

    since = _time(follower.watermark - follower.lookback)
    day = (follower.watermark - follower.lookback) // DAY_SECONDS - 1
    queries = {
        "window count": select(func.count()).select_from(Feed).where(Feed.timestamp >= since),
        "window read": select(Feed.timestamp, Feed.user_id, Feed.post_id, Feed.action).where(
            Feed.timestamp >= since
        ),
        "audit day count": select(func.count())
        .select_from(Feed)
        .where(Feed.timestamp >= _time(day * DAY_SECONDS), Feed.timestamp < _time((day + 1) * DAY_SECONDS)),
    }
    plans = {}
    with engine.connect() as conn:
        for name, query in queries.items():
            sql = str(query.compile(dialect=postgresql.dialect(), compile_kwargs={"literal_binds": True}))
            plans[name] = [row[0] for row in conn.execute(text(f"EXPLAIN (ANALYZE, BUFFERS) {sql}"))]
    return plans


def explain_log(engine: Engine, follower: TableFollower) -> dict[str, list[str]]:
    """EXPLAIN ANALYZE of the change log read (changelog.read_since) at the follower's position."""
    from sqlalchemy import text

    from changelog import LOG_TABLE

    position = follower.log_position
    assert position is not None, "the follower reads the change log"
    sql = (
        f"SELECT id, op, timestamp, user_id, post_id, action FROM {LOG_TABLE}"
        f" WHERE xid >= '{position.xmin}'::xid8"
        f" AND NOT pg_visible_in_snapshot(xid, '{position.snapshot}'::pg_snapshot) ORDER BY id"
    )
    with engine.connect() as conn:
        return {"log read": [row[0] for row in conn.execute(text(f"EXPLAIN (ANALYZE, BUFFERS) {sql}"))]}


def follow_the_log(engine: Engine, follower: TableFollower) -> None:
    """Install the change log in the scratch copy and follow it from now (what a model trained on a
    database with the log records)."""
    import changelog

    changelog.install(engine)
    with engine.connect() as conn:
        follower.log_position = changelog.current_position(conn)
    follower.path = "log"


def log_reads(args: argparse.Namespace) -> dict[str, object]:
    """--log-only: the change log's part of a cycle on the bench tables, without a model (the state's
    rebuild is the same on both paths): changelog.read_since with no new rows and after --rows new
    rows, the writer's COPY of those rows through the log's trigger, and the read's plan."""
    from sqlalchemy import func, select

    import changelog
    import database
    from table_feed import Feed
    from table_post import Post
    from table_user import User

    table_counts = {}
    url = scratch_copy(args.database_url, f"bench_refresh_{os.getpid()}")
    engine = database.make_engine(url)
    try:
        with engine.connect() as conn:
            user_ids = np.array(conn.execute(select(User.user_id)).scalars().all())
            post_ids = np.array(conn.execute(select(Post.post_id)).scalars().all())
            around = int(
                pd.Timestamp(conn.execute(select(func.max(Feed.timestamp))).scalar_one()).timestamp()
            )
            table_counts["feed_data"] = conn.execute(select(func.count()).select_from(Feed)).scalar_one()
        changelog.install(engine)
        with engine.connect() as conn:
            position = changelog.current_position(conn)
        rng = np.random.default_rng(0)

        def timed_read() -> tuple[float, changelog.LogRead]:
            clock = time.perf_counter()
            read = changelog.read_since(engine, position)
            return (time.perf_counter() - clock) * 1000, read

        idle = []
        for _ in range(args.cycles):
            ms, read = timed_read()
            idle.append(ms)
            position = read.position
        log(f"(1) log read, no new rows: median {np.median(idle):.2f} ms")
        burst, writes = [], []
        for _ in range(args.cycles):
            rows = new_rows(rng, args.rows, around, user_ids, post_ids)
            clock = time.perf_counter()
            insert(engine, rows)
            writes.append((time.perf_counter() - clock) * 1000)
            ms, read = timed_read()
            assert len(read.added) == args.rows, f"rows lost or doubled: {len(read.added)}"
            burst.append(ms)
            position = read.position
        log(f"(2) log read of {args.rows} new rows: median {np.median(burst):.1f} ms")
        log(f"    the writer's COPY of them (trigger included): median {np.median(writes):.1f} ms")

        class _At:
            log_position = position

        plans = explain_log(engine, _At())  # type: ignore[arg-type]
        for name, plan in plans.items():
            log(f"(3) {name}:\n    " + "\n    ".join(plan))
    finally:
        engine.dispose()
        drop_database(url)
    return {
        "path": "log (read only, no model)",
        "feed_rows": table_counts["feed_data"],
        "log_read_idle_ms": round(float(np.median(idle)), 2),
        f"log_read_{args.rows}_rows_ms": round(float(np.median(burst)), 1),
        f"copy_{args.rows}_rows_with_trigger_ms": round(float(np.median(writes)), 1),
        "explain": plans,
        "plans_read_feed_data": any("feed_data" in line for plan in plans.values() for line in plan),
    }


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.refresh", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--database-url", default=DEFAULT_DATABASE_URL, help="the bench database (PostgreSQL)"
    )
    parser.add_argument("--data-dir", type=Path, default=DATA_DIR)
    parser.add_argument("--cycles", type=int, default=20)
    parser.add_argument("--rows", type=int, default=10_000, help="new feed rows per cycle in (2) and (4)")
    parser.add_argument("--seconds", type=float, default=30.0, help="length of the requests run (4)")
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout")
    parser.add_argument(
        "--path", choices=("log", "timestamps"), default="log", help="follow the change log or the timestamps"
    )
    parser.add_argument(
        "--log-only", action="store_true", help="time the change log's reads alone (no model needed)"
    )
    args = parser.parse_args()
    if args.log_only:
        summary = log_reads(args)
        if args.json:
            print(json.dumps(summary))
        return

    import database
    from get_model import load_model_file
    from refresh import TableFollower
    from serving import Changes, Recommender
    from settings import Settings

    build_or_reuse(database_url=args.database_url, data_dir=args.data_dir, scale="full")
    url = scratch_copy(args.database_url, f"bench_refresh_{os.getpid()}")  # two runs never share one
    engine = database.make_engine(url)
    try:
        clock = time.perf_counter()
        recommender = Recommender(load_model_file(args.data_dir / "model.pt", mmap=True), threads=1)
        import get_features_table

        posts = get_features_table.read_table(engine, "post_text_df")
        recommender.apply(Changes(texts=posts, live_post_ids=posts["post_id"].to_numpy()))
        follower = TableFollower(engine, recommender, lookback_seconds=Settings().refresh_lookback_seconds)
        if args.path == "log":
            follow_the_log(engine, follower)
        else:
            follower.path = "timestamps"
        follower.cycle()  # the first look at the tables (user count, post ids)
        log(f"loaded in {time.perf_counter() - clock:.1f} s")
        rng = np.random.default_rng(0)
        user_ids, post_ids = recommender.state.users.user_ids, recommender.state.post_ids

        def timed_cycle() -> tuple[float, object]:
            clock = time.perf_counter()
            report = follower.cycle()
            return (time.perf_counter() - clock) * 1000, report

        idle = [timed_cycle()[0] for _ in range(args.cycles)]
        log(f"(1) no new rows: median {np.median(idle):.1f} ms")
        busy, reports = [], []
        for _ in range(args.cycles):
            insert(engine, new_rows(rng, args.rows, follower.watermark, user_ids, post_ids))
            ms, report = timed_cycle()
            busy.append(ms)
            reports.append(report)
        assert all(r.feed_rows == args.rows for r in reports), f"rows lost or doubled: {reports[-1]}"
        delta = len(recommender.state.rows)
        log(f"(2) {args.rows} new rows: median {np.median(busy):.1f} ms (delta now {delta:,} rows)")
        plans = explain_log(engine, follower) if args.path == "log" else explain(engine, follower)
        reads_feed = any("feed_data" in line for plan in plans.values() for line in plan)
        for name, plan in plans.items():
            log(f"(3) {name}:\n    " + "\n    ".join(plan))

        stop = threading.Event()
        cycles_during = []

        def refresh_loop() -> None:
            while not stop.is_set():
                insert(engine, new_rows(rng, args.rows, follower.watermark, user_ids, post_ids))
                cycles_during.append(timed_cycle()[0])

        worker = threading.Thread(target=refresh_loop, daemon=True)
        worker.start()
        latencies = []
        deadline = time.monotonic() + args.seconds
        start, end = recommender.snapshot.start, recommender.snapshot.end
        while time.monotonic() < deadline:
            state = recommender.state
            row, moment = int(rng.integers(len(state.users.user_ids))), int(rng.integers(start, end))
            clock = time.perf_counter()
            state.response_body(recommender.recommend(state, row, moment, 5))
            latencies.append(time.perf_counter() - clock)
        stop.set()
        worker.join()
        during = percentiles_ms(latencies)
        n_cycles = len(cycles_during)
        log(f"(4) requests during {n_cycles} refresh cycles: p50 {during['p50']} ms, p99 {during['p99']} ms")
    finally:
        engine.dispose()
        drop_database(url)

    summary = {
        "refresh_idle_ms": round(float(np.median(idle)), 2),
        "refresh_10k_rows_ms": round(float(np.median(busy)), 2),
        "rows_per_cycle": args.rows,
        "refresh_cycles_during_requests": len(cycles_during),
        "refresh_ms_during_requests": round(float(np.median(cycles_during)), 1) if cycles_during else None,
        "requests_during_refresh": during,
        "path": args.path,
        "explain": plans,
        "plans_read_feed_data": reads_feed,
        "targets": {
            "refresh_idle_ms": "< 20",
            "refresh_10k_rows_ms": "< 200",
            "requests_during_refresh.p99": "< 5",
            "plans_read_feed_data": False,
        },
    }
    if args.json:
        print(json.dumps(summary))


if __name__ == "__main__":
    main()
