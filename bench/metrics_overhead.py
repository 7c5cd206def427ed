"""What /metrics costs the service: server CPU per recommendation with METRICS=on against METRICS=off.

    python -m bench.metrics_overhead [--requests 1000] [--rounds 5] [--json]

Serves the model and database of the current settings (DATABASE_URL, MODEL_PATH: .env or environment)
twice at once, `gunicorn app:app` with one worker each, METRICS=on and METRICS=off, REFRESH_SECONDS=0
(no refresh in the measurement); then, round after round and in alternating order, sends each server
the same sequential recommendation requests (keep-alive, from this process) and reads the server's CPU
time (/proc) around them. Prints the median CPU microseconds per request of each and their ratio: the
machine is noisy, so compare the ratio within one run.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np

from bench.harness import cpu_seconds, free_port, log, start_server, stop_server


def user_ids(database_url: str, n: int, seed: int) -> list[int]:
    import database
    import get_features_table

    engine = database.make_engine(database_url)
    try:
        users = get_features_table.read_table(engine, "user_data", columns=["user_id"])["user_id"].to_numpy()
    finally:
        engine.dispose()
    return np.random.default_rng(seed).choice(users, n).tolist()


def burst(port: int, paths: list[str]) -> None:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        for path in paths:
            connection.request("GET", path)
            response = connection.getresponse()
            response.read()
            assert response.status == 200, f"{path}: {response.status}"
    finally:
        connection.close()


def main() -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.metrics_overhead", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--requests", type=int, default=1000, help="per server and round (default: 1000)")
    parser.add_argument("--rounds", type=int, default=5, help="default: 5")
    parser.add_argument(
        "--time", default="2021-12-20T12:00:00", help="the requests' time (default: %(default)s)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout")
    args = parser.parse_args()

    from settings import Settings

    settings = Settings()
    ids = user_ids(settings.db_url, args.requests, args.seed)
    paths = [f"/post/recommendations/?id={user}&time={args.time}&limit=5" for user in ids]
    servers = {}
    per_request: dict[str, list[float]] = {"on": [], "off": []}
    with tempfile.TemporaryDirectory() as folder:
        try:
            for mode in ("on", "off"):
                env = {**os.environ, "METRICS": mode, "REFRESH_SECONDS": "0"}
                port = free_port()
                server, _ = start_server(
                    env=env, port=port, log_path=Path(folder) / f"{mode}.log", access_log=False
                )
                servers[mode] = (server, port)
                burst(port, paths[:100])  # warm up: first calls build caches
            for round_number in range(args.rounds):
                order = ("on", "off") if round_number % 2 == 0 else ("off", "on")
                for mode in order:
                    server, port = servers[mode]
                    before = cpu_seconds(server.pid)
                    burst(port, paths)
                    per_request[mode].append((cpu_seconds(server.pid) - before) / len(paths) * 1e6)
                log(
                    f"round {round_number + 1}: "
                    + ", ".join(f"{m} {v[-1]:.0f} us" for m, v in per_request.items())
                )
        finally:
            for server, _ in servers.values():
                stop_server(server)
    result = {
        "cpu_us_per_request_median": {
            mode: round(statistics.median(v), 1) for mode, v in per_request.items()
        },
        "ratio_on_off": round(
            statistics.median(per_request["on"]) / statistics.median(per_request["off"]), 3
        ),
        "requests": args.requests,
        "rounds": args.rounds,
        "load_average": round(os.getloadavg()[0], 2),
    }
    if args.json:
        print(json.dumps(result))
    else:
        medians = result["cpu_us_per_request_median"]
        print(f"server CPU per recommendation: on {medians['on']} us, off {medians['off']} us")
        print(f"ratio on/off: {result['ratio_on_off']} (target: within 1.05)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
