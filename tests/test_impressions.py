"""The impression log: rows written in batches on SQLite and PostgreSQL, flushed at shutdown, kept through
a database outage (bounded: what overflows is counted), and written by the service for every answer."""

from __future__ import annotations

import sqlite3
import time

import pandas as pd
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, select
from sqlalchemy.orm import Session
from test_experiments import TOML, URL, WHEN, ids_of, write_experiment

import database
import get_features_table
import main_script
from app import create_app
from experiments import load_experiment
from impressions import ImpressionLog
from table_recommendation_log import RecommendationLog, parse_post_ids
from times import parse_time


def logged_rows(engine) -> list[RecommendationLog]:
    with Session(engine) as session:
        return list(session.scalars(select(RecommendationLog).order_by(RecommendationLog.id)))


def test_rows_are_written_in_batches_and_flushed_at_close(engine):
    log = ImpressionLog(engine, batch_size=64, flush_seconds=0.05).start()
    for i in range(500):
        assert log.record(user_id=i, request_time=parse_time("2021-12-01 12:00:00") + i, post_ids=[i, 7, 3])
    counts = log.close()  # most rows are still queued here: close writes them
    assert (counts.written, counts.dropped, counts.queued, counts.lost_at_shutdown) == (500, 0, 0, 0)
    rows = logged_rows(engine)
    assert [row.user_id for row in rows] == list(range(500)), "every row, in the order recorded"
    assert parse_post_ids(rows[9].post_ids) == [9, 7, 3], "post ids in the order shown"
    assert rows[9].request_time == pd.Timestamp("2021-12-01 12:00:09"), "the request's time"


def locked_sqlite(tmp_path):
    """(engine with a 50 ms busy timeout, a connection that can lock the file) of a fresh SQLite file."""
    path = tmp_path / "locked.db"
    url = f"sqlite:///{path}"
    setup = database.make_engine(url)
    RecommendationLog.__table__.create(setup)
    setup.dispose()
    engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 0.05})
    return engine, sqlite3.connect(path, isolation_level=None)


def test_an_outage_keeps_rows_queued_and_writes_them_when_the_database_returns(tmp_path):
    engine, blocker = locked_sqlite(tmp_path)
    blocker.execute("BEGIN EXCLUSIVE")  # the database refuses every write from here on
    log = ImpressionLog(engine, queue_size=1000, batch_size=100, flush_seconds=0.02, retry_seconds=0.05)
    log.start()
    started = time.perf_counter()
    for i in range(300):
        log.record(user_id=i, request_time=0, post_ids=[1])
    assert time.perf_counter() - started < 0.5, "recording never waits for the database"
    deadline = time.perf_counter() + 10  # a loaded machine retries slowly: wait for two refused batches
    while log.counts().failed_batches < 2 and time.perf_counter() < deadline:
        time.sleep(0.02)
    during = log.counts()
    assert during.written == 0 and during.failed_batches >= 2, f"the database was locked: {during}"
    assert during.queued == 300, "every row waits"
    blocker.execute("ROLLBACK")  # the database is back
    counts = log.close(timeout=5)
    assert (counts.written, counts.dropped, counts.lost_at_shutdown) == (300, 0, 0), counts
    assert len(logged_rows(engine)) == 300
    blocker.close()
    engine.dispose()


def test_overflow_is_counted_and_a_dead_database_at_shutdown_is_reported(tmp_path):
    engine, blocker = locked_sqlite(tmp_path)
    blocker.execute("BEGIN EXCLUSIVE")
    log = ImpressionLog(engine, queue_size=50, batch_size=10, flush_seconds=0.01, retry_seconds=0.02)
    log.start()
    time.sleep(0.05)
    results = [log.record(user_id=i, request_time=0, post_ids=[1]) for i in range(200)]
    counts = log.close(timeout=0.2)
    assert counts.accepted + counts.dropped == 200, f"every impression is accepted or counted: {counts}"
    assert counts.dropped == results.count(False) >= 140, f"a queue of 50 (+ a batch of 10 in hand): {counts}"
    assert counts.written == 0 and counts.lost_at_shutdown == counts.accepted, counts
    blocker.close()
    engine.dispose()


@pytest.fixture(scope="module")
def tiny_tables(tiny_model):
    return main_script.load_tables(tiny_model, progress=False)


def test_the_service_logs_every_answer_with_its_arm_and_flushes_at_shutdown(
    tiny_model, tiny_tables, db_url, tmp_path
):
    users, posts, feed = tiny_tables
    engine = database.make_engine(db_url)
    get_features_table.write_tables(engine, users=users, posts=posts, feed=feed, progress=False)
    path = write_experiment(tmp_path, TOML)
    experiment = load_experiment(path)
    asked = feed["user_id"].value_counts().index[:10].tolist()
    settings = tiny_model.replace(database_url=db_url, experiment_path=path, impression_flush_seconds=30.0)
    answers = {}
    with TestClient(create_app(settings)) as client:
        for user in asked:
            response = client.get(URL, params={"id": user, "time": WHEN, "limit": 3})
            answers[user] = (ids_of(response), response.headers["X-Model-Version"])
        client.get(URL, params={"id": 10**9, "time": WHEN})  # 404: not an impression
        health = client.get("/health").json()
        assert health["impressions"]["accepted"] == 10, health
    # the flush interval (30 s) had not come: the rows were written by the shutdown
    rows = logged_rows(engine)
    engine.dispose()
    assert [row.user_id for row in rows] == asked
    for row in rows:
        ids, version = answers[row.user_id]
        assert parse_post_ids(row.post_ids) == ids, f"user {row.user_id}: the posts shown, in order"
        assert (row.experiment, row.arm, row.model_version) == (
            "likes-vs-logged",
            experiment.arm_of(row.user_id).name,
            version,
        )
        assert row.request_time == pd.Timestamp(WHEN)


def test_a_locked_database_fails_no_request_and_the_rows_follow_it(tiny_model, tiny_tables, tmp_path):
    users, posts, feed = tiny_tables
    path = tmp_path / "locked_service.db"
    engine = database.make_engine(f"sqlite:///{path}")
    get_features_table.write_tables(engine, users=users, posts=posts, feed=feed, progress=False)
    settings = tiny_model.replace(
        database_url=f"sqlite:///{path}",
        experiment_path=write_experiment(tmp_path, TOML),
        impression_flush_seconds=0.05,
    )
    asked = feed["user_id"].value_counts().index[:20].tolist()
    blocker = sqlite3.connect(path, isolation_level=None)
    with TestClient(create_app(settings)) as client:
        blocker.execute("BEGIN EXCLUSIVE")  # no write reaches the database from here on (reads still do)
        for user in asked:
            ids_of(client.get(URL, params={"id": user, "time": WHEN}))  # 200, every one
        time.sleep(0.3)
        counts = client.get("/health").json()["impressions"]
        assert counts["written"] == 0 and counts["queued"] == 20, f"rows wait for the database: {counts}"
        blocker.execute("ROLLBACK")  # the database is back; the shutdown writes what waits
    blocker.close()
    assert len(logged_rows(engine)) == 20
    engine.dispose()
