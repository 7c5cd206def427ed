"""A simulated A/B experiment on the demo: the whole loop (assignment, serving, impression log, refresh,
report) over real HTTP, judged against the generator's truth.

    python -m bench.ab_simulation [--users 3000] [--days 4] [--aa] [--salts 20] [--json]

1. The `small` demo in its own PostgreSQL database (--database-url) and a model trained on it (reused
   when present; rows a previous simulation added are deleted first, so every run starts from the demo).
2. The service as the container runs it (gunicorn, --workers uvicorn workers) with an experiment of two
   arms of the one model file: "logged" (the exposure-weighted ranking, the control) and "likes" (the
   calibrated like probability); with --aa both arms rank by likes. REFRESH_SECONDS=1: each worker
   follows the rows the simulated users add.
3. --users users of the demo, each coming back once a day for --days days after the demo's feed ends,
   at a random hour: they ask /post/recommendations/ (limit 5) at that time, view the five posts in
   order and like each by the generator's true probability (its like logit, with the user's history
   state moved by every like, simulated ones included). Their view and like rows are inserted into
   feed_data an hour of simulated time at a time, so the service's refresh merges them (exclusions,
   histories, post statistics) before the users come back.
4. After a clean stop (the workers flush their impression logs), the experiment report on the logged
   impressions (1 h attribution window), next to the truth: the expected likes of what each arm showed
   (the sum of the true like probabilities), whose ratio is the lift the report must find.
   With --aa, the same logged run is also split by --salts other salts: in an A/A both arms answer
   identically, so relabelling the impressions is exactly what a run with that salt would log; the
   count of intervals that cover 0 is printed (95% intervals: about 19 of 20).
"""

from __future__ import annotations

import argparse
import http.client
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from bench.harness import (
    ROOT,
    child_env,
    ensure_database,
    free_port,
    log,
    run_step,
    start_server,
    stop_server,
)

EXPERIMENT = "ab-simulation"
VIEW_GAP_SECONDS = 20  # between two of the five posts a user views
WINDOW_SECONDS = 3600


def prepare(database_url: str, data_dir: Path, epochs: int) -> dict[str, str]:
    """The small demo and its model in data_dir (reused when present); the environment of the service."""
    import get_model

    ensure_database(database_url)
    env = child_env(database_url=database_url, data_dir=data_dir, scale="small")
    env.update(EPOCHS=str(epochs), TRAIN_SAMPLE="1500000")
    data_dir.mkdir(parents=True, exist_ok=True)
    run_step(["--quiet", "demo-data", "--scale", "small", "--if-missing"], env=env)
    if not get_model.usable(data_dir / "model.pt"):
        run_step(["--quiet", "all"], env=env)
    return env


def reset(engine, since: pd.Timestamp) -> None:
    """Delete what a previous run added: feed rows from the simulation's start, this experiment's log."""
    from sqlalchemy import delete

    from table_feed import Feed
    from table_recommendation_log import RecommendationLog

    RecommendationLog.__table__.create(engine, checkfirst=True)
    with engine.begin() as conn:
        conn.execute(delete(Feed).where(Feed.timestamp >= since.to_pydatetime()))
        conn.execute(delete(RecommendationLog).where(RecommendationLog.experiment == EXPERIMENT))


def write_experiment(path: Path, *, aa: bool, salt: str) -> Path:
    arms = [("logged", "logged"), ("likes", "likes")] if not aa else [("A1", "likes"), ("A2", "likes")]
    text = f'name = "{EXPERIMENT}"\nsalt = "{salt}"\n' + "".join(
        f'[[arms]]\nname = "{name}"\nranking = "{ranking}"\nshare = 0.5\n' for name, ranking in arms
    )
    path.write_text(text)
    return path


class Client:
    """Keep-alive HTTP connections, one per thread."""

    def __init__(self, port: int):
        self.port, self.local = port, threading.local()

    def recommend(self, user: int, when: str) -> tuple[list[int], str]:
        from urllib.parse import urlencode

        if not hasattr(self.local, "connection"):
            self.local.connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        connection = self.local.connection
        connection.request(
            "GET", "/post/recommendations/?" + urlencode({"id": user, "time": when, "limit": 5})
        )
        response = connection.getresponse()
        body = response.read()
        assert response.status == 200, f"user {user} at {when}: {response.status} {body[:200]!r}"
        return [item["id"] for item in json.loads(body)], response.getheader("X-Arm")


class Users:
    """The simulated users' true like model: the generator's like logit with their history state."""

    def __init__(self, truth, feed: pd.DataFrame, users: np.ndarray, start: int):
        from demo_data import _replay

        self.truth, self.feed = truth, feed
        rows = np.searchsorted(truth.user_ids, users)
        self.h0 = dict(
            zip(users.tolist(), _replay(truth, feed).state_at(rows, np.full(len(rows), start)), strict=True)
        )
        self.h = {user: state.copy() for user, state in self.h0.items()}

    def session(self, user: int, when: int, posts: list[int], rng: np.random.Generator) -> tuple[float, list]:
        """(expected likes, feed rows) of one user viewing `posts` from `when` on."""
        truth = self.truth
        latent = truth.post_latent[np.searchsorted(truth.post_ids, posts)]
        # the logit with the demo feed's history state (constant after the feed ends), then swapped for
        # the user's current state, which the simulated likes have moved
        base = (
            truth.like_logit_matrix([user], posts, when, self.feed)[0] - truth.gamma * latent @ self.h0[user]
        )
        expected, rows = 0.0, []
        for k, post in enumerate(posts):
            seen = when + 1 + k * VIEW_GAP_SECONDS
            p = 1.0 / (1.0 + np.exp(-(base[k] + truth.gamma * latent[k] @ self.h[user])))
            expected += p
            liked = bool(rng.random() < p)
            rows.append((seen, user, post, "view", int(liked)))
            if liked:
                rows.append((seen + int(rng.integers(1, 10)), user, post, "like", 0))
                self.h[user] = truth.decay * self.h[user] + (1 - truth.decay) * latent[k]
        return expected, rows


def insert_feed(engine, frame: pd.DataFrame, attempts: int = 5) -> None:
    """Append feed rows; on SQLite a transaction that read before writing fails at once (not after the
    busy timeout) when the service's impression log committed meanwhile, so it is tried again."""
    from sqlalchemy.exc import OperationalError

    import get_features_table

    for attempt in range(attempts):
        try:
            get_features_table.write_tables(engine, feed=frame, replace=False, progress=False)
            return
        except OperationalError:
            if attempt == attempts - 1:
                raise
            time.sleep(0.2)


def simulate(args: argparse.Namespace) -> dict[str, Any]:
    import database
    import get_features_table
    from demo_data import GroundTruth
    from experiment_report import attributed_likes, experiment_report, run_report
    from experiments import load_experiment
    from times import DAY_SECONDS, format_time, to_seconds

    data_dir = args.data_dir.resolve()
    env = prepare(args.database_url, data_dir, args.epochs)
    engine = database.make_engine(args.database_url)
    truth = GroundTruth.load(data_dir / "demo_truth.npz")
    feed = get_features_table.read_table(engine, "feed_data")
    feed_end = int(to_seconds(feed["timestamp"]).max())
    start = (feed_end // DAY_SECONDS + 1) * DAY_SECONDS  # midnight after the demo's last event
    feed = feed[to_seconds(feed["timestamp"]) < start].reset_index(drop=True)  # the demo's rows only
    reset(engine, pd.Timestamp(start, unit="s"))
    rng = np.random.default_rng(args.seed)
    active = np.unique(feed["user_id"].to_numpy())
    users = np.sort(rng.choice(active, min(args.users, len(active)), replace=False))
    people = Users(truth, feed, users, start)
    # one request per user and day, at a random second between 08:00 and 23:00
    times = (
        start
        + np.arange(args.days)[:, None] * DAY_SECONDS
        + rng.integers(8 * 3600, 23 * 3600, (args.days, len(users)))
    )
    requests = pd.DataFrame({"user_id": np.tile(users, args.days), "time": times.ravel()}).sort_values("time")

    experiment_path = write_experiment(data_dir / "experiment.toml", aa=args.aa, salt=f"sim-{args.seed}")
    env.update(
        EXPERIMENT_PATH=str(experiment_path),
        REFRESH_SECONDS="1",
        IMPRESSION_FLUSH_SECONDS="0.5",
        GROUND_TRUTH_PATH=str(data_dir / "demo_truth.npz"),
    )
    port = free_port()
    server, startup_s = start_server(
        env=env, port=port, log_path=data_dir / "server.log", workers=args.workers, access_log=False
    )
    client = Client(port)
    expected: list[tuple[int, int, str, float]] = []
    clock = time.perf_counter()
    try:
        with ThreadPoolExecutor(args.concurrency) as pool:
            for _, block in requests.groupby(requests["time"] // 3600):  # an hour of simulated time
                asked = list(zip(block["user_id"].tolist(), block["time"].tolist(), strict=True))
                answers = list(pool.map(lambda q: client.recommend(q[0], format_time(q[1])), asked))
                rows = []
                for (user, when), (posts, arm) in zip(asked, answers, strict=True):
                    value, mine = people.session(user, when, posts, rng)
                    expected.append((user, when, arm, value))
                    rows += mine
                frame = pd.DataFrame(rows, columns=["seconds", "user_id", "post_id", "action", "target"])
                frame.insert(0, "timestamp", pd.to_datetime(frame.pop("seconds"), unit="s"))
                frame["target"] = frame["target"].where(frame["action"] == "view", 0)
                insert_feed(engine, frame)
        serve_s = time.perf_counter() - clock
    finally:
        stop_server(server)  # SIGTERM: each worker's lifespan exit writes its queued impressions

    declared = load_experiment(experiment_path)
    report = run_report(
        engine, experiment=EXPERIMENT, declared=declared, window=WINDOW_SECONDS, seed=args.seed
    )
    truth_frame = pd.DataFrame(expected, columns=["user_id", "time", "arm", "expected"])
    per_arm = truth_frame.groupby("arm")["expected"].mean()
    control, treatment = (arm.name for arm in declared.arms)
    truth_lift = float(per_arm[treatment] / per_arm[control] - 1)
    lift = report["comparisons"][f"{treatment} vs {control}"]["likes_per_impression"]
    result: dict[str, Any] = {
        "users": len(users),
        "days": args.days,
        "requests": len(requests),
        "workers": args.workers,
        "startup_s": round(startup_s, 1),
        "serve_s": round(serve_s, 1),
        "arms": {arm: report["arms"][arm] for arm in (control, treatment)},
        "truth_expected_likes_per_impression": {arm: float(per_arm[arm]) for arm in (control, treatment)},
        "truth_lift": truth_lift,
        "lift": lift["lift"],
        "lift_ci": lift["lift_ci"],
        "p_value": lift["p_value"],
        "truth_lift_inside_ci": bool(lift["lift_ci"][0] <= truth_lift <= lift["lift_ci"][1]),
        "srm_p_value": report["srm"]["p_value"],
        "srm_mismatch": report["srm"]["mismatch"],
        "logged_impressions": sum(row["impressions"] for row in report["arms"].values()),
    }
    if args.aa:
        result["aa"] = aa_coverage(engine, declared, args.salts, attributed_likes, experiment_report)
    engine.dispose()
    return result


def aa_coverage(engine, declared, salts: int, attributed_likes, experiment_report) -> dict[str, Any]:
    """The A/A run's impressions split by `salts` other salts: how many 95% lift intervals cover 0."""
    from experiment_report import read_impressions, read_likes
    from experiments import Experiment

    impressions = read_impressions(engine, EXPERIMENT)
    likes = read_likes(
        engine,
        int(impressions["request_time"].min()),
        int(impressions["request_time"].max()) + WINDOW_SECONDS,
    )
    counts = attributed_likes(impressions, likes, WINDOW_SECONDS)
    lifts = []
    for salt in range(salts):
        split = Experiment(declared.name, f"aa-{salt}", declared.arms)
        relabelled = impressions.assign(arm=[split.arm_of(user).name for user in impressions["user_id"]])
        names = [arm.name for arm in declared.arms]
        report = experiment_report(
            relabelled, counts, arms=names, shares=declared.shares, seed=salt, bootstrap=1000
        )
        lift = report["comparisons"][f"{names[1]} vs {names[0]}"]["likes_per_impression"]
        lifts.append(
            {
                "salt": f"aa-{salt}",
                "lift": lift["lift"],
                "lift_ci": lift["lift_ci"],
                "srm_p": report["srm"]["p_value"],
            }
        )
    covered = sum(row["lift_ci"][0] <= 0 <= row["lift_ci"][1] for row in lifts)
    return {"salts": salts, "intervals_covering_0": covered, "runs": lifts}


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.ab_simulation", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--database-url", default="postgresql://postgres@127.0.0.1:5432/ab_sim")
    parser.add_argument("--data-dir", type=Path, default=ROOT / "data" / "ab")
    parser.add_argument("--users", type=int, default=3000, help="simulated users (default 3000)")
    parser.add_argument("--days", type=int, default=4, help="days, one visit a day each (default 4)")
    parser.add_argument("--seed", type=int, default=0, help="users, visit times, likes, the salt (default 0)")
    parser.add_argument("--workers", type=int, default=2, help="service workers (default 2)")
    parser.add_argument("--concurrency", type=int, default=4, help="requests in flight (default 4)")
    parser.add_argument("--epochs", type=int, default=3, help="training epochs when the model is missing")
    parser.add_argument("--aa", action="store_true", help="A/A: both arms rank by likes")
    parser.add_argument(
        "--salts", type=int, default=20, help="with --aa: the other splits to check (default 20)"
    )
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout")
    args = parser.parse_args()
    result = simulate(args)
    if args.json:
        print(json.dumps(result))
        return
    for arm, row in result["arms"].items():
        value = row["likes_per_impression"]
        log(
            f"{arm:>8}: {row['users']} users, {row['impressions']} impressions, likes/impression "
            f"{value['value']:.4f} [{value['ci'][0]:.4f}, {value['ci'][1]:.4f}], truth "
            f"{result['truth_expected_likes_per_impression'][arm]:.4f}"
        )
    log(
        f"lift {result['lift']:+.1%} [{result['lift_ci'][0]:+.1%}, {result['lift_ci'][1]:+.1%}], "
        f"p = {result['p_value']:.2g}; truth {result['truth_lift']:+.1%} "
        f"({'inside' if result['truth_lift_inside_ci'] else 'OUTSIDE'} the interval); "
        f"SRM p = {result['srm_p_value']:.3f}"
    )
    if "aa" in result:
        log(f"A/A: {result['aa']['intervals_covering_0']} of {result['aa']['salts']} intervals cover 0")


if __name__ == "__main__":
    main()
