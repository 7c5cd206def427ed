"""Feature building: vectorised histories and aggregates, and the leakage rules they must keep."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from conftest import plain_posts, plain_users

from features import (
    UNKNOWN,
    NotEnoughDataError,
    build_dataset,
    build_user_histories,
    build_vocab,
    encode,
    post_statistics,
    time_features,
)
from histories import ACTION_LIKE, ACTION_VIEW, Histories, LayeredHistories
from times import DAY_SECONDS, to_seconds

T0 = pd.Timestamp("2021-10-01 00:00:00")


def make_feed(rng: np.random.Generator, n: int = 3000, n_users: int = 40, n_posts: int = 25) -> pd.DataFrame:
    views = pd.DataFrame(
        {
            "timestamp": T0 + pd.to_timedelta(np.sort(rng.integers(0, 40 * DAY_SECONDS, n)), unit="s"),
            "user_id": rng.integers(0, n_users, n) + 200,
            "post_id": rng.integers(1, n_posts + 1, n),
            "action": "view",
            "target": (rng.random(n) < 0.15).astype(int),
        }
    )
    likes = views[views["target"] == 1].assign(
        timestamp=lambda f: f["timestamp"] + pd.Timedelta(seconds=30), action="like", target=0
    )
    return pd.concat([views, likes]).sort_values("timestamp", kind="stable").reset_index(drop=True)


@pytest.fixture
def feed() -> pd.DataFrame:
    return make_feed(np.random.default_rng(0))


def naive_history(feed: pd.DataFrame, user_id: int, time: pd.Timestamp, max_history: int) -> list[tuple]:
    """The slow, obviously right definition: the user's last events strictly before `time`."""
    rows = feed[(feed["user_id"] == user_id) & (feed["timestamp"] < time)]
    rows = rows.assign(rank=(rows["action"] == "like").astype(int)).sort_values(
        ["timestamp", "rank"], kind="stable"
    )
    return list(zip(rows["post_id"], rows["action"], strict=True))[-max_history:]


def test_history_window_matches_the_slow_definition(feed):
    user_ids = np.arange(200, 240)
    post_ids = np.arange(1, 26)
    histories = build_user_histories(feed, user_ids, post_ids)
    rng = np.random.default_rng(1)
    query_users = rng.integers(200, 240, 60)
    query_times = T0 + pd.to_timedelta(rng.integers(0, 41 * DAY_SECONDS, 60), unit="s")
    posts, actions, _recency, mask = histories.window(query_users - 200, to_seconds(query_times), 8)
    for i, (user, time) in enumerate(zip(query_users, query_times, strict=True)):
        expected = naive_history(feed, user, time, 8)
        got = [
            (post_ids[p], "like" if a == ACTION_LIKE else "view")
            for p, a, m in zip(posts[i], actions[i], mask[i], strict=True)
            if m
        ]
        assert got == expected, f"history of user {user} at {time} differs from the definition"


def test_history_never_sees_an_event_at_or_after_its_time(feed):
    histories = build_user_histories(feed, np.arange(200, 240), np.arange(1, 26))
    sample = feed.sample(500, random_state=0)
    rows, times = sample["user_id"].to_numpy() - 200, to_seconds(sample["timestamp"])
    end = histories.last_before(rows, times)
    posts, _actions, _recency, mask = histories.window(rows, times, 16)
    last_index = end - 1
    has_any = mask.any(axis=1)
    assert (histories.ev_time[last_index[has_any]] < times[has_any]).all(), "an event at/after t leaked"
    # the event at exactly the query time is excluded, the one just before is included
    assert mask.sum() > 0 and posts.shape == (500, 16)


def test_liked_posts_before_is_strict(feed):
    likes = build_user_histories(feed, np.arange(200, 240), np.arange(1, 26)).likes
    first_like = feed[feed["action"] == "like"].iloc[0]
    row, t = int(first_like["user_id"]) - 200, int(to_seconds(pd.Series([first_like["timestamp"]]))[0])
    assert int(first_like["post_id"]) - 1 not in likes.posts_before(row, t).tolist()
    assert int(first_like["post_id"]) - 1 in likes.posts_before(row, t + 1).tolist()


def test_counts_before_cover_the_whole_history_in_a_subset(feed):
    full = build_user_histories(feed, np.arange(200, 240), np.arange(1, 26))
    tail = full.select(np.arange(full.n_events) >= full.user_ptr[1:][full.owner()] - 3)  # last 3 each
    assert tail.n_events < full.n_events
    rows = np.arange(40)
    end = to_seconds(pd.Series([feed["timestamp"].max()]))[0] + 1
    times = np.full(40, end)
    events, likes = tail.counts_before(rows, times)
    per_user = feed.groupby("user_id")["action"].agg(["size", lambda a: (a == "like").sum()])
    per_user = per_user.reindex(np.arange(200, 240), fill_value=0)
    assert np.array_equal(events, per_user["size"].to_numpy())
    assert np.array_equal(likes, per_user.iloc[:, 1].to_numpy())


def test_post_statistics_use_only_events_before_the_cutoff(feed):
    post_ids = np.arange(1, 26)
    cutoff = int(to_seconds(pd.Series([T0 + pd.Timedelta(days=20)]))[0])
    first = int(to_seconds(pd.Series([T0]))[0])
    before = post_statistics(feed, post_ids, cutoff=cutoff, first=first)
    later = feed[to_seconds(feed["timestamp"]) >= cutoff]
    scrambled = later.assign(action="like", post_id=1)  # change everything after the cutoff
    changed = pd.concat([feed[to_seconds(feed["timestamp"]) < cutoff], scrambled])
    assert np.array_equal(before, post_statistics(changed, post_ids, cutoff=cutoff, first=first))
    assert not np.array_equal(
        before, post_statistics(feed, post_ids, cutoff=cutoff + DAY_SECONDS * 10, first=first)
    )


def test_dataset_windows_are_temporal_and_aggregates_ignore_later_windows(feed):
    users, posts = plain_users(np.arange(200, 240)), plain_posts(25)
    data = build_dataset(users, posts, feed, test_days=10, val_days=5)
    assert data.start < data.val_cutoff == data.cutoff - 5 * DAY_SECONDS < data.cutoff < data.end
    assert (data.train_views.times < data.val_cutoff - 3600).all()
    assert (data.train_likes.times < data.val_cutoff).all()
    assert ((data.val_views.times >= data.val_cutoff) & (data.val_views.times < data.cutoff - 3600)).all()
    assert (data.test_views.times >= data.cutoff).all()
    assert len(data.val_views) and len(data.test_views)
    mutated = feed.copy()
    after = to_seconds(mutated["timestamp"]) >= data.val_cutoff
    mutated.loc[after, "post_id"] = 1
    again = build_dataset(users, posts, mutated, test_days=10, val_days=5)
    assert again.val_cutoff == data.val_cutoff
    assert np.array_equal(again.post_stats, data.post_stats), "training statistics saw a later window"
    assert np.array_equal(again.post_stats_at(data.val_cutoff), data.post_stats_at(data.val_cutoff))
    assert not np.array_equal(again.post_stats_at(data.cutoff), data.post_stats_at(data.cutoff))
    assert np.allclose(data.post_stats_at(data.val_cutoff), data.post_stats, atol=1e-5), (
        "the statistics from the histories and from the feed agree"
    )
    with pytest.raises(NotEnoughDataError, match="no training window"):
        build_dataset(users, posts, feed, test_days=30, val_days=15)


def test_unknown_category_maps_to_the_unknown_bucket():
    vocab = build_vocab(pd.Series(["Moscow", "Moscow", "Omsk"]))
    assert vocab[0] == UNKNOWN
    assert encode(pd.Series(["Omsk", "Atlantis"]), vocab).tolist() == [vocab.index("Omsk"), 0]


def test_time_features_are_periodic():
    day = DAY_SECONDS
    base = to_seconds(pd.Series([T0]))
    assert np.allclose(time_features(base), time_features(base + 7 * day), atol=1e-5)
    assert not np.allclose(time_features(base), time_features(base + 6 * 3600))
    assert ACTION_VIEW != ACTION_LIKE


def test_single_query_search_equals_the_vectorised_one(feed):
    histories = build_user_histories(feed, np.arange(200, 240), np.arange(1, 26))
    rng = np.random.default_rng(2)
    rows = rng.integers(0, 40, 50)
    times = to_seconds(T0 + pd.to_timedelta(rng.integers(0, 41 * DAY_SECONDS, 50), unit="s"))
    batched = histories.last_before(rows, times)  # > 8 queries: the vectorised binary search
    one_by_one = [histories.last_before(rows[i : i + 1], times[i : i + 1])[0] for i in range(50)]
    assert batched.tolist() == one_by_one


def test_layered_histories_read_as_the_histories_of_all_events(feed):
    """Snapshot + delta (late rows and users added after the snapshot included) == one Histories of all."""
    rng = np.random.default_rng(3)
    users, posts = np.arange(200, 245), np.arange(1, 26)  # users 240..244 exist only in the delta
    late = make_feed(rng, n=400, n_users=45).assign(
        timestamp=lambda f: f["timestamp"] + pd.Timedelta(days=rng.integers(-5, 10))
    )
    in_snapshot = feed["user_id"] < 240
    base = build_user_histories(feed[in_snapshot], users[:40], posts)
    same_second = feed[in_snapshot].iloc[::40].assign(post_id=lambda f: f["post_id"] % 25 + 1)  # ties
    delta_rows = pd.concat([feed[~in_snapshot], late, same_second])
    delta = build_user_histories(delta_rows, users, posts)
    whole = build_user_histories(pd.concat([feed[in_snapshot], delta_rows]), users, posts)
    layered = LayeredHistories(base, delta)
    rows = rng.integers(0, 45, 300)
    times = to_seconds(pd.Series(T0 + pd.to_timedelta(rng.integers(0, 50 * DAY_SECONDS, 300), unit="s")))
    for got, expected in zip(layered.window(rows, times, 12), whole.window(rows, times, 12), strict=True):
        assert np.array_equal(got, expected)  # equal times: snapshot first, as in one stable sort
    for a, b in zip(layered.counts_before(rows, times), whole.counts_before(rows, times), strict=True):
        assert np.array_equal(a, b)
    for row, time in zip(rows[:50], times[:50], strict=True):
        assert sorted(layered.likes.posts_before(row, time)) == sorted(whole.likes.posts_before(row, time))
    empty = LayeredHistories(base, Histories.empty(45))
    for a, b in zip(empty.window(rows % 40, times, 12), base.window(rows % 40, times, 12), strict=True):
        assert np.array_equal(a, b)


def test_post_statistics_by_day_are_those_at_each_day_start(feed):
    users, posts = plain_users(np.arange(200, 240)), plain_posts(25)
    data = build_dataset(users, posts, feed, test_days=10, val_days=5)
    table = data.post_stats_by_day(data.val_cutoff)
    assert len(table) == (data.val_cutoff - data.start) // DAY_SECONDS + 1
    for day in (0, 1, 6, 7, 8, 20, len(table) - 1):
        expected = data.post_stats_at(data.start + day * DAY_SECONDS)
        np.testing.assert_allclose(table[day], expected, atol=1e-5, err_msg=f"day {day}")


def test_training_samples_read_the_statistics_of_their_day_start(feed):
    from learn_model import sample_post_stats

    users, posts = plain_users(np.arange(200, 240)), plain_posts(25)
    data = build_dataset(users, posts, feed, test_days=10, val_days=5)
    samples = data.train_views.subset(np.arange(0, len(data.train_views), 97))
    stats = sample_post_stats((data.start, data.post_stats_by_day(data.val_cutoff)), samples)
    for i in range(len(samples)):
        day_start = data.start + (samples.times[i] - data.start) // DAY_SECONDS * DAY_SECONDS
        assert day_start <= samples.times[i], "a sample never reads statistics from after it"
        expected = data.post_stats_at(day_start)[samples.post_rows[i]]
        np.testing.assert_allclose(stats[i], expected, atol=1e-5)
