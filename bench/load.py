"""Load test of a running service: many concurrent keep-alive connections, mixed endpoints, real ids.

    uvicorn app:app --port 8000 &                   # the service under test, in its own process
    python -m bench.load                            # 60 s, 32 connections, http://127.0.0.1:8000
    python -m bench.load http://127.0.0.1:8001 --duration 20 --concurrency 64 --database-url sqlite:///data/demo.db
    python -m bench.load --json                     # ONE JSON object on stdout

The ids come from the database the service reads (--database-url, default DATABASE_URL / .env): users
and posts that exist, times inside the feed's window, and ids above the largest ones, which must answer
404. The mix: recommendations 40%, user / post / user feed / post feed 10% each, unknown ids 20%
(/user, /post and /post/recommendations with an id nobody has). Counted per endpoint: requests, answers
with an unexpected status, server errors (5xx), dropped connections (exceptions: refused, reset,
timeout), and the p50 / p99 / max latency after a warm-up. Exit code 1 when any 5xx or exception
happened, so the script can gate a CI job. Only loopback addresses are accepted.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import random
import sys
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from urllib.parse import urlsplit

import httpx
import numpy as np
from sqlalchemy import func, select

import database
import table_feed
import table_post
import table_user
from settings import Settings
from times import DAY_SECONDS

MIX = {  # endpoint -> share of the requests
    "recommendations": 40,
    "user": 10,
    "post": 10,
    "user_feed": 10,
    "post_feed": 10,
    "unknown_id": 20,
}


@dataclass
class Ids:
    users: list[int]
    posts: list[int]
    start: datetime
    end: datetime
    unknown: int  # every id from here up is in neither table


@dataclass
class Tally:
    latencies: list[float] = field(default_factory=list)  # seconds, answered requests only
    statuses: Counter = field(default_factory=Counter)
    exceptions: Counter = field(default_factory=Counter)
    unexpected: int = 0


def read_ids(database_url: str, *, sample: int = 5000, seed: int = 0) -> Ids:
    engine = database.make_engine(database_url)
    try:
        with engine.connect() as conn:
            users = conn.execute(select(table_user.User.user_id)).scalars().all()
            posts = conn.execute(select(table_post.Post.post_id)).scalars().all()
            start, end = conn.execute(
                select(func.min(table_feed.Feed.timestamp), func.max(table_feed.Feed.timestamp))
            ).one()
    finally:
        engine.dispose()
    if not users or not posts or start is None:
        raise SystemExit(f"no users, posts or feed rows in {database_url.split('@')[-1]}")
    rng = random.Random(seed)
    return Ids(
        users=rng.sample(users, min(sample, len(users))),
        posts=list(posts),
        start=_as_datetime(start),
        end=_as_datetime(end),
        unknown=max(max(users), max(posts)) + 1,
    )


def _as_datetime(value: object) -> datetime:
    return value if isinstance(value, datetime) else datetime.fromisoformat(str(value))


def pick(rng: random.Random, ids: Ids) -> tuple[str, str, int]:
    """(endpoint name, path with query, expected status) of one random request."""
    name = rng.choices(list(MIX), weights=list(MIX.values()))[0]
    user, post = rng.choice(ids.users), rng.choice(ids.posts)
    moment = ids.start + timedelta(
        seconds=rng.uniform(0, (ids.end - ids.start).total_seconds() + DAY_SECONDS)
    )
    if name == "recommendations":
        return name, f"/post/recommendations/?id={user}&time={moment:%Y-%m-%d %H:%M:%S}&limit=5", 200
    if name == "user":
        return name, f"/user/{user}", 200
    if name == "post":
        return name, f"/post/{post}", 200
    if name == "user_feed":
        return name, f"/user/{user}/feed?limit=10", 200
    if name == "post_feed":
        return name, f"/post/{post}/feed?limit=10", 200
    nobody = ids.unknown + rng.randrange(1_000_000)
    path = rng.choice(
        [
            f"/user/{nobody}",
            f"/post/{nobody}",
            f"/post/recommendations/?id={nobody}&time={moment:%Y-%m-%d %H:%M:%S}",
        ]
    )
    return name, path, 404


async def worker(
    client: httpx.AsyncClient,
    ids: Ids,
    rng: random.Random,
    tallies: dict[str, Tally],
    measure_from: float,
    stop_at: float,
) -> None:
    while (now := time.perf_counter()) < stop_at:
        name, path, expected = pick(rng, ids)
        try:
            response = await client.get(path)
        except httpx.HTTPError as exc:  # refused, reset, timed out, broken protocol: a dropped request
            if now >= measure_from:
                tallies[name].exceptions[type(exc).__name__] += 1
            continue
        if now < measure_from:  # warm-up: sent, not counted
            continue
        tally = tallies[name]
        tally.latencies.append(time.perf_counter() - now)
        tally.statuses[response.status_code] += 1
        tally.unexpected += response.status_code != expected


async def run(url: str, ids: Ids, *, duration: float, concurrency: int, warmup: float, seed: int) -> dict:
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    tallies: dict[str, Tally] = defaultdict(Tally)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=10.0) as client:
        health = await client.get("/health")
        health.raise_for_status()
        started = time.perf_counter()
        measure_from, stop_at = started + warmup, started + warmup + duration
        await asyncio.gather(
            *(
                worker(client, ids, random.Random(seed * 1000 + i), tallies, measure_from, stop_at)
                for i in range(concurrency)
            )
        )
    return report(tallies, url=url, duration=duration, concurrency=concurrency, health=health.json())


def report(tallies: dict[str, Tally], **context: object) -> dict:
    endpoints = {}
    for name in MIX:
        tally = tallies.get(name, Tally())
        ms = np.array(tally.latencies) * 1000
        endpoints[name] = {
            "requests": len(ms) + sum(tally.exceptions.values()),
            "statuses": {str(k): v for k, v in sorted(tally.statuses.items())},
            "unexpected_status": tally.unexpected,
            "server_errors": sum(v for k, v in tally.statuses.items() if k >= 500),
            "exceptions": dict(tally.exceptions),
            "p50_ms": round(float(np.percentile(ms, 50)), 2) if len(ms) else None,
            "p99_ms": round(float(np.percentile(ms, 99)), 2) if len(ms) else None,
            "max_ms": round(float(ms.max()), 2) if len(ms) else None,
        }
    every = np.concatenate([np.array(t.latencies) for t in tallies.values()] or [np.zeros(0)]) * 1000
    total = sum(e["requests"] for e in endpoints.values())
    return {
        **context,
        "requests": total,
        "requests_per_s": round(total / context["duration"], 1),
        "server_errors": sum(e["server_errors"] for e in endpoints.values()),
        "exceptions": sum(sum(e["exceptions"].values()) for e in endpoints.values()),
        "unexpected_status": sum(e["unexpected_status"] for e in endpoints.values()),
        "p50_ms": round(float(np.percentile(every, 50)), 2) if len(every) else None,
        "p99_ms": round(float(np.percentile(every, 99)), 2) if len(every) else None,
        "endpoints": endpoints,
    }


def print_table(result: dict) -> None:
    print(
        f"{result['url']}: {result['requests']} requests in {result['duration']:.0f} s at concurrency "
        f"{result['concurrency']} = {result['requests_per_s']} req/s; 5xx {result['server_errors']}, "
        f"dropped {result['exceptions']}, unexpected status {result['unexpected_status']}; "
        f"p50 {result['p50_ms']} ms, p99 {result['p99_ms']} ms"
    )
    header = ("requests", "5xx", "dropped", "unexp.", "p50 ms", "p99 ms", "max ms")
    print(f"{'endpoint':<16}" + "".join(f"{h:>9}" for h in header))
    for name, e in result["endpoints"].items():
        print(
            f"{name:<16}{e['requests']:>9}{e['server_errors']:>9}{sum(e['exceptions'].values()):>9}"
            f"{e['unexpected_status']:>9}{e['p50_ms']!s:>9}{e['p99_ms']!s:>9}{e['max_ms']!s:>9}"
        )


def loopback_only(url: str) -> str:
    host = urlsplit(url).hostname or ""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise SystemExit(f"refusing to load {url}: only 127.0.0.1 / localhost services are load-tested")
    return url.rstrip("/")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.load", description=__doc__.split("\n\n")[0])
    parser.add_argument("url", nargs="?", default="http://127.0.0.1:8000", help="the running service")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds measured (default 60)")
    parser.add_argument("--concurrency", type=int, default=32, help="concurrent connections (default 32)")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds sent before measuring (default 2)")
    parser.add_argument("--database-url", help="where to read real ids (default: DATABASE_URL / .env)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = parser.parse_args(argv)
    url = loopback_only(args.url)
    ids = read_ids(args.database_url or Settings().db_url, seed=args.seed)
    result = asyncio.run(
        run(
            url,
            ids,
            duration=args.duration,
            concurrency=args.concurrency,
            warmup=args.warmup,
            seed=args.seed,
        )
    )
    if args.json:
        print(json.dumps(result))
    else:
        print_table(result)
    return 1 if result["server_errors"] or result["exceptions"] else 0


if __name__ == "__main__":
    sys.exit(main())
