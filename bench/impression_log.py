"""The impression log under load: what it costs a request, and what a database outage does to it.

    python -m bench.impression_log [--seconds 20] [--rounds 2] [--outage 10] [--json]

Uses the demo and model of `python -m bench.ab_simulation` (the small demo in PostgreSQL, built there
when missing). The service is `gunicorn app:app` with one worker, reached by an asyncio keep-alive
client in its own process (bench.harness), asking recommendations of demo users after the feed's end.

1. CPU: the same load with IMPRESSION_LOG=off and =on, alternating, --rounds times: server CPU seconds
   per answered request (all threads of the process tree, the log's writer included), and the ratio.
2. Outage: the service reaches PostgreSQL through a TCP proxy run here; --outage seconds into the load
   the proxy stops (refusing connections and cutting the open ones) for --outage seconds. Counted: failed
   requests, answers, rows written to recommendation_log, rows the log reports dropped (/health of the
   one worker, read at the end). With the default queue every answer must be written; with
   --small-queue rows (a second run) the overflow must be counted: written + dropped = answered.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import func, select
from sqlalchemy.engine import make_url

from bench.ab_simulation import prepare
from bench.harness import (
    ROOT,
    cpu_seconds,
    free_port,
    load_average,
    log,
    run_python_client,
    start_server,
    stop_server,
)


class TcpProxy:
    """A TCP forwarder on 127.0.0.1:port to (host, target_port) that can be stopped (listener closed,
    open connections cut) and started again, in a thread of its own."""

    def __init__(self, host: str, target_port: int):
        self.host, self.target_port, self.port = host, target_port, free_port()
        self.loop = asyncio.new_event_loop()
        self.server: asyncio.AbstractServer | None = None
        self.writers: set[asyncio.StreamWriter] = set()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()

    def start(self) -> None:
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result()

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self._stop(), self.loop).result()

    async def _start(self) -> None:
        self.server = await asyncio.start_server(self._connection, "127.0.0.1", self.port)

    async def _stop(self) -> None:
        if self.server is not None:
            self.server.close()
            self.server = None
        for writer in list(self.writers):
            writer.transport.abort()
        self.writers.clear()

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(self.host, self.target_port)
        except OSError:
            writer.transport.abort()
            return
        self.writers |= {writer, up_writer}

        async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            try:
                while data := await source.read(65536):
                    sink.write(data)
                    await sink.drain()
            except (OSError, asyncio.IncompleteReadError):
                pass
            finally:
                sink.transport.abort()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        self.writers -= {writer, up_writer}


def request_paths(engine, n: int, seed: int) -> list[str]:
    """Recommendation paths of random demo users at random times in the two days after the feed ends."""
    from table_feed import Feed
    from times import DAY_SECONDS, format_time, to_seconds

    with engine.connect() as conn:
        users = np.array(conn.execute(select(Feed.user_id).distinct()).scalars().all())
        end = int(to_seconds(np.array([conn.execute(select(func.max(Feed.timestamp))).scalar_one()]))[0])
    rng = np.random.default_rng(seed)
    times = end + rng.integers(3600, 2 * DAY_SECONDS, n)
    return [
        f"/post/recommendations/?id={user}&time={format_time(t).replace(' ', '%20')}&limit=5"
        for user, t in zip(rng.choice(users, n), times, strict=True)
    ]


def logged_rows(engine, since) -> tuple[int, int]:
    """(rows, distinct rows) of recommendation_log served since `since`: the log writes at least once,
    so a batch whose commit acknowledgement was cut off is written twice (the report counts it once)."""
    from table_recommendation_log import RecommendationLog as Log

    Log.__table__.create(engine, checkfirst=True)
    columns = (Log.served_at, Log.user_id, Log.request_time, Log.arm, Log.post_ids)
    with engine.connect() as conn:
        rows = conn.execute(select(func.count()).select_from(Log).where(Log.served_at >= since)).scalar_one()
        distinct = select(*columns).where(Log.served_at >= since).distinct().subquery()
        return int(rows), int(conn.execute(select(func.count()).select_from(distinct)).scalar_one())


def health(port: int) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10) as response:
        return json.loads(response.read())


def cpu_round(env: dict[str, str], paths: list[str], *, log_on: bool, seconds: float, work_dir: Path) -> dict:
    port = free_port()
    env = env | {"IMPRESSION_LOG": "on" if log_on else "off"}
    server, _ = start_server(env=env, port=port, log_path=work_dir / "server.log", access_log=False)
    try:
        run_python_client(
            port=port, paths=paths[::-1], concurrency=4, seconds=2, work_dir=work_dir
        )  # warm-up
        cpu, load = cpu_seconds(server.pid), load_average()
        result = run_python_client(port=port, paths=paths, concurrency=4, seconds=seconds, work_dir=work_dir)
        used = cpu_seconds(server.pid) - cpu
    finally:
        stop_server(server)
    answered = result["requests"] - result["non_2xx"]
    return {
        "log": log_on,
        "requests": result["requests"],
        "errors": result["errors"] + result["non_2xx"],
        "rps": round(result["rps"], 1),
        "cpu_ms_per_request": round(1000 * used / max(answered, 1), 4),
        "load": load,
    }


def outage_run(
    env: dict[str, str],
    paths: list[str],
    engine,
    database_url: str,
    *,
    outage: float,
    queue_size: int,
    work_dir: Path,
) -> dict:
    from datetime import UTC, datetime

    url = make_url(database_url)
    proxy = TcpProxy(url.host or "127.0.0.1", url.port or 5432)
    proxy.start()
    proxied = url.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
    port = free_port()
    env = env | {
        "DATABASE_URL": proxied,
        "IMPRESSION_LOG": "on",
        "IMPRESSION_QUEUE_SIZE": str(queue_size),
        "REFRESH_SECONDS": "1",
    }
    since = datetime.now(UTC).replace(tzinfo=None)
    server, _ = start_server(env=env, port=port, log_path=work_dir / "server_outage.log", access_log=False)
    seconds = 3 * outage

    def cut() -> None:
        time.sleep(outage)
        proxy.stop()
        log(f"proxy stopped for {outage} s")
        time.sleep(outage)
        proxy.start()
        log("proxy started again")

    cutter = threading.Thread(target=cut)
    try:
        cutter.start()
        result = run_python_client(port=port, paths=paths, concurrency=4, seconds=seconds, work_dir=work_dir)
        cutter.join()
        time.sleep(3)  # the writer's retry interval and a flush
        counts = health(port).get("impressions", {})
    finally:
        stop_server(server)  # the lifespan exit writes what is still queued
    answered = result["requests"] - result["non_2xx"]
    rows, written = logged_rows(engine, since)
    return {
        "outage_s": outage,
        "queue_size": queue_size,
        "requests": result["requests"],
        "failed_requests": result["errors"] + result["non_2xx"],
        "answered": answered,
        "written": written,
        "rows_written_twice": rows - written,
        "dropped": counts.get("dropped"),
        "failed_batches": counts.get("failed_batches"),
        "written_plus_dropped_equals_answered": written + (counts.get("dropped") or 0) == answered,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.impression_log", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--database-url", default="postgresql://postgres@127.0.0.1:5432/ab_sim")
    parser.add_argument("--data-dir", type=Path, default=ROOT / "data" / "ab")
    parser.add_argument("--seconds", type=float, default=20, help="load per CPU round (default 20)")
    parser.add_argument("--rounds", type=int, default=2, help="off/on pairs (default 2)")
    parser.add_argument("--outage", type=float, default=10, help="seconds the database is away (default 10)")
    parser.add_argument("--small-queue", type=int, default=200, help="the overflow run's queue (default 200)")
    parser.add_argument("--epochs", type=int, default=3, help="training epochs when the model is missing")
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout")
    args = parser.parse_args()

    import database

    data_dir = args.data_dir.resolve()
    env = prepare(args.database_url, data_dir, args.epochs)
    env.pop("EXPERIMENT_PATH", None)
    engine = database.make_engine(args.database_url)
    paths = request_paths(engine, 5000, seed=0)
    rounds = []
    for _ in range(args.rounds):
        for log_on in (False, True):
            rounds.append(cpu_round(env, paths, log_on=log_on, seconds=args.seconds, work_dir=data_dir))
            log(f"cpu round: {rounds[-1]}")
    off = float(np.median([r["cpu_ms_per_request"] for r in rounds if not r["log"]]))
    on = float(np.median([r["cpu_ms_per_request"] for r in rounds if r["log"]]))
    outages = [
        outage_run(
            env, paths, engine, args.database_url, outage=args.outage, queue_size=size, work_dir=data_dir
        )
        for size in (100_000, args.small_queue)
    ]
    for row in outages:
        log(f"outage: {row}")
    engine.dispose()
    result = {
        "cpu_ms_per_request_off": off,
        "cpu_ms_per_request_on": on,
        "cpu_ratio_on_off": round(on / off, 3),
        "request_errors": sum(r["errors"] for r in rounds),
        "rounds": rounds,
        "outages": outages,
    }
    if args.json:
        print(json.dumps(result))
    else:
        log(
            f"server CPU per request: log off {off:.4f} ms, on {on:.4f} ms = {on / off:.3f}x "
            f"(medians of {args.rounds}); request errors {result['request_errors']}"
        )
        for row in outages:
            log(
                f"database away {row['outage_s']} s, queue {row['queue_size']}: "
                f"{row['failed_requests']} failed requests, {row['answered']} answered, "
                f"{row['written']} written, {row['dropped']} dropped"
            )


if __name__ == "__main__":
    main()
