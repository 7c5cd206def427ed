"""Top-k search: the exact product and the FAISS index agree, and both honour exclusions."""

from __future__ import annotations

import numpy as np
import pytest

from get_model import load_model_file
from serving import ExactSearch, FaissSearch, Recommender, make_search


@pytest.fixture(scope="module")
def catalogue() -> tuple[np.ndarray, np.ndarray]:
    """20,000 vectors in 40 clusters (a catalogue's topics) and 50 queries."""
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((40, 65)).astype(np.float32) * 2
    matrix = centres[rng.integers(0, 40, 20_000)] + rng.standard_normal((20_000, 65)).astype(np.float32)
    return matrix.astype(np.float32), rng.standard_normal((50, 65)).astype(np.float32)


def test_faiss_finds_the_exact_top_10_and_never_an_excluded_row(catalogue):
    matrix, queries = catalogue
    exact, index = ExactSearch(matrix), FaissSearch(matrix, threads=1)
    recalls = []
    for query in queries:
        excluded = np.argsort(-(matrix @ query))[:25:2]  # every other one of the best 25
        truth, _ = exact.top(query, 10, excluded)
        rows, scores = index.top(query, 10, excluded)
        assert len(rows) == 10 and not np.isin(rows, excluded).any()
        np.testing.assert_allclose(scores, matrix[rows] @ query, rtol=1e-5, atol=1e-4)  # the same scores
        recalls.append(len(set(rows) & set(truth)) / 10)
    assert np.mean(recalls) >= 0.95, np.mean(recalls)


def test_a_refresh_reuses_the_trained_lists_and_sees_the_new_vectors(catalogue):
    matrix, queries = catalogue
    first = FaissSearch(matrix, threads=1)
    moved = matrix.copy()
    moved[123] = queries[0] * 10  # a post whose statistics made it the best for this query
    again = make_search(moved, faiss_min_posts=1, threads=1, previous=first)
    assert isinstance(again, FaissSearch) and again.empty is first.empty
    assert again.top(queries[0], 1, np.array([], dtype=np.int64))[0][0] == 123


def test_exclusions_beyond_the_first_fetch_and_fewer_rows_than_asked(catalogue):
    matrix, queries = catalogue
    small = matrix[:300]
    index = FaissSearch(small, threads=1)
    excluded = np.argsort(-(small @ queries[1]))[:280]  # all but 20 rows excluded
    rows, _ = index.top(queries[1], 50, excluded)
    assert not np.isin(rows, excluded).any() and len(rows) <= 20
    exact_rows, _ = ExactSearch(small).top(queries[1], 50, excluded)
    assert len(exact_rows) == 20


def test_the_service_ranks_through_faiss_above_the_threshold(tiny_model):
    model_file = load_model_file(tiny_model.model_path)
    exact = Recommender(model_file, threads=1, faiss_min_posts=10**6)
    indexed = Recommender(model_file, threads=1, faiss_min_posts=1)
    assert isinstance(exact.state.search, ExactSearch) and isinstance(indexed.state.search, FaissSearch)
    state, rng = exact.state, np.random.default_rng(1)
    overlap = []
    for row in rng.integers(0, len(state.users.user_ids), 30):
        moment = exact.snapshot.end
        liked = state.histories.likes.posts_before(int(row), moment)
        a = exact.recommend(state, int(row), moment, 10)
        b = indexed.recommend(indexed.state, int(row), moment, 10)
        assert not np.isin(b, liked).any()
        overlap.append(len(set(a) & set(b)) / max(len(a), 1))
    assert np.mean(overlap) >= 0.9, np.mean(overlap)
