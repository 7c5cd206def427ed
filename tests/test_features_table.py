"""get_features_table: SQL <-> pandas <-> CSV on SQLite and PostgreSQL, validation, all-or-nothing writes."""

from __future__ import annotations

import socket
from datetime import datetime
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sqlalchemy import func, inspect, select
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError
from sqlalchemy.orm import Session

import database
import get_features_table as gft
from table_feed import Feed

FEED_INDEXES = {"ix_feed_data_user_id_timestamp", "ix_feed_data_post_id_timestamp", "ix_feed_data_timestamp"}


def make_tables(n_feed: int = 12, *, seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Small users, posts and an unsorted feed with likes whose target is NULL or 0."""
    rng = np.random.default_rng(seed)
    users = pd.DataFrame(
        {
            "user_id": [200, 201, 202, 203, 204, 205],
            "gender": [0, 1, 0, 1, 1, 0],
            "age": [14, 24, 27, 33, 51, 95],
            "country": ["Russia", "Russia", "Ukraine", "Belarus", "Russia", "Cyprus"],
            "city": ["Moscow", "Saint Petersburg", "Kyiv", "Minsk", "Kazan", "Limassol"],
            "exp_group": [0, 1, 2, 3, 4, 0],
            "os": ["Android", "iOS", "Android", "Android", "iOS", "Android"],
            "source": ["ads", "organic", "ads", "ads", "organic", "ads"],
        }
    )
    posts = pd.DataFrame(
        {
            "post_id": [1, 2, 5, 7],
            "text": ['A "quoted" text, with a comma\nand a second line', "NA", "\\.", "plain words"],
            "topic": ["movie", "covid", "business", "a topic nobody listed"],
        }
    )
    like = np.arange(n_feed) % 4 == 3
    target = pd.array(np.where(like, 0, rng.integers(0, 2, n_feed)), dtype="Int64")
    target[like & (np.arange(n_feed) % 8 == 3)] = pd.NA
    seconds = rng.permutation(np.arange(n_feed) * 3_600 + 17)
    feed = pd.DataFrame(
        {
            "timestamp": (np.datetime64("2021-10-01T00:00:00", "s") + seconds).astype("datetime64[ns]"),
            "user_id": rng.choice(users["user_id"].to_numpy(), n_feed),
            "post_id": rng.choice(posts["post_id"].to_numpy(), n_feed),
            "action": pd.Series(np.where(like, "like", "view"), dtype="str"),
            "target": target,
        }
    )
    return users, posts, feed


def canonical(df: pd.DataFrame, table: str) -> pd.DataFrame:
    """Frame with the dtypes of COLUMNS, rows in a stable order (storage order is not guaranteed)."""
    typed = df.astype({c: d for c, d in gft.COLUMNS[table].items() if c in df.columns})
    return typed.sort_values(list(typed.columns), kind="stable", ignore_index=True)


def snapshot(engine) -> dict[str, object]:
    """Everything a failed write must leave alone: rows of each table and the indexes."""
    names = set(inspect(engine).get_table_names())
    state: dict[str, object] = {t: canonical(gft.read_table(engine, t), t) for t in gft.TABLES if t in names}
    state["indexes"] = sorted(ix["name"] for ix in inspect(engine).get_indexes("feed_data"))
    return state


def assert_same(before: dict[str, object], after: dict[str, object]) -> None:
    assert before.keys() == after.keys(), f"tables differ: {before.keys()} vs {after.keys()}"
    assert before["indexes"] == after["indexes"], f"indexes differ: {before['indexes']} vs {after['indexes']}"
    for table in gft.TABLES:
        pd.testing.assert_frame_equal(before[table], after[table], obj=table)


def preload(engine, *, seed: int) -> None:
    users, posts, feed = make_tables(seed=seed)
    gft.write_tables(engine, users=users, posts=posts, feed=feed, progress=False)


def write_csvs(folder: Path, users: pd.DataFrame, posts: pd.DataFrame, feed: pd.DataFrame) -> dict[str, Path]:
    paths = {"users": folder / "users.csv", "posts": folder / "posts.csv", "feed": folder / "feed.csv"}
    users.to_csv(paths["users"], index=False)
    posts.to_csv(paths["posts"], index=False)
    feed.to_csv(paths["feed"], index=False, date_format="%Y-%m-%d %H:%M:%S")
    return paths


# --- validation without a database ----------------------------------------------------------------


def test_error_message_names_file_row_and_column() -> None:
    _, _, feed = make_tables()
    raw = pd.concat([feed, feed], ignore_index=True).astype({"timestamp": "str"})
    raw.loc[15 - 2, "timestamp"] = "yesterday"  # CSV row 15 = position 13 (header is row 1)
    with pytest.raises(gft.TableValidationError) as caught:
        gft.validate_frame(raw, "feed_data", source="feed.csv")
    error = caught.value
    assert (error.file, error.row, error.column) == ("feed.csv", 15, "timestamp"), str(error)
    assert (
        str(error)
        == "feed.csv, row 15, column 'timestamp': 'yesterday' is not a timestamp (YYYY-mm-dd HH:MM:SS)"
    )


def test_many_problems_are_counted_and_the_first_ten_shown() -> None:
    users, _, _ = make_tables()
    many = pd.concat([users] * 5, ignore_index=True).astype({"gender": "object"})
    many["gender"] = "x"
    with pytest.raises(gft.TableValidationError) as caught:
        gft.validate_frame(many, "user_data", source="users.csv")
    lines = str(caught.value).splitlines()
    assert len(caught.value.problems) == gft.MAX_PROBLEMS, lines
    assert caught.value.total > 30, caught.value.total  # 30 bad genders plus the duplicate user ids
    assert lines[0] == "users.csv, row 2, column 'gender': 'x' is not an integer", lines[0]
    assert lines[-1].startswith("... and ") and lines[-1].endswith(" more problems"), lines[-1]


@pytest.mark.parametrize(
    ("change", "column", "message"),
    [
        ({"action": "like", "target": 1}, "target", "1 on a 'like' row; likes carry 0 or NULL"),
        ({"action": "view", "target": None}, "target", "empty (NULL) on a 'view' row; views need 0 or 1"),
        ({"target": 2}, "target", "2 is not one of 0, 1"),
        ({"user_id": 2.5}, "user_id", "2.5 is not an integer"),
        ({"post_id": 2**31}, "post_id", "2147483648 is outside the 32-bit integer range"),
        ({"action": None}, "action", "empty, but action cannot be NULL"),
        ({"timestamp": "2021-02-30 10:00:00"}, "timestamp", "'2021-02-30 10:00:00' is not a timestamp"),
    ],
)
def test_feed_rules(change: dict[str, object], column: str, message: str) -> None:
    _, _, feed = make_tables()
    raw = feed.astype(object)
    for name, value in change.items():
        raw.loc[4, name] = value
    with pytest.raises(gft.TableValidationError) as caught:
        gft.validate_frame(raw, "feed_data", source="feed_data frame", first_row=0)
    assert (caught.value.row, caught.value.column) == (4, column), str(caught.value)
    assert message in caught.value.message, str(caught.value)


def test_text_frames_are_coerced_and_iso_t_timestamps_accepted() -> None:
    users, _, feed = make_tables()
    as_text = feed.astype(str)
    as_text["timestamp"] = feed["timestamp"].dt.strftime("%Y-%m-%dT%H:%M:%S")
    as_text["target"] = feed["target"].astype(object).where(feed["target"].notna(), None)
    clean = gft.validate_frame(as_text, "feed_data", source="feed.csv")
    pd.testing.assert_frame_equal(clean, feed.astype(gft.COLUMNS["feed_data"]))
    assert gft.validate_frame(users.astype(str), "user_data", source="u").dtypes.to_dict() == {
        c: np.dtype("int64") if d == "int64" else pd.StringDtype(na_value=np.nan)
        for c, d in gft.COLUMNS["user_data"].items()
    }


def test_blank_topic_and_unexpected_column() -> None:
    _, posts, _ = make_tables()
    blank = posts.assign(topic=["movie", "  ", "covid", "sport"])
    with pytest.raises(gft.TableValidationError, match=r"posts.csv, row 3, column 'topic': '  ' is blank"):
        gft.validate_frame(blank, "post_text_df", source="posts.csv")
    extra = posts.assign(views=1)
    with pytest.raises(
        gft.TableValidationError, match=r"posts.csv, row 1, column 'views': unexpected column"
    ):
        gft.validate_frame(extra, "post_text_df", source="posts.csv")


def test_missing_csv_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"nowhere\.csv"):
        gft.read_csv_table(tmp_path / "nowhere.csv", "user_data")


# --- SQL round trips ------------------------------------------------------------------------------


def test_round_trip_keeps_values_dtypes_and_null_targets(engine) -> None:
    users, posts, feed = make_tables()
    counts = gft.write_tables(engine, users=users, posts=posts, feed=feed, progress=False)
    assert counts == {"user_data": 6, "post_text_df": 4, "feed_data": 12}, counts
    for table, frame in (("user_data", users), ("post_text_df", posts), ("feed_data", feed)):
        back = gft.read_table(engine, table)
        assert back.dtypes.to_dict() == {c: pd.Series(dtype=d).dtype for c, d in gft.COLUMNS[table].items()}
        pd.testing.assert_frame_equal(canonical(back, table), canonical(frame, table), obj=table)
    stored = gft.read_table(engine, "feed_data")
    assert stored["timestamp"].is_monotonic_increasing, "the feed is stored in time order"
    assert stored["target"].isna().sum() == feed["target"].isna().sum() > 0, "NULL targets survive"


def test_chunked_read_equals_one_read_and_where_filters(engine) -> None:
    users, posts, feed = make_tables(n_feed=50)
    gft.write_tables(engine, users=users, posts=posts, feed=feed, progress=False)
    whole = gft.read_table(engine, "feed_data")
    chunks = list(gft.iter_table_chunks(engine, "feed_data", chunksize=7))
    assert [len(c) for c in chunks] == [7] * 7 + [1], [len(c) for c in chunks]
    pd.testing.assert_frame_equal(pd.concat(chunks, ignore_index=True), whole)
    pd.testing.assert_frame_equal(gft.read_table(engine, "feed_data", chunksize=3), whole)

    cutoff = datetime(2021, 10, 2, 0, 0, 17)
    recent = gft.read_table(
        engine, "feed_data", columns=["user_id", "timestamp"], where=Feed.timestamp >= cutoff
    )
    expected = whole.loc[whole["timestamp"] >= cutoff, ["user_id", "timestamp"]].reset_index(drop=True)
    pd.testing.assert_frame_equal(canonical(recent, "feed_data"), canonical(expected, "feed_data"))
    some = gft.read_table(engine, "user_data", where=gft._table("user_data").c.user_id.in_([201, 204]))
    assert sorted(some["user_id"]) == [201, 204], some

    none = gft.read_table(engine, "feed_data", where=Feed.user_id < 0)
    assert none.empty and list(none.columns) == list(gft.COLUMNS["feed_data"]), none
    assert none.dtypes.to_dict() == whole.dtypes.to_dict(), none.dtypes


def test_stopping_a_chunked_read_early_leaves_the_engine_usable(engine) -> None:
    users, posts, feed = make_tables(n_feed=40)
    gft.write_tables(engine, users=users, posts=posts, feed=feed, progress=False)
    for _ in range(3):
        chunks = gft.iter_table_chunks(engine, "feed_data", chunksize=5)
        assert len(next(chunks)) == 5
        chunks.close()
    assert len(gft.read_table(engine, "feed_data")) == 40


def test_a_database_error_during_a_read_is_raised(engine) -> None:
    users, posts, feed = make_tables()
    gft.write_tables(engine, users=users, posts=posts, feed=feed, progress=False)
    with pytest.raises(DBAPIError, match="no_such_function"):
        gft.read_table(engine, "feed_data", where=func.no_such_function(Feed.user_id) == 1)
    assert len(gft.read_table(engine, "feed_data")) == 12, "the engine still works after the error"


def test_an_unreachable_database_is_a_sqlalchemy_error(postgres_url) -> None:
    """Callers catch SQLAlchemy's OperationalError (the service answers 503), also on the COPY path."""
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))  # a port nobody listens on
        url = make_url(postgres_url).set(host="127.0.0.1", port=unused.getsockname()[1])
        engine = database.make_engine(url.render_as_string(hide_password=False))
        try:
            with pytest.raises(OperationalError):
                gft.read_table(engine, "post_text_df")
        finally:
            engine.dispose()


def test_rows_written_fast_path_are_readable_through_the_orm(engine) -> None:
    users, posts, feed = make_tables()
    gft.write_tables(engine, users=users, posts=posts, feed=feed, progress=False)
    first = feed.sort_values("timestamp").iloc[0]
    with Session(engine) as session:
        row = session.scalars(select(Feed).where(Feed.timestamp <= first["timestamp"].to_pydatetime())).one()
        assert (row.user_id, row.post_id, row.action) == (first["user_id"], first["post_id"], first["action"])
        assert row.user.user_id == first["user_id"] and row.post.post_id == first["post_id"], row


def test_feed_indexes_exist_after_write_tables(engine) -> None:
    users, posts, feed = make_tables()
    gft.write_tables(engine, users=users, posts=posts, feed=feed, progress=False)
    indexes = {ix["name"]: ix["column_names"] for ix in inspect(engine).get_indexes("feed_data")}
    assert indexes == {
        "ix_feed_data_user_id_timestamp": ["user_id", "timestamp"],
        "ix_feed_data_post_id_timestamp": ["post_id", "timestamp"],
        "ix_feed_data_timestamp": ["timestamp"],
    }, indexes


def test_appending_feed_rows_checks_references(engine) -> None:
    users, posts, feed = make_tables()
    gft.write_tables(engine, users=users, posts=posts, feed=feed, progress=False)
    more = make_tables(n_feed=5, seed=1)[2]
    assert gft.write_tables(engine, feed=more, replace=False, progress=False) == {"feed_data": 5}
    assert len(gft.read_table(engine, "feed_data")) == 17
    stranger = more.assign(user_id=[200, 200, 99_999, 200, 200])
    with pytest.raises(
        gft.TableValidationError, match=r"row 2, column 'user_id': user_id 99999 is not in user_data"
    ):
        gft.write_tables(engine, feed=stranger, replace=False, progress=False)
    assert len(gft.read_table(engine, "feed_data")) == 17
    assert {ix["name"] for ix in inspect(engine).get_indexes("feed_data")} == FEED_INDEXES


# --- all or nothing -------------------------------------------------------------------------------


def test_failure_in_the_middle_of_write_tables_rolls_everything_back(engine, monkeypatch) -> None:
    preload(engine, seed=3)
    before = snapshot(engine)
    real_load = gft._load_rows

    def load_then_fail(conn, table, frame, bar) -> None:
        real_load(conn, table, frame.iloc[: len(frame) // 2], bar)
        if table.name == "feed_data":
            raise RuntimeError("injected failure after half of the feed")

    monkeypatch.setattr(gft, "_load_rows", load_then_fail)
    users, posts, feed = make_tables(n_feed=30, seed=4)
    with pytest.raises(RuntimeError, match="injected"):
        gft.write_tables(engine, users=users, posts=posts, feed=feed, progress=False)
    assert_same(before, snapshot(engine))


def test_a_database_error_in_a_later_chunk_rolls_everything_back(engine, monkeypatch) -> None:
    users, posts, feed = make_tables()
    gft.write_tables(engine, users=users, posts=posts, feed=feed, progress=False)
    before = snapshot(engine)
    monkeypatch.setattr(gft, "WRITE_CHUNK_ROWS", 2)
    new_users = users.assign(user_id=users["user_id"] + 1000)
    new_users.loc[5, "user_id"] = 200  # already stored: the primary key fails in the third chunk
    with pytest.raises(IntegrityError):
        gft.write_tables(
            engine, users=new_users, posts=posts.assign(post_id=posts["post_id"] + 100), replace=False
        )
    assert_same(before, snapshot(engine))


def test_import_csv_happy_path(engine, tmp_path: Path) -> None:
    users, posts, feed = make_tables()
    paths = write_csvs(tmp_path, users, posts, feed)
    text = paths["feed"].read_text().replace("2021-10-01 05:00:17", "2021-10-01T05:00:17")
    paths["feed"].write_text(text)  # ISO 8601 with a T is accepted too
    counts = gft.import_csv(engine, **paths, progress=False)
    assert counts == {"user_data": 6, "post_text_df": 4, "feed_data": 12}, counts
    for table, frame in (("user_data", users), ("post_text_df", posts), ("feed_data", feed)):
        pd.testing.assert_frame_equal(
            canonical(gft.read_table(engine, table), table), canonical(frame, table)
        )


def _missing_column(users, posts, feed):
    return users.drop(columns="city"), posts, feed, ("users.csv", 1, "city", "missing column")


def _wrong_type(users, posts, feed):
    users = users.astype({"age": object})
    users.loc[3, "age"] = "twenty"
    return users, posts, feed, ("users.csv", 5, "age", "'twenty' is not an integer")


def _bad_timestamp(users, posts, feed):
    feed = feed.astype({"timestamp": str})
    feed.loc[7, "timestamp"] = "yesterday"
    return (
        users,
        posts,
        feed,
        ("feed.csv", 9, "timestamp", "'yesterday' is not a timestamp (YYYY-mm-dd HH:MM:SS)"),
    )


def _null_text(users, posts, feed):
    posts.loc[1, "text"] = None
    return users, posts, feed, ("posts.csv", 3, "text", "empty, but text cannot be NULL")


def _duplicate_id(users, posts, feed):
    posts.loc[2, "post_id"] = 1
    return users, posts, feed, ("posts.csv", 4, "post_id", "duplicate post_id 1 (first in row 2)")


def _bad_action(users, posts, feed):
    feed["action"] = feed["action"].astype(object)
    feed.loc[2, "action"] = "click"
    return users, posts, feed, ("feed.csv", 4, "action", "'click' is not one of 'view', 'like'")


def _unknown_user(users, posts, feed):
    feed.loc[4, "user_id"] = 99_999
    return users, posts, feed, ("feed.csv", 6, "user_id", "user_id 99999 is not in user_data")


@pytest.mark.parametrize(
    "breakage",
    [_missing_column, _wrong_type, _bad_timestamp, _null_text, _duplicate_id, _bad_action, _unknown_user],
    ids=lambda f: f.__name__.strip("_"),
)
def test_import_csv_rejects_a_broken_file_and_leaves_the_database_alone(
    engine, tmp_path: Path, breakage
) -> None:
    preload(engine, seed=7)
    before = snapshot(engine)
    users, posts, feed, (file, row, column, message) = breakage(*make_tables(n_feed=20))
    paths = write_csvs(tmp_path, users, posts, feed)
    with pytest.raises(gft.TableValidationError) as caught:
        gft.import_csv(engine, **paths, progress=False)
    error = caught.value
    assert (error.file, error.row, error.column) == (file, row, column), str(error)
    assert message in error.message, str(error)
    assert str(error).startswith(f"{file}, row {row}, column {column!r}: "), str(error)
    assert_same(before, snapshot(engine))
