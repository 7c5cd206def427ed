"""The demo generator: the real dataset's marginals, determinism, and the known model behind the likes."""

from __future__ import annotations

import dataclasses
import re
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import demo_data
from demo_data import END, SCALES, START, TOPIC_COUNTS, DemoData, GroundTruth, Scale, generate


@pytest.fixture(scope="session")
def tiny() -> DemoData:
    return generate("tiny", seed=0, progress=False)


@pytest.fixture(scope="session")
def small() -> DemoData:
    return generate("small", seed=0, progress=False)


def views_of(demo: DemoData) -> pd.DataFrame:
    return demo.feed[demo.feed["action"] == "view"]


# ----------------------------------------------------------------------------- table shapes


def test_columns_and_dtypes(tiny: DemoData) -> None:
    users, posts, feed = tiny.users, tiny.posts, tiny.feed
    assert list(users.columns) == ["user_id", "gender", "age", "country", "city", "exp_group", "os", "source"]
    assert list(posts.columns) == ["post_id", "text", "topic"]
    assert list(feed.columns) == ["timestamp", "user_id", "post_id", "action", "target"]
    for frame, ints in ((users, ["user_id", "gender", "age", "exp_group"]), (posts, ["post_id"])):
        assert all(frame[c].dtype == np.int64 for c in ints), frame.dtypes
    for frame, strings in ((users, ["country", "city", "os", "source"]), (posts, ["text", "topic"])):
        assert all(pd.api.types.is_string_dtype(frame[c]) for c in strings), frame.dtypes
    assert feed["timestamp"].dtype == "datetime64[ns]" and feed["timestamp"].dt.tz is None
    assert feed["user_id"].dtype == np.int64 and feed["post_id"].dtype == np.int64
    assert pd.api.types.is_string_dtype(feed["action"]) and set(feed["action"]) == {"view", "like"}
    assert feed["target"].dtype == "Int64" and not feed["target"].isna().any()
    assert (feed.loc[feed["action"] == "like", "target"] == 0).all(), "like rows carry target 0"
    assert users["user_id"].is_monotonic_increasing and users["user_id"].is_unique
    assert posts["post_id"].is_monotonic_increasing and posts["post_id"].is_unique
    assert users["user_id"].iloc[0] == 200 and posts["post_id"].iloc[0] == 1
    assert feed["user_id"].isin(users["user_id"]).all() and feed["post_id"].isin(posts["post_id"]).all()


def test_full_scale_ids_span_the_real_ranges() -> None:
    full = SCALES["full"]
    assert (full.n_users, full.n_posts) == (163_205, 7_023)
    assert full.n_views * 1.1 >= 10_000_000, "full scale must give 10M+ feed rows"
    rng = np.random.default_rng(0)
    users = demo_data._spread_ids(full.n_users, first=200, last_full=168_552, n_full=163_205, rng=rng)
    posts = demo_data._spread_ids(full.n_posts, first=1, last_full=7_319, n_full=7_023, rng=rng)
    assert (users[0], users[-1], len(np.unique(users))) == (200, 168_552, 163_205)
    assert (posts[0], posts[-1], len(np.unique(posts))) == (1, 7_319, 7_023)


def test_scale_is_validated() -> None:
    with pytest.raises(ValueError, match="n_views >= n_users"):
        Scale(n_users=100, n_posts=20, n_views=50)
    with pytest.raises(ValueError, match="tiny"):
        generate("huge", seed=0, progress=False)


def test_a_custom_scale_works_even_with_empty_subtopics() -> None:
    demo = generate(Scale(n_users=30, n_posts=12, n_views=600), seed=3, progress=False)
    assert len(demo.users) == 30 and len(demo.posts) == 12
    assert (demo.feed["action"] == "view").sum() == 600


# ----------------------------------------------------------------- marginals (the facts of the real dataset)


def test_user_marginals(small: DemoData) -> None:
    users = small.users
    country = users["country"].value_counts(normalize=True)
    assert set(country.index) == set(demo_data.COUNTRY_SHARES), "all 11 countries appear"
    assert country["Russia"] == pytest.approx(0.876, abs=0.02)
    city = users["city"].value_counts(normalize=True)
    assert city["Moscow"] == pytest.approx(0.134, abs=0.015)
    assert city["Saint Petersburg"] == pytest.approx(0.042, abs=0.01)
    assert users["city"].nunique() > 1_000, "a long tail of cities"
    assert (users["os"] == "Android").mean() == pytest.approx(0.65, abs=0.02)
    assert set(users["os"]) == {"Android", "iOS"}
    assert (users["source"] == "ads").mean() == pytest.approx(0.62, abs=0.02)
    assert set(users["source"]) == {"ads", "organic"}
    shares = users["exp_group"].value_counts(normalize=True).sort_index()
    assert list(shares.index) == [0, 1, 2, 3, 4] and np.allclose(shares, 0.2, atol=0.02)
    assert set(users["gender"]) == {0, 1}
    assert users["age"].between(14, 95).all()
    assert users["age"].median() == pytest.approx(24, abs=1)
    assert users["age"].mean() == pytest.approx(27, abs=1)


def test_topic_proportions_and_texts(small: DemoData) -> None:
    posts = small.posts
    expected = pd.Series(TOPIC_COUNTS) * len(posts) / sum(TOPIC_COUNTS.values())
    counts = posts["topic"].value_counts().reindex(expected.index)
    assert (counts - expected).abs().max() <= 1, counts
    length = posts["text"].str.len()
    assert length.min() < 60 and length.max() > 2_000, "from a few words to a few thousand characters"
    assert length.mean() < 800, "a modest mean keeps the encoder fast"
    assert not posts["text"].str.contains(r"\{|\}").any(), "every template slot is filled"


def test_feed_marginals(small: DemoData) -> None:
    feed, views = small.feed, views_of(small)
    assert feed["timestamp"].is_monotonic_increasing
    assert feed["timestamp"].min() >= pd.Timestamp(START) and feed["timestamp"].max() <= pd.Timestamp(END)
    assert not feed.duplicated(["timestamp", "user_id", "post_id", "action"]).any()
    assert len(views) == SCALES["small"].n_views
    assert views["target"].mean() == pytest.approx(0.12, abs=0.02)
    assert (feed["action"] == "like").mean() == pytest.approx(0.10, abs=0.015)
    assert views["user_id"].nunique() / len(small.users) == pytest.approx(0.97, abs=0.015)
    topic = views["post_id"].map(small.posts.set_index("post_id")["topic"])
    per_topic = views["target"].groupby(topic).mean()
    assert per_topic.between(0.10, 0.15).all(), per_topic
    per_post = views.groupby("post_id")["target"].agg(["mean", "size"])
    per_post = per_post.loc[per_post["size"] >= 1_000, "mean"]
    assert len(per_post) > 10 and per_post.between(0.05, 0.2).all(), per_post.describe()


def test_every_like_follows_its_view(small: DemoData) -> None:
    feed = small.feed.sort_values(["user_id", "timestamp"], kind="stable").reset_index(drop=True)
    is_like = (feed["action"] == "like").to_numpy()
    previous = np.flatnonzero(is_like) - 1
    assert previous.min() >= 0, "a like row cannot open the feed"
    before = feed.iloc[previous]
    likes = feed[is_like]
    assert (before["user_id"].to_numpy() == likes["user_id"].to_numpy()).all()
    assert (before["post_id"].to_numpy() == likes["post_id"].to_numpy()).all()
    assert (before["action"] == "view").all() and (before["target"] == 1).all()
    assert (before["timestamp"].to_numpy() < likes["timestamp"].to_numpy()).all()
    delay = (likes["timestamp"].to_numpy() - before["timestamp"].to_numpy()) / np.timedelta64(1, "s")
    assert delay.max() <= 3_600, "likes come seconds to minutes after the view"
    assert is_like.sum() == (feed["target"] == 1).sum(), "one like row per liked view"


# ----------------------------------------------------------------------------- determinism


def test_same_seed_same_tables_other_seed_other_tables(tiny: DemoData) -> None:
    again = generate("tiny", seed=0, progress=False)
    for name in ("users", "posts", "feed"):
        pd.testing.assert_frame_equal(getattr(again, name), getattr(tiny, name))
    np.testing.assert_array_equal(again.truth.taste, tiny.truth.taste)
    other = generate("tiny", seed=1, progress=False)
    assert not other.feed.equals(tiny.feed)
    assert not other.posts["text"].equals(tiny.posts["text"])


# ----------------------------------------------------------------------------- the text carries the sub-topic


def test_subtopics_are_separable_from_text(small: DemoData) -> None:
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.neighbors import NearestCentroid

    labels = small.truth.post_subtopic
    features = TfidfVectorizer().fit_transform(small.posts["text"])
    train = np.arange(len(labels)) % 2 == 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # identical features within a tiny class are fine
        model = NearestCentroid().fit(features[train], labels[train])
    accuracy = (model.predict(features[~train]) == labels[~train]).mean()
    chance = np.bincount(labels).max() / len(labels)
    assert accuracy > 0.8 and accuracy > 4 * chance, (accuracy, chance)


# ----------------------------------------------------------------------------- the ground truth file


def test_truth_round_trip(tiny: DemoData, tmp_path: Path) -> None:
    path = tmp_path / "nested" / "truth.npz"
    tiny.truth.save(path)
    assert sorted(p.name for p in path.parent.iterdir()) == ["truth.npz"], "no temporary file is left"
    loaded = GroundTruth.load(path)
    for f in dataclasses.fields(GroundTruth):
        if not f.name.startswith("_"):
            np.testing.assert_array_equal(getattr(loaded, f.name), getattr(tiny.truth, f.name), f.name)
    views = views_of(tiny).iloc[:500]
    args = (views["user_id"], views["post_id"], views["timestamp"], tiny.feed)
    np.testing.assert_array_equal(loaded.like_logits(*args), tiny.truth.like_logits(*args))


def test_truth_load_names_the_path_when_missing_or_corrupt(tmp_path: Path) -> None:
    missing = tmp_path / "missing.npz"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        GroundTruth.load(missing)
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"not a zip file")
    with pytest.raises(ValueError, match=re.escape(str(garbage))):
        GroundTruth.load(garbage)
    partial = tmp_path / "partial.npz"
    np.savez(partial, format=np.asarray(demo_data.TRUTH_FORMAT), b0=np.asarray(0.0))
    with pytest.raises(ValueError, match=re.escape(str(partial))):
        GroundTruth.load(partial)


# ----------------------------------------------------------------------------- the oracle


def test_like_logits_reproduce_the_generator(tiny: DemoData) -> None:
    feed = tiny.feed
    is_view = (feed["action"] == "view").to_numpy()
    views = feed[is_view]
    logits = tiny.truth.like_logits(views["user_id"], views["post_id"], views["timestamp"], feed)
    np.testing.assert_allclose(logits, tiny.like_logit[is_view], rtol=0, atol=1e-12)
    assert np.isnan(tiny.like_logit[~is_view]).all()
    seconds = views["timestamp"].to_numpy().astype("datetime64[s]").astype(np.int64)
    from_seconds = tiny.truth.like_logits(views["user_id"], views["post_id"], seconds, feed)
    np.testing.assert_array_equal(from_seconds, logits)
    # The realised likes agree with the probabilities: the like rate tracks the mean probability.
    probability = 1 / (1 + np.exp(-logits))
    assert views["target"].mean() == pytest.approx(probability.mean(), abs=0.01)


def test_history_is_strictly_before_the_time(tiny: DemoData) -> None:
    feed = tiny.feed
    likes = feed[feed["action"] == "like"]
    like = likes.iloc[len(likes) // 2]
    without = feed.drop(index=like.name)
    user, at = like["user_id"], like["timestamp"]
    posts = tiny.truth.post_ids
    users = np.full(len(posts), user)
    same_time = tiny.truth.like_logits(users, posts, at, feed)
    np.testing.assert_array_equal(same_time, tiny.truth.like_logits(users, posts, at, without))
    later = at + pd.Timedelta(seconds=1)
    assert not np.allclose(
        tiny.truth.like_logits(users, posts, later, feed),
        tiny.truth.like_logits(users, posts, later, without),
    ), "the like counts for any time after it"


def test_history_dependence_is_real(tiny: DemoData) -> None:
    views = views_of(tiny)
    args = (views["user_id"], views["post_id"], views["timestamp"], tiny.feed)
    with_history = tiny.truth.like_logits(*args)
    without = dataclasses.replace(tiny.truth, gamma=0.0).like_logits(*args)
    assert tiny.truth.gamma > 0
    assert np.abs(with_history - without).mean() > 0.1
    first_view = ~views.duplicated("user_id").to_numpy()
    np.testing.assert_array_equal(with_history[first_view], without[first_view])


def test_exposure_follows_the_model(tiny: DemoData) -> None:
    """Views per post match the expectation under softmax(exposure logit) of every view's (user, week)."""
    truth, views = tiny.truth, views_of(tiny)
    users = demo_data._rows_of(truth.user_ids, views["user_id"].to_numpy(), "user")
    seconds = views["timestamp"].to_numpy().astype("datetime64[s]").astype(np.int64) - truth.start_s
    week = np.minimum(seconds // demo_data.WEEK_SECONDS, demo_data.N_WEEKS - 1)
    logit = truth.popularity + truth.trend * demo_data._tau()[week][:, None]
    logit = logit + truth.alpha * truth.taste[users] @ truth.post_latent.T
    expected = np.exp(logit - logit.max(axis=1, keepdims=True))
    expected = (expected / expected.sum(axis=1, keepdims=True)).sum(axis=0)
    observed = np.bincount(demo_data._rows_of(truth.post_ids, views["post_id"].to_numpy(), "post"))
    z = (observed - expected) / np.sqrt(expected)
    assert np.abs(z).max() < 5 and np.corrcoef(observed, expected)[0, 1] > 0.99, np.abs(z).max()


def test_score_matrix_ranks_future_likes(small: DemoData) -> None:
    truth, feed = small.truth, small.feed
    cutoff = pd.Timestamp("2021-12-15")
    before, after = feed[feed["timestamp"] < cutoff], feed[feed["timestamp"] >= cutoff]
    liked_before, liked_after = before[before["action"] == "like"], after[after["action"] == "like"]
    users = np.unique(liked_after["user_id"])
    scores = truth.score_matrix(users, truth.post_ids, cutoff.to_pydatetime(), feed)
    assert scores.shape == (len(users), len(truth.post_ids)) and np.isfinite(scores).all()

    def cells(rows: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
        return np.searchsorted(users, rows["user_id"]), np.searchsorted(truth.post_ids, rows["post_id"])

    seen = liked_before[liked_before["user_id"].isin(users)]
    relevant = np.zeros(scores.shape, dtype=bool)
    relevant[cells(liked_after)] = True

    def hit_rate(matrix: np.ndarray) -> float:
        matrix = matrix.copy()
        matrix[cells(seen)] = -np.inf
        top = np.argsort(-matrix, axis=1, kind="stable")[:, :5]
        return float(np.take_along_axis(relevant, top, axis=1).any(axis=1).mean())

    counts = liked_before["post_id"].value_counts().reindex(truth.post_ids, fill_value=0).to_numpy()
    popular = np.broadcast_to(counts.astype(float), scores.shape)
    assert hit_rate(scores) > hit_rate(popular) + 0.05, "the oracle beats the most-popular baseline"
    # The score is the exposure logit plus log sigmoid of the like logit at the cutoff.
    row = 7
    like = truth.like_logits(np.full(len(truth.post_ids), users[row]), truth.post_ids, cutoff, feed)
    exposure = scores[row] + np.logaddexp(0.0, -like)
    week = (cutoff - pd.Timestamp(START)).days // 7
    u = np.searchsorted(truth.user_ids, users[row])
    expected = (
        truth.popularity
        + truth.trend * demo_data._tau()[week]
        + truth.alpha * truth.post_latent @ truth.taste[u]
    )
    np.testing.assert_allclose(exposure, expected, atol=1e-9)


def test_main_writes_csv_files_and_truth(tmp_path: Path) -> None:
    demo_data.main(["--scale", "tiny", "--seed", "2", "--out", str(tmp_path)])
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "demo_truth.npz",
        "feed.csv",
        "posts.csv",
        "users.csv",
    ]
    feed = pd.read_csv(tmp_path / "feed.csv", parse_dates=["timestamp"])
    assert list(feed.columns) == ["timestamp", "user_id", "post_id", "action", "target"]
    assert len(feed) == len(generate("tiny", seed=2, progress=False).feed)
    assert GroundTruth.load(tmp_path / "demo_truth.npz").user_ids.size == SCALES["tiny"].n_users
