"""The live service follows its tables: new posts, late feed rows, new users, moving statistics.

Each test runs the real app (lifespan, model file, database) on SQLite and on PostgreSQL, writes to the
tables as a writer beside the service would, runs refresh cycles (refresh.TableFollower) and reads the
answers over the HTTP interface and the state the answers come from.
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import append_feed
from fastapi.testclient import TestClient
from sqlalchemy import delete, update
from sqlalchemy.orm import Session

import database
import get_features_table
import main_script
from app import MAX_LIMIT, create_app, refresh_once
from features import build_user_histories, post_statistics, user_features
from refresh import unseen
from serving import FeedRows
from table_post import Post
from times import DAY_SECONDS, format_time, to_seconds

URL = "/post/recommendations/"
NEW_TEXT = "Chess grandmasters gather in Reykjavik for a rapid tournament; the favourite loses in round two."


@pytest.fixture(scope="module")
def tiny_tables(tiny_model):
    return main_script.load_tables(tiny_model, progress=False)


@pytest.fixture
def live(tiny_model, tiny_tables, db_url):
    """(client, app, settings): the tiny model served over `db_url` holding the tiny tables; refresh
    cycles run only when a test calls refresh_once."""
    users, posts, feed = tiny_tables
    engine = database.make_engine(db_url)
    get_features_table.write_tables(engine, users=users, posts=posts, feed=feed, progress=False)
    engine.dispose()
    settings = tiny_model.replace(database_url=db_url, refresh_seconds=0)
    app = create_app(settings)
    with TestClient(app) as client:
        yield client, app, settings


def recommended(client, user: int, when: str, limit: int = MAX_LIMIT) -> list[int]:
    response = client.get(URL, params={"id": user, "time": when, "limit": limit})
    assert response.status_code == 200, response.text
    return [post["id"] for post in response.json()]


def feed_rows(**columns) -> pd.DataFrame:
    frame = pd.DataFrame(columns)
    frame["target"] = np.where(frame["action"] == "view", 0, 0)
    return frame


def add_user(url: str, user_id: int) -> None:
    user = {"user_id": [user_id], "gender": [0], "age": [29], "country": ["Russia"], "city": ["Kazan"]}
    user |= {"exp_group": [1], "os": ["iOS"], "source": ["organic"]}
    engine = database.make_engine(url)
    get_features_table.write_tables(engine, users=pd.DataFrame(user), replace=False, progress=False)
    engine.dispose()


def add_post(url: str, post_id: int, text: str = NEW_TEXT, topic: str = "sport") -> None:
    engine = database.make_engine(url)
    posts = pd.DataFrame({"post_id": [post_id], "text": [text], "topic": [topic]})
    get_features_table.write_tables(engine, posts=posts, replace=False, progress=False)
    engine.dispose()


def table_counts(url: str, users: np.ndarray, post_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(events, likes) per user over the whole feed table: what the served histories must count."""
    engine = database.make_engine(url)
    feed = get_features_table.read_table(engine, "feed_data")
    engine.dispose()
    histories = build_user_histories(feed, np.sort(users), post_ids)
    return histories.counts_before(np.arange(len(users)), np.full(len(users), 2**40))


def test_one_refresh_reflects_every_row_post_and_user(live, db_url, tiny_tables):
    """The issue's freshness check: a new post, 1,000 feed rows up to an hour into the past (some
    before the watermark, some equal to each other), a new user with a like; one refresh; all of it."""
    client, app, settings = live
    users, posts, _feed = tiny_tables
    recommender = app.state.recommender
    watermark = recommender.snapshot.end - 1
    new_post, new_user = int(posts["post_id"].max()) + 1, int(users["user_id"].max()) + 1
    add_post(db_url, new_post)
    assert main_script.sync_post_embeddings(settings, progress=False) >= 1
    add_user(db_url, new_user)

    rng = np.random.default_rng(7)
    n = 1000
    some_posts = np.append(posts["post_id"].to_numpy(), new_post)
    rows = feed_rows(
        timestamp=pd.to_datetime(watermark + rng.integers(-3600, 600, n), unit="s"),
        user_id=rng.choice(users["user_id"].to_numpy(), n),
        post_id=rng.choice(some_posts, n),
        action=np.where(rng.random(n) < 0.3, "like", "view"),
    )
    rows.iloc[-5:] = rows.iloc[:5].to_numpy()  # five rows equal to five others: the table has no key
    liked_by_newcomer = int(posts["post_id"].iloc[3])
    newcomer = feed_rows(
        timestamp=pd.to_datetime([watermark - 1200, watermark - 1190], unit="s"),
        user_id=[new_user] * 2,
        post_id=[liked_by_newcomer] * 2,
        action=["view", "like"],
    )
    inserted = pd.concat([rows, newcomer], ignore_index=True)
    append_feed(db_url, inserted)
    assert (to_seconds(inserted["timestamp"]) < watermark).sum() > 500, "most rows are late"

    report = refresh_once(app)
    assert (report.feed_rows, report.users, report.posts) == (len(inserted), 1, 1), report
    assert refresh_once(app).feed_rows == 0, "a second refresh merged rows again"
    state = recommender.state
    merged = state.rows.to_frame().sort_values(
        ["seconds", "user_id", "post_id", "is_like"], ignore_index=True
    )
    expected = pd.DataFrame(
        {
            "seconds": to_seconds(inserted["timestamp"]),
            "user_id": inserted["user_id"].to_numpy(np.int64),
            "post_id": inserted["post_id"].to_numpy(np.int64),
            "is_like": (inserted["action"] == "like").to_numpy(),
        }
    ).sort_values(["seconds", "user_id", "post_id", "is_like"], ignore_index=True)
    pd.testing.assert_frame_equal(merged, expected)  # every row once, the five duplicates twice

    all_users = state.users.user_ids
    events, likes = state.histories.counts_before(np.arange(len(all_users)), np.full(len(all_users), 2**40))
    order = np.argsort(all_users)
    expected_events, expected_likes = table_counts(db_url, all_users, np.sort(state.post_ids))
    assert np.array_equal(events[order], expected_events) and np.array_equal(likes[order], expected_likes)

    later = format_time(watermark + DAY_SECONDS)
    likes_now = inserted[inserted["action"] == "like"]
    for user, liked in likes_now.groupby("user_id")["post_id"].agg(set).head(15).items():
        assert not set(recommended(client, int(user), later)) & liked, f"user {user} sees a post they liked"
    assert liked_by_newcomer not in recommended(client, new_user, later), "the new user's like"
    assert state.user_row(new_user) >= 0, "the new user joined the state"

    row = int(state.post_rows(np.array([new_post]))[0])
    assert row >= 0 and state.live[row] and np.isfinite(state.ranking_matrix[row]).all()
    assert any(new_post in recommended(client, int(u), later) for u in users["user_id"].iloc[:40])


def test_a_late_row_and_a_second_row_in_the_last_second_are_merged(live, db_url, tiny_tables):
    """Before: rows older than the watermark, and a second equal row in the snapshot's last second,
    were never read until a restart."""
    client, app, _settings = live
    feed = tiny_tables[2]
    last = feed[feed["timestamp"] == feed["timestamp"].max()].iloc[[0]]
    user = int(last["user_id"].iloc[0])
    when = format_time(app.state.recommender.snapshot.end + 3600)
    top = recommended(client, user, when, limit=5)[0]
    watermark = app.state.recommender.snapshot.end - 1
    late_like = feed_rows(
        timestamp=pd.to_datetime([watermark - 1800], unit="s"), user_id=[user], post_id=[top], action=["like"]
    )
    append_feed(db_url, pd.concat([last, late_like]))
    assert refresh_once(app).feed_rows == 2
    assert top not in recommended(client, user, when)
    events, _ = app.state.recommender.state.histories.counts_before(
        np.array([app.state.recommender.state.user_row(user)]), np.array([watermark + 10])
    )
    assert events[0] == (feed["user_id"] == user).sum() + 2


def test_rows_older_than_the_lookback_are_merged_and_logged(live, db_url, tiny_tables, caplog):
    client, app, _settings = live
    follower = app.state.follower
    follower.lookback = 600
    user = int(tiny_tables[2]["user_id"].iloc[-1])
    when = format_time(follower.watermark + DAY_SECONDS)
    top = recommended(client, user, when, limit=5)[0]
    # in the first day the audit counts: the day where the window starts, before the window
    day_before_window = (follower.watermark - 600) // DAY_SECONDS * DAY_SECONDS + 1
    append_feed(
        db_url,
        feed_rows(
            timestamp=pd.to_datetime([day_before_window], unit="s"),
            user_id=[user],
            post_id=[top],
            action=["like"],
        ),
    )
    with caplog.at_level(logging.WARNING, logger="recommender"):
        report = refresh_once(app)
    assert (report.feed_rows, report.late_rows) == (1, 1), report
    assert "arrived after the lookback window" in caplog.text
    assert top not in recommended(client, user, when)
    for _ in range(100):  # a whole rotation of the audit: nothing is merged twice
        assert refresh_once(app).feed_rows == 0


def test_a_new_users_like_is_excluded_like_a_known_users(live, db_url, tiny_tables):
    """Before: the refresh dropped rows of users the model file did not know, and the newcomer path
    skipped the exclusion, so the new user was recommended the very post they had liked."""
    client, app, _settings = live
    new_user = int(tiny_tables[0]["user_id"].max()) + 7
    add_user(db_url, new_user)
    when = format_time(app.state.recommender.snapshot.end + 600)
    top = recommended(client, new_user, when, limit=5)[0]  # served before any refresh: user_data row
    append_feed(
        db_url,
        feed_rows(
            timestamp=pd.to_datetime([app.state.recommender.snapshot.end + 60] * 2, unit="s"),
            user_id=[new_user] * 2,
            post_id=[top] * 2,
            action=["view", "like"],
        ),
    )
    refresh_once(app)
    assert top not in recommended(client, new_user, when)
    state = app.state.recommender.state
    row = state.user_row(new_user)
    features = user_features(
        tiny_tables[0].head(0), app.state.recommender.vocabs, app.state.recommender.age_scaler
    )
    assert row >= len(app.state.recommender.snapshot.users.user_ids) and features.categorical.shape[1] == 7
    assert state.histories.counts_before(np.array([row]), np.array([2**40]))[1][0] == 1


def test_a_limit_beyond_the_eligible_posts_returns_only_eligible_ones(live, db_url, tiny_tables):
    """Before: with `limit` above the posts left, already-liked posts came back (scored -inf, kept)."""
    client, app, _settings = live
    users, posts, _feed = tiny_tables
    user = int(users["user_id"].iloc[0])
    keep = set(posts["post_id"].iloc[:3])
    liked = [int(p) for p in posts["post_id"] if p not in keep]
    moment = app.state.recommender.snapshot.end + 60
    append_feed(
        db_url,
        feed_rows(
            timestamp=pd.to_datetime([moment] * len(liked), unit="s"),
            user_id=[user] * len(liked),
            post_id=liked,
            action=["like"] * len(liked),
        ),
    )
    refresh_once(app)
    got = recommended(client, user, format_time(moment + 60), limit=MAX_LIMIT)
    assert set(got) <= keep and len(got) <= 3, got


def test_a_post_removed_from_the_table_is_no_longer_recommended(live, db_url, tiny_tables):
    client, app, _settings = live
    user = int(tiny_tables[0]["user_id"].iloc[5])
    when = format_time(app.state.recommender.snapshot.end)
    top = recommended(client, user, when, limit=5)[0]
    engine = database.make_engine(db_url)
    with Session(engine) as session:
        session.execute(delete(Post).where(Post.post_id == top))
        session.commit()
    engine.dispose()
    refresh_once(app)
    assert top not in recommended(client, user, when)


def test_post_statistics_follow_the_feed(live, db_url, tiny_tables):
    """The item matrix after a refresh is the item tower on the statistics of the whole feed as it is."""
    _client, app, _settings = live
    users, posts, feed = tiny_tables
    recommender = app.state.recommender
    target = int(posts["post_id"].iloc[10])
    row = int(recommender.state.post_rows(np.array([target]))[0])
    before = recommender.state.ranking_matrix[row].copy()
    start = recommender.snapshot.end + 3600
    n = 400
    burst = feed_rows(
        timestamp=pd.to_datetime(start + np.arange(n) * 60, unit="s"),
        user_id=np.resize(users["user_id"].to_numpy(), n),
        post_id=[target] * n,
        action=np.where(np.arange(n) % 3 == 0, "like", "view"),
    )
    append_feed(db_url, burst)
    report = refresh_once(app)
    state = recommender.state
    assert report.feed_rows == len(state.rows) == n and report.late_rows == 0, "counted twice"
    whole = pd.concat([feed, burst], ignore_index=True)
    stats = post_statistics(whole, state.post_ids, cutoff=state.stats_time, first=recommender.snapshot.start)
    mean, std = recommender.stats_scaler
    with torch.inference_mode():
        expected = recommender.model.ranking_rows(
            state.post_text, state.post_topic, torch.from_numpy((stats - mean) / std).float()
        )
    np.testing.assert_allclose(state.ranking_matrix, expected.numpy(), atol=1e-5)
    assert not np.allclose(state.ranking_matrix[row], before, atol=1e-3), "the post's vector moved"
    assert state.stats_time == start + (n - 1) * 60 + 1


def test_a_new_post_waits_for_its_embedding_then_joins(live, db_url, tiny_tables):
    _client, app, settings = live
    new_post = int(tiny_tables[1]["post_id"].max()) + 3
    add_post(db_url, new_post)
    report = refresh_once(app)
    assert (report.posts, report.waiting_posts) == (0, 1)
    assert app.state.recommender.state.post_rows(np.array([new_post]))[0] < 0
    assert main_script.sync_post_embeddings(settings, progress=False) >= 1
    assert main_script.sync_post_embeddings(settings, progress=False) == 0, "nothing left to embed"
    engine = database.make_engine(db_url)  # an edited text needs a new embedding
    with Session(engine) as session:
        session.execute(update(Post).where(Post.post_id == new_post).values(text=NEW_TEXT + " Edited."))
        session.commit()
    engine.dispose()
    assert refresh_once(app).waiting_posts == 1, "a vector of the old text must not be used"
    assert main_script.sync_post_embeddings(settings, progress=False) == 1
    report = refresh_once(app)
    assert (report.posts, report.waiting_posts) == (1, 0)
    state = app.state.recommender.state
    body = state.response_body(state.post_rows(np.array([new_post])))
    assert body is not None and b"Edited." in body


def test_unseen_is_a_multiset_difference():
    def rows(*keys):
        return FeedRows.from_frame(pd.DataFrame(keys, columns=["seconds", "user_id", "post_id", "is_like"]))

    fetched = rows((1, 2, 3, False), (1, 2, 3, False), (1, 2, 3, True), (5, 2, 3, False))
    held = rows((1, 2, 3, False), (9, 9, 9, False))
    extra = unseen(fetched, held).to_frame()
    assert sorted(map(tuple, extra.itertuples(index=False))) == [
        (1, 2, 3, False),
        (1, 2, 3, True),
        (5, 2, 3, False),
    ]
    assert len(unseen(held, held)) == 0 and len(unseen(FeedRows.empty(), held)) == 0


def test_a_cycle_that_fails_half_way_loses_no_row(live, db_url, tiny_tables, monkeypatch):
    """Before: the window's rows moved the watermark as soon as they were read; a failure later in the
    same cycle (the database dropping out) left them out of the state and out of every later window."""
    client, app, _settings = live
    follower = app.state.follower
    user = int(tiny_tables[2]["user_id"].iloc[-1])
    when = format_time(follower.watermark + DAY_SECONDS)
    top = recommended(client, user, when, limit=5)[0]
    append_feed(
        db_url,
        feed_rows(
            timestamp=pd.to_datetime([follower.watermark + 5], unit="s"),
            user_id=[user],
            post_id=[top],
            action=["like"],
        ),
    )

    def outage(*_args, **_kwargs):
        raise ConnectionError("the database went away")

    with monkeypatch.context() as patched:
        patched.setattr(follower, "_late_rows", outage)
        with pytest.raises(ConnectionError):
            refresh_once(app)
    assert top in recommended(client, user, when), "nothing was merged by the failed cycle"
    assert refresh_once(app).feed_rows == 1, "the next cycle reads the row again"
    assert top not in recommended(client, user, when)


def test_a_row_dated_after_the_clock_does_not_age_the_others(live, db_url, tiny_tables):
    """Before: one row from a writer whose clock ran years ahead became the watermark; every real row
    after it was older than the lookback window, and every post's statistics were taken in the future."""
    _client, app, _settings = live
    follower, recommender = app.state.follower, app.state.recommender
    users, posts = tiny_tables[0]["user_id"], tiny_tables[1]["post_id"]
    watermark = follower.watermark
    future = int(pd.Timestamp("2031-01-01").timestamp())
    rows = feed_rows(
        timestamp=pd.to_datetime([future, watermark + 60], unit="s"),
        user_id=[int(users.iloc[0])] * 2,
        post_id=[int(posts.iloc[0])] * 2,
        action=["view", "view"],
    )
    append_feed(db_url, rows)
    assert refresh_once(app).feed_rows == 2
    assert follower.watermark == watermark + 60 and recommender.state.stats_time == watermark + 61
    append_feed(db_url, rows.iloc[[1]].assign(timestamp=pd.to_datetime([watermark + 30], unit="s")))
    assert refresh_once(app).feed_rows == 1, "a row inside the real window is read at once"


def test_a_new_post_without_text_does_not_stop_the_refresh(live, monkeypatch):
    """Before: text_key(None) raised in every cycle, so nothing at all was merged any more."""
    _client, app, _settings = live
    follower = app.state.follower
    state = app.state.recommender.state
    new_id = int(state.post_ids.max()) + 11
    monkeypatch.setattr(
        follower,
        "_posts",
        lambda ids: pd.DataFrame({"post_id": ids, "text": [None] * len(ids), "topic": "sport"}),
    )
    ready, waiting = follower._new_posts(state, np.append(state.post_ids, new_id))
    assert ready is None and waiting == 1


def test_deployments_with_two_encoders_keep_their_own_embeddings(live, db_url, tiny_tables):
    """Before: post_embedding was keyed by post alone, so two encoders deleted each other's rows."""
    _client, _app, settings = live
    add_post(db_url, int(tiny_tables[1]["post_id"].max()) + 21)
    other = settings.replace(embed_max_length=64)  # another encoder key: name;max_length=64
    first, second = (main_script.sync_post_embeddings(s, progress=False) for s in (settings, other))
    assert first >= 1 and second >= 1
    assert main_script.sync_post_embeddings(settings, progress=False) == 0, "its rows were kept"
    assert main_script.sync_post_embeddings(other, progress=False) == 0


def test_the_embedding_job_outlives_a_database_outage(tmp_path, capsys):
    unreachable = f"postgresql://nobody@127.0.0.1:{_free_port()}/none"
    settings = main_script.Settings(database_url=unreachable, embed_cache_dir=tmp_path)
    main_script.follow_post_embeddings(settings, every=0, cycles=2)
    assert capsys.readouterr().out.count("database error") == 2


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
