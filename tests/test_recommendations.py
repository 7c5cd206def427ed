"""/post/recommendations over the app's real lifespan, on SQLite and PostgreSQL.

Parity with the offline model, exclusions, validation, the no-history path and the freshness refresh.
"""

from __future__ import annotations

import re
import time as clock
from datetime import datetime

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import append_feed
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session

import database
import get_features_table
import main_script
from app import MAX_LIMIT, create_app, refresh_once
from features import build_user_histories, user_features
from get_model import load_model_file
from model import TwoTower, make_user_batch
from table_user import User
from times import DAY_SECONDS, TIME_PATTERN, TIME_RANGE, parse_time, to_seconds

URL = "/post/recommendations/"


@pytest.fixture(scope="module")
def tiny_tables(tiny_model):
    return main_script.load_tables(tiny_model, progress=False)


@pytest.fixture
def served(tiny_model, tiny_tables, db_url):
    """(client, settings) of an app serving the tiny model over `db_url` holding the tiny tables."""
    users, posts, feed = tiny_tables
    engine = database.make_engine(db_url)
    get_features_table.write_tables(engine, users=users, posts=posts, feed=feed, progress=False)
    engine.dispose()
    settings = tiny_model.replace(database_url=db_url)
    app = create_app(settings)
    with TestClient(app) as client:
        yield client, app


def offline_top(
    settings, tables, user_id: int, when: str, limit: int, *, ranking: str = "likes"
) -> list[int]:
    """The ranking computed the training way, on histories rebuilt from the whole feed: by the
    calibrated like probability ("likes"), or by like logit + exposure terms ("logged")."""
    model_file = load_model_file(settings.model_path)
    model = TwoTower(model_file.config)
    model.load_state_dict(model_file.state_dict)
    model.eval()
    users, _posts, feed = tables
    post_ids = model_file.post_ids
    table = user_features(users, model_file.vocabs, model_file.age_scaler)
    histories = build_user_histories(feed, table.user_ids, post_ids)
    row = int(np.searchsorted(table.user_ids, user_id))
    moment = parse_time(when)
    batch = make_user_batch(table, histories, np.array([row]), np.array([moment]), model.config)
    with torch.inference_mode():
        users = model.user_embeddings(batch)
        if ranking == "likes":
            scores = torch.sigmoid(model.calibrated(users @ model.item_embeddings().T + model.bias))[0]
        else:
            scores = (model.ranking_user_vector(users) @ model.ranking_item_matrix().T)[0]
    scores = scores.numpy().astype(np.float64)
    scores[histories.likes.posts_before(row, moment)] = -np.inf
    order = np.lexsort((np.arange(len(scores)), -scores))[:limit]
    return post_ids[order].tolist()


def active_users(feed: pd.DataFrame, n: int) -> list[int]:
    likes = feed[feed["action"] == "like"]["user_id"].value_counts()
    return likes.index[:n].tolist()


def test_returns_posts_in_postget_shape(served, tiny_tables):
    client, _ = served
    user = active_users(tiny_tables[2], 1)[0]
    response = client.get(URL, params={"id": user, "time": "2021-12-20 12:00:00"})
    assert response.status_code == 200
    body = response.json()
    assert len(body) == 5, "default limit is 5"
    assert set(body[0]) == {"id", "text", "topic"}
    posts = tiny_tables[1].set_index("post_id")
    for item in body:
        assert (
            posts.loc[item["id"], "text"] == item["text"] and posts.loc[item["id"], "topic"] == item["topic"]
        )


@pytest.mark.parametrize("when", ["2021-10-20 08:00:00", "2021-12-10 21:30:00", "2022-01-05 12:00:00"])
def test_service_ranking_equals_offline_like_probability_order(served, tiny_model, tiny_tables, when):
    client, _ = served
    for user in active_users(tiny_tables[2], 4):
        got = [item["id"] for item in client.get(URL, params={"id": user, "time": when, "limit": 20}).json()]
        assert got == offline_top(tiny_model, tiny_tables, user, when, 20), f"user {user} at {when}"


def test_ranking_logged_reproduces_the_exposure_weighted_order(tiny_model, tiny_tables, tmp_path):
    users, posts, feed = tiny_tables
    url = f"sqlite:///{tmp_path / 'logged.db'}"
    engine = database.make_engine(url)
    get_features_table.write_tables(engine, users=users, posts=posts, feed=feed, progress=False)
    engine.dispose()
    when = "2021-12-10 21:30:00"
    with TestClient(create_app(tiny_model.replace(database_url=url, ranking="logged"))) as client:
        for user in active_users(feed, 4):
            got = [
                item["id"] for item in client.get(URL, params={"id": user, "time": when, "limit": 20}).json()
            ]
            expected = offline_top(tiny_model, tiny_tables, user, when, 20, ranking="logged")
            assert got == expected, f"user {user}"
            assert expected != offline_top(tiny_model, tiny_tables, user, when, 20), "the two rankings differ"


def test_posts_liked_before_time_are_excluded(served, tiny_tables):
    client, _ = served
    feed = tiny_tables[2]
    user = active_users(feed, 1)[0]
    when = "2021-12-01 00:00:00"
    liked = set(
        feed[(feed["user_id"] == user) & (feed["action"] == "like") & (feed["timestamp"] < when)]["post_id"]
    )
    assert liked, "the test needs a user with likes"
    got = {
        item["id"] for item in client.get(URL, params={"id": user, "time": when, "limit": MAX_LIMIT}).json()
    }
    assert len(got) == MAX_LIMIT
    assert not got & liked
    liked_later = set(feed[(feed["user_id"] == user) & (feed["action"] == "like")]["post_id"]) - liked
    early = {
        item["id"]
        for item in client.get(
            URL, params={"id": user, "time": "2021-10-01 00:00:01", "limit": MAX_LIMIT}
        ).json()
    }
    assert early & (liked | liked_later) or len(liked | liked_later) < 3, "exclusions must depend on time"


def test_the_seed_url_forms_answer_directly(served, tiny_tables):
    client, _ = served
    query = f"id={active_users(tiny_tables[2], 1)[0]}&time=2021-12-20 12:00:00&limit=3"
    with_slash = client.get(f"/post/recommendations/?{query}", follow_redirects=False)
    without = client.get(f"/post/recommendations?{query}", follow_redirects=False)
    assert with_slash.status_code == without.status_code == 200, without.text
    assert with_slash.json() == without.json() and len(without.json()) == 3


def test_ranking_is_deterministic(served, tiny_tables):
    client, _ = served
    params = {"id": active_users(tiny_tables[2], 1)[0], "time": "2021-12-20 12:00:00", "limit": 50}
    assert client.get(URL, params=params).json() == client.get(URL, params=params).json()


@pytest.mark.parametrize(
    ("params", "fragment"),
    [
        ({"id": 200, "time": "2021-12-20"}, "time must look like"),
        ({"id": 200, "time": "1000-01-01 00:00:00"}, "1678-01-01 00:00:00..2261-12-31 23:59:59"),
        ({"id": 200, "time": "9999-12-31 23:59:59"}, "1678-01-01 00:00:00..2261-12-31 23:59:59"),
        ({"id": 200, "time": "2021-02-29 12:00:00"}, "time must look like"),
        ({"id": 200, "time": "2021-1-5 1:02:03"}, "time must look like"),
        ({"id": 200, "time": "20/12/2021 10:00:00"}, "time must look like"),
        ({"id": 200, "time": "2021-12-20 12:00:00", "limit": 0}, "limit"),
        ({"id": 200, "time": "2021-12-20 12:00:00", "limit": MAX_LIMIT + 1}, "limit"),
        ({"id": -3, "time": "2021-12-20 12:00:00"}, "id"),
        ({"id": "x", "time": "2021-12-20 12:00:00"}, "id"),
    ],
)
def test_invalid_parameters_are_422(served, params, fragment):
    client, _ = served
    response = client.get(URL, params=params)
    assert response.status_code == 422
    assert fragment in str(response.json()["detail"])


def test_unknown_user_is_404(served):
    client, _ = served
    response = client.get(URL, params={"id": 999_999, "time": "2021-12-20 12:00:00"})
    assert response.status_code == 404
    assert response.json() == {"detail": "user 999999 not found"}


def test_user_added_after_training_gets_static_recommendations(served, db_url):
    client, _ = served
    engine = database.make_engine(db_url)
    with Session(engine) as session:
        session.add(
            User(
                user_id=900_001,
                gender=1,
                age=33,
                country="Atlantis",
                city="Poseidonia",
                exp_group=2,
                os="iOS",
                source="organic",
            )
        )
        session.commit()
    engine.dispose()
    response = client.get(URL, params={"id": 900_001, "time": "2021-12-20 12:00:00", "limit": 7})
    assert response.status_code == 200
    assert len(response.json()) == 7


def test_new_like_is_excluded_after_refresh(served, db_url, tiny_tables):
    client, app = served
    user = active_users(tiny_tables[2], 1)[0]
    params = {"id": user, "time": "2022-01-10 12:00:00", "limit": 5}
    top = client.get(URL, params=params).json()[0]["id"]
    like = pd.DataFrame(
        {
            "timestamp": [pd.Timestamp("2022-01-02 10:00:00")] * 2,
            "user_id": [user] * 2,
            "post_id": [top] * 2,
            "action": ["view", "like"],
            "target": [1, 0],
        }
    )
    append_feed(db_url, like)
    assert client.get(URL, params=params).json()[0]["id"] == top, "not merged before the refresh"
    assert refresh_once(app).feed_rows == 2
    assert refresh_once(app).feed_rows == 0, "a second refresh must not merge the same rows again"
    after = [item["id"] for item in client.get(URL, params=params).json()]
    assert top not in after
    before_like = [
        item["id"] for item in client.get(URL, params=params | {"time": "2022-01-02 09:00:00"}).json()
    ]
    assert top in before_like or len(before_like) == 5, "the like only counts from its own time on"


def test_background_refresh_runs_without_restart(tiny_model, tiny_tables, tmp_path):
    users, posts, feed = tiny_tables
    url = f"sqlite:///{tmp_path / 'live.db'}"
    engine = database.make_engine(url)
    get_features_table.write_tables(engine, users=users, posts=posts, feed=feed, progress=False)
    settings = tiny_model.replace(database_url=url, refresh_seconds=0.2)
    user = active_users(feed, 1)[0]
    params = {"id": user, "time": "2022-01-10 12:00:00", "limit": 3}
    with TestClient(create_app(settings)) as client:
        top = client.get(URL, params=params).json()[0]["id"]
        like = pd.DataFrame(
            {
                "timestamp": [pd.Timestamp("2022-01-03 10:00:00")],
                "user_id": [user],
                "post_id": [top],
                "action": ["like"],
                "target": [0],
            }
        )
        append_feed(url, like)
        deadline = clock.monotonic() + 10
        while clock.monotonic() < deadline:
            if top not in [item["id"] for item in client.get(URL, params=params).json()]:
                break
            clock.sleep(0.1)
        else:
            pytest.fail("the background refresh did not merge the new like within 10 s")
    engine.dispose()


def test_parse_time_is_utc_seconds():
    assert parse_time("2021-10-01 00:00:00") == int(to_seconds(pd.Series([datetime(2021, 10, 1)]))[0])
    epoch = datetime(1970, 1, 1)
    for first_or_last in TIME_RANGE:  # exact at both ends: no wrap-around through nanoseconds
        expected = (datetime.strptime(first_or_last, "%Y-%m-%d %H:%M:%S") - epoch).total_seconds()
        assert parse_time(first_or_last) == int(expected)
    for bad in ("2021-10-01", "1000-01-01 00:00:00", "9999-12-31 23:59:59", "2021-10-01 24:00:00"):
        with pytest.raises(ValueError, match="between 1678-01-01 00:00:00 and 2261-12-31 23:59:59"):
            parse_time(bad)


def test_the_time_pattern_accepts_exactly_what_parse_time_accepts():
    """The OpenAPI `pattern` of `time` (what generated clients send) against every day of the range."""
    pattern = re.compile(TIME_PATTERN)
    first, last = (int(t[:4]) for t in TIME_RANGE)

    def accepts(text: str) -> bool:
        try:
            parse_time(text)
        except ValueError:
            return False
        return True

    for year in range(first - 1, last + 2):
        for month in range(0, 14):
            for day in range(0, 33):
                text = f"{year:04d}-{month:02d}-{day:02d} 12:34:56"
                try:
                    exists = first <= datetime(year, month, day).year <= last
                except ValueError:
                    exists = False
                assert bool(pattern.fullmatch(text)) == exists, text
                assert accepts(text) == exists, text
    for hms in ("00:00:00", "23:59:59", "24:00:00", "12:60:00", "12:00:60", "7:00:00", "07:00:0"):
        valid = hms[:2] != "24" and "60" not in hms and len(hms) == 8
        assert bool(pattern.fullmatch(f"2021-06-15 {hms}")) == valid == accepts(f"2021-06-15 {hms}"), hms
    assert not pattern.fullmatch("0000-01-01 00:00:00") and not pattern.fullmatch("2021-06-15t12:00:00")
    assert pattern.fullmatch("2021-06-15T12:00:00") and accepts("2021-06-15T12:00:00"), "ISO 8601's T too"
    assert not pattern.fullmatch("2021-06-15_12:00:00") and not accepts("2021-06-15_12:00:00")


def test_the_request_path_computes_the_user_tower_of_training(tiny_model, tiny_tables):
    """request_inputs + the ONNX user tower == make_user_batch + model.UserTower, request by request,
    also with a delta of late rows and a user whom only the delta knows."""
    from features import UserFeatures, lookup
    from histories import LayeredHistories, histories_from_rows
    from serving import Recommender, request_inputs

    recommender = Recommender(load_model_file(tiny_model.model_path), threads=1)
    model, state = recommender.model, recommender.state
    feed = tiny_tables[2]
    rng = np.random.default_rng(5)
    late = feed.sample(300, random_state=5)
    seconds = to_seconds(late["timestamp"]) - rng.integers(0, DAY_SECONDS, len(late))
    n_known = len(state.users.user_ids)
    user_rows = lookup(state.users.user_ids, late["user_id"].to_numpy())
    user_rows[:40] = n_known  # the newcomer's row
    delta = histories_from_rows(
        user_rows,
        lookup(state.post_ids, late["post_id"].to_numpy()),
        seconds,
        (late["action"] == "like").to_numpy(),
        n_known + 1,
    )
    histories = LayeredHistories(state.histories.base, delta)
    known = state.users
    users = UserFeatures(
        np.append(known.user_ids, -1),
        np.vstack([known.categorical, known.categorical[:1]]),
        np.vstack([known.numeric, known.numeric[:1]]),
    )
    rows = np.append(rng.integers(0, n_known + 1, 150), np.full(10, n_known))
    times = rng.integers(recommender.snapshot.start, recommender.snapshot.end + DAY_SECONDS, len(rows))
    items = torch.from_numpy(state.item_matrix)
    for row, moment in zip(rows, times, strict=True):
        inputs = request_inputs(users, histories, int(row), int(moment), model.config)
        got = recommender._user_tower(inputs, state.item_matrix[inputs.posts])
        batch = make_user_batch(users, histories, np.array([row]), np.array([moment]), model.config)
        with torch.inference_mode():
            expected = model.ranking_user_vector(model.users(batch, items[batch.hist_post]))[0].numpy()
        np.testing.assert_allclose(got, expected, atol=2e-5, err_msg=f"row {row} at {moment}")
