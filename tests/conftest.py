"""Shared fixtures: every database test runs on SQLite and on PostgreSQL.

PostgreSQL comes from TEST_POSTGRES_URL (default: the local server's `test` database). Each pytest run
creates its own scratch database there and drops it at the end, so runs never see each other's rows.
Without a reachable server the PostgreSQL cases are skipped with the reason, unless REQUIRE_POSTGRES=1
(set by .ci/run when PostgreSQL is installed), where they fail instead.
"""

from __future__ import annotations

import os
import sys
import uuid
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import database  # noqa: E402
import get_features_table  # noqa: E402
import table_feed  # noqa: E402, F401  (registers all three tables on Base.metadata)
from settings import Settings  # noqa: E402

PG_ADMIN_URL = os.environ.get("TEST_POSTGRES_URL", "postgresql+psycopg2://postgres@127.0.0.1:5432/test")


def _postgres_problem() -> str | None:
    try:
        engine = create_engine(PG_ADMIN_URL, connect_args={"connect_timeout": 3})
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        engine.dispose()
        return None
    except Exception as exc:  # any failure to connect means "no PostgreSQL here"
        where = make_url(PG_ADMIN_URL).render_as_string()
        return f"PostgreSQL not reachable at {where}: {exc.__class__.__name__}"


@pytest.fixture(scope="session")
def postgres_url() -> str:
    """URL of a fresh scratch database for this pytest run."""
    problem = _postgres_problem()
    if problem:
        if os.environ.get("REQUIRE_POSTGRES") == "1":
            pytest.fail(f"REQUIRE_POSTGRES=1 but {problem}")
        pytest.skip(problem)
    name = f"rec_test_{uuid.uuid4().hex[:10]}"
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    yield make_url(PG_ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty database (tables created, no rows) on each backend in turn."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'test.db'}"
    else:
        url = request.getfixturevalue("postgres_url")
    engine = database.make_engine(url)
    database.Base.metadata.drop_all(engine)
    database.Base.metadata.create_all(engine)
    engine.dispose()
    return url


@pytest.fixture
def engine(db_url: str):
    eng = database.make_engine(db_url)
    yield eng
    eng.dispose()


@pytest.fixture(scope="session")
def tiny_encoder(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A 2-layer, 32-wide random RoBERTa saved offline; pass as encoder= / TEXT_ENCODER."""
    from fixtures_text import build_tiny_roberta

    return str(build_tiny_roberta(tmp_path_factory.mktemp("tiny_roberta")))


def append_feed(url: str, rows) -> None:
    """Add feed rows to the database at `url`, as a writer beside the service would."""
    engine = database.make_engine(url)
    try:
        get_features_table.write_tables(engine, feed=rows, replace=False, progress=False)
    finally:
        engine.dispose()


def tiny_settings(folder: Path, **overrides: object) -> Settings:
    """Settings for a tiny demo in `folder`: a SQLite database, its truth, cache and model file."""
    values = {
        "database_url": f"sqlite:///{folder / 'demo.db'}",
        "demo_scale": "tiny",
        "ground_truth_path": folder / "truth.npz",
        "embed_cache_dir": folder / "embed_cache",
        "model_path": folder / "model.pt",
        "export_dir": folder / "export",
        "epochs": 2,
        "batch_size": 256,
        "refresh_seconds": 0.0,
    }
    return Settings(**(values | overrides))


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    """The tiny demo in SQLite and a model trained on it by the real pipeline (once per test run)."""
    import main_script

    settings = tiny_settings(tmp_path_factory.mktemp("tiny_demo"))
    main_script.make_demo_data(settings, progress=False)
    main_script.run_all(settings, progress=False)
    return settings


def plain_users(user_ids) -> pd.DataFrame:
    """user_data rows with the same demographics for every id: tables where only the feed matters."""
    return pd.DataFrame({"user_id": user_ids}).assign(
        gender=0, age=30, country="Russia", city="Moscow", exp_group=1, os="iOS", source="ads"
    )


def plain_posts(n: int) -> pd.DataFrame:
    """post_text_df rows 1..n, one topic, one text."""
    return pd.DataFrame({"post_id": np.arange(1, n + 1), "text": "t", "topic": "movie"})
