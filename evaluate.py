"""The one evaluation protocol behind every reported number (DESIGN.md, "Honest evaluation").

- Global temporal split at `cutoff`: the model and every aggregate saw only events before it.
- Pointwise, on the test views: ROC-AUC, accuracy, log-loss.
- Ranking, for each user with at least one like at or after the cutoff: top-k over all posts, scored at
  the cutoff, excluding the posts the user liked before it. HitRate@5, Recall@10, NDCG@10, coverage.
- Beside the model: random, most-popular and (on demo data) the generator's oracle.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from features import ACTION_LIKE, POST_STAT_NAMES, Dataset, Histories
from learn_model import pointwise_metrics, predict
from model import TwoTower, make_user_batch

if TYPE_CHECKING:
    from demo_data import GroundTruth

TOP_K = 10
HIT_K = 5
METRIC_KEYS = ("roc_auc", "accuracy", "log_loss", "hitrate@5", "recall@10", "ndcg@10", "coverage")

ScoreBlock = Callable[[np.ndarray], np.ndarray]  # user rows -> [n_users, n_posts] scores


@dataclass
class RankingTask:
    """Who is ranked at the cutoff, what they may not be shown, and what counts as a hit (CSR by user)."""

    user_rows: np.ndarray  # users with >= 1 like at or after the cutoff
    excluded_ptr: np.ndarray  # posts liked before the cutoff
    excluded_post: np.ndarray
    relevant_ptr: np.ndarray  # posts liked at or after the cutoff (and not before)
    relevant_post: np.ndarray
    n_posts: int


def _csr(owner: np.ndarray, values: np.ndarray, n_rows: int) -> tuple[np.ndarray, np.ndarray]:
    order = np.lexsort((values, owner))
    counts = np.bincount(owner, minlength=n_rows)
    return np.concatenate([[0], np.cumsum(counts)]).astype(np.int64), values[order]


def ranking_task(histories: Histories, cutoff: int, n_posts: int) -> RankingTask:
    """The ranking task from the full histories (events on both sides of the cutoff)."""
    n_users = len(histories.user_ptr) - 1
    owner = np.repeat(np.arange(n_users), np.diff(histories.user_ptr))
    is_like = histories.ev_action == ACTION_LIKE
    before = is_like & (histories.ev_time < cutoff)
    after = is_like & (histories.ev_time >= cutoff)
    excluded_ptr, excluded_post = _csr(owner[before], histories.ev_post[before].astype(np.int64), n_users)
    # A post liked before the cutoff is never recommended, so it cannot count as a hit either.
    pair_before = owner[before] * n_posts + histories.ev_post[before]
    pair_after = owner[after] * n_posts + histories.ev_post[after]
    fresh = ~np.isin(pair_after, pair_before)
    pairs = np.unique(pair_after[fresh])
    relevant_ptr, relevant_post = _csr(pairs // n_posts, pairs % n_posts, n_users)
    users = np.flatnonzero(np.diff(relevant_ptr) > 0)
    return RankingTask(users, excluded_ptr, excluded_post, relevant_ptr, relevant_post, n_posts)


def _rows_mask(ptr: np.ndarray, values: np.ndarray, rows: np.ndarray, n_cols: int) -> np.ndarray:
    """Boolean [len(rows), n_cols] with True at each row's CSR values."""
    starts, ends = ptr[rows], ptr[rows + 1]
    counts = ends - starts
    local = np.repeat(np.arange(len(rows)), counts)
    offsets = np.repeat(starts - np.concatenate([[0], np.cumsum(counts)[:-1]]), counts)
    mask = np.zeros((len(rows), n_cols), dtype=bool)
    mask[local, values[offsets + np.arange(counts.sum())]] = True
    return mask


def top_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k best scores per row, best first; equal scores go to the lower post row."""
    values, index = torch.topk(scores, k, dim=1, sorted=True)
    # torch.topk breaks ties arbitrarily: re-sort by (score desc, index asc) for a deterministic order.
    order = np.lexsort((index.numpy(), -values.numpy()), axis=1)
    return torch.from_numpy(np.take_along_axis(index.numpy(), order, axis=1))


def evaluate_ranking(score_block: ScoreBlock, task: RankingTask, *, chunk: int = 2048) -> dict[str, float]:
    """HitRate@5, Recall@10, NDCG@10 and catalog coverage of top-10 lists for the task's users."""
    hits, recalls, ndcgs, shown = [], [], [], np.zeros(task.n_posts, dtype=bool)
    discount = 1.0 / np.log2(np.arange(TOP_K) + 2.0)
    for start in range(0, len(task.user_rows), chunk):
        rows = task.user_rows[start : start + chunk]
        scores = torch.tensor(np.array(score_block(rows), dtype=np.float32))  # a copy: baselines broadcast
        excluded = _rows_mask(task.excluded_ptr, task.excluded_post, rows, task.n_posts)
        scores[torch.from_numpy(excluded)] = float("-inf")
        top = top_k(scores, TOP_K).numpy()
        relevant = _rows_mask(task.relevant_ptr, task.relevant_post, rows, task.n_posts)
        gained = np.take_along_axis(relevant, top, axis=1)
        n_relevant = relevant.sum(axis=1)
        ideal = np.cumsum(discount)[np.minimum(n_relevant, TOP_K) - 1]
        hits.append(gained[:, :HIT_K].any(axis=1))
        recalls.append(gained.sum(axis=1) / n_relevant)
        ndcgs.append((gained * discount).sum(axis=1) / ideal)
        shown[top.ravel()] = True
    if not hits:
        return {
            "hitrate@5": float("nan"),
            "recall@10": float("nan"),
            "ndcg@10": float("nan"),
            "coverage": 0.0,
        }
    return {
        "hitrate@5": float(np.concatenate(hits).mean()),
        "recall@10": float(np.concatenate(recalls).mean()),
        "ndcg@10": float(np.concatenate(ndcgs).mean()),
        "coverage": float(shown.mean()),
    }


def popularity_scores(histories: Histories, cutoff: int, n_posts: int) -> np.ndarray:
    """Likes per post before the cutoff (the most-popular baseline's score)."""
    before = (histories.ev_action == ACTION_LIKE) & (histories.ev_time < cutoff)
    return np.bincount(histories.ev_post[before], minlength=n_posts).astype(np.float32)


def random_block(n_posts: int, seed: int) -> ScoreBlock:
    rng = np.random.default_rng(seed)
    return lambda rows: rng.random((len(rows), n_posts), dtype=np.float32)


def constant_block(scores: np.ndarray) -> ScoreBlock:
    return lambda rows: np.broadcast_to(scores, (len(rows), len(scores)))


def evaluate_model(
    model: TwoTower,
    data: Dataset,
    *,
    truth: GroundTruth | None = None,
    feed: pd.DataFrame | None = None,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, dict[str, float]]:
    """{"model", "popularity", "random"[, "oracle"]} -> metrics, all under the one protocol above.

    The random baseline ranks at random and predicts the training window's like rate for every view;
    the popularity baseline ranks by likes before the cutoff and predicts each post's like rate then.
    The oracle (demo data only) scores with the generator's true like model.
    """
    model.eval()
    test, n_posts = data.test_views, len(data.post_ids)
    task = ranking_task(data.histories, data.cutoff, n_posts)
    steps = tqdm(total=4 if truth is not None else 3, desc="evaluate", disable=not progress, leave=False)
    results: dict[str, dict[str, float]] = {}

    with torch.inference_mode():
        item_matrix = model.ranking_item_matrix()

    def model_block(rows: np.ndarray) -> np.ndarray:
        times = np.full(len(rows), data.cutoff, dtype=np.int64)
        with torch.inference_mode():
            batch = make_user_batch(data.users, data.histories, rows, times, model.config)
            return (model.ranking_user_vector(model.user_embeddings(batch)) @ item_matrix.T).numpy()

    results["model"] = pointwise_metrics(test.labels, predict(model, data.users, data.histories, test))
    results["model"] |= evaluate_ranking(model_block, task)
    steps.update()

    popular = popularity_scores(data.histories, data.cutoff, n_posts)
    like_rate = data.post_stats * data.stats_scaler[1] + data.stats_scaler[0]
    rate = np.clip(like_rate[:, POST_STAT_NAMES.index("like_rate")], 1e-4, 1 - 1e-4)
    results["popularity"] = pointwise_metrics(test.labels, np.log(rate / (1 - rate))[test.post_rows])
    results["popularity"] |= evaluate_ranking(constant_block(popular + 1e-6 * rate), task)
    steps.update()

    prior = float(np.clip(data.train_views.labels.mean(), 1e-4, 1 - 1e-4))
    rng = np.random.default_rng(seed)
    random_logits = np.log(prior / (1 - prior)) + 1e-3 * rng.standard_normal(len(test))
    results["random"] = pointwise_metrics(test.labels, random_logits)
    results["random"] |= evaluate_ranking(random_block(n_posts, seed), task)
    steps.update()

    if truth is not None:
        assert feed is not None, "the oracle replays histories from the feed: pass feed= with truth="
        user_ids, post_ids = data.users.user_ids, data.post_ids
        oracle_logits = truth.like_logits(
            user_ids[test.user_rows], post_ids[test.post_rows], test.times, feed
        )
        cutoff = pd.Timestamp(data.cutoff, unit="s").to_pydatetime()
        results["oracle"] = pointwise_metrics(test.labels, oracle_logits)
        results["oracle"] |= evaluate_ranking(
            lambda rows: truth.score_matrix(user_ids[rows], post_ids, cutoff, feed), task
        )
        steps.update()
    steps.close()
    results["model"]["ranked_users"] = float(len(task.user_rows))
    return results
