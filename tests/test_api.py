"""The table endpoints over real HTTP semantics (TestClient runs the app's lifespan), on both databases."""

from __future__ import annotations

from datetime import datetime

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session

from app import MAX_LIMIT, create_app
from settings import Settings
from table_feed import Feed
from table_post import Post
from table_user import User

T0 = datetime(2021, 10, 1, 12, 0, 0)


@pytest.fixture
def client(engine, db_url, tmp_path):
    with Session(engine) as session:
        session.add_all(
            [
                User(
                    user_id=200,
                    gender=1,
                    age=24,
                    country="Russia",
                    city="Moscow",
                    exp_group=3,
                    os="Android",
                    source="ads",
                ),
                User(
                    user_id=201,
                    gender=0,
                    age=31,
                    country="Finland",
                    city="Helsinki",
                    exp_group=0,
                    os="iOS",
                    source="organic",
                ),
                Post(post_id=1, text="Markets rallied today.", topic="business"),
                Post(post_id=2, text="A new film opens.", topic="movie"),
            ]
        )
        session.add_all(
            [
                Feed(timestamp=T0.replace(minute=m), user_id=200, post_id=1 + m % 2, action="view", target=0)
                for m in range(15)
            ]
            + [Feed(timestamp=T0.replace(minute=16), user_id=200, post_id=2, action="like", target=None)]
        )
        session.commit()
    settings = Settings(database_url=db_url, model_path=tmp_path / "absent.pt")
    with TestClient(create_app(settings)) as test_client:
        yield test_client


def test_user_found(client):
    response = client.get("/user/200")
    assert response.status_code == 200
    assert response.json() == {
        "id": 200,
        "gender": 1,
        "age": 24,
        "country": "Russia",
        "city": "Moscow",
        "exp_group": 3,
        "os": "Android",
        "source": "ads",
    }


def test_post_found(client):
    assert client.get("/post/2").json() == {"id": 2, "text": "A new film opens.", "topic": "movie"}


@pytest.mark.parametrize("path", ["/user/999", "/post/999", "/user/999/feed", "/post/999/feed"])
def test_unknown_id_is_404_with_message(client, path):
    response = client.get(path)
    assert response.status_code == 404
    assert "999 not found" in response.json()["detail"]


@pytest.mark.parametrize(
    "path",
    [
        "/user/abc",
        "/user/-1",
        "/user/200/feed?limit=0",
        f"/user/200/feed?limit={MAX_LIMIT + 1}",
        "/post/1/feed?limit=x",
        "/user/99999999999",
    ],
)
def test_invalid_parameters_are_422(client, path):
    response = client.get(path)
    assert response.status_code == 422
    assert response.json()["detail"], "422 must say what was wrong"


def test_user_feed_newest_first_with_default_limit(client):
    rows = client.get("/user/200/feed").json()
    assert len(rows) == 10
    times = [row["time"] for row in rows]
    assert times == sorted(times, reverse=True)
    assert rows[0]["action"] == "like" and rows[0]["post"]["id"] == 2
    assert rows[0]["user"]["id"] == 200 and rows[0]["user"]["city"] == "Moscow"


def test_post_feed_limit(client):
    rows = client.get("/post/1/feed?limit=3").json()
    assert [row["post_id"] for row in rows] == [1, 1, 1]
    assert rows[0]["time"] == "2021-10-01T12:14:00"


def test_user_without_feed_gets_empty_list(client):
    assert client.get("/user/201/feed").json() == []


def test_health_reports_database_and_model(client):
    assert client.get("/health").json() == {"status": "ok", "database": "up", "model": "absent"}


def test_openapi_describes_every_endpoint(client):
    spec = client.get("/openapi.json").json()
    for path in ["/user/{id}", "/post/{id}", "/user/{id}/feed", "/post/{id}/feed", "/health"]:
        operation = spec["paths"][path]["get"]
        assert operation.get("description") or operation.get("summary"), path


@pytest.mark.parametrize(
    "path",
    [
        "/user/200",
        "/post/2",
        "/user/200/feed?limit=2",
        "/post/1/feed?limit=2",
        "/health",
        "/health/live",
    ],
)
def test_every_path_answers_with_and_without_the_trailing_slash(client, path):
    route, _, query = path.partition("?")
    plain = client.get(path, follow_redirects=False)
    slashed = client.get(f"{route}/" + (f"?{query}" if query else ""), follow_redirects=False)
    assert plain.status_code == slashed.status_code == 200, (plain.status_code, slashed.status_code)
    assert plain.json() == slashed.json()


def test_recommendations_without_the_slash_is_not_taken_for_a_post_id(client):
    response = client.get("/post/recommendations?id=200&time=2021-12-01 12:00:00", follow_redirects=False)
    assert response.status_code == 503, response.text  # this app has no model: the recommendation route
    assert "no model loaded" in response.json()["detail"]


class NoDatabase:
    """An engine stand-in that fails every use but the shutdown's dispose()."""

    def dispose(self) -> None:
        pass

    def __getattr__(self, name: str):
        raise AssertionError(f"the endpoint used the database ({name})")


def test_liveness_touches_neither_database_nor_model(client):
    app = client.app
    engine, recommender = app.state.engine, app.state.recommender
    app.state.engine, app.state.recommender = NoDatabase(), NoDatabase()
    try:
        assert client.get("/health/live").json() == {"status": "alive"}
        assert client.get("/health").json()["database"] == "down", "the control: readiness asks it"
    finally:
        app.state.engine, app.state.recommender = engine, recommender
