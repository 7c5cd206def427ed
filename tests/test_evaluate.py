"""The evaluation protocol pinned on cases small enough to compute by hand: the metrics, the cutoff, the
exclusions, the tie order, the baselines and the calibration."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import plain_posts, plain_users
from sklearn.metrics.pairwise import cosine_similarity

import main_script
from evaluate import (
    BASELINES,
    OnlineTask,
    RankingTask,
    bootstrap_interval,
    constant_block,
    ease_weights,
    evaluate_model,
    evaluate_ranking,
    item_knn_weights,
    like_matrix,
    matrix_block,
    online_report,
    online_values,
    random_block,
    ranking_task,
    top_k,
    truth_block,
    validation_score,
)
from features import build_dataset, build_user_histories
from learn_model import expected_calibration_error, fit_calibration, pointwise_metrics, predict
from model import make_user_batch
from settings import Settings
from times import to_seconds

T0 = pd.Timestamp("2021-10-01 00:00:00")
N_POSTS = 12


def csr(lists: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    ptr = np.concatenate([[0], np.cumsum([len(x) for x in lists])]).astype(np.int64)
    return ptr, np.array([v for x in lists for v in sorted(x)], dtype=np.int64)


def hand_task() -> RankingTask:
    """User 0 liked post 0 before the cutoff and posts 3 and 11 after; user 1 liked post 11 after."""
    excluded_ptr, excluded = csr([[0], []])
    relevant_ptr, relevant = csr([[3, 11], [11]])
    return RankingTask(np.array([0, 1]), excluded_ptr, excluded, relevant_ptr, relevant, N_POSTS)


def hand_scores(rows: np.ndarray) -> np.ndarray:
    """User 0 prefers lower post rows (post 0 best); user 1 sees every post as equal (a tie)."""
    scores = np.zeros((len(rows), N_POSTS), dtype=np.float32)
    scores[rows == 0] = N_POSTS - np.arange(N_POSTS)
    return scores


def test_ranking_metrics_match_a_hand_computation():
    result = evaluate_ranking(hand_scores, hand_task())
    # user 0: post 0 excluded, top-10 = posts 1..10, post 3 third -> hit, recall 1/2,
    # NDCG = (1/log2 4) / (1 + 1/log2 3). User 1: the tie gives posts 0..9 -> no hit.
    ndcg_user0 = (1 / math.log2(4)) / (1 + 1 / math.log2(3))
    assert result["hitrate@5"] == pytest.approx(0.5)
    assert result["recall@10"] == pytest.approx(0.25)
    assert result["ndcg@10"] == pytest.approx(ndcg_user0 / 2)
    assert result["coverage"] == pytest.approx(11 / 12)  # posts 0..10 shown, post 11 never


def test_ties_go_to_the_lower_post_row():
    scores = torch.zeros(2, N_POSTS)
    scores[1, 5] = 1.0
    assert top_k(scores, 4).tolist() == [[0, 1, 2, 3], [5, 0, 1, 2]]


def test_bootstrap_interval_brackets_the_mean_and_narrows_with_more_users():
    rng = np.random.default_rng(0)
    few, many = rng.random(50), rng.random(5000)
    low, high = bootstrap_interval(few, seed=1)
    assert low < few.mean() < high
    wide, narrow = high - low, np.subtract(*bootstrap_interval(many, seed=1)[::-1])
    assert narrow < wide / 5, "the interval must shrink like 1/sqrt(n)"
    assert bootstrap_interval(np.ones(10)) == [1.0, 1.0]
    result = evaluate_ranking(hand_scores, hand_task())
    assert result["hitrate@5_ci"][0] <= result["hitrate@5"] <= result["hitrate@5_ci"][1]


def feed_of(events: list[tuple[float, int, int, bool]]) -> pd.DataFrame:
    """A feed from (day, user_id, post_id, liked): a view, and a like row a second later when liked."""
    rows = []
    for day, user, post, liked in events:
        at = T0 + pd.Timedelta(days=day)
        rows.append((at, user, post, "view", int(liked)))
        if liked:
            rows.append((at + pd.Timedelta(seconds=1), user, post, "like", 0))
    frame = pd.DataFrame(rows, columns=["timestamp", "user_id", "post_id", "action", "target"])
    return frame.sort_values("timestamp", kind="stable").reset_index(drop=True)


def test_ranking_task_splits_likes_at_the_cutoff_and_excludes_the_known():
    feed = feed_of(
        [
            (1, 200, 1, True),  # before: excluded for user 200
            (2, 200, 2, False),  # a view is neither excluded nor relevant
            (5, 200, 1, True),  # liked again after: not a hit (already known)
            (6, 200, 3, True),  # relevant
            (9, 200, 4, True),  # after the window's end: not relevant
            (6, 201, 2, False),  # user 201 has no like in the window: not ranked
        ]
    )
    histories = build_user_histories(feed, np.array([200, 201]), np.arange(1, 6))
    cutoff, end = (to_seconds(pd.Series([T0 + pd.Timedelta(days=d)]))[0] for d in (4, 8))
    task = ranking_task(histories, cutoff, 5, end=end)
    assert task.user_rows.tolist() == [0]
    assert task.excluded_post[task.excluded_ptr[0] : task.excluded_ptr[1]].tolist() == [0]
    assert task.relevant_post[task.relevant_ptr[0] : task.relevant_ptr[1]].tolist() == [2]
    assert ranking_task(histories, cutoff, 5).relevant_post.tolist() == [2, 3], "no end: every later like"


def test_item_knn_is_cosine_and_ease_solves_its_regression():
    rng = np.random.default_rng(0)
    likes = like_matrix_of((rng.random((40, 9)) < 0.3).astype(np.float32))
    knn = item_knn_weights(likes)
    expected = cosine_similarity(likes.T.toarray())
    np.fill_diagonal(expected, 0.0)
    assert np.allclose(knn, expected, atol=1e-6)
    # EASE column j is the ridge regression of post j's likes on the other posts' likes.
    x, regulariser = likes.toarray().astype(np.float64), 5.0
    weights = ease_weights(likes, regulariser)
    for j in range(x.shape[1]):
        others = np.delete(np.arange(x.shape[1]), j)
        a = x[:, others]
        ridge = np.linalg.solve(a.T @ a + regulariser * np.eye(len(others)), a.T @ x[:, j])
        assert np.allclose(weights[others, j], ridge, atol=1e-4)
        assert weights[j, j] == 0.0


def like_matrix_of(dense: np.ndarray):
    from scipy import sparse

    return sparse.csr_matrix(dense)


def test_like_matrix_counts_likes_before_the_cutoff_once():
    feed = feed_of([(1, 200, 1, True), (2, 200, 1, True), (3, 201, 2, True), (6, 201, 3, True)])
    histories = build_user_histories(feed, np.array([200, 201]), np.arange(1, 4))
    cutoff = to_seconds(pd.Series([T0 + pd.Timedelta(days=5)]))[0]
    assert like_matrix(histories, cutoff, 3).toarray().tolist() == [[1, 0, 0], [0, 1, 0]]


def test_calibration_recovers_a_known_scale_and_bias_and_lowers_the_error():
    rng = np.random.default_rng(0)
    logits = rng.normal(0.0, 2.0, 200_000)
    labels = (rng.random(len(logits)) < 1 / (1 + np.exp(-(0.5 * logits - 1.0)))).astype(np.float64)
    scale, bias = fit_calibration(logits, labels)
    assert scale == pytest.approx(0.5, abs=0.02) and bias == pytest.approx(-1.0, abs=0.02)
    raw, calibrated = pointwise_metrics(labels, logits), pointwise_metrics(labels, scale * logits + bias)
    assert calibrated["log_loss"] < raw["log_loss"] and calibrated["ece"] < raw["ece"] / 5
    assert calibrated["roc_auc"] == pytest.approx(raw["roc_auc"]), "calibration keeps every ranking"
    # a baseline's score is no logit: large and shifted (item-kNN sums, counts) must calibrate as well
    big_scale, big_bias = fit_calibration(40 * logits + 300, labels)
    assert big_scale * 40 == pytest.approx(0.5, abs=0.02)
    assert big_scale * 300 + big_bias == pytest.approx(-1.0, abs=0.05)


def test_expected_calibration_error_by_hand():
    # two bins used: p=0.05 (bin 0) with like rate 0.5, p=0.95 (bin 14) with like rate 1.0
    probability = np.array([0.05, 0.05, 0.95, 0.95])
    labels = np.array([0.0, 1.0, 1.0, 1.0])
    assert expected_calibration_error(labels, probability) == pytest.approx(0.5 * 0.45 + 0.5 * 0.05)


# ----------------------------------------------------------------------------- the whole report


def leak_scenario() -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """30 days: test window days 20-30, validation 15-20. Before the cutoff posts 1..5 are the popular
    ones (posts 6 the recent one); in the test window eight new users like post 12 alone, which nobody
    liked before. Honest popularity therefore never hits; counting test-window likes always would."""
    events: list[tuple[float, int, int, bool]] = []
    for post, n_likers in zip(range(1, 6), (5, 4, 3, 2, 1), strict=True):
        events += [(1 + u, 300 + u, post, True) for u in range(n_likers)]
    events += [(8 + u * 0.1, 300 + u, 7 + u % 4, False) for u in range(15)]
    events += [(15.5 + u * 0.1, 300 + u, 6, u % 3 == 0) for u in range(15)]  # validation window
    events += [(16 + u * 0.1, 300 + u, 1 + u % 5, u % 2 == 0) for u in range(15)]
    events += [(21 + u, 400 + u, 11, False) for u in range(8)]
    events += [(21.5 + u, 400 + u, 12, True) for u in range(8)]
    events += [(30, 300, 10, False)]
    feed = feed_of(events)
    user_ids = np.unique(feed["user_id"])
    users, posts = plain_users(user_ids), plain_posts(12)
    return users, posts, feed


def test_baselines_never_count_the_test_window():
    users, posts, feed = leak_scenario()
    data = build_dataset(users, posts, feed, test_days=10, val_days=5)
    settings = Settings(text_dim=4, max_history=4)
    model = main_script.new_model(settings, data, np.zeros((N_POSTS, 4), np.float32))
    results = evaluate_model(model, data, progress=False)
    assert results["model"]["ranked_users"] == 8
    for name in ("popularity", "recent_popularity"):
        assert results[name]["hitrate@5"] == 0.0, f"{name} counted likes at or after the cutoff"
    assert set(BASELINES) <= set(results)
    assert results["protocol"]["validation_cutoff"] < results["protocol"]["test_cutoff"] == data.cutoff


def test_the_model_is_scored_at_the_cutoff(tiny_model):
    model_file = main_script.get_model.get_model(tiny_model)
    tables = main_script.load_tables(tiny_model, progress=False)
    data = main_script.dataset_of_model(tiny_model, model_file, tables)
    model = model_file.two_tower()
    reported = evaluate_model(model, data, ranking="logged", progress=False)["model"]

    with torch.no_grad():
        model.post_stats.copy_(torch.from_numpy(data.post_stats_at(data.cutoff)))
        items = model.ranking_item_matrix()

    def at_cutoff(rows: np.ndarray) -> np.ndarray:
        times = np.full(len(rows), data.cutoff)
        with torch.no_grad():
            batch = make_user_batch(data.users, data.histories, rows, times, model.config)
            return (model.ranking_user_vector(model.user_embeddings(batch)) @ items.T).numpy()

    task = ranking_task(data.histories, data.cutoff, len(data.post_ids), end=data.end + 1)
    expected = evaluate_ranking(at_cutoff, task)
    assert reported["ranked_users"] == len(task.user_rows) > 20
    for key in ("hitrate@5", "recall@10", "ndcg@10", "coverage"):
        assert reported[key] == pytest.approx(expected[key], abs=1e-12), key


def test_popularity_block_breaks_ties_by_post_row():
    block = constant_block(np.array([1.0, 2.0, 2.0, 0.0], np.float32))
    task = RankingTask(np.array([0]), *csr([[]]), *csr([[2]]), 4)
    assert evaluate_ranking(block, task)["ndcg@10"] == pytest.approx(1 / math.log2(3) / 1.0)


def test_calibration_of_a_score_that_falls_with_the_like_rate_predicts_the_mean_rate():
    rng = np.random.default_rng(0)
    scores = rng.normal(size=50_000)
    labels = (rng.random(len(scores)) < 1 / (1 + np.exp(2.5 + 1.5 * scores))).astype(np.float64)
    scale, bias = fit_calibration(scores, labels)
    probability = 1 / (1 + np.exp(-(scale * scores + bias)))
    assert 0 < scale < 1e-6, "the order of the scores is kept, their (wrong-way) slope is not"
    assert probability.mean() == pytest.approx(labels.mean(), rel=1e-3)
    assert fit_calibration(scores, np.zeros(len(scores))) == (1.0, 0.0), "one label only: nothing to fit"
    assert math.isnan(expected_calibration_error(np.zeros(0), np.zeros(0)))


# ----------------------------------------------------------------------------- online value


def hand_built_task() -> OnlineTask:
    """Two users, seven posts; user 3 liked post 6 before the cutoff (excluded, never counted)."""
    probability = np.array(
        [[0.9, 0.1, 0.5, 0.3, 0.2, 0.05, 0.6], [0.2, 0.4, 0.1, 0.8, 0.7, 0.3, 0.05]], np.float32
    )
    excluded = np.zeros_like(probability, dtype=bool)
    excluded[0, 6] = True
    return OnlineTask(user_rows=np.array([3, 7]), excluded=excluded, probability=probability)


def test_online_value_of_a_ranking_on_a_hand_built_truth():
    task = hand_built_task()
    best = online_values(truth_block(task), task)  # the five most likely eligible posts of each user
    np.testing.assert_allclose(best, [0.9 + 0.5 + 0.3 + 0.2 + 0.1, 0.8 + 0.7 + 0.4 + 0.3 + 0.2], rtol=1e-6)
    worst = online_values(lambda rows: -task.probability[task.positions(rows)], task)
    np.testing.assert_allclose(worst, [0.05 + 0.1 + 0.2 + 0.3 + 0.5, 0.05 + 0.1 + 0.2 + 0.3 + 0.4], rtol=1e-6)
    excluded_first = online_values(constant_block(np.array([0, 0, 0, 0, 0, 0, 10], np.float32)), task)
    np.testing.assert_allclose(excluded_first[0], 0.9 + 0.1 + 0.5 + 0.3 + 0.2, rtol=1e-6)  # ties: lower rows


def test_online_report_shares_of_the_ceiling():
    task = hand_built_task()
    report = online_report(
        {
            "truth": truth_block(task),
            "reversed": lambda rows: -task.probability[task.positions(rows)],
            "random": random_block(7, seed=0),
        },
        task,
    )
    assert report["truth"]["share"] == pytest.approx(1.0) and report["ceiling"]["share"] == 1.0
    assert report["ceiling"]["likes@5"] == pytest.approx((2.0 + 2.4) / 2)
    expected_random = (5 * (2.65 - 0.6) / 6 + 5 * 2.55 / 7) / 2  # five eligible posts at random
    randoms = [online_values(random_block(7, seed), task).mean() for seed in range(400)]
    assert np.mean(randoms) == pytest.approx(expected_random, abs=0.01)
    assert report["reversed"]["share"] < expected_random / report["ceiling"]["likes@5"] < 1.0
    assert report["users"]["count"] == 2


def test_personal_baselines_rank_users_without_likes_by_popularity():
    likes = like_matrix(
        build_user_histories(
            pd.DataFrame(
                {
                    "timestamp": [T0, T0, T0],
                    "user_id": [1, 1, 2],
                    "post_id": [1, 2, 2],
                    "action": "like",
                    "target": 0,
                }
            ),
            np.array([1, 2, 3]),
            np.arange(1, 6),
        ),
        cutoff=to_seconds(pd.Series([T0]))[0] + 1,
        n_posts=5,
    )
    popularity = np.array([1.0, 5.0, 0.0, 9.0, 2.0], np.float32)
    for weights in (item_knn_weights(likes), ease_weights(likes, 10.0)):
        scores = matrix_block(likes, weights, popularity)(np.array([2]))  # user 3: no like before
        assert np.argsort(-scores[0], kind="stable").tolist() == [3, 1, 4, 0, 2], "not by popularity"


def test_early_stopping_scores_the_ranking_the_service_serves(tiny_model):
    """RANKING=likes: minus the like head's log-loss on the validation views once calibrated there (the
    model's own calibration untouched); RANKING=logged: NDCG@10 of the exposure-weighted ranking."""
    model_file = main_script.get_model.get_model(tiny_model)
    tables = main_script.load_tables(tiny_model, progress=False)
    data = main_script.dataset_of_model(tiny_model, model_file, tables)
    model = model_file.two_tower()
    saved = model.calibration.clone()

    score = validation_score(model, data, ranking="likes")

    assert torch.equal(model.calibration, saved)
    cutoff, _, views = data.window("validation")
    model.calibration.copy_(torch.tensor([1.0, 0.0]))
    with torch.no_grad():
        model.post_stats.copy_(torch.from_numpy(data.post_stats_at(cutoff)))
    logits = predict(model, data.users, data.histories, views)
    scale, bias = fit_calibration(logits, views.labels)
    calibrated = pointwise_metrics(views.labels, scale * logits + bias)
    assert score == pytest.approx(-calibrated["log_loss"], rel=1e-6)
    assert score > -pointwise_metrics(views.labels, logits * 0 + 5.0)["log_loss"]  # beats a silly constant
    logged = validation_score(model, data, ranking="logged")
    assert 0 <= logged <= 1 and logged != pytest.approx(score)
