"""SQLAlchemy engine and sessions, driven by settings.DATABASE_URL.

SQLite is the zero-setup default; PostgreSQL (psycopg2) is what a user points it at. On SQLite we take
over transaction control (the documented pysqlite recipe) so that DDL joins the transaction too: an
import that fails half way rolls back its DROP/CREATE TABLE as well as its rows, as on PostgreSQL.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.orm import DeclarativeBase, Session, sessionmaker

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1  # the tables' INTEGER columns (ids too): 32-bit on PostgreSQL


class Base(DeclarativeBase):
    pass


def make_engine(url: str, **kwargs: object) -> Engine:
    """An engine for `url`; creates the parent folder of a SQLite file; postgresql:// uses psycopg2."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"check_same_thread": False}, **kwargs)
        event.listen(engine, "connect", _sqlite_on_connect)
        event.listen(engine, "begin", _sqlite_on_begin)
        return engine
    if parsed.drivername in ("postgresql", "postgres"):
        url = parsed.set(drivername="postgresql+psycopg2")  # SQLAlchemy 2.1 would pick psycopg 3
    kwargs.setdefault("connect_args", {"connect_timeout": 3})  # an unreachable host fails fast: 503
    kwargs.setdefault("pool_timeout", 5)
    kwargs.setdefault("pool_pre_ping", True)
    kwargs.setdefault("pool_size", 8)
    return create_engine(url, **kwargs)


def _sqlite_on_connect(dbapi_connection, _record) -> None:
    dbapi_connection.isolation_level = None  # no implicit BEGIN from pysqlite; we emit our own below
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")  # readers (the service) do not block the writer (import)
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


def _sqlite_on_begin(connection) -> None:
    # writers ask for BEGIN IMMEDIATE (execution option sqlite_begin): the write lock up front, waiting
    # for another writer (busy timeout) instead of failing when they meet
    mode = connection.get_execution_options().get("sqlite_begin", "")
    connection.exec_driver_sql(f"BEGIN {mode}".strip())


def is_postgres(engine: Engine) -> bool:
    return engine.dialect.name == "postgresql"


def session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(bind=engine, expire_on_commit=False, autoflush=False)


def get_session(request: Request) -> Iterator[Session]:
    """FastAPI dependency: one session per request, from the engine the app's lifespan opened."""
    with request.app.state.session_factory() as session:
        yield session


SessionDep = Annotated[Session, Depends(get_session)]
