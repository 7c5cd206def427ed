"""Bad input data: CSV imports that must fail cleanly, repairs that are documented, users the model never saw.

Every import case runs on SQLite and PostgreSQL against a database already holding other rows: a broken
import must raise one clear error naming the file, the row (as a spreadsheet counts: header = 1) and the
column, and leave every row of the database as it was.
"""

from __future__ import annotations

import csv
import io
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from fastapi.testclient import TestClient
from fixtures_model import copy_tables, demo_tables, trained_demo
from sqlalchemy import func, select
from sqlalchemy.orm import Session

import database
import get_features_table as gft
import main_script
from app import create_app
from features import UNKNOWN, USER_CATEGORICALS, encode
from get_model import load_model_file
from table_user import User
from times import parse_time

ROOT = Path(__file__).resolve().parent.parent

USERS = """\
user_id,gender,age,country,city,exp_group,os,source
200,1,24,Russia,Moscow,3,Android,ads
201,0,31,Finland,Helsinki,0,iOS,organic
"""
POSTS = """\
post_id,text,topic
1,Markets rallied today.,business
2,"A new film opens, to good reviews.",movie
3,Mercury is in retrograde this week.,astrology
"""
FEED = """\
timestamp,user_id,post_id,action,target
2021-10-01 12:00:00,200,1,view,0
2021-10-01 12:05:00,200,2,view,1
2021-10-01 12:06:00,200,2,like,
2021-10-02 09:00:00,201,3,view,0
"""


def write_csvs(folder: Path, *, users: str = USERS, posts: str = POSTS, feed: str = FEED) -> dict[str, Path]:
    paths = {"users": folder / "users.csv", "posts": folder / "posts.csv", "feed": folder / "feed.csv"}
    for name, text in (("users", users), ("posts", posts), ("feed", feed)):
        paths[name].write_text(text)
    return paths


def without_column(text: str, column: str) -> str:
    rows = list(csv.DictReader(io.StringIO(text)))
    out = io.StringIO()
    writer = csv.DictWriter(
        out, [c for c in rows[0] if c != column], extrasaction="ignore", lineterminator="\n"
    )
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def preload(engine) -> None:
    """Rows that differ from every CSV here, so any partial write would show."""
    users = pd.DataFrame(
        {
            "user_id": [300],
            "gender": [0],
            "age": [40],
            "country": ["Cyprus"],
            "city": ["Limassol"],
            "exp_group": [2],
            "os": ["iOS"],
            "source": ["ads"],
        }
    )
    posts = pd.DataFrame({"post_id": [10], "text": ["An older post."], "topic": ["sport"]})
    feed = pd.DataFrame(
        {
            "timestamp": pd.to_datetime(["2021-09-30 08:00:00"]),
            "user_id": [300],
            "post_id": [10],
            "action": ["view"],
            "target": pd.array([1], dtype="Int64"),
        }
    )
    gft.write_tables(engine, users=users, posts=posts, feed=feed, progress=False)


def snapshot(engine) -> dict[str, pd.DataFrame]:
    frames = {table: gft.read_table(engine, table) for table in gft.TABLES}
    return {t: f.sort_values(list(f.columns), ignore_index=True) for t, f in frames.items()}


def assert_unchanged(before: dict[str, pd.DataFrame], engine) -> None:
    after = snapshot(engine)
    for table in gft.TABLES:
        pd.testing.assert_frame_equal(after[table], before[table], obj=f"{table} after the failed import")


BROKEN = [  # (file, text before, text after) -> (file, row, column, message) of the first problem
    pytest.param(
        ("users", None, "city"),
        ("users.csv", 1, "city", "missing column (expected columns: user_id,"),
        id="missing-column",
    ),
    pytest.param(
        ("users", "201,0,31,", "201,0,thirty-one,"),
        ("users.csv", 3, "age", "'thirty-one' is not an integer"),
        id="text-in-int-column",
    ),
    pytest.param(
        ("users", "Moscow,3,", "Moscow,7,"),
        ("users.csv", 2, "exp_group", "7 is not one of 0, 1, 2, 3, 4"),
        id="out-of-domain",
    ),
    pytest.param(
        ("posts", "1,Markets", "1.5,Markets"),
        ("posts.csv", 2, "post_id", "'1.5' is not an integer"),
        id="float-id",
    ),
    pytest.param(
        ("posts", '2,"A new film opens, to good reviews."', "2,"),
        ("posts.csv", 3, "text", "empty, but text cannot be NULL"),
        id="null-text",
    ),
    pytest.param(
        ("posts", '"A new film opens, to good reviews."', '"   "'),
        ("posts.csv", 3, "text", "'   ' is blank; text needs a value"),
        id="blank-text",
    ),
    pytest.param(
        ("posts", "3,Mercury", "1,Mercury"),
        ("posts.csv", 4, "post_id", "duplicate post_id 1 (first in row 2)"),
        id="duplicate-id",
    ),
    pytest.param(
        ("feed", "12:05:00,200,2", "12:05:00,999,2"),
        ("feed.csv", 3, "user_id", "user_id 999 is not in user_data"),
        id="feed-unknown-user",
    ),
    pytest.param(
        ("feed", "09:00:00,201,3", "09:00:00,201,42"),
        ("feed.csv", 5, "post_id", "post_id 42 is not in post_text_df"),
        id="feed-unknown-post",
    ),
    pytest.param(
        ("feed", "09:00:00,201,3", "09:00:00,,3"),
        ("feed.csv", 5, "user_id", "empty, but user_id cannot be NULL"),
        id="feed-no-user",
    ),
    pytest.param(
        ("feed", "09:00:00,201,3", "09:00:00,201,"),
        ("feed.csv", 5, "post_id", "empty, but post_id cannot be NULL"),
        id="feed-no-post",
    ),
    pytest.param(
        ("feed", "2021-10-01 12:05:00", "2021-10-01 25:05:00"),
        ("feed.csv", 3, "timestamp", "'2021-10-01 25:05:00' is not a timestamp"),
        id="bad-timestamp",
    ),
    pytest.param(
        ("feed", "like,", "like,1"), ("feed.csv", 4, "target", "1 on a 'like' row"), id="like-with-target-1"
    ),
]


@pytest.mark.parametrize(("change", "expected"), BROKEN)
def test_broken_import_names_file_row_column_and_changes_nothing(engine, tmp_path, change, expected):
    preload(engine)
    before = snapshot(engine)
    name, old, new = change
    texts = {"users": USERS, "posts": POSTS, "feed": FEED}
    if old is None:
        texts[name] = without_column(texts[name], new)
    else:
        assert old in texts[name], f"the case does not apply: {old!r} not in {name}"
        texts[name] = texts[name].replace(old, new, 1)
    with pytest.raises(gft.TableValidationError) as caught:
        gft.import_csv(engine, **write_csvs(tmp_path, **texts), progress=False)
    error = caught.value
    file, row, column, message = expected
    assert (error.file, error.row, error.column) == (file, row, column), str(error)
    assert str(error).splitlines()[0] == f"{file}, row {row}, column {column!r}: {error.message}"
    assert error.message.startswith(message), error.message
    assert_unchanged(before, engine)


def test_every_file_is_checked_before_reporting(engine, tmp_path):
    preload(engine)
    before = snapshot(engine)
    paths = write_csvs(
        tmp_path, users=USERS.replace("201,0,31,", "201,0,x,"), feed=FEED.replace("view,1", "click,1")
    )
    with pytest.raises(gft.TableValidationError) as caught:
        gft.import_csv(engine, **paths, progress=False)
    lines = str(caught.value).splitlines()
    assert [line.split(":")[0] for line in lines] == [
        "users.csv, row 3, column 'age'",
        "feed.csv, row 3, column 'action'",
    ]
    assert_unchanged(before, engine)


def test_unknown_topics_are_accepted(engine, tmp_path):
    gft.import_csv(engine, **write_csvs(tmp_path), progress=False)
    posts = gft.read_table(engine, "post_text_df").set_index("post_id")
    assert posts.loc[3, "topic"] == "astrology"


def test_feed_out_of_order_is_stored_sorted_by_time(engine, tmp_path):
    header, *rows = FEED.splitlines()
    shuffled = "\n".join([header, rows[3], rows[1], rows[0], rows[2]]) + "\n"
    gft.import_csv(engine, **write_csvs(tmp_path, feed=shuffled), progress=False)
    stored = gft.read_table(engine, "feed_data")  # storage order: a freshly loaded table is read as written
    assert stored["timestamp"].is_monotonic_increasing, stored
    expected = pd.read_csv(io.StringIO(FEED), parse_dates=["timestamp"])
    assert stored["post_id"].tolist() == expected["post_id"].tolist()


# --- the command line ----------------------------------------------------------------------------------


def import_cli(paths: dict[str, Path], database_url: str, cwd: Path) -> subprocess.CompletedProcess:
    command = [sys.executable, str(ROOT / "main_script.py"), "--quiet", "import-csv"]
    for name, path in paths.items():
        command += [f"--{name}", str(path)]
    env = os.environ | {"DATABASE_URL": database_url, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


@pytest.fixture
def sqlite_engine(tmp_path):
    engine = database.make_engine(f"sqlite:///{tmp_path / 'cli.db'}")
    preload(engine)
    yield engine
    engine.dispose()


def test_cli_broken_file_exits_2_with_one_line(sqlite_engine, tmp_path):
    before = snapshot(sqlite_engine)
    paths = write_csvs(tmp_path, users=USERS.replace("201,0,31,", "201,0,thirty-one,"))
    done = import_cli(paths, str(sqlite_engine.url), tmp_path)
    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines() == [
        "error: users.csv, row 3, column 'age': 'thirty-one' is not an integer"
    ]
    assert_unchanged(before, sqlite_engine)


def test_cli_missing_file_exits_2_with_one_line(sqlite_engine, tmp_path, monkeypatch, capsys):
    paths = write_csvs(tmp_path) | {"users": tmp_path / "nope.csv"}
    monkeypatch.setenv("DATABASE_URL", str(sqlite_engine.url))
    monkeypatch.chdir(tmp_path)  # in process (an interpreter start costs seconds): the same main()
    code = main_script.main(["--quiet", "import-csv", *(f"--{n}={p}" for n, p in paths.items())])
    assert code == 2
    assert capsys.readouterr().err.splitlines() == [
        f"error: CSV file for user_data not found: {tmp_path / 'nope.csv'}"
    ]


# --- serving users and categories the model never saw ---------------------------------------------------


@pytest.fixture(scope="session")
def demo(tmp_path_factory):
    return trained_demo(tmp_path_factory.getbasetemp() / "trained_demo")


def test_unseen_topic_maps_to_the_unknown_bucket(demo):
    vocab = load_model_file(demo.model_path).vocabs["topic"]
    assert vocab[0] == UNKNOWN and "astrology" not in vocab
    assert encode(pd.Series(["astrology", vocab[1]]), vocab).tolist() == [0, 1]


def test_user_added_after_training_gets_recommendations(demo, db_url, engine):
    copy_tables(demo, db_url)
    with Session(engine) as session:
        new_id = session.scalar(select(func.max(User.user_id))) + 1
        session.add(
            User(
                user_id=new_id,
                gender=1,
                age=33,
                country="Atlantis",
                city="Poseidonia",
                exp_group=2,
                os="Android",
                source="organic",
            )
        )
        session.commit()
    moment = "2021-12-20 12:00:00"
    with TestClient(create_app(demo.replace(database_url=db_url))) as client:
        response = client.get("/post/recommendations/", params={"id": new_id, "time": moment, "limit": 5})
        assert response.status_code == 200, response.text
        recommender = client.app.state.recommender
        state = recommender.state
        assert state.user_row(new_id) < 0, "the model file must not know the new user"
        with Session(engine) as session:
            features, history = recommender.newcomer(state, session.get(User, new_id))
        rows = recommender.recommend(state, 0, parse_time(moment), 5, users=features, histories=history)
        expected = state.post_ids[rows]
        missing = client.get("/post/recommendations/", params={"id": new_id + 1, "time": moment})

    categorical = dict(zip(USER_CATEGORICALS, features.categorical[0].tolist(), strict=True))
    assert categorical["country"] == 0 and categorical["city"] == 0, f"not the unknown bucket: {categorical}"
    posts = response.json()
    assert [post["id"] for post in posts] == expected.tolist(), "not the static-features recommendation"
    known_posts = set(demo_tables(demo)[1]["post_id"])
    assert all(post["id"] in known_posts and post["text"] for post in posts)
    assert missing.status_code == 404 and missing.json()["detail"] == f"user {new_id + 1} not found"
