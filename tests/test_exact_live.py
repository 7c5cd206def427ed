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
import threading

import numpy as np
import pandas as pd
import pytest
from conftest import append_feed, plain_posts, plain_users
from fastapi.testclient import TestClient
from sqlalchemy import and_, delete, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session
from test_live import add_post, feed_rows, live, recommended, tiny_tables  # noqa: F401 (fixtures)

import changelog
import database
import get_features_table
import main_script
from app import create_app, refresh_once
from serving import request_inputs
from table_feed import Feed
from times import DAY_SECONDS, format_time, to_seconds

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
    n = len(state.post_ids)
    full = state.post_ids[recommender.recommend(state, row, when, n)].tolist()
    # the scores the search ranks by: equal rows may still differ in the last bit (a BLAS kernel sums
    # blocks of rows and the tail differently), so the test looks at the ties that are exact
    scores = state.search.matrix @ recommender.query(state, row, when)
    by_score = pd.Series(twins).groupby(scores[state.post_rows(np.array(twins))]).agg(list)
    tied = [group for group in by_score if len(group) >= 2]
    assert tied, f"no two of the identical posts score exactly alike: {by_score.to_dict()}"
    for group in tied:
        at = [full.index(p) for p in group]
        assert at == list(range(at[0], at[0] + len(group))), "equal scores are neighbours"
        assert [full[i] for i in at] == sorted(group), "ties go to the lower post id"
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


# ----------------------------------------------------------------------------- the change log


def follow_the_log(app, url: str) -> None:
    """Install the change log on `url` and follow it from now: the tables hold exactly the rows of the
    model's snapshot, as if the model had been trained on this database with the log in place."""
    engine = database.make_engine(url)
    changelog.install(engine)
    with engine.connect() as conn:
        position = changelog.current_position(conn)
    engine.dispose()
    app.state.follower.path, app.state.follower.log_position = "log", position


def as_sorted_frame(rows) -> pd.DataFrame:
    keys = ["seconds", "user_id", "post_id", "is_like"]
    return rows.to_frame().sort_values(keys, ignore_index=True)


def written_rows(frame: pd.DataFrame):
    from serving import FeedRows

    return FeedRows(
        to_seconds(frame["timestamp"]),
        frame["user_id"].to_numpy(np.int64),
        frame["post_id"].to_numpy(np.int64),
        (frame["action"] == "like").to_numpy(),
    )


@POSTGRES_ONLY
def test_the_log_reads_transactions_that_commit_out_of_order(live, db_url, tiny_tables):  # noqa: F811
    """Writer A takes its log ids first and commits last: a reader that kept `id > last id` would
    skip A's rows for good."""
    _client, app, _settings = live
    follow_the_log(app, db_url)
    user, post = some_user_and_post(app, tiny_tables)
    old = app.state.recommender.snapshot.end - 20 * DAY_SECONDS  # weeks old: no window would see it
    engine = database.make_engine(db_url)
    with engine.connect() as writer_a:
        transaction = writer_a.begin()
        writer_a.execute(
            text("INSERT INTO feed_data VALUES (:t, :u, :p, 'like', 0)"),
            {"t": pd.Timestamp(old, unit="s").to_pydatetime(), "u": user, "p": post},
        )
        append_feed(db_url, one_row(old + 60, user, post + 1))  # writer B: later ids, committed first
        report = refresh_once(app)
        assert report.feed_rows == 1 and merged_count(app, user, post + 1) == 1, report
        assert merged_count(app, user, post) == 0, "A has not committed"
        transaction.commit()
    engine.dispose()
    assert refresh_once(app).feed_rows == 1, "A's row, committed after B's"
    assert merged_count(app, user, post) == 1 and refresh_once(app).feed_rows == 0
    assert app.state.follower.health().lag_rows == 0


def test_two_concurrent_writers_lose_nothing(live, db_url, tiny_tables):  # noqa: F811
    """Two writers insert 10,000 rows each (random timestamps, weeks old too, some rows equal) in
    transactions of random size while the service refreshes: afterwards every row is merged once,
    every like excluded for its user, and each post's like count is the table's."""
    _client, app, _settings = live
    follow_the_log(app, db_url)
    users, posts, _feed = tiny_tables
    end = app.state.recommender.snapshot.end
    stop, failures, written = threading.Event(), [], {}

    def write(seed: int) -> None:
        try:
            write_rows(seed)
        except Exception as exc:  # reported below
            failures.append(exc)

    def write_rows(seed: int) -> None:
        rng = np.random.default_rng(seed)
        parts, left = [], 10_000
        while left:
            n = min(left, int(rng.integers(200, 1500)))
            n = left if left - n < 10 else n  # every transaction holds ten rows or more
            rows = feed_rows(
                timestamp=pd.to_datetime(end - rng.integers(-3600, 6 * 7 * DAY_SECONDS, n), unit="s"),
                user_id=rng.choice(users["user_id"].to_numpy(), n),
                post_id=rng.choice(posts["post_id"].to_numpy(), n),
                action=np.where(rng.random(n) < 0.3, "like", "view"),
            )
            rows.iloc[: n // 10] = rows.iloc[n // 10 : 2 * (n // 10)].to_numpy()  # equal rows
            append_feed(db_url, rows)
            parts.append(rows)
            left -= n
        written[seed] = pd.concat(parts, ignore_index=True)

    busy_cycles = []

    def refresh() -> None:
        while not stop.is_set():
            try:
                busy_cycles.append(refresh_once(app).feed_rows)
            except Exception as exc:  # reported below: the test must not hang on a failing cycle
                failures.append(exc)
            stop.wait(0.3)

    writers = [threading.Thread(target=write, args=(seed,)) for seed in (1, 2)]
    refresher = threading.Thread(target=refresh)
    for thread in [*writers, refresher]:
        thread.start()
    for thread in writers:
        thread.join()
    stop.set()
    refresher.join()
    refresh_once(app)
    assert not failures, failures[:3]
    assert sum(1 for rows in busy_cycles if rows) >= 2, f"no refresh while writing: {busy_cycles}"

    state = app.state.recommender.state
    expected = written_rows(pd.concat(written.values(), ignore_index=True))
    pd.testing.assert_frame_equal(as_sorted_frame(state.rows), as_sorted_frame(expected))

    engine = database.make_engine(db_url)
    table = get_features_table.read_table(engine, "feed_data")
    engine.dispose()
    likes = table[table["action"] == "like"]
    for user, liked in likes.groupby("user_id")["post_id"].agg(set).items():
        row = state.user_row(int(user))
        excluded = set(state.post_ids[state.histories.likes.posts_before(row, 2**40)].tolist())
        assert liked <= excluded, f"user {user}: likes not excluded: {sorted(liked - excluded)[:5]}"
    histories = state.histories
    served = np.zeros(len(state.post_ids), np.int64)
    for layer in (histories.base, histories.delta):
        is_like = layer.ev_action == 1
        served += np.bincount(layer.ev_post[is_like], minlength=len(state.post_ids))
    counts = likes.groupby("post_id").size()
    table_likes = counts.reindex(state.post_ids, fill_value=0).to_numpy()
    np.testing.assert_array_equal(served, table_likes)


@POSTGRES_ONLY
def test_the_feed_read_and_its_log_position_agree(db_url, monkeypatch):
    """read_feed takes the feed and its position in one snapshot: a transaction that commits while the
    feed is being read is in the log after the position, not in the rows read (never in both, never
    in neither)."""
    engine = database.make_engine(db_url)
    feed = pd.concat([one_row(1_639_958_400 + i, 1, 1, "view") for i in range(3)], ignore_index=True)
    get_features_table.write_tables(engine, users=plain_users([1, 2]), posts=plain_posts(2), feed=feed)
    changelog.install(engine)
    read_table = get_features_table.read_table
    with engine.connect() as writer:
        transaction = writer.begin()
        writer.execute(text("INSERT INTO feed_data VALUES ('2021-12-21 00:00:00', 2, 2, 'like', 0)"))

        def read_then_commit(*args, **kwargs):
            frame = read_table(*args, **kwargs)
            transaction.commit()  # the writer commits while the training is still reading
            return frame

        monkeypatch.setattr(changelog.get_features_table, "read_table", read_then_commit)
        read = changelog.read_feed(engine)
        monkeypatch.undo()
    append_feed(db_url, one_row(1_640_131_200, 2, 1))
    position = changelog.LogPosition.from_dict(read.attrs["log_position"])
    after = changelog.read_since(engine, position)
    engine.dispose()
    assert len(read) == 3, "the row committed during the read is not in the read"
    assert sorted(after.added.post_id.tolist()) == [1, 2] and len(after.removed) == 0, after


def test_a_worker_started_later_catches_up_from_the_model_files_position(tiny_model, tmp_path):
    """Case 6: a worker started after a late like arrived missed it until its own day audit reached
    the like's day; from the model file's log position it merges it at its first cycle, and two
    workers answer alike."""
    copy = tmp_path / "demo.db"
    source = sqlite3.connect(make_url(tiny_model.db_url).database)
    with sqlite3.connect(copy) as target:
        source.backup(target)
    source.close()
    settings = tiny_model.replace(database_url=f"sqlite:///{copy}", refresh_seconds=0)
    early = create_app(settings)
    with TestClient(early) as first:
        assert early.state.follower.choose_path() == "log"
        recommender = early.state.recommender
        state = recommender.state
        row = 5
        user = int(state.users.user_ids[row])
        when = recommender.snapshot.end + 600
        top = int(state.post_ids[recommender.recommend(state, row, when, 1)][0])
        old = recommender.snapshot.end - 30 * DAY_SECONDS
        append_feed(settings.db_url, one_row(old, user, top))
        late = create_app(settings)
        with TestClient(late) as second:
            for app in (early, late):
                report = refresh_once(app)
                assert report.feed_rows == 1, report
            for client in (first, second):
                assert top not in recommended(client, user, format_time(when))
            answers = [recommended(c, user, format_time(when), limit=20) for c in (first, second)]
            assert answers[0] == answers[1], "two workers answer alike"


def test_a_deleted_like_no_longer_counts_on_the_log(live, db_url, tiny_tables):  # noqa: F811
    """Deletes are followed: a like merged from the log and then deleted leaves the history and the
    exclusions; an insert and a delete between two cycles cancel out."""
    _client, app, _settings = live
    follow_the_log(app, db_url)
    user = int(tiny_tables[0]["user_id"].iloc[3])
    post, second, third = (int(p) for p in tiny_tables[1]["post_id"].iloc[:3])
    moment = app.state.recommender.snapshot.end + 60
    append_feed(db_url, pd.concat([one_row(moment, user, post), one_row(moment + 1, user, second)]))
    assert refresh_once(app).feed_rows == 2
    assert post in set(recommended_excluded(app, user))
    engine = database.make_engine(db_url)
    with engine.begin() as conn:
        conn.execute(
            delete(Feed).where(Feed.user_id == user, Feed.post_id.in_([post, second]), Feed.action == "like")
        )
    engine.dispose()
    append_feed(db_url, one_row(moment + 2, user, third))
    engine = database.make_engine(db_url)
    with engine.begin() as conn:  # inserted and deleted before the next cycle
        conn.execute(delete(Feed).where(Feed.user_id == user, Feed.post_id == third))
    engine.dispose()
    report = refresh_once(app)
    assert (report.feed_rows, report.removed_rows) == (0, 2), report
    assert len(app.state.recommender.state.rows) == 0
    assert post not in set(recommended_excluded(app, user)), "the deleted like still excludes its post"


def recommended_excluded(app, user: int) -> list[int]:
    """Post ids the state excludes for this user (liked before the far future)."""
    state = app.state.recommender.state
    rows = state.histories.likes.posts_before(state.user_row(user), 2**40)
    return state.post_ids[rows].tolist()
