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
import warnings
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from types import SimpleNamespace
from typing import Annotated, Any, TypeVar

import numpy as np
from fastapi import APIRouter, FastAPI, HTTPException, Path, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi_offline import FastAPIOffline
from sqlalchemy import inspect, select, text
from sqlalchemy.exc import DBAPIError, OperationalError, SAWarning
from sqlalchemy.orm import InstrumentedAttribute, Session
from starlette.types import ASGIApp, Message, Receive, Scope, Send

import database
import get_features_table
from database import Base, SessionDep
from experiments import Experiment, ServedArm, load_experiment
from fast_path import FastRecommendations
from get_model import ModelFileError, load_model_file, resolve_model_file, sha256_file
from impressions import ImpressionLog
from metrics import Metrics, MetricsMiddleware, metrics_endpoint
from refresh import CycleReport, TableFollower
from schema import ArmGet, ErrorGet, FeedGet, HealthGet, ImpressionsGet, LiveGet, PostGet, UserGet
from serving import Changes, Recommender, ServingState
from settings import Settings
from table_feed import Feed
from table_post import Post
from table_user import User
from times import TIME_HINT, TIME_PATTERN, TIME_RANGE, format_time, now_seconds, parse_time

MAX_LIMIT = 100  # every ?limit= is bounded, so no request can ask for an unbounded response
DEFAULT_LIMIT = 5  # posts per recommendation when ?limit= is absent
MAX_ID = database.INT32_MAX  # the tables' ids are 32-bit integers
log = logging.getLogger("recommender")

IdPath = Annotated[int, Path(ge=0, le=MAX_ID, description="the row's id", examples=[200])]
FeedLimit = Annotated[int, Query(ge=1, le=MAX_LIMIT, description="how many feed rows, newest first")]
UserQuery = Annotated[int, Query(ge=0, le=MAX_ID, description="user_id", examples=[200])]
RecLimit = Annotated[int, Query(ge=1, le=MAX_LIMIT, description="how many posts")]
TimeQuery = Annotated[
    str | None,
    Query(
        description=f"the moment to recommend at, {TIME_HINT} (or ISO 8601 with a T: 2021-12-01T12:00:00), "
        f"from {TIME_RANGE[0]} to {TIME_RANGE[1]}; "
        "omitted: now, by the server's clock (local time, naive like the feed's timestamps)",
        examples=["2021-12-01 12:00:00", "2021-12-01T12:00:00"],
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
        app.state.experiment = experiment = load_experiment(current.experiment_path)
        app.state.arms = []
        if experiment:
            app.state.arms = load_arms(current, experiment, app.state.engine)
            app.state.recommender = recommender = app.state.arms[0].recommender
        else:
            app.state.recommender = recommender = load_recommender(current)
        app.state.impressions = impressions = start_impression_log(current, app.state.engine, experiment)
        app.state.metrics = Metrics() if current.metrics == "on" else None
        if recommender and app.state.metrics:
            trained_until = format_time(recommender.snapshot.end - 1)
            app.state.metrics.model_loaded(str(current.model_path), trained_until)
        refresher = None
        if recommender:
            app.state.follower = (
                app.state.arms[0].follower
                if app.state.arms
                else TableFollower(
                    app.state.engine, recommender, lookback_seconds=current.refresh_lookback_seconds
                )
            )
            await asyncio.to_thread(load_posts, app)
            await asyncio.to_thread(choose_refresh_path, app)
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
            if impressions:  # a clean shutdown writes what is queued
                await asyncio.to_thread(impressions.close)
            app.state.engine.dispose()

    # FastAPIOffline: FastAPI whose /docs and /redoc load Swagger UI and ReDoc from the app itself
    # (/static-offline-docs/...), not from a CDN, so the docs work on a machine without internet.
    app = FastAPIOffline(
        title="Post recommender",
        version="2.0.0",
        summary="Two-tower recommendations of posts for the users of a social network.",
        lifespan=lifespan,
    )
    app.add_middleware(OneLineStartupFailure)
    # the fast path inside the metrics middleware, which counts its answers too
    app.add_middleware(  # the usual recommendation request, answered below the framework (fast_path.py)
        FastRecommendations,
        paths=("/post/recommendations/", "/post/recommendations"),
        answer=_fast_answer,
        max_id=MAX_ID,
        max_limit=MAX_LIMIT,
        default_limit=DEFAULT_LIMIT,
    )
    app.add_middleware(MetricsMiddleware)
    app.add_route("/metrics", metrics_endpoint, include_in_schema=False)
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


def load_arms(settings: Settings, experiment: Experiment, engine: Any) -> list[ServedArm]:
    """Every arm of the experiment, each with its recommender and table follower. A model file named
    by several arms is mapped once (memory-mapped: the workers share its pages too)."""
    default_path, default_sha256 = resolve_model_file(settings)
    files: dict[str, tuple[Any, str]] = {}  # by path
    served = []
    for arm in experiment.arms:
        path = arm.model_path or default_path
        if str(path) not in files:
            sha256 = default_sha256 if path == default_path else ""
            files[str(path)] = (load_model_file(path, sha256=sha256, mmap=True), sha256 or sha256_file(path))
        model_file, digest = files[str(path)]
        recommender = Recommender(
            model_file,
            threads=settings.torch_threads,
            faiss_min_posts=settings.faiss_min_posts,
            ranking=arm.ranking or settings.ranking,
        )
        follower = TableFollower(engine, recommender, lookback_seconds=settings.refresh_lookback_seconds)
        served.append(ServedArm(arm=arm, recommender=recommender, follower=follower, version=digest[:12]))
        log.info(
            "experiment %s, arm %s (share %.3f): model %s (version %s), ranking by %s",
            experiment.name,
            arm.name,
            arm.share,
            path,
            digest[:12],
            arm.ranking or settings.ranking,
        )
    return served


def start_impression_log(
    settings: Settings, engine: Any, experiment: Experiment | None
) -> ImpressionLog | None:
    """The impression log's writer thread, when IMPRESSION_LOG is on (auto: with an experiment)."""
    if settings.impression_log == "off" or (settings.impression_log == "auto" and experiment is None):
        return None
    return ImpressionLog(
        engine,
        queue_size=settings.impression_queue_size,
        batch_size=settings.impression_batch_size,
        flush_seconds=settings.impression_flush_seconds,
    ).start()


def load_posts(app: FastAPI) -> None:
    """Post texts into the recommender's memory (so answers need no database), and which posts are live.
    With the database down they are fetched per request, and the next refresh tries again."""
    recommender: Recommender = app.state.recommender
    try:
        posts = get_features_table.read_table(app.state.engine, "post_text_df")
        with app.state.engine.connect() as conn:
            with warnings.catch_warnings():  # SQLite's expression index is not reflected, and says so
                warnings.simplefilter("ignore", SAWarning)
                indexes = {ix["name"] for ix in inspect(conn).get_indexes("feed_data")}
            if "ix_feed_data_timestamp" not in indexes:
                log.warning(
                    "feed_data has no index on timestamp: each refresh scans the table. "
                    "CREATE INDEX ix_feed_data_timestamp ON feed_data (timestamp)"
                )
    except (OperationalError, DBAPIError) as exc:
        log.warning("could not read post_text_df at startup (%s)", exc.__class__.__name__)
        return
    changes = Changes(texts=posts, live_post_ids=posts["post_id"].to_numpy())
    for served in app.state.arms[1:]:  # the first arm's recommender is app.state.recommender
        served.recommender.apply(changes)
    state = recommender.apply(changes)
    gone = int((~state.live).sum())
    if gone:
        log.warning("%d posts of the model are not in post_text_df: they are not recommended", gone)


def choose_refresh_path(app: FastAPI) -> None:
    """Change log or timestamps (refresh.TableFollower.choose_path), said at startup; with the database
    down, the first cycle that reaches it chooses."""
    try:
        app.state.follower.choose_path()
    except (OperationalError, DBAPIError) as exc:
        log.warning("could not look for the feed's change log at startup (%s)", exc.__class__.__name__)


def refresh_once(app: FastAPI) -> CycleReport:
    """One refresh cycle: what changed in the tables reaches the recommender (refresh.TableFollower)."""
    for served in app.state.arms[1:]:  # every arm follows the tables, as the single model does
        served.follower.cycle()
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
            log.warning(
                "refresh failed (%s: %s); serving the previous state", exc.__class__.__name__, str(exc)[:200]
            )
        if app.state.metrics:
            follower = app.state.follower
            app.state.metrics.refresh_done(
                failed=follower.failures > 0,
                consecutive=follower.failures,
                lag_seconds=now_seconds() - follower.watermark,
            )
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
) -> list[SimpleNamespace]:
    """The newest `limit` feed rows with column == id, equal rows included (the table has no key: ORM
    entities would merge rows of one identity); 404 when the user/post itself does not exist."""
    query = (
        select(Feed.timestamp, Feed.user_id, Feed.post_id, Feed.action, User, Post)
        .join(User, User.user_id == Feed.user_id)
        .join(Post, Post.post_id == Feed.post_id)
        .where(column == id)
        .order_by(Feed.timestamp.desc())
        .limit(limit)
    )
    rows = [
        SimpleNamespace(timestamp=when, user_id=user_id, post_id=post_id, action=action, user=user, post=post)
        for when, user_id, post_id, action, user, post in session.execute(query)
    ]
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


@get_route(health, "/health", response_model=HealthGet, response_model_exclude_none=True)
def ready(request: Request) -> HealthGet:
    """Readiness: whether the database answers and the model is loaded."""
    try:
        with request.app.state.engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        db_state = "up"
    except Exception:  # any failure means "down" for the health report; it never raises
        db_state = "down"
    model = "loaded" if getattr(request.app.state, "recommender", None) else "absent"
    follower: TableFollower | None = getattr(request.app.state, "follower", None)
    refresh = (
        follower.health(database_up=db_state == "up") if follower is not None and follower.attempts else None
    )
    failing = refresh is not None and (
        refresh.consecutive_failures >= request.app.state.settings.refresh_failures_degraded
    )
    status = "ok" if db_state == "up" and not failing else "degraded"
    health = HealthGet(status=status, database=db_state, model=model, refresh=refresh)
    experiment = getattr(request.app.state, "experiment", None)
    if experiment is not None:
        health.experiment = experiment.name
        health.arms = [
            ArmGet(
                name=served.arm.name,
                share=served.arm.share,
                ranking=served.recommender.ranking,
                model_version=served.version,
            )
            for served in request.app.state.arms
        ]
    impressions = getattr(request.app.state, "impressions", None)
    if impressions is not None:
        health.impressions = ImpressionsGet(
            **{k: v for k, v in vars(impressions.counts()).items() if k in ImpressionsGet.model_fields}
        )
    return health


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
def get_user_feed(id: IdPath, session: SessionDep, limit: FeedLimit = 10) -> list[SimpleNamespace]:
    """The user's views and likes, newest first."""
    return feed_rows(session, Feed.user_id, User, id, limit)


@get_route(tables, "/post/{id}/feed", response_model=list[FeedGet])
def get_post_feed(id: IdPath, session: SessionDep, limit: FeedLimit = 10) -> list[SimpleNamespace]:
    """The post's views and likes, newest first."""
    return feed_rows(session, Feed.post_id, Post, id, limit)


# ----------------------------------------------------------------------------- recommendations

recommendations = APIRouter(tags=["recommendations"], responses=NOT_FOUND | NO_MODEL)


@get_route(recommendations, "/post/recommendations/", response_model=list[PostGet])
async def recommend(
    request: Request,
    response: Response,
    id: UserQuery,
    time: TimeQuery = None,
    limit: RecLimit = DEFAULT_LIMIT,
) -> Any:
    """The top `limit` posts for user `id` at `time` (default: now): history before `time`, liked posts
    excluded. During an experiment, the headers X-Experiment, X-Arm and X-Model-Version say who answered."""
    recommender: Recommender | None = request.app.state.recommender
    experiment: Experiment | None = request.app.state.experiment
    served = None
    if experiment is not None:  # the user's arm: a salted hash of the id, the same in every worker
        served = request.app.state.arms[experiment.arm_index(id)]
        recommender = served.recommender
    if recommender is None:
        raise HTTPException(503, detail="no model loaded: train one with `python main_script.py`")
    try:
        moment = now_seconds() if time is None else parse_time(time)
    except ValueError:
        message = (
            f"time must look like 2021-12-01 12:00:00 ({TIME_HINT}) or 2021-12-01T12:00:00, "
            f"{TIME_RANGE[0]}..{TIME_RANGE[1]}"
        )
        error = {"type": "datetime_parsing", "loc": ("query", "time"), "msg": message, "input": time}
        raise RequestValidationError([error]) from None
    state = recommender.state  # one state for the whole request, whatever a refresh swaps in meanwhile
    row = state.user_row(id)
    answer = None
    if row >= 0:  # the usual path, memory only: inline, no worker-thread round trips
        post_rows = recommender.recommend(state, row, moment, limit)
        body = state.response_body(post_rows)
        if body is not None:  # pre-encoded PostGet JSON
            answer = Response(body, media_type="application/json")
    if answer is None:
        # a user added since the last refresh, or post texts not in memory: the database, in a worker thread
        answer, post_rows = await run_in_threadpool(
            _recommend_from_database, request, recommender, state, id, moment, limit
        )
    if served is not None:
        headers = {"X-Experiment": experiment.name} | served.headers
        (answer if isinstance(answer, Response) else response).headers.update(headers)
    impressions: ImpressionLog | None = request.app.state.impressions
    if impressions is not None:
        impressions.record(
            user_id=id,
            request_time=moment,
            post_ids=state.post_ids[post_rows].tolist(),
            experiment=experiment.name if experiment else "",
            arm=served.arm.name if served else "",
            model_version=served.version if served else "",
        )
    return answer


def answer_in_memory(
    recommender: Recommender, state: ServingState, id: int, moment: int, limit: int
) -> bytes | None:
    """The recommendations as pre-encoded PostGet JSON when memory alone answers (a user the state
    holds, every text in memory), as the endpoint's memory path answers them; None otherwise."""
    row = state.user_row(id)
    return state.response_body(recommender.recommend(state, row, moment, limit)) if row >= 0 else None


def _fast_answer(app_state: Any, id: int, moment: int, limit: int) -> bytes | None:
    """fast_path's answer; None (the endpoint answers) during an experiment or with the impression log
    on, whose headers and log rows the endpoint writes."""
    if getattr(app_state, "experiment", None) is not None or getattr(app_state, "impressions", None):
        return None
    recommender: Recommender | None = getattr(app_state, "recommender", None)  # None before the lifespan
    return (
        None if recommender is None else answer_in_memory(recommender, recommender.state, id, moment, limit)
    )


def _recommend_from_database(
    request: Request, recommender: Recommender, state: ServingState, id: int, moment: int, limit: int
) -> tuple[Response | list[Post], np.ndarray]:
    """(the answer, its post rows in the state)."""
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
            body = recommender.state.response_body(post_rows)  # rows only ever append
        if body is not None:  # pre-encoded PostGet JSON, no database round trip
            return Response(body, media_type="application/json"), post_rows
        post_ids = state.post_ids[post_rows].tolist()
        found = {
            post.post_id: post for post in session.scalars(select(Post).where(Post.post_id.in_(post_ids)))
        }
        return [found[pid] for pid in post_ids if pid in found], post_rows


app = create_app()
