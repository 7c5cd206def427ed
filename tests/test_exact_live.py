"""An exact live path: every committed feed row reaches the service once, whatever its timestamp.

One test per defect found by trying the service as an adversarial writer would (each failed on the code
before its fix), and tests that fail when one line of the refresh or of the serving path is changed
(the window edge, the audit day's end, the bookkeeping order, the audit's difference, the tie order,
the delta rebuilt for new posts, the history strictly before `time`). They reuse test_live's `live`
fixture: the tiny model served over a fresh SQLite or PostgreSQL database, refresh cycles run by hand.
"""

from __future__ import annotations

import logging
import sqlite3

import numpy as np
import pandas as pd
import pytest
from conftest import append_feed, plain_posts, plain_users
from sqlalchemy import and_, delete, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session
from test_live import add_post, feed_rows, live, recommended, tiny_tables  # noqa: F401 (fixtures)

import database
import get_features_table
import main_script
from app import refresh_once
from serving import request_inputs
from table_feed import Feed
from times import DAY_SECONDS, format_time

SQLITE_ONLY = pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
POSTGRES_ONLY = pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)


def one_row(seconds: int, user: int, post: int, action: str = "like") -> pd.DataFrame:
    return feed_rows(
        timestamp=pd.to_datetime([seconds], unit="s"), user_id=[user], post_id=[post], action=[action]
    )


def merged_count(app, user: int, post: int) -> int:
    """How many merged rows (since the snapshot) name this user and post."""
    rows = app.state.recommender.state.rows
    return int(((rows.user_id == user) & (rows.post_id == post)).sum())


def rotate(app, cycles: int) -> int:
    """Run `cycles` refresh cycles; the rows they merged."""
    return sum(refresh_once(app).feed_rows for _ in range(cycles))


def audit_cycles(app) -> int:
    """Cycles for the day audit to visit every day of the table once, and a few more."""
    follower = app.state.follower
    return (follower.watermark - follower.lookback) // DAY_SECONDS - follower.first_day + 5


def some_user_and_post(app, tiny_tables) -> tuple[int, int]:  # noqa: F811
    users, posts, _feed = tiny_tables
    return int(users["user_id"].iloc[3]), int(posts["post_id"].iloc[-2])


# ----------------------------------------------------------------------------- serving


@SQLITE_ONLY
def test_ties_at_the_cut_go_to_the_lower_post_id(live, db_url, tiny_tables):  # noqa: F811
    """Twelve identical new posts score the same: every top-k is a prefix of the full ranking (case 7,
    and the mutation 'ties to the higher post id')."""
    client, app, settings = live
    first = int(tiny_tables[1]["post_id"].max()) + 100
    twins = list(range(first, first + 12))
    for post_id in twins[::-1]:  # written in descending order: the table order must not decide
        add_post(db_url, post_id, text="Twelve identical posts about the same chess match.", topic="sport")
    main_script.sync_post_embeddings(settings, progress=False)
    assert refresh_once(app).posts == 12
    recommender = app.state.recommender
    state = recommender.state
    row = state.user_row(int(tiny_tables[0]["user_id"].iloc[1]))
    when = recommender.snapshot.end + 60
    full = state.post_ids[recommender.recommend(state, row, when, len(state.post_ids))].tolist()
    at = [full.index(p) for p in twins]
    assert at == list(range(at[0], at[0] + 12)), "equal scores: the twelve posts are neighbours"
    assert [full[i] for i in at] == twins, "ties go to the lower post id"
    for k in range(at[0] + 1, at[-1] + 1):  # every cut through the tie
        top = state.post_ids[recommender.recommend(state, row, when, k)].tolist()
        assert top == full[:k], f"top-{k} is not a prefix of the full ranking"
    user = int(state.users.user_ids[row])
    assert recommended(client, user, format_time(when), limit=5) == full[:5]


def test_feed_endpoints_return_equal_rows(live, db_url, tiny_tables):  # noqa: F811
    """Case 8: three equal rows are three rows (the table has no key; ORM identity merged them)."""
    client, app, _settings = live
    user, post = some_user_and_post(app, tiny_tables)
    moment = app.state.recommender.snapshot.end + 3600
    append_feed(db_url, pd.concat([one_row(moment, user, post, "view")] * 3))
    for path in (f"/user/{user}/feed", f"/post/{post}/feed"):
        body = client.get(path, params={"limit": 3}).json()
        assert len(body) == 3, f"{path}: {body}"
        assert all((row["user_id"], row["post_id"]) == (user, post) for row in body), body
        assert body[0]["user"]["id"] == user and body[0]["post"]["id"] == post


@POSTGRES_ONLY
def test_a_timestamptz_feed_column_is_read(live, db_url, tiny_tables):  # noqa: F811
    """Case 9: with `timestamp timestamptz` every cycle failed with a TypeError."""
    client, app, _settings = live
    engine = database.make_engine(db_url)
    with engine.begin() as conn:
        conn.execute(
            text(
                "ALTER TABLE feed_data ALTER COLUMN timestamp TYPE timestamptz"
                " USING timestamp AT TIME ZONE 'UTC'"
            )
        )
    engine.dispose()
    user, post = some_user_and_post(app, tiny_tables)
    moment = app.state.follower.watermark - 60
    append_feed(db_url, one_row(moment, user, post))
    report = refresh_once(app)
    assert report.feed_rows == 1, report
    assert app.state.recommender.state.rows.seconds.tolist() == [moment], "read as UTC"
    assert client.get("/health").json()["status"] == "ok"


def test_a_refresh_that_keeps_failing_shows_in_health(live, monkeypatch):  # noqa: F811
    client, app, settings = live
    follower = app.state.follower
    refresh_once(app)
    assert client.get("/health").json()["refresh"]["consecutive_failures"] == 0

    def broken():
        raise TypeError("cannot compare the feed's timestamps")

    monkeypatch.setattr(follower, "_cycle", broken)
    for failures in range(1, settings.refresh_failures_degraded + 1):
        with pytest.raises(TypeError):
            refresh_once(app)
        health = client.get("/health").json()
        assert health["refresh"]["consecutive_failures"] == failures
        expected = "degraded" if failures >= settings.refresh_failures_degraded else "ok"
        assert health["status"] == expected, health
    assert "TypeError: cannot compare" in health["refresh"]["last_error"]
    monkeypatch.undo()
    refresh_once(app)
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["refresh"]["consecutive_failures"] == 0, health


@SQLITE_ONLY
def test_training_leaves_out_rows_dated_after_the_clock(db_url, tmp_path, caplog):
    """Case 3: one row dated 2031 made the snapshot end in 2031 (every real row late), metrics NaN."""
    feed = pd.concat(
        [one_row(1_639_958_400 + i * 60, 1 + i % 3, 1 + i % 4, "view") for i in range(10)]  # 2021-12-20
        + [one_row(1_924_992_000, 1, 1, "view"), one_row(1_924_992_060, 2, 1)],  # 2031
        ignore_index=True,
    )
    engine = database.make_engine(db_url)
    get_features_table.write_tables(engine, users=plain_users([1, 2, 3]), posts=plain_posts(4), feed=feed)
    engine.dispose()
    settings = main_script.Settings(database_url=db_url, embed_cache_dir=tmp_path)
    with caplog.at_level(logging.WARNING, logger="pipeline"):
        _users, _posts, loaded = main_script.load_tables(settings, progress=False)
    assert len(loaded) == 10 and loaded["timestamp"].max() < pd.Timestamp("2022-01-01"), loaded
    assert "2 rows dated after the clock (the latest 2031-01-01 00:01:00)" in caplog.text


# ----------------------------------------------------------------------------- the timestamp path


@SQLITE_ONLY
def test_sqlite_rows_in_any_text_form_are_merged_once(live, db_url, tiny_tables):  # noqa: F811
    """Case 4: SQLite compares text: '...T...' and Python's '2021-12-20 00:00:00' landed in the wrong
    window or day and were merged again and again."""
    _client, app, _settings = live
    follower = app.state.follower
    user, post = some_user_and_post(app, tiny_tables)
    since = follower.watermark - follower.lookback
    t_form = since - 60  # before the window, the same date: as text 'T' sorted after the window's start
    assert t_form // DAY_SECONDS == since // DAY_SECONDS, "the test needs a window starting after 00:01"
    midnight = (since // DAY_SECONDS - 3) * DAY_SECONDS  # a day the audit reads; no microseconds
    path = make_url(db_url).database
    with sqlite3.connect(path) as conn:
        conn.execute(
            "INSERT INTO feed_data VALUES (?, ?, ?, 'like', 0), (?, ?, ?, 'like', 0)",
            (format_time(t_form).replace(" ", "T"), user, post, format_time(midnight), user, post + 1),
        )
    rotate(app, 2 * audit_cycles(app))
    assert merged_count(app, user, post) == 1, "the 'T' form"
    assert merged_count(app, user, post + 1) == 1, "Python's sqlite3 form at midnight"
    assert sorted(app.state.recommender.state.rows.seconds.tolist()) == sorted([t_form, midnight])


def test_a_delete_and_an_insert_in_the_window_are_both_seen(live, db_url, tiny_tables):  # noqa: F811
    """Case 5: one row deleted and one like added left the count unchanged: the like was not read.
    Deletes are followed: the deleted row no longer counts."""
    _client, app, _settings = live
    user, post = some_user_and_post(app, tiny_tables)
    watermark = app.state.follower.watermark
    append_feed(db_url, one_row(watermark - 100, user, post, "view"))
    assert refresh_once(app).feed_rows == 1
    engine = database.make_engine(db_url)
    with Session(engine) as session:
        doomed = and_(Feed.user_id == user, Feed.post_id == post, Feed.action == "view")
        session.execute(delete(Feed).where(doomed, Feed.timestamp > pd.Timestamp(watermark - 200, unit="s")))
        session.commit()
    engine.dispose()
    append_feed(db_url, one_row(watermark - 50, user, post + 1))
    report = refresh_once(app)
    assert (report.feed_rows, report.removed_rows) == (1, 1), report
    rows = app.state.recommender.state.rows
    assert list(zip(rows.seconds.tolist(), rows.post_id.tolist(), strict=True)) == [
        (watermark - 50, post + 1)
    ]
    row = app.state.recommender.state.user_row(user)
    _, likes = app.state.recommender.state.histories.counts_before(np.array([row]), np.array([2**40]))
    assert likes[0] == ((tiny_tables[2]["user_id"] == user) & (tiny_tables[2]["action"] == "like")).sum() + 1


def test_a_like_before_the_first_day_of_training_is_merged(live, db_url, tiny_tables):  # noqa: F811
    """Case 1: the audit never visited days before the snapshot's first day."""
    _client, app, _settings = live
    user, post = some_user_and_post(app, tiny_tables)
    early = app.state.recommender.snapshot.start - 3 * DAY_SECONDS
    append_feed(db_url, one_row(early, user, post))
    assert rotate(app, audit_cycles(app) + 5) == 1
    assert merged_count(app, user, post) == 1
    assert rotate(app, audit_cycles(app) + 5) == 0, "merged once"


def test_a_late_row_earlier_on_the_windows_first_day_is_merged(live, db_url, tiny_tables):  # noqa: F811
    """Case 2: a row dated earlier on the day where the lookback window starts was in neither the
    window nor any audited day."""
    _client, app, _settings = live
    follower = app.state.follower
    user, post = some_user_and_post(app, tiny_tables)
    since = follower.watermark - follower.lookback
    early_that_day = since // DAY_SECONDS * DAY_SECONDS + 30
    assert early_that_day < since
    append_feed(db_url, one_row(early_that_day, user, post))
    report = refresh_once(app)
    assert (report.feed_rows, report.late_rows) == (1, 1), report
    assert rotate(app, audit_cycles(app)) == 0


# ----------------------------------------------------------------------------- one-line changes


def test_a_row_at_the_windows_first_second_is_read_by_the_window(live, db_url, tiny_tables):  # noqa: F811
    """The window is timestamp >= its start (not >): a row there is read by the window, not as late."""
    _client, app, _settings = live
    follower = app.state.follower
    user, post = some_user_and_post(app, tiny_tables)
    follower.lookback = 3600 + 17  # a shorter window (the held rows shrink with it), off midnight
    follower.window = follower.window.select(
        follower.window.seconds >= follower.watermark - follower.lookback
    )
    append_feed(db_url, one_row(follower.watermark - follower.lookback, user, post))
    report = refresh_once(app)
    assert (report.feed_rows, report.late_rows, report.window_read) == (1, 0, True), report


def test_a_row_at_midnight_belongs_to_its_own_day_only(live, db_url, tiny_tables):  # noqa: F811
    """The audit's day ends before the next midnight (<, not <=): else a row at midnight is read with
    both days and merged twice."""
    _client, app, _settings = live
    follower = app.state.follower
    user, post = some_user_and_post(app, tiny_tables)
    midnight = ((follower.watermark - follower.lookback) // DAY_SECONDS - 2) * DAY_SECONDS
    append_feed(db_url, one_row(midnight, user, post))
    rotate(app, audit_cycles(app) + 3)
    assert merged_count(app, user, post) == 1


def test_a_cycle_that_fails_when_applied_is_read_again(live, db_url, tiny_tables, monkeypatch):  # noqa: F811
    """The bookkeeping moves on only after the state took the changes."""
    _client, app, _settings = live
    user, post = some_user_and_post(app, tiny_tables)
    append_feed(db_url, one_row(app.state.follower.watermark - 30, user, post))

    def fail(_changes):
        raise RuntimeError("the state could not be built")

    monkeypatch.setattr(app.state.recommender, "apply", fail)
    with pytest.raises(RuntimeError):
        refresh_once(app)
    monkeypatch.undo()
    assert refresh_once(app).feed_rows == 1
    assert merged_count(app, user, post) == 1


def test_a_second_late_row_of_a_day_does_not_bring_the_first_again(live, db_url, tiny_tables):  # noqa: F811
    """The audit's difference counts the rows merged since the snapshot: a day audited twice, once
    per late row, merges each row once."""
    _client, app, _settings = live
    follower = app.state.follower
    user, post = some_user_and_post(app, tiny_tables)
    day_start = ((follower.watermark - follower.lookback) // DAY_SECONDS - 1) * DAY_SECONDS
    append_feed(db_url, one_row(day_start + 3600, user, post))
    assert rotate(app, audit_cycles(app)) == 1
    append_feed(db_url, one_row(day_start + 7200, user, post))
    assert rotate(app, audit_cycles(app)) == 1
    assert merged_count(app, user, post) == 2


def test_a_like_of_a_post_that_arrives_later_counts_once_the_post_does(live, db_url, tiny_tables):  # noqa: F811
    """The delta is rebuilt when only posts (or users) were added: a like of a post without an
    embedding waits in the merged rows and joins the history when the post joins."""
    client, app, settings = live
    user = int(tiny_tables[0]["user_id"].iloc[4])
    new_post = int(tiny_tables[1]["post_id"].max()) + 50
    add_post(db_url, new_post)
    moment = app.state.follower.watermark + 60
    append_feed(db_url, one_row(moment, user, new_post))
    assert refresh_once(app).waiting_posts == 1
    main_script.sync_post_embeddings(settings, progress=False)
    report = refresh_once(app)
    assert (report.posts, report.feed_rows) == (1, 0), report
    state = app.state.recommender.state
    row = state.user_row(user)
    _, likes = state.histories.counts_before(np.array([row]), np.array([2**40]))
    assert likes[0] == ((tiny_tables[2]["user_id"] == user) & (tiny_tables[2]["action"] == "like")).sum() + 1
    assert new_post not in recommended(client, user, format_time(moment + 1))


@SQLITE_ONLY
def test_a_request_at_time_t_reads_events_strictly_before_t(live, db_url, tiny_tables):  # noqa: F811
    _client, app, _settings = live
    recommender = app.state.recommender
    user, post = some_user_and_post(app, tiny_tables)
    moment = app.state.follower.watermark + 600
    row = recommender.state.user_row(user)
    config = recommender.model.config
    before = request_inputs(recommender.state.users, recommender.state.histories, row, moment, config)
    append_feed(db_url, one_row(moment, user, post))
    assert refresh_once(app).feed_rows == 1
    state = recommender.state
    after = request_inputs(state.users, state.histories, row, moment, config)
    for name in ("posts", "actions", "recency", "slots", "numeric"):
        np.testing.assert_array_equal(getattr(before, name), getattr(after, name), err_msg=name)
    later = request_inputs(state.users, state.histories, row, moment + 1, config)
    assert len(later.posts) > len(after.posts) or not np.array_equal(later.numeric, after.numeric)
