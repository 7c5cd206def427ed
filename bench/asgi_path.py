"""The server's CPU per request without the network: the ASGI app called directly, in one thread.

    python -m bench.asgi_path --json                       # the bench's model and database (bench.serve)
    python -m bench.asgi_path --model data/model.pt --database-url sqlite:///data/demo.db

What it isolates: the CPU the app itself spends per request (routing, parameter parsing and validation,
the endpoint, the response), apart from the HTTP server, the sockets and the load generator, and
measured as the calling thread's CPU time, so other jobs on the machine move it far less than latency.
Three figures, interleaved over --rounds rounds (medians of each round's median): /health/live (the
framework's floor), /post/recommendations/ for random known users at random times, and
Recommender.recommend alone on the same requests (the model's work). The ratio
recommendation / (live + model) is what the HTTP path adds around the model, beyond the framework's
own floor. `--no-fast-path` measures the app without fast_path.FastRecommendations (the endpoint
through FastAPI), for comparison in the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from urllib.parse import parse_qs

import numpy as np

import get_model
from bench.harness import DATA_DIR, DEFAULT_DATABASE_URL, ROOT, load_average, log
from bench.serve import request_plan
from times import parse_time


def scope_of(path: str) -> dict:
    """The ASGI scope uvicorn builds for GET `path` (percent-escapes in the path itself are not used)."""
    route, _, query = path.partition("?")
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": route,
        "raw_path": route.encode(),
        "root_path": "",
        "query_string": query.encode(),
        "headers": [(b"host", b"127.0.0.1")],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8000),
        "state": {},
    }


async def measure(app, paths: list[str], *, calls: int, rounds: int) -> dict[str, list[float]]:
    """Per round, the median thread CPU (ms) of each kind of call, after a warm-up."""
    startup: asyncio.Queue = asyncio.Queue()
    await startup.put({"type": "lifespan.startup"})
    lifespan_out: list[dict] = []

    async def lifespan_send(message: dict) -> None:
        lifespan_out.append(message)

    lifespan = asyncio.create_task(
        app({"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}, startup.get, lifespan_send)
    )
    while not lifespan_out:
        await asyncio.sleep(0.01)
    assert lifespan_out[0]["type"] == "lifespan.startup.complete", f"startup failed: {lifespan_out}"
    recommender = app.state.recommender
    assert recommender is not None, "the app loaded no model"
    statuses: list[int] = []

    async def receive() -> dict:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict) -> None:
        if message["type"] == "http.response.start":
            statuses.append(message["status"])

    async def through_app(path: str) -> None:
        await app(scope_of(path), receive, send)

    def model_only(path: str) -> None:
        query = parse_qs(path.partition("?")[2])
        state = recommender.state
        row = state.user_row(int(query["id"][0]))
        moment = parse_time(query["time"][0])
        clock = time.thread_time()
        recommender.recommend(state, row, moment, int(query["limit"][0]))
        model_cpu.append(time.thread_time() - clock)

    results: dict[str, list[float]] = {"live": [], "recommendation": [], "model": []}
    for _ in range(rounds):
        for name, batch in (("live", ["/health/live"] * calls), ("recommendation", paths[:calls])):
            for path in batch[:200]:
                await through_app(path)
            cpu = []
            for path in batch:
                clock = time.thread_time()
                await through_app(path)
                cpu.append(time.thread_time() - clock)
            results[name].append(float(np.median(cpu)) * 1000)
        model_cpu: list[float] = []
        for path in paths[:calls]:
            model_only(path)
        results["model"].append(float(np.median(model_cpu)) * 1000)
    await startup.put({"type": "lifespan.shutdown"})
    await lifespan
    bad = {status for status in statuses if status != 200}
    assert not bad, f"some requests did not answer 200: {bad}"
    return results


def main() -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.asgi_path",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", type=Path, default=DATA_DIR / "model.pt", help="default: %(default)s")
    parser.add_argument("--database-url", default=DEFAULT_DATABASE_URL, help="default: %(default)s")
    parser.add_argument("--calls", type=int, default=2000, help="calls of each kind per round")
    parser.add_argument("--rounds", type=int, default=3, help="rounds (default: 3)")
    parser.add_argument("--no-fast-path", action="store_true", help="without fast_path.FastRecommendations")
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout")
    args = parser.parse_args()
    assert args.calls > 200, "--calls must exceed the 200 warm-up calls"
    assert args.model.exists(), f"{args.model} does not exist: build it with `python -m bench.serve`"

    from app import create_app
    from fast_path import FastRecommendations
    from settings import Settings

    loadavg_start = load_average()
    settings = Settings(database_url=args.database_url, model_path=args.model, refresh_seconds=0)
    app = create_app(settings)
    if args.no_fast_path:  # the middleware stack is built at the first call: removing it here is enough
        app.user_middleware = [m for m in app.user_middleware if m.cls is not FastRecommendations]
    _rows, _times, paths = request_plan(get_model.load_model_file(args.model), n=args.calls, seed=0)
    results = asyncio.run(measure(app, paths, calls=args.calls, rounds=args.rounds))
    median = {name: round(float(np.median(values)), 4) for name, values in results.items()}
    summary = {
        **{f"{name}_cpu_ms": value for name, value in median.items()},
        "recommendation_vs_live_plus_model": round(
            median["recommendation"] / (median["live"] + median["model"]), 3
        ),
        "rounds": {name: [round(v, 4) for v in values] for name, values in results.items()},
        "fast_path": not args.no_fast_path,
        "loadavg_start": loadavg_start,
        "loadavg_end": load_average(),
    }
    log(
        f"thread CPU per call (medians of {args.rounds} rounds): /health/live {median['live']:.3f} ms, "
        f"recommendation {median['recommendation']:.3f} ms, Recommender.recommend {median['model']:.3f} ms; "
        f"recommendation / (live + model) = {summary['recommendation_vs_live_plus_model']:.2f}x "
        f"(fast path {'on' if summary['fast_path'] else 'off'}; load average {loadavg_start} -> "
        f"{summary['loadavg_end']})"
    )
    if args.json:
        print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
