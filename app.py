"""The web service: table lookups and post recommendations.

`uvicorn app:app` serves with settings from the environment / `.env`; tests build their own app with
`create_app(Settings(...))`. The lifespan opens the database engine once and, when the model file
exists, loads the recommender (model, item matrix, user histories) once and follows the tables every
REFRESH_SECONDS in a worker thread (refresh.py); requests only read memory and, for the table endpoints,
the database. Three routers: health, recommendations, tables. Every
route answers with and without a trailing slash (the original project writes `/user/{id}/feed/?limit=`); the
schema lists one form.
"""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, FastAPI, HTTPException, Path, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from sqlalchemy import inspect, select, text
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.orm import InstrumentedAttribute, Session
from starlette.types import ASGIApp, Message, Receive, Scope, Send

import database
import get_features_table
from database import Base, SessionDep
from fast_path import FastRecommendations
from get_model import ModelFileError, load_model_file, resolve_model_file
from refresh import CycleReport, TableFollower
from schema import ErrorGet, FeedGet, HealthGet, LiveGet, PostGet, UserGet
from serving import Changes, Recommender, ServingState
from settings import Settings
from table_feed import Feed
from table_post import Post
from table_user import User
from times import TIME_HINT, TIME_PATTERN, TIME_RANGE, parse_time

MAX_LIMIT = 100  # every ?limit= is bounded, so no request can ask for an unbounded response
DEFAULT_LIMIT = 5  # posts per recommendation when ?limit= is absent
MAX_ID = database.INT32_MAX  # the tables' ids are 32-bit integers
log = logging.getLogger("recommender")

IdPath = Annotated[int, Path(ge=0, le=MAX_ID, description="the row's id", examples=[200])]
FeedLimit = Annotated[int, Query(ge=1, le=MAX_LIMIT, description="how many feed rows, newest first")]
UserQuery = Annotated[int, Query(ge=0, le=MAX_ID, description="user_id", examples=[200])]
RecLimit = Annotated[int, Query(ge=1, le=MAX_LIMIT, description="how many posts")]
TimeQuery = Annotated[
    str,
    Query(
        description=f"the moment to recommend at, {TIME_HINT}, from {TIME_RANGE[0]} to {TIME_RANGE[1]}",
        examples=["2021-12-01 12:00:00"],
        json_schema_extra={"pattern": TIME_PATTERN},
    ),
]
NOT_FOUND = {404: {"model": ErrorGet, "description": "no row with that id"}}
UNAVAILABLE = {503: {"model": ErrorGet, "description": "the database is unavailable; try again shortly"}}
NO_MODEL = {503: {"model": ErrorGet, "description": "no model loaded, or the database is unavailable"}}
Row = TypeVar("Row", bound=Base)


# ----------------------------------------------------------------------------- app and lifespan


def create_app(settings: Settings | None = None) -> FastAPI:
    """The FastAPI app; `settings` default to Settings() read when the app starts."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.settings = current = settings or Settings()
        app.state.engine = database.make_engine(current.db_url)
        app.state.session_factory = database.session_factory(app.state.engine)
        app.state.recommender = recommender = load_recommender(current)
        refresher = None
        if recommender:
            app.state.follower = TableFollower(
                app.state.engine, recommender, lookback_seconds=current.refresh_lookback_seconds
            )
            await asyncio.to_thread(load_posts, app)
            refresher = asyncio.create_task(refresh_forever(app))
        # what the startup built lives as long as the worker: out of the collector's reach (after one
        # last collection), so that no collection between requests walks it again (the latency tail)
        gc.collect()
        gc.freeze()
        try:
            yield
        finally:
            gc.unfreeze()  # collectable again (tests start and stop many apps in one process)
            if refresher:
                refresher.cancel()
            app.state.engine.dispose()

    app = FastAPI(
        title="Post recommender",
        version="2.0.0",
        summary="Two-tower recommendations of posts for the users of a social network.",
        lifespan=lifespan,
    )
    app.add_middleware(OneLineStartupFailure)
    app.add_middleware(  # the usual recommendation request, answered below the framework (fast_path.py)
        FastRecommendations,
        paths=("/post/recommendations/", "/post/recommendations"),
        answer=_fast_answer,
        max_id=MAX_ID,
        max_limit=MAX_LIMIT,
        default_limit=DEFAULT_LIMIT,
    )
    app.add_exception_handler(OperationalError, _database_unavailable)
    app.add_exception_handler(DBAPIError, _database_unavailable)
    for router in (health, recommendations, tables):  # recommendations first: /post/recommendations
        app.include_router(router)  # must not be taken for /post/{id}
    return app


class OneLineStartupFailure:
    """Shortens a failed startup's report to its last line (e.g. the ModelFileError's message).

    uvicorn prints the lifespan's failure message and exits non-zero; for an operator the cause matters,
    not the traceback through the framework.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "lifespan":
            return await self.app(scope, receive, send)

        async def send_short(message: Message) -> None:
            if message["type"] == "lifespan.startup.failed" and message.get("message"):
                message = {**message, "message": message["message"].strip().splitlines()[-1]}
            await send(message)

        return await self.app(scope, receive, send_short)


def load_recommender(settings: Settings) -> Recommender | None:
    """The model file -> Recommender; None (table endpoints only) when there is no model at all.

    A model file that exists but is broken, or fails its checksum, stops the startup: serving without
    the model the operator configured would hide the problem.
    """
    try:
        path, sha256 = resolve_model_file(settings)
    except ModelFileError as exc:
        if settings.model_url:
            raise
        log.warning("%s; /post/recommendations answers 503 until a model file exists", exc)
        return None
    recommender = Recommender(
        load_model_file(path, sha256=sha256, mmap=True),
        threads=settings.torch_threads,
        faiss_min_posts=settings.faiss_min_posts,
        ranking=settings.ranking,
    )
    log.info(
        "model %s loaded: %d users, %d posts, ranking by %s",
        path,
        len(recommender.user_ids),
        len(recommender.post_ids),
        settings.ranking,
    )
    return recommender


def load_posts(app: FastAPI) -> None:
    """Post texts into the recommender's memory (so answers need no database), and which posts are live.
    With the database down they are fetched per request, and the next refresh tries again."""
    recommender: Recommender = app.state.recommender
    try:
        posts = get_features_table.read_table(app.state.engine, "post_text_df")
        with app.state.engine.connect() as conn:
            if "ix_feed_data_timestamp" not in {ix["name"] for ix in inspect(conn).get_indexes("feed_data")}:
                log.warning(
                    "feed_data has no index on timestamp: each refresh scans the table. "
                    "CREATE INDEX ix_feed_data_timestamp ON feed_data (timestamp)"
                )
    except (OperationalError, DBAPIError) as exc:
        log.warning("could not read post_text_df at startup (%s)", exc.__class__.__name__)
        return
    state = recommender.apply(Changes(texts=posts, live_post_ids=posts["post_id"].to_numpy()))
    gone = int((~state.live).sum())
    if gone:
        log.warning("%d posts of the model are not in post_text_df: they are not recommended", gone)


def refresh_once(app: FastAPI) -> CycleReport:
    """One refresh cycle: what changed in the tables reaches the recommender (refresh.TableFollower)."""
    return app.state.follower.cycle()


async def refresh_forever(app: FastAPI) -> None:
    """A refresh now (rows committed since training), then every REFRESH_SECONDS (0: never)."""
    interval = app.state.settings.refresh_seconds
    while interval > 0:
        try:
            report = await asyncio.to_thread(refresh_once, app)
            if report:
                log.info("refresh: %s", report)
        except Exception as exc:  # a failed refresh must not stop the service; the next one retries
            log.warning("refresh failed (%s); serving the previous state", exc.__class__.__name__)
        await asyncio.sleep(interval)


async def _database_unavailable(_request: Request, exc: Exception) -> JSONResponse:
    log.warning("database error: %s", exc.__class__.__name__)
    return JSONResponse(status_code=503, content={"detail": "database unavailable, try again shortly"})


# ----------------------------------------------------------------------------- routing helpers


def get_route(router: APIRouter, path: str, **options: Any) -> Callable[[Callable], Callable]:
    """router.get for `path` (in the schema) and the same path with or without a trailing slash."""
    alias = path.removesuffix("/") if path.endswith("/") else f"{path}/"

    def register(endpoint: Callable) -> Callable:
        router.get(alias, include_in_schema=False, **options)(endpoint)
        return router.get(path, **options)(endpoint)

    return register


def get_or_404(session: Session, table: type[Row], id: int) -> Row:
    """The row of `table` with primary key `id`, or a 404 naming the table's row kind."""
    row = session.get(table, id)
    if row is None:
        raise HTTPException(404, detail=f"{table.__name__.lower()} {id} not found")
    return row


def feed_rows(
    session: Session, column: InstrumentedAttribute, owner: type[Row], id: int, limit: int
) -> list[Feed]:
    """The newest `limit` feed rows with column == id; 404 when the user/post itself does not exist."""
    query = select(Feed).where(column == id).order_by(Feed.timestamp.desc()).limit(limit)
    rows = list(session.scalars(query).unique())
    if not rows:  # the existence check only when nothing came back
        get_or_404(session, owner, id)
    return rows


# ----------------------------------------------------------------------------- health

health = APIRouter(tags=["service"])


@get_route(health, "/health/live", response_model=LiveGet)
async def live() -> LiveGet:
    """Liveness: the process answers. Touches neither the database nor the model (the framework's
    floor: async, so not even a worker thread)."""
    return LiveGet(status="alive")


@get_route(health, "/health", response_model=HealthGet)
def ready(request: Request) -> HealthGet:
    """Readiness: whether the database answers and the model is loaded."""
    try:
        with request.app.state.engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        db_state = "up"
    except Exception:  # any failure means "down" for the health report; it never raises
        db_state = "down"
    model = "loaded" if getattr(request.app.state, "recommender", None) else "absent"
    return HealthGet(status="ok" if db_state == "up" else "degraded", database=db_state, model=model)


# ----------------------------------------------------------------------------- tables

tables = APIRouter(tags=["tables"], responses=NOT_FOUND | UNAVAILABLE)


@get_route(tables, "/user/{id}", response_model=UserGet)
def get_user(id: IdPath, session: SessionDep) -> User:
    """One user's profile."""
    return get_or_404(session, User, id)


@get_route(tables, "/post/{id}", response_model=PostGet)
def get_post(id: IdPath, session: SessionDep) -> Post:
    """One post: its text and topic."""
    return get_or_404(session, Post, id)


@get_route(tables, "/user/{id}/feed", response_model=list[FeedGet])
def get_user_feed(id: IdPath, session: SessionDep, limit: FeedLimit = 10) -> list[Feed]:
    """The user's views and likes, newest first."""
    return feed_rows(session, Feed.user_id, User, id, limit)


@get_route(tables, "/post/{id}/feed", response_model=list[FeedGet])
def get_post_feed(id: IdPath, session: SessionDep, limit: FeedLimit = 10) -> list[Feed]:
    """The post's views and likes, newest first."""
    return feed_rows(session, Feed.post_id, Post, id, limit)


# ----------------------------------------------------------------------------- recommendations

recommendations = APIRouter(tags=["recommendations"], responses=NOT_FOUND | NO_MODEL)


@get_route(recommendations, "/post/recommendations/", response_model=list[PostGet])
async def recommend(request: Request, id: UserQuery, time: TimeQuery, limit: RecLimit = DEFAULT_LIMIT) -> Any:
    """The top `limit` posts for user `id` at `time`: history before `time`, liked posts excluded."""
    recommender: Recommender | None = request.app.state.recommender
    if recommender is None:
        raise HTTPException(503, detail="no model loaded: train one with `python main_script.py`")
    try:
        moment = parse_time(time)
    except ValueError:
        message = f"time must look like 2021-12-01 12:00:00 ({TIME_HINT}), {TIME_RANGE[0]}..{TIME_RANGE[1]}"
        error = {"type": "datetime_parsing", "loc": ("query", "time"), "msg": message, "input": time}
        raise RequestValidationError([error]) from None
    state = recommender.state  # one state for the whole request, whatever a refresh swaps in meanwhile
    body = answer_in_memory(recommender, state, id, moment, limit)
    if body is not None:  # the usual path, memory only: inline, no worker-thread round trips
        return Response(body, media_type="application/json")
    # a user added since the last refresh, or post texts not in memory: the database, in a worker thread
    return await run_in_threadpool(_recommend_from_database, request, recommender, state, id, moment, limit)


def answer_in_memory(
    recommender: Recommender, state: ServingState, id: int, moment: int, limit: int
) -> bytes | None:
    """The recommendations as pre-encoded PostGet JSON when memory alone answers (a user the state
    holds, every text in memory); None otherwise. The endpoint and fast_path.FastRecommendations both
    answer through it."""
    row = state.user_row(id)
    return state.response_body(recommender.recommend(state, row, moment, limit)) if row >= 0 else None


def _fast_answer(app_state: Any, id: int, moment: int, limit: int) -> bytes | None:
    recommender: Recommender | None = getattr(app_state, "recommender", None)  # None before the lifespan
    return (
        None if recommender is None else answer_in_memory(recommender, recommender.state, id, moment, limit)
    )


def _recommend_from_database(
    request: Request, recommender: Recommender, state: ServingState, id: int, moment: int, limit: int
) -> Response | list[Post]:
    with request.app.state.session_factory() as session:
        row = state.user_row(id)
        if row >= 0:
            post_rows = recommender.recommend(state, row, moment, limit)
        else:  # in user_data since the last refresh: their merged feed rows, the same user tower
            users, histories = recommender.newcomer(state, get_or_404(session, User, id))
            post_rows = recommender.recommend(state, 0, moment, limit, users=users, histories=histories)
        body = state.response_body(post_rows)
        if body is None:  # texts not in memory (the database was down at startup): read them now
            load_posts(request.app)
            body = request.app.state.recommender.state.response_body(post_rows)  # rows only ever append
        if body is not None:  # pre-encoded PostGet JSON, no database round trip
            return Response(body, media_type="application/json")
        post_ids = state.post_ids[post_rows].tolist()
        found = {
            post.post_id: post for post in session.scalars(select(Post).where(Post.post_id.in_(post_ids)))
        }
        return [found[pid] for pid in post_ids if pid in found]


app = create_app()
