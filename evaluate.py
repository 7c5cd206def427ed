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
from histories import ACTION_LIKE, ACTION_VIEW, Histories
from learn_model import fit_calibration, pointwise_metrics, predict
from model import TwoTower, make_user_batch, ranked_columns
from settings import RANKINGS
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
ONLINE_K = 5  # the online value: expected likes of the top ONLINE_K posts if they were shown
ONLINE_USERS = 5000  # users scored online: every user with a view in the window, or a seeded sample

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


# ----------------------------------------------------------------------------- online value (demo data)


@dataclass
class OnlineTask:
    """Users shown a recommendation at a window's cutoff, and what each post would bring them."""

    user_rows: np.ndarray  # sorted: users with a view in [cutoff, end) (a seeded sample of ONLINE_USERS)
    excluded: np.ndarray  # bool [n_users, n_posts]: liked before the cutoff, never recommended
    probability: np.ndarray  # float32 [n_users, n_posts]: the true P(like | shown) at the cutoff

    def positions(self, rows: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.user_rows, rows)


def online_task(
    data: Dataset,
    truth: GroundTruth,
    feed: pd.DataFrame,
    window: str,
    *,
    max_users: int = ONLINE_USERS,
    seed: int = 0,
    chunk: int = 1024,
) -> OnlineTask:
    """The online task of a window (validation or test) from the generator's truth."""
    cutoff, end, _ = data.window(window)
    h, n_posts = data.histories, len(data.post_ids)
    active = (h.ev_time >= cutoff) & (h.ev_time < end) & (h.ev_action == ACTION_VIEW)
    users = np.unique(h.owner()[active])
    if len(users) > max_users:
        users = np.sort(np.random.default_rng(seed).choice(users, max_users, replace=False))
    liked = ranking_task(h, cutoff, n_posts, end=end)
    excluded = _rows_mask(liked.excluded_ptr, liked.excluded_post, users, n_posts)
    probability = np.empty((len(users), n_posts), np.float32)
    user_ids, post_ids = data.users.user_ids, data.post_ids
    for start in range(0, len(users), chunk):
        logits = truth.like_logit_matrix(user_ids[users[start : start + chunk]], post_ids, cutoff, feed)
        probability[start : start + chunk] = 1.0 / (1.0 + np.exp(-logits))
    return OnlineTask(users, excluded, probability)


def online_values(score_block: ScoreBlock, task: OnlineTask, *, chunk: int = 2048) -> np.ndarray:
    """[n_users]: the expected likes of each user's top ONLINE_K posts by `score_block`, were they shown
    (posts liked before the cutoff excluded; ties to the lower post row)."""
    out = np.empty(len(task.user_rows))
    k = min(ONLINE_K, task.probability.shape[1])
    for start in range(0, len(task.user_rows), chunk):
        part = slice(start, start + chunk)
        scores = torch.tensor(np.array(score_block(task.user_rows[part]), dtype=np.float32))
        excluded = torch.from_numpy(task.excluded[part])
        top = top_k(scores.masked_fill(excluded, float("-inf")), k).numpy()
        gained = np.where(task.excluded[part], 0.0, task.probability[part])
        out[part] = np.take_along_axis(gained, top, axis=1).sum(axis=1)
    return out


def truth_block(task: OnlineTask) -> ScoreBlock:
    """The ceiling's ranking: the true like probabilities themselves."""
    return lambda rows: task.probability[task.positions(rows)]


def online_report(blocks: dict[str, ScoreBlock], task: OnlineTask, *, seed: int = 0) -> dict[str, dict]:
    """{ranking: {"likes@5", "likes@5_ci", "share"}} for every ranking and the "ceiling" (the top
    ONLINE_K by the true like probability); share = its expected likes over the ceiling's."""
    values = {name: online_values(block, task) for name, block in blocks.items()}
    values["ceiling"] = online_values(truth_block(task), task)
    ceiling = values["ceiling"].mean()
    return {
        name: {
            f"likes@{ONLINE_K}": float(per_user.mean()),
            f"likes@{ONLINE_K}_ci": bootstrap_interval(per_user, seed=seed),
            "share": float(per_user.mean() / ceiling) if ceiling > 0 else float("nan"),
        }
        for name, per_user in values.items()
    } | {"users": {"count": float(len(task.user_rows))}}


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


class Ease:
    """EASE (Steck 2019): B = argmin ||X - XB||^2 + regulariser ||B||^2 with diag(B) = 0, in closed form
    B = I - P / diag(P) (columns), P = (X^T X + regulariser I)^-1. One eigendecomposition of X^T X serves
    every regulariser: P = V diag(1 / (eigenvalues + regulariser)) V^T."""

    def __init__(self, likes: sparse.csr_matrix):
        gram = (likes.T @ likes).toarray().astype(np.float64)
        self.eigenvalues, self.eigenvectors = np.linalg.eigh(gram)

    def weights(self, regulariser: float) -> np.ndarray:
        """[n_posts, n_posts] float32 B for this regulariser."""
        inverse = (self.eigenvectors / (self.eigenvalues + regulariser)) @ self.eigenvectors.T
        weights = -inverse / np.diag(inverse)[None, :]
        np.fill_diagonal(weights, 0.0)
        return weights.astype(np.float32)


def ease_weights(likes: sparse.csr_matrix, regulariser: float) -> np.ndarray:
    """EASE's B for one regulariser (see Ease)."""
    return Ease(likes).weights(regulariser)


def matrix_block(likes: sparse.csr_matrix, weights: np.ndarray, fallback: np.ndarray) -> ScoreBlock:
    """Scores of item-to-item models: the users' like rows times the post-by-post weights, plus a
    tie-break by `fallback` (popularity, scaled to 1e-6): a user without a like before the cutoff, whose
    row is all zeros, is ranked by popularity, not by post id."""
    tie_break = 1e-6 * fallback / max(float(fallback.max()), 1e-12)
    return lambda rows: np.asarray(likes[rows] @ weights) + tie_break


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


def baseline_blocks(
    data: Dataset, cutoff: int, *, ease_regulariser: float, ease: Ease | None = None
) -> dict[str, ScoreBlock]:
    """The personal and popularity baselines' score blocks, fitted on the events before `cutoff` (`ease`:
    its fit on those events, when already made). Popularity breaks ties by the post's like rate, recent
    popularity by all-time likes, the personal baselines by popularity (users without likes)."""
    n_posts = len(data.post_ids)
    likes = like_matrix(data.histories, cutoff, n_posts)
    ease = ease or Ease(likes)
    popular = popularity_scores(data.histories, cutoff, n_posts)
    recent = popularity_scores(data.histories, cutoff, n_posts, days=RECENT_POPULARITY_DAYS)
    return {
        "popularity": constant_block(popular + 1e-6 * _like_rate(data, cutoff)),
        "recent_popularity": constant_block(np.log1p(recent) + 1e-6 * np.log1p(popular)),
        "item_knn": matrix_block(likes, item_knn_weights(likes), popular),
        "ease": matrix_block(likes, ease.weights(ease_regulariser), popular),
    }


def _like_rate(data: Dataset, cutoff: int) -> np.ndarray:
    """Each post's (shrunk) like rate before the cutoff, from the post statistics."""
    mean, std = data.stats_scaler
    raw = data.post_stats_at(cutoff) * std + mean
    return np.clip(raw[:, POST_STAT_NAMES.index("like_rate")], 1e-4, 1 - 1e-4)


def choose_ease_regulariser(
    data: Dataset, *, grid: tuple[float, ...] = EASE_LAMBDAS, ease: Ease | None = None
) -> float:
    """The EASE regulariser with the best validation NDCG@10 (fitted on the events before val_cutoff;
    `ease`: that fit, when already made)."""
    cutoff, end, _ = data.window("validation")
    n_posts = len(data.post_ids)
    task = ranking_task(data.histories, cutoff, n_posts, end=end)
    likes = like_matrix(data.histories, cutoff, n_posts)
    ease = ease or Ease(likes)
    popular = popularity_scores(data.histories, cutoff, n_posts)
    scores = {
        regulariser: ranking_per_user(matrix_block(likes, ease.weights(regulariser), popular), task)[0][
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


def model_block(model: TwoTower, data: Dataset, cutoff: int, *, ranking: str = "logged") -> ScoreBlock:
    """The model's ranking scores at `cutoff` (item matrix from the model's current post statistics):
    the service's, by `ranking` (model.ranked_columns)."""
    columns = ranked_columns(model.config, ranking)
    with torch.inference_mode():
        item_matrix = model.ranking_item_matrix()[:, columns]

    def block(rows: np.ndarray) -> np.ndarray:
        times = np.full(len(rows), cutoff, dtype=np.int64)
        with torch.inference_mode():
            batch = make_user_batch(data.users, data.histories, rows, times, model.config)
            users = model.ranking_user_vector(model.user_embeddings(batch))[:, columns]
            return (users @ item_matrix.T).numpy()

    return block


def validation_score(model: TwoTower, data: Dataset, *, ranking: str = "likes") -> float:
    """What early stopping maximises, on the validation window, for the ranking the service will serve:
    "likes" minus the log-loss of the like head's probabilities (calibrated on those views, as the
    service's are): a proper score of the like model, which is what that ranking orders by, and one that
    real data has too; "logged" the NDCG@10 of the exposure-weighted ranking among logged likes."""
    model.eval()
    cutoff, end, views = data.window("validation")
    with post_stats_of(model, data.post_stats_at(cutoff)):
        if ranking == "likes":
            saved = model.calibration.clone()
            with torch.no_grad():
                model.calibration.copy_(torch.tensor([1.0, 0.0]))
            logits = predict(model, data.users, data.histories, views)
            with torch.no_grad():
                model.calibration.copy_(saved)
            scale, bias = fit_calibration(logits, views.labels)
            return -pointwise_metrics(views.labels, scale * logits + bias)["log_loss"]
        task = ranking_task(data.histories, cutoff, len(data.post_ids), end=end)
        block = model_block(model, data, cutoff, ranking=ranking)
        return float(ranking_per_user(block, task)[0]["ndcg@10"].mean())


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
    ranking: str = "likes",
    seed: int = 0,
    progress: bool = True,
) -> dict[str, dict]:
    """{"model", "random", "popularity", "recent_popularity", "item_knn", "ease"[, "oracle"]} -> metrics
    on the test window, all under the one protocol above; "model" ranks as the service does (`ranking`),
    "model_<other>" by the other ranking when the two differ (a model with an exposure head). "protocol"
    records the windows and the choices made on validation; with the demo's truth, "online" holds the
    online value of every ranking at the validation and the test cutoff (online_report).

    The random baseline ranks at random and predicts the training window's like rate for every view;
    popularity predicts each post's like rate before the cutoff; the other baselines' probabilities are
    their scores through a sigmoid fitted on the validation views. The oracle (demo data only) scores
    with the generator's true like model and ranks as the old feed did (exposure and likes).
    """
    model.eval()
    n_posts = len(data.post_ids)
    val_cutoff, _, val_views = data.window("validation")
    cutoff, end, test = data.window("test")
    task = ranking_task(data.histories, cutoff, n_posts, end=end)
    rankings = {"model": ranking}
    if model.config.exposure_head:
        other = next(name for name in RANKINGS if name != ranking)
        rankings[f"model_{other}"] = other
    assert truth is None or feed is not None, "the oracle replays histories from the feed: pass feed="
    steps = tqdm(total=len(BASELINES) + 4, desc="evaluate", disable=not progress, leave=False)
    results: dict[str, dict] = {}
    online: dict[str, dict] = {}

    # validation: the EASE regulariser, each baseline's sigmoid, the online values at its cutoff; the
    # fits are dropped before the test window's are built (at full scale each post-by-post matrix is 200 MB)
    ease = Ease(like_matrix(data.histories, val_cutoff, n_posts))
    regulariser = choose_ease_regulariser(data, ease=ease)
    val_blocks = baseline_blocks(data, val_cutoff, ease_regulariser=regulariser, ease=ease)
    calibration = {
        name: fit_calibration(view_scores(block, val_views), val_views.labels)
        for name, block in val_blocks.items()
        if name != "popularity"
    }
    if truth is not None:
        online["validation"] = _online(model, data, truth, feed, "validation", rankings, val_blocks, seed)
    del val_blocks, ease
    steps.update(2)

    with post_stats_of(model, data.post_stats_at(cutoff)):
        pointwise = pointwise_metrics(test.labels, predict(model, data.users, data.histories, test))
        for name, order in rankings.items():
            block = model_block(model, data, cutoff, ranking=order)
            results[name] = pointwise | evaluate_ranking(block, task, seed=seed)
    steps.update()

    prior = float(np.clip(data.train_views.labels.mean(), 1e-4, 1 - 1e-4))
    rng = np.random.default_rng(seed)
    random_logits = np.log(prior / (1 - prior)) + 1e-3 * rng.standard_normal(len(test))
    results["random"] = pointwise_metrics(test.labels, random_logits)
    results["random"] |= evaluate_ranking(random_block(n_posts, seed), task, seed=seed)
    steps.update()

    rate = _like_rate(data, cutoff)
    test_blocks = baseline_blocks(data, cutoff, ease_regulariser=regulariser)
    for name, block in test_blocks.items():
        if name == "popularity":
            logits = np.log(rate / (1 - rate))[test.post_rows]
        else:
            scale, bias = calibration[name]
            logits = scale * view_scores(block, test) + bias
        results[name] = pointwise_metrics(test.labels, logits) | evaluate_ranking(block, task, seed=seed)
        steps.update()

    if truth is not None:
        user_ids, post_ids = data.users.user_ids, data.post_ids
        oracle_logits = truth.like_logits(
            user_ids[test.user_rows], post_ids[test.post_rows], test.times, feed
        )
        results["oracle"] = pointwise_metrics(test.labels, oracle_logits)
        results["oracle"] |= evaluate_ranking(_feed_block(truth, data, feed, cutoff), task, seed=seed)
        online["test"] = _online(model, data, truth, feed, "test", rankings, test_blocks, seed)
    del test_blocks
    steps.update()
    steps.close()
    results["model"]["ranked_users"] = float(len(task.user_rows))
    results["protocol"] = {
        "validation_cutoff": float(val_cutoff),
        "test_cutoff": float(cutoff),
        "ranking": ranking,
        "ease_regulariser": regulariser,
        "calibration_scale": float(model.calibration[0]),
        "calibration_bias": float(model.calibration[1]),
    }
    if online:
        results["online"] = online
    return results


def _feed_block(truth: GroundTruth, data: Dataset, feed: pd.DataFrame, cutoff: int) -> ScoreBlock:
    """The old feed's own ranking at the cutoff (exposure and likes, the generator's score)."""
    user_ids, post_ids = data.users.user_ids, data.post_ids
    return lambda rows: truth.score_matrix(user_ids[rows], post_ids, cutoff, feed)


def _online(
    model: TwoTower,
    data: Dataset,
    truth: GroundTruth,
    feed: pd.DataFrame,
    window: str,
    rankings: dict[str, str],
    baselines: dict[str, ScoreBlock],
    seed: int,
) -> dict[str, dict]:
    """online_report of the model's rankings, random, the baselines (fitted at the window's cutoff) and
    the old feed's ranking, at the window's cutoff."""
    cutoff, _, _ = data.window(window)
    task = online_task(data, truth, feed, window, seed=seed)
    with post_stats_of(model, data.post_stats_at(cutoff)):  # the history's items read them too
        blocks = {name: model_block(model, data, cutoff, ranking=order) for name, order in rankings.items()}
        blocks |= {"random": random_block(len(data.post_ids), seed), **baselines}
        blocks["feed"] = _feed_block(truth, data, feed, cutoff)
        return online_report(blocks, task, seed=seed)
