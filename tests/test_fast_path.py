"""fast_path.FastRecommendations answers the usual recommendation request below FastAPI: its answers
must be byte for byte (status, headers, body) what the endpoint answers, and everything it does not
take must reach the endpoint unchanged (the 422 messages included)."""

from __future__ import annotations

import numpy as np
import pytest
from fastapi.testclient import TestClient

import get_model
from app import DEFAULT_LIMIT, MAX_ID, MAX_LIMIT, create_app
from fast_path import FastRecommendations
from times import format_time, parse_time


@pytest.fixture(scope="module")
def clients(tiny_model):
    """(the app as served, the same app without the fast path): two TestClients over one model."""
    fast, plain = create_app(tiny_model), create_app(tiny_model)
    # the middleware stack is built at the first request, so removing it here leaves the endpoint alone
    plain.user_middleware = [m for m in plain.user_middleware if m.cls is not FastRecommendations]
    with TestClient(fast) as fast_client, TestClient(plain) as plain_client:
        yield fast_client, plain_client


def answers(client: TestClient, url: str) -> tuple[int, list, bytes]:
    response = client.get(url)
    return response.status_code, response.headers.raw, response.content


def sample_urls(settings, n: int = 40) -> list[str]:
    model_file = get_model.load_model_file(settings.model_path)
    rng = np.random.default_rng(1)
    user_ids = model_file.snapshot.users.user_ids
    start, end = (parse_time(model_file.data_window[key]) for key in ("start", "end"))
    urls = []
    for i in range(n):
        user, moment = int(rng.choice(user_ids)), format_time(int(rng.integers(start, end)))
        slash = "/" if i % 2 else ""
        limit = "" if i % 3 == 0 else f"&limit={int(rng.integers(1, MAX_LIMIT + 1))}"
        urls.append(f"/post/recommendations{slash}?id={user}&time={moment.replace(' ', '%20')}{limit}")
    return urls


def test_the_fast_path_answers_exactly_what_the_endpoint_answers(clients, tiny_model, monkeypatch):
    fast, plain = clients
    served = []
    original = FastRecommendations.parse

    def parse(self, query: bytes) -> tuple[int, int, int] | None:
        served.append(original(self, query))
        return served[-1]

    monkeypatch.setattr(FastRecommendations, "parse", parse)
    urls = sample_urls(tiny_model)
    for url in urls:
        fast_answer, plain_answer = answers(fast, url), answers(plain, url)
        assert fast_answer[0] == 200, (url, fast_answer)
        assert fast_answer == plain_answer, f"{url}: the fast path answers differently"
    assert len(served) == len(urls) and None not in served, "the fast path did not take every request"


@pytest.mark.parametrize(
    "query",
    [
        "id=200",  # no time
        "time=2021-12-01%2012:00:00",  # no id
        "id=-1&time=2021-12-01%2012:00:00",
        f"id={MAX_ID + 1}&time=2021-12-01%2012:00:00",
        "id=abc&time=2021-12-01%2012:00:00",
        "id=200&time=2021-12-01",
        "id=200&time=2021-02-30%2012:00:00",
        "id=200&time=2021-12-01%2012:00:00&limit=0",
        f"id=200&time=2021-12-01%2012:00:00&limit={MAX_LIMIT + 1}",
        "id=200&time=2021-12-01%2012:00:00&limit=five",
        "id=99999999&time=2021-12-01%2012:00:00",  # an unknown user: 404 from the endpoint
        "id=200&id=201&time=2021-12-01%2012:00:00",  # repeated: FastAPI's rule decides
        "id=%2B200&time=2021-12-01%2012:00:00",  # '+200'
        "id=200&time=2021-12-01+12:00:00&extra=1",
        "",
    ],
)
def test_what_the_fast_path_does_not_take_reaches_the_endpoint(clients, query):
    fast, plain = clients
    url = f"/post/recommendations/?{query}"
    fast_answer, plain_answer = answers(fast, url), answers(plain, url)
    assert fast_answer == plain_answer, f"{url}: {fast_answer} != {plain_answer}"


def parser() -> FastRecommendations:
    return FastRecommendations(
        None,  # type: ignore[arg-type]  (parse never calls the app)
        paths=(),
        answer=lambda *args: None,
        max_id=MAX_ID,
        max_limit=MAX_LIMIT,
        default_limit=DEFAULT_LIMIT,
    )


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        (b"id=200&time=2021-12-01%2012:00:00", (200, parse_time("2021-12-01 12:00:00"), DEFAULT_LIMIT)),
        (b"time=2021-12-01+12:00:00&limit=100&id=0", (0, parse_time("2021-12-01 12:00:00"), 100)),
        (b"id=007&time=2021-12-01%2012%3A00%3A00&limit=1", (7, parse_time("2021-12-01 12:00:00"), 1)),
        (b"id=200&time=2021-12-01%2012:00:00&limit=", None),
        (b"id=200&time=2021-12-01%2012:00:00&", None),
        (b"id=200&time=2021-12-01%2012:00:00&limit=1&limit=2", None),
        (b"id=%32%30%30&time=2021-12-01%2012:00:00", None),  # escaped digits: FastAPI decodes them
        (b"id=200 &time=2021-12-01%2012:00:00", None),
        (b"id=2147483647&time=2021-12-01%2012:00:00", (MAX_ID, parse_time("2021-12-01 12:00:00"), 5)),
        (b"id=2147483648&time=2021-12-01%2012:00:00", None),
        (b"id=200&time=1677-12-31%2023:59:59", None),
    ],
)
def test_the_fast_path_takes_only_plain_well_formed_queries(query, expected):
    assert parser().parse(query) == expected, query
