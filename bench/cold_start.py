"""Cold start: posts the model never saw, added through the live path, ranked among themselves.

    python -m bench.cold_start [--scale small] [--seed 0] [--share 0.1] [--json]

1. Generate the demo (DEMO_SCALE) into a scratch SQLite database under --data-dir and withhold a random
   --share of its posts, with every feed row that names them.
2. Train the model on the rest (main_script.train_stage: the real pipeline, default settings).
3. The service at the cutoff: a model file whose snapshot holds the events before the cutoff only, a
   database holding the users, all posts (the withheld ones back in post_text_df), the feed before the
   cutoff without the withheld posts' rows, and their text embeddings from `main_script.py embed-posts`.
   One refresh cycle (refresh.TableFollower) adds the withheld posts to the item matrix, as new posts
   with no statistics.
4. Rank only the withheld posts for every user who liked one of them in the test window, at the
   cutoff, under the evaluation protocol (evaluate.py: excluded = withheld posts liked before the
   cutoff, relevant = those liked at or after it): the model (Recommender.scores, the service's own
   path), random, the most popular topic (likes per topic before the cutoff), the oracle (the
   generator's true model, which also knows how often the feed will show each post) and the oracle
   without that exposure term (the true like probability alone).

Targets (the live-service issue): model HitRate@5 >= 0.7 x the oracle's and >= 2 x random's.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from bench.harness import DATA_DIR, ROOT, log

if TYPE_CHECKING:
    from get_model import ModelFile

SHOWN = ("hitrate@5", "recall@10", "ndcg@10", "coverage")


def model_file_at(model_file: ModelFile, cutoff: int) -> ModelFile:
    """The model file as a service running at `cutoff` would hold it: the snapshot's events before the
    cutoff only, post statistics at the cutoff (the same counts the service keeps, serving.py)."""
    import torch

    from features import post_counts, post_stats_from_counts, window_days
    from histories import ACTION_LIKE

    snapshot = model_file.snapshot
    histories = snapshot.histories
    before = histories.select(histories.ev_time < cutoff)
    before.likes = histories.likes.select(histories.likes.ev_time < cutoff)
    counts = post_counts(
        before.ev_post,
        before.ev_action == ACTION_LIKE,
        before.ev_time,
        len(model_file.post_ids),
        cutoff=cutoff,
    )
    stats = post_stats_from_counts(*counts, window_days=window_days(snapshot.start, cutoff))
    mean, std = model_file.stats_scaler
    state = dict(model_file.state_dict)
    state["post_stats"] = torch.from_numpy(((stats - mean) / std).astype(np.float32))
    return dataclasses.replace(
        model_file,
        snapshot=dataclasses.replace(snapshot, histories=before, end=cutoff),
        state_dict=state,
    )


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.cold_start", description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", default="small", help="demo scale (default: small)")
    parser.add_argument("--seed", type=int, default=0, help="demo and split seed (default: 0)")
    parser.add_argument("--share", type=float, default=0.1, help="share of posts withheld (default: 0.1)")
    parser.add_argument("--data-dir", type=Path, default=DATA_DIR / "cold_start")
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout")
    args = parser.parse_args()

    import database
    import demo_data
    import get_features_table
    import main_script
    from evaluate import constant_block, evaluate_ranking, random_block, ranking_task
    from features import build_user_histories
    from refresh import TableFollower
    from serving import Changes, Recommender
    from settings import Settings
    from times import format_time, to_seconds

    started = time.perf_counter()
    folder = args.data_dir / f"{args.scale}-seed{args.seed}"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    settings = Settings().replace(
        database_url=f"sqlite:///{folder / 'serving.db'}",
        demo_scale=args.scale,
        seed=args.seed,
        ground_truth_path=folder / "truth.npz",
        model_path=folder / "model.pt",
        embed_cache_dir=ROOT / "data" / "embed_cache",  # shared: the demo texts are the same per seed
    )
    demo = demo_data.generate(args.scale, seed=args.seed, progress=False)
    users, posts, feed = demo.users, demo.posts, demo.feed
    rng = np.random.default_rng(args.seed)
    withheld = np.sort(rng.choice(posts["post_id"].to_numpy(), round(args.share * len(posts)), replace=False))
    seen_feed = feed[~feed["post_id"].isin(withheld)].reset_index(drop=True)
    seen_posts = posts[~posts["post_id"].isin(withheld)].reset_index(drop=True)
    log(
        f"{args.scale} demo: {len(posts)} posts, {len(withheld)} withheld "
        f"with {len(feed) - len(seen_feed)} feed rows"
    )

    trained = main_script.train_stage(
        settings, tables=(users, seen_posts, seen_feed), evaluate=False, progress=False
    )
    cutoff = trained.data.cutoff
    log(f"trained in {trained.seconds['train']:.0f} s; cutoff {format_time(cutoff)}")

    engine = database.make_engine(settings.db_url)  # the service's tables at the cutoff
    before_cutoff = seen_feed[to_seconds(seen_feed["timestamp"]) < cutoff]
    get_features_table.write_tables(engine, users=users, posts=posts, feed=before_cutoff, progress=False)
    main_script.sync_post_embeddings(settings, progress=False)
    recommender = Recommender(model_file_at(trained.model_file, cutoff), threads=1)
    recommender.apply(Changes(texts=posts, live_post_ids=posts["post_id"].to_numpy()))
    report = TableFollower(engine, recommender, lookback_seconds=settings.refresh_lookback_seconds).cycle()
    engine.dispose()
    state = recommender.state
    columns = state.post_rows(withheld)
    assert report.posts == len(withheld) and (columns >= 0).all(), f"not every withheld post joined: {report}"

    user_ids = state.users.user_ids
    histories = build_user_histories(feed[feed["post_id"].isin(withheld)], user_ids, withheld)
    task = ranking_task(histories, cutoff, len(withheld))

    def model_block(rows: np.ndarray) -> np.ndarray:
        return np.stack([recommender.scores(state, int(row), cutoff)[columns] for row in rows])

    topic_likes = (
        seen_feed[(seen_feed["action"] == "like") & (to_seconds(seen_feed["timestamp"]) < cutoff)]
        .merge(seen_posts, on="post_id")["topic"]
        .value_counts()
    )
    topic = posts.set_index("post_id").loc[withheld, "topic"]
    popular_topic = topic.map(topic_likes).fillna(0).to_numpy(np.float64) + 1e-3 * rng.random(len(withheld))
    truth = demo.truth

    def taste_block(rows: np.ndarray) -> np.ndarray:
        """The oracle's like probability alone: what it knows of the user's taste, not of the feed's
        future exposure of each post (which no statistic of a new post can tell)."""
        pairs = np.repeat(user_ids[rows], len(withheld)), np.tile(withheld, len(rows))
        return truth.like_logits(*pairs, cutoff, feed).reshape(len(rows), len(withheld))

    results = {
        "model": evaluate_ranking(model_block, task),
        "random": evaluate_ranking(random_block(len(withheld), args.seed), task),
        "popular_topic": evaluate_ranking(constant_block(popular_topic), task),
        "oracle": evaluate_ranking(
            lambda rows: truth.score_matrix(user_ids[rows], withheld, cutoff, feed), task
        ),
        "oracle_without_exposure": evaluate_ranking(taste_block, task),
    }
    model_hr = results["model"]["hitrate@5"]
    summary = {
        "scale": args.scale,
        "seed": args.seed,
        "withheld_posts": len(withheld),
        "ranked_users": len(task.user_rows),
        "results": results,
        "hitrate@5_vs_oracle": round(model_hr / results["oracle"]["hitrate@5"], 3),
        "hitrate@5_vs_random": round(model_hr / results["random"]["hitrate@5"], 3),
        "targets": {"hitrate@5_vs_oracle": ">= 0.7", "hitrate@5_vs_random": ">= 2"},
        "seconds": round(time.perf_counter() - started, 1),
    }
    lines = [f"| ranker | {' | '.join(SHOWN)} |", "|---" * (len(SHOWN) + 1) + "|"]
    lines += [f"| {name} | " + " | ".join(f"{m[k]:.4f}" for k in SHOWN) + " |" for name, m in results.items()]
    log("\n".join(lines))
    log(
        f"{len(task.user_rows)} users ranked over {len(withheld)} withheld posts; model HitRate@5 = "
        f"{summary['hitrate@5_vs_oracle']} x oracle, {summary['hitrate@5_vs_random']} x random"
    )
    if args.json:
        print(json.dumps(summary))


if __name__ == "__main__":
    main()
