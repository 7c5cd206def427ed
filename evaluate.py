"""The one evaluation protocol behind every reported number (README, "Honest evaluation").

- Three windows by time (features.Dataset): training, validation (the VAL_DAYS before the test window),
  test (the last TEST_DAYS). A window is scored at its cutoff: the model and every aggregate see only
  events before it. Every choice (the model's epoch, its calibration, the EASE regulariser, the
  baselines' calibration) is made on the validation window; the test window is scored once, at the end.
- Pointwise, on the window's views: ROC-AUC, accuracy, log-loss, expected calibration error (ECE).
- Ranking, for each user with at least one like in the window: top-10 over all posts, scored at the
  cutoff, excluding the posts the user liked before it (they cannot count as hits either); ties go to
  the lower post row. HitRate@5, Recall@10, NDCG@10 (each with a 95% bootstrap interval over users,
  "<metric>_ci") and catalog coverage.
- Beside the model, under the same protocol: random, popularity (likes before the cutoff),
  recent_popularity (likes in the RECENT_POPULARITY_DAYS before it), item_knn (cosine between posts over
  the users' likes), ease (Steck 2019, closed form, regulariser chosen on validation) and, on demo data,
  the generator's oracle. A baseline's probability is its score through a sigmoid fitted on validation.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch
from scipy import sparse
from tqdm.auto import tqdm

from features import POST_STAT_NAMES, Dataset, Interactions
from histories import ACTION_LIKE, Histories
from learn_model import fit_calibration, pointwise_metrics, predict
from model import TwoTower, make_user_batch
from times import DAY_SECONDS

if TYPE_CHECKING:
    from demo_data import GroundTruth

TOP_K = 10
HIT_K = 5
RANKING_KEYS = ("hitrate@5", "recall@10", "ndcg@10")  # per-user means, each with a bootstrap interval
METRIC_KEYS = ("roc_auc", "accuracy", "log_loss", "ece", *RANKING_KEYS, "coverage")
BASELINES = ("random", "popularity", "recent_popularity", "item_knn", "ease")
RECENT_POPULARITY_DAYS = 7
EASE_LAMBDAS = (10.0, 30.0, 100.0, 300.0, 1000.0, 3000.0)  # the grid the validation window chooses from
BOOTSTRAP_RESAMPLES = 1000

ScoreBlock = Callable[[np.ndarray], np.ndarray]  # user rows -> [n_users, n_posts] scores


@dataclass
class RankingTask:
    """Who is ranked at the cutoff, what they may not be shown, and what counts as a hit (CSR by user)."""

    user_rows: np.ndarray  # users with >= 1 like in [cutoff, end)
    excluded_ptr: np.ndarray  # posts liked before the cutoff
    excluded_post: np.ndarray
    relevant_ptr: np.ndarray  # posts liked in [cutoff, end) (and not before)
    relevant_post: np.ndarray
    n_posts: int


def _csr(owner: np.ndarray, values: np.ndarray, n_rows: int) -> tuple[np.ndarray, np.ndarray]:
    order = np.lexsort((values, owner))
    counts = np.bincount(owner, minlength=n_rows)
    return np.concatenate([[0], np.cumsum(counts)]).astype(np.int64), values[order]


def ranking_task(histories: Histories, cutoff: int, n_posts: int, *, end: int | None = None) -> RankingTask:
    """The ranking task of the window [cutoff, end) (no end: every later event) from the full histories."""
    n_users = len(histories.user_ptr) - 1
    owner = np.repeat(np.arange(n_users), np.diff(histories.user_ptr))
    is_like = histories.ev_action == ACTION_LIKE
    before = is_like & (histories.ev_time < cutoff)
    after = is_like & (histories.ev_time >= cutoff)
    if end is not None:
        after &= histories.ev_time < end
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
    """Indices of the k best scores per row, best first; equal scores go to the lower post row, also at
    the k-th place (torch.topk alone picks among tied scores arbitrarily)."""
    kth = torch.topk(scores, k, dim=1, sorted=True).values[:, -1:]
    above, tied = scores > kth, scores == kth
    room = k - above.sum(dim=1, keepdim=True)  # the places left for the tied scores, lowest rows first
    chosen = above | (tied & (torch.cumsum(tied, dim=1) <= room))
    index = torch.nonzero(chosen)[:, 1].view(len(scores), k)  # exactly k per row, in row order
    values = torch.gather(scores, 1, index)
    order = np.lexsort((index.numpy(), -values.numpy()), axis=1)  # score desc, then post row asc
    return torch.from_numpy(np.take_along_axis(index.numpy(), order, axis=1))


def ranking_per_user(
    score_block: ScoreBlock, task: RankingTask, *, chunk: int = 2048
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """({metric: [n_ranked_users] values}, [n_posts] bool: shown in some top-10) for the task's users."""
    per_user: dict[str, list[np.ndarray]] = {key: [] for key in RANKING_KEYS}
    shown = np.zeros(task.n_posts, dtype=bool)
    k = min(TOP_K, task.n_posts)
    discount = 1.0 / np.log2(np.arange(k) + 2.0)
    for start in range(0, len(task.user_rows), chunk):
        rows = task.user_rows[start : start + chunk]
        scores = torch.tensor(np.array(score_block(rows), dtype=np.float32))  # a copy: baselines broadcast
        excluded = _rows_mask(task.excluded_ptr, task.excluded_post, rows, task.n_posts)
        scores[torch.from_numpy(excluded)] = float("-inf")
        top = top_k(scores, k).numpy()
        relevant = _rows_mask(task.relevant_ptr, task.relevant_post, rows, task.n_posts)
        gained = np.take_along_axis(relevant, top, axis=1)
        n_relevant = relevant.sum(axis=1)
        ideal = np.cumsum(discount)[np.minimum(n_relevant, k) - 1]
        per_user["hitrate@5"].append(gained[:, :HIT_K].any(axis=1).astype(np.float64))
        per_user["recall@10"].append(gained.sum(axis=1) / n_relevant)
        per_user["ndcg@10"].append((gained * discount).sum(axis=1) / ideal)
        shown[top.ravel()] = True
    return {key: np.concatenate(parts) if parts else np.zeros(0) for key, parts in per_user.items()}, shown


def bootstrap_interval(
    values: np.ndarray, *, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0, level: float = 0.95
) -> list[float]:
    """[low, high]: the percentile bootstrap interval of the mean of `values` (users drawn with
    replacement, `resamples` times)."""
    if len(values) == 0:
        return [float("nan"), float("nan")]
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    step = max(1, 2_000_000 // len(values))  # resamples per block: bounded memory at any scale
    for start in range(0, resamples, step):
        n = min(step, resamples - start)
        means[start : start + n] = values[rng.integers(0, len(values), size=(n, len(values)))].mean(axis=1)
    tail = (1.0 - level) / 2.0 * 100.0
    low, high = np.percentile(means, [tail, 100.0 - tail])
    return [float(low), float(high)]


def evaluate_ranking(
    score_block: ScoreBlock, task: RankingTask, *, seed: int = 0, chunk: int = 2048
) -> dict[str, float | list[float]]:
    """HitRate@5, Recall@10, NDCG@10 (means over the ranked users, with 95% bootstrap intervals) and the
    catalog coverage of the top-10 lists."""
    per_user, shown = ranking_per_user(score_block, task, chunk=chunk)
    result: dict[str, float | list[float]] = {}
    for key in RANKING_KEYS:
        values = per_user[key]
        result[key] = float(values.mean()) if len(values) else float("nan")
        result[f"{key}_ci"] = bootstrap_interval(values, seed=seed)
    result["coverage"] = float(shown.mean())
    return result


# ----------------------------------------------------------------------------- baselines


def like_matrix(histories: Histories, cutoff: int, n_posts: int) -> sparse.csr_matrix:
    """[n_users, n_posts] float32 CSR: 1 where the user liked the post before the cutoff."""
    owner = np.repeat(np.arange(histories.n_users), np.diff(histories.user_ptr))
    before = (histories.ev_action == ACTION_LIKE) & (histories.ev_time < cutoff)
    matrix = sparse.csr_matrix(
        (np.ones(before.sum(), np.float32), (owner[before], histories.ev_post[before])),
        shape=(histories.n_users, n_posts),
    )
    matrix.data[:] = 1.0  # a post liked twice counts once
    return matrix


def popularity_scores(
    histories: Histories, cutoff: int, n_posts: int, *, days: float | None = None
) -> np.ndarray:
    """Likes per post before the cutoff (in the `days` before it when given): the most-popular score."""
    before = (histories.ev_action == ACTION_LIKE) & (histories.ev_time < cutoff)
    if days is not None:
        before &= histories.ev_time >= cutoff - int(days * DAY_SECONDS)
    return np.bincount(histories.ev_post[before], minlength=n_posts).astype(np.float32)


def item_knn_weights(likes: sparse.csr_matrix) -> np.ndarray:
    """[n_posts, n_posts] cosine similarity between posts' like vectors, zero diagonal: a user's score
    for a post is the sum of its similarities to the posts the user liked."""
    gram = (likes.T @ likes).toarray().astype(np.float32)
    norm = np.sqrt(np.diag(gram))
    weights = gram / np.maximum(np.outer(norm, norm), 1e-12)
    np.fill_diagonal(weights, 0.0)
    return weights


def ease_weights(likes: sparse.csr_matrix, regulariser: float) -> np.ndarray:
    """EASE (Steck 2019): B = argmin ||X - XB||^2 + regulariser ||B||^2 with diag(B) = 0, in closed form
    B = I - P / diag(P) (columns), P = (X^T X + regulariser I)^-1: one n_posts x n_posts inversion."""
    gram = (likes.T @ likes).toarray().astype(np.float64)
    gram[np.diag_indices_from(gram)] += regulariser
    inverse = np.linalg.inv(gram)
    weights = -inverse / np.diag(inverse)[None, :]
    np.fill_diagonal(weights, 0.0)
    return weights.astype(np.float32)


def matrix_block(likes: sparse.csr_matrix, weights: np.ndarray) -> ScoreBlock:
    """Scores of item-to-item models: the users' like rows times the post-by-post weights."""
    return lambda rows: likes[rows] @ weights


def view_scores(block: ScoreBlock, views: Interactions, *, chunk: int = 4096) -> np.ndarray:
    """A score block's score of each view (user row, post row), user by user in chunks."""
    users, inverse = np.unique(views.user_rows, return_inverse=True)
    out = np.empty(len(views), dtype=np.float32)
    for start in range(0, len(users), chunk):
        in_chunk = (inverse >= start) & (inverse < start + chunk)
        scores = np.asarray(block(users[start : start + chunk]))
        out[in_chunk] = scores[inverse[in_chunk] - start, views.post_rows[in_chunk]]
    return out


def random_block(n_posts: int, seed: int) -> ScoreBlock:
    rng = np.random.default_rng(seed)
    return lambda rows: rng.random((len(rows), n_posts), dtype=np.float32)


def constant_block(scores: np.ndarray) -> ScoreBlock:
    return lambda rows: np.broadcast_to(scores, (len(rows), len(scores)))


def baseline_blocks(data: Dataset, cutoff: int, *, ease_regulariser: float) -> dict[str, ScoreBlock]:
    """The personal and popularity baselines' score blocks, fitted on the events before `cutoff`.
    Popularity breaks ties by the post's like rate, recent popularity by all-time likes."""
    n_posts = len(data.post_ids)
    likes = like_matrix(data.histories, cutoff, n_posts)
    popular = popularity_scores(data.histories, cutoff, n_posts)
    recent = popularity_scores(data.histories, cutoff, n_posts, days=RECENT_POPULARITY_DAYS)
    return {
        "popularity": constant_block(popular + 1e-6 * _like_rate(data, cutoff)),
        "recent_popularity": constant_block(np.log1p(recent) + 1e-6 * np.log1p(popular)),
        "item_knn": matrix_block(likes, item_knn_weights(likes)),
        "ease": matrix_block(likes, ease_weights(likes, ease_regulariser)),
    }


def _like_rate(data: Dataset, cutoff: int) -> np.ndarray:
    """Each post's (shrunk) like rate before the cutoff, from the post statistics."""
    mean, std = data.stats_scaler
    raw = data.post_stats_at(cutoff) * std + mean
    return np.clip(raw[:, POST_STAT_NAMES.index("like_rate")], 1e-4, 1 - 1e-4)


def choose_ease_regulariser(data: Dataset, *, grid: tuple[float, ...] = EASE_LAMBDAS) -> float:
    """The EASE regulariser with the best validation NDCG@10 (fitted on the events before val_cutoff)."""
    cutoff, end, _ = data.window("validation")
    task = ranking_task(data.histories, cutoff, len(data.post_ids), end=end)
    likes = like_matrix(data.histories, cutoff, len(data.post_ids))
    scores = {
        regulariser: ranking_per_user(matrix_block(likes, ease_weights(likes, regulariser)), task)[0][
            "ndcg@10"
        ].mean()
        for regulariser in grid
    }
    return max(scores, key=lambda regulariser: (scores[regulariser], -regulariser))


# ----------------------------------------------------------------------------- the model


@contextmanager
def post_stats_of(model: TwoTower, stats: np.ndarray):
    """The model with its post statistics set to `stats` inside the block, restored after it."""
    saved = model.post_stats.clone()
    with torch.no_grad():
        model.post_stats.copy_(torch.from_numpy(stats))
    try:
        yield model
    finally:
        with torch.no_grad():
            model.post_stats.copy_(saved)


def model_block(model: TwoTower, data: Dataset, cutoff: int) -> ScoreBlock:
    """The model's ranking scores at `cutoff` (item matrix from the model's current post statistics)."""
    with torch.inference_mode():
        item_matrix = model.ranking_item_matrix()

    def block(rows: np.ndarray) -> np.ndarray:
        times = np.full(len(rows), cutoff, dtype=np.int64)
        with torch.inference_mode():
            batch = make_user_batch(data.users, data.histories, rows, times, model.config)
            return (model.ranking_user_vector(model.user_embeddings(batch)) @ item_matrix.T).numpy()

    return block


def validation_score(model: TwoTower, data: Dataset, *, key: str = "ndcg@10") -> float:
    """The model's ranking metric on the validation window (what early stopping maximises)."""
    model.eval()
    cutoff, end, _ = data.window("validation")
    task = ranking_task(data.histories, cutoff, len(data.post_ids), end=end)
    with post_stats_of(model, data.post_stats_at(cutoff)):
        return float(ranking_per_user(model_block(model, data, cutoff), task)[0][key].mean())


def calibrate(model: TwoTower, data: Dataset) -> tuple[float, float]:
    """Fit the model's (scale, bias) on the validation views and store them in it; returns them."""
    model.eval()
    cutoff, _, views = data.window("validation")
    with torch.no_grad():
        model.calibration.copy_(torch.tensor([1.0, 0.0]))
    with post_stats_of(model, data.post_stats_at(cutoff)):
        scale, bias = fit_calibration(predict(model, data.users, data.histories, views), views.labels)
    with torch.no_grad():
        model.calibration.copy_(torch.tensor([scale, bias]))
    return scale, bias


# ----------------------------------------------------------------------------- the report


def evaluate_model(
    model: TwoTower,
    data: Dataset,
    *,
    truth: GroundTruth | None = None,
    feed: pd.DataFrame | None = None,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, dict]:
    """{"model", "random", "popularity", "recent_popularity", "item_knn", "ease"[, "oracle"]} -> metrics
    on the test window, all under the one protocol above; "protocol" records the windows and the
    choices made on validation.

    The random baseline ranks at random and predicts the training window's like rate for every view;
    popularity predicts each post's like rate before the cutoff; the other baselines' probabilities are
    their scores through a sigmoid fitted on the validation views. The oracle (demo data only) scores
    with the generator's true like model.
    """
    model.eval()
    n_posts = len(data.post_ids)
    val_cutoff, _, val_views = data.window("validation")
    cutoff, end, test = data.window("test")
    task = ranking_task(data.histories, cutoff, n_posts, end=end)
    steps = tqdm(total=len(BASELINES) + 2, desc="evaluate", disable=not progress, leave=False)
    results: dict[str, dict] = {}

    with post_stats_of(model, data.post_stats_at(cutoff)):
        results["model"] = pointwise_metrics(test.labels, predict(model, data.users, data.histories, test))
        results["model"] |= evaluate_ranking(model_block(model, data, cutoff), task, seed=seed)
    steps.update()

    prior = float(np.clip(data.train_views.labels.mean(), 1e-4, 1 - 1e-4))
    rng = np.random.default_rng(seed)
    random_logits = np.log(prior / (1 - prior)) + 1e-3 * rng.standard_normal(len(test))
    results["random"] = pointwise_metrics(test.labels, random_logits)
    results["random"] |= evaluate_ranking(random_block(n_posts, seed), task, seed=seed)
    steps.update()

    regulariser = choose_ease_regulariser(data)
    # Each baseline's sigmoid from its validation-window fit; those fits are dropped before the test
    # window's are built (at full scale each post-by-post matrix is 200 MB).
    val_blocks = baseline_blocks(data, val_cutoff, ease_regulariser=regulariser)
    calibration = {
        name: fit_calibration(view_scores(block, val_views), val_views.labels)
        for name, block in val_blocks.items()
        if name != "popularity"
    }
    del val_blocks
    rate = _like_rate(data, cutoff)
    for name, block in baseline_blocks(data, cutoff, ease_regulariser=regulariser).items():
        if name == "popularity":
            logits = np.log(rate / (1 - rate))[test.post_rows]
        else:
            scale, bias = calibration[name]
            logits = scale * view_scores(block, test) + bias
        results[name] = pointwise_metrics(test.labels, logits) | evaluate_ranking(block, task, seed=seed)
        steps.update()

    if truth is not None:
        assert feed is not None, "the oracle replays histories from the feed: pass feed= with truth="
        user_ids, post_ids = data.users.user_ids, data.post_ids
        oracle_logits = truth.like_logits(
            user_ids[test.user_rows], post_ids[test.post_rows], test.times, feed
        )
        at = pd.Timestamp(cutoff, unit="s").to_pydatetime()
        results["oracle"] = pointwise_metrics(test.labels, oracle_logits)
        results["oracle"] |= evaluate_ranking(
            lambda rows: truth.score_matrix(user_ids[rows], post_ids, at, feed), task, seed=seed
        )
    steps.update()
    steps.close()
    results["model"]["ranked_users"] = float(len(task.user_rows))
    results["protocol"] = {
        "validation_cutoff": float(val_cutoff),
        "test_cutoff": float(cutoff),
        "ease_regulariser": regulariser,
        "calibration_scale": float(model.calibration[0]),
        "calibration_bias": float(model.calibration[1]),
    }
    return results
