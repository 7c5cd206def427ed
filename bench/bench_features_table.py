"""Timing of get_features_table's bulk paths on a synthetic feed.

    python -m bench.bench_features_table --url postgresql://postgres@127.0.0.1:5432/bench --rows 10000000
    python -m bench.bench_features_table --url sqlite:///data/bench.db --rows 1000000

The database at --url is overwritten (its three tables are replaced).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import pandas as pd

import database
import get_features_table
from times import DAY_SECONDS

N_USERS = 163_205
N_POSTS = 7_023


def synthetic_tables(rows: int, *, seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Users, posts and a `rows`-long feed with the real data's shape (not its statistics)."""
    rng = np.random.default_rng(seed)
    user_ids = np.arange(200, 200 + N_USERS)
    post_ids = np.arange(1, N_POSTS + 1)
    users = pd.DataFrame(
        {
            "user_id": user_ids,
            "gender": rng.integers(0, 2, N_USERS),
            "age": rng.integers(14, 96, N_USERS),
            "country": "Russia",
            "city": "Moscow",
            "exp_group": rng.integers(0, 5, N_USERS),
            "os": np.where(rng.random(N_USERS) < 0.65, "Android", "iOS"),
            "source": np.where(rng.random(N_USERS) < 0.62, "ads", "organic"),
        }
    )
    posts = pd.DataFrame({"post_id": post_ids, "text": "some post text", "topic": "movie"})
    start = np.datetime64("2021-10-01T00:00:00", "s")
    seconds = np.sort(rng.integers(0, 90 * DAY_SECONDS, rows))
    like = rng.random(rows) < 0.1
    target = np.where(like, 0, (rng.random(rows) < 0.12).astype("int64"))
    feed = pd.DataFrame(
        {
            "timestamp": (start + seconds).astype("datetime64[ns]"),
            "user_id": rng.choice(user_ids, rows),
            "post_id": rng.choice(post_ids, rows),
            "action": pd.Categorical.from_codes(like.astype("int8"), ["view", "like"]).astype("str"),
            "target": pd.array(target, dtype="Int64"),
        }
    )
    return users, posts, feed


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.bench_features_table",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--url", required=True, help="database to overwrite")
    parser.add_argument("--rows", type=int, default=1_000_000, help="feed rows")
    args = parser.parse_args()

    t0 = time.perf_counter()
    users, posts, feed = synthetic_tables(args.rows)
    print(f"generate {args.rows:,} feed rows: {time.perf_counter() - t0:.1f} s")
    engine = database.make_engine(args.url)
    t0 = time.perf_counter()
    counts = get_features_table.write_tables(engine, users=users, posts=posts, feed=feed, progress=False)
    print(f"write_tables {counts}: {time.perf_counter() - t0:.1f} s")
    t0 = time.perf_counter()
    back = get_features_table.read_table(engine, "feed_data")
    print(f"read_table feed_data ({len(back):,} rows): {time.perf_counter() - t0:.1f} s")
    engine.dispose()


if __name__ == "__main__":
    main()
