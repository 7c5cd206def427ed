"""Top-k over large catalogues: the exact product against the FAISS index, as the service runs them.

    python -m bench.catalog [--posts 1000000] [--sizes 10000 100000] [--queries 300] [--json]

The catalogue is synthetic but keeps the model's geometry: the ranking vectors of the bench model's
7,023 posts (`python -m bench.serve` trains it; a random matrix of the same width when it is absent), each
resampled with Gaussian noise of half its dimension's spread, up to --posts rows (81 columns: the
64-D item embedding, the 16-D personal exposure and the exposure term). The queries are the model's
own ranking user vectors for random users at random times. Both searches are serving.py's
(ExactSearch, FaissSearch), one thread, with exclusions: each query excludes 30 of its exact top
100, and a FAISS answer that holds an excluded post counts as a failure. Recall@10 is measured
against the exact top 10 after exclusions.
Targets (the serving-at-scale issue), at 1,000,000 posts: FAISS p50 <= 2 ms at recall@10 >= 0.95.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from bench.harness import DATA_DIR, log


def model_vectors(model_path: Path, n_queries: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(ranking matrix [n_posts, width], queries [n_queries, width]) of the bench model, or random ones
    of the default model's width (81)."""
    rng = np.random.default_rng(seed)
    if not model_path.is_file():
        log(f"{model_path} missing: random vectors of width 81 (run python -m bench.serve for the model's)")
        return rng.standard_normal((7023, 81)).astype(np.float32), rng.standard_normal(
            (n_queries, 81)
        ).astype(np.float32)
    from get_model import load_model_file
    from serving import Recommender

    recommender = Recommender(load_model_file(model_path, mmap=True), threads=1)
    state = recommender.state
    rows = rng.integers(0, len(state.users.user_ids), n_queries)
    times = rng.integers(recommender.snapshot.start, recommender.snapshot.end, n_queries)
    queries = np.stack([recommender.query(state, int(r), int(t)) for r, t in zip(rows, times, strict=True)])
    return state.ranking_matrix, queries.astype(np.float32)


def catalogue(base: np.ndarray, n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    picked = base[rng.integers(0, len(base), n)]
    noise = rng.standard_normal(picked.shape).astype(np.float32) * (0.5 * base.std(axis=0))
    return np.ascontiguousarray(picked + noise, dtype=np.float32)


def measure(matrix: np.ndarray, queries: np.ndarray, *, seed: int, faiss: bool) -> dict[str, float]:
    from serving import ExactSearch, FaissSearch

    rng = np.random.default_rng(seed)
    exact = ExactSearch(matrix)
    excluded = [rng.choice(np.argsort(-(matrix @ q))[:100], 30, replace=False) for q in queries]
    truth = [exact.top(q, 10, ex)[0] for q, ex in zip(queries, excluded, strict=True)]
    result: dict[str, float] = {"posts": len(matrix)}
    searches: dict[str, object] = {"exact": exact}
    if faiss:
        clock = time.perf_counter()
        searches["faiss"] = FaissSearch(matrix, threads=1)
        result["faiss_build_s"] = round(time.perf_counter() - clock, 1)
    for name, search in searches.items():
        for q, ex in zip(queries[:20], excluded[:20], strict=True):  # warm-up
            search.top(q, 10, ex)
        seconds, found = [], []
        for q, ex in zip(queries, excluded, strict=True):
            clock = time.perf_counter()
            rows, _scores = search.top(q, 10, ex)
            seconds.append(time.perf_counter() - clock)
            found.append(rows)
        result[f"{name}_p50_ms"] = round(float(np.median(seconds)) * 1000, 3)
        result[f"{name}_p99_ms"] = round(float(np.percentile(seconds, 99)) * 1000, 3)
        hits = [len(set(f) & set(t)) / 10 for f, t in zip(found, truth, strict=True)]
        result[f"{name}_recall@10"] = round(float(np.mean(hits)), 4)
        result[f"{name}_excluded_returned"] = int(
            sum(np.isin(f, ex).sum() for f, ex in zip(found, excluded, strict=True))
        )
    log(json.dumps(result))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.catalog", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--posts", type=int, default=1_000_000, help="the large catalogue (default 1,000,000)"
    )
    parser.add_argument(
        "--sizes",
        type=int,
        nargs="*",
        default=[10_000, 100_000, 300_000],
        help="smaller catalogues, for the crossover",
    )
    parser.add_argument("--queries", type=int, default=300)
    parser.add_argument("--model", type=Path, default=DATA_DIR / "model.pt")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout")
    args = parser.parse_args()

    base, queries = model_vectors(args.model, args.queries, args.seed)
    runs = [
        measure(catalogue(base, n, args.seed), queries, seed=args.seed, faiss=True)
        for n in [*args.sizes, args.posts]
    ]
    large = runs[-1]
    summary = {
        "posts": args.posts,
        "width": base.shape[1],
        "exact_p50_ms": large["exact_p50_ms"],
        "faiss_p50_ms": large["faiss_p50_ms"],
        "faiss_recall@10": large["faiss_recall@10"],
        "excluded_returned": large["faiss_excluded_returned"],
        "faiss_build_s": large["faiss_build_s"],
        "runs": runs,
        "targets": {"faiss_p50_ms": "<= 2", "faiss_recall@10": ">= 0.95"},
    }
    for run in runs:
        log(
            f"{run['posts']:>9,} posts: exact p50 {run['exact_p50_ms']:.3f} ms; "
            f"FAISS p50 {run['faiss_p50_ms']:.3f} ms, recall@10 {run['faiss_recall@10']:.3f}, "
            f"built in {run['faiss_build_s']} s"
        )
    if args.json:
        print(json.dumps(summary))


if __name__ == "__main__":
    main()
