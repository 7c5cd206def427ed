"""Latency of the table endpoints in-process (the ASGI app, no network), on whatever DATABASE_URL holds.

    python -m bench.feed --database-url postgresql://postgres@127.0.0.1:5432/bench [--json]

Calls /user/{id}/feed?limit=10 (and /user/{id}, /post/{id}/feed) for random known ids through the ASGI
app in this process (httpx's ASGI transport: the app's real lifespan, routing, validation, database
query and serialisation; no sockets) and prints medians and p99 in milliseconds.
Fill the database first, e.g. `python main_script.py demo-data --scale full`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from pathlib import Path

import numpy as np


async def measure(client, paths: list[str]) -> dict[str, float]:
    for path in paths[:50]:  # warm-up: connection pool, statement caches
        await client.get(path)
    seconds = []
    for path in paths:
        started = time.perf_counter()
        response = await client.get(path)
        seconds.append(time.perf_counter() - started)
        assert response.status_code == 200, f"{path}: {response.status_code} {response.text[:200]}"
    ms = np.array(seconds) * 1000
    return {"p50_ms": float(np.median(ms)), "p99_ms": float(np.percentile(ms, 99))}


async def run(settings, users: np.ndarray, posts: np.ndarray) -> dict[str, dict[str, float]]:
    import httpx

    from app import create_app

    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://bench") as client:
            return {
                "user_feed": await measure(client, [f"/user/{u}/feed?limit=10" for u in users]),
                "post_feed": await measure(client, [f"/post/{p}/feed?limit=10" for p in posts]),
                "user": await measure(client, [f"/user/{u}" for u in users]),
            }


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.feed", description=__doc__.split("\n\n")[0])
    parser.add_argument("--database-url", default=os.environ.get("DATABASE_URL", "sqlite:///data/demo.db"))
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()

    from sqlalchemy import func, select

    import database
    from settings import Settings
    from table_feed import Feed
    from table_user import User

    engine = database.make_engine(args.database_url)
    with engine.connect() as conn:
        n_rows = conn.execute(select(func.count()).select_from(Feed)).scalar_one()
        user_ids = np.array(conn.execute(select(User.user_id)).scalars().all())
        post_ids = np.array(conn.execute(select(Feed.post_id).distinct()).scalars().all())
    engine.dispose()
    rng = np.random.default_rng(0)
    users, posts = rng.choice(user_ids, args.requests), rng.choice(post_ids, args.requests)
    settings = Settings(database_url=args.database_url, model_path=Path("data/bench/absent.pt"))
    result = {"feed_rows": int(n_rows)} | asyncio.run(run(settings, users, posts))
    if args.json:
        print(json.dumps(result))
    else:
        print(f"feed_data rows: {n_rows:,}  ({args.requests} requests each, in-process)")
        for name in ("user_feed", "post_feed", "user"):
            print(f"{name:10s} p50 {result[name]['p50_ms']:.2f} ms   p99 {result[name]['p99_ms']:.2f} ms")


if __name__ == "__main__":
    main()
