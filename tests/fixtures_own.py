"""A new user's own small data as CSV files: 50 users, 30 posts, 2,000 feed rows over 30 days by default.

Plain functions (no fixtures), also a script for tools/own_data_check.sh:
`python tests/fixtures_own.py OUT_DIR [--users N --posts N --feed N --days D --seed S]`.
Every like row follows a view of the same post with target=1, as the data contract states.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd

TOPICS = ("sport", "movie", "covid", "politics", "tech")
WORDS = [
    "match",
    "goal",
    "film",
    "actor",
    "virus",
    "vaccine",
    "vote",
    "senate",
    "phone",
    "chip",
    "team",
    "scene",
    "mask",
    "law",
    "code",
]


def own_tables(
    *, users: int = 50, posts: int = 30, feed: int = 2000, days: float = 30.0, seed: int = 0
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """(users, posts, feed) frames of the course's columns; ids do not start at 0 or 1 on purpose."""
    rng = np.random.default_rng(seed)
    user_ids = 1000 + np.arange(users) * 7
    user_frame = pd.DataFrame(
        {
            "user_id": user_ids,
            "gender": rng.integers(0, 2, users),
            "age": rng.integers(14, 70, users),
            "country": rng.choice(["Russia", "Belarus", "Finland"], users),
            "city": rng.choice(["Moscow", "Minsk", "Helsinki", "Omsk"], users),
            "exp_group": rng.integers(0, 5, users),
            "os": rng.choice(["Android", "iOS"], users),
            "source": rng.choice(["ads", "organic"], users),
        }
    )
    post_ids = 500 + np.arange(posts) * 3
    topics = rng.choice(TOPICS, posts)
    texts = [" ".join([topic, *rng.choice(WORDS, 12)]) for topic in topics]
    post_frame = pd.DataFrame({"post_id": post_ids, "text": texts, "topic": topics})
    n_views = int(feed / 1.12)  # about 12% of the views are liked: each like is one more row
    start = np.datetime64("2021-10-01T00:00:00")
    offsets = np.sort(rng.integers(0, int(days * 86400), n_views))
    liked = rng.random(n_views) < 0.12
    views = pd.DataFrame(
        {
            "timestamp": start + offsets.astype("timedelta64[s]"),
            "user_id": rng.choice(user_ids, n_views),
            "post_id": rng.choice(post_ids, n_views),
            "action": "view",
            "target": liked.astype(int),
        }
    )
    likes = views[liked].assign(action="like", target=pd.NA)
    likes["timestamp"] = likes["timestamp"] + pd.Timedelta(seconds=30)
    rows = pd.concat([views, likes], ignore_index=True).sort_values("timestamp", kind="stable")
    rows = rows.head(feed).reset_index(drop=True)
    return user_frame, post_frame, rows.astype({"target": "Int64"})


def write_own_csvs(folder: Path, **sizes: float) -> dict[str, Path]:
    """users.csv, posts.csv, feed.csv in `folder`; returns the paths by import-csv option name."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"users": folder / "users.csv", "posts": folder / "posts.csv", "feed": folder / "feed.csv"}
    for frame, path in zip(own_tables(**sizes), paths.values(), strict=True):
        frame.to_csv(path, index=False, date_format="%Y-%m-%d %H:%M:%S")
    return paths


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--users", type=int, default=50)
    parser.add_argument("--posts", type=int, default=30)
    parser.add_argument("--feed", type=int, default=2000)
    parser.add_argument("--days", type=float, default=30.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    sizes = {k: getattr(args, k) for k in ("users", "posts", "feed", "days", "seed")}
    print(write_own_csvs(args.out, **sizes))
