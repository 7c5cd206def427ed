"""A/B experiments: the declaration, the assignment (stable, uniform, independent between salts) and the
service serving each user from their arm, saying which in headers and /health."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import append_feed
from fastapi.testclient import TestClient
from scipy.stats import chi2, chi2_contingency

import database
import get_features_table
import main_script
from app import create_app, refresh_once
from experiments import Arm, Experiment, ExperimentError, bucket, load_experiment
from get_model import sha256_file

URL = "/post/recommendations/"
WHEN = "2021-12-10 21:30:00"


def two_arms(salt: str = "s1", shares=(0.5, 0.5)) -> Experiment:
    return Experiment(
        name="e",
        salt=salt,
        arms=(Arm("logged", shares[0], ranking="logged"), Arm("likes", shares[1], ranking="likes")),
    )


def write_experiment(folder: Path, text: str, suffix: str = ".toml") -> Path:
    path = folder / f"experiment{suffix}"
    path.write_text(text)
    return path


TOML = """
name = "likes-vs-logged"
salt = "2026-12"
[[arms]]
name = "logged"
ranking = "logged"
share = 0.5
[[arms]]
name = "likes"
ranking = "likes"
share = 0.5
"""

# --- assignment ---


def test_assignment_is_deterministic_and_stateless():
    first, again = two_arms(), two_arms()  # a new object (another worker, a restart) agrees
    ids = range(1000)
    assert [first.arm_index(i) for i in ids] == [again.arm_index(i) for i in ids], "same arm every time"
    assert bucket("s1", 42) == bucket("s1", 42), "the hash has no hidden state"
    assert min(bucket("s1", i) for i in ids) >= 0.0, "buckets lie in [0, 1)"
    assert max(bucket("s1", i) for i in ids) < 1.0, "buckets lie in [0, 1)"


def test_assignment_is_uniform_within_a_chi_square_bound():
    ids = np.arange(10_000)
    buckets = np.array([bucket("uniform", i) for i in ids])
    counts = np.bincount((buckets * 20).astype(int), minlength=20)
    statistic = ((counts - 500) ** 2 / 500).sum()
    assert statistic < chi2.ppf(0.999, df=19), f"20 equal bins of 10k ids: chi-square {statistic:.1f}"
    uneven = Experiment("e", "uniform", (Arm("a", 0.2), Arm("b", 0.3), Arm("c", 0.5)))
    arms = np.bincount([uneven.arm_index(i) for i in ids], minlength=3)
    expected = np.array([0.2, 0.3, 0.5]) * 10_000
    assert ((arms - expected) ** 2 / expected).sum() < chi2.ppf(0.999, df=2), f"shares 20/30/50: {arms}"


def test_different_salts_split_users_independently():
    ids = range(10_000)
    one, other = two_arms("salt-a"), two_arms("salt-b")
    table = np.zeros((2, 2), int)
    for i in ids:
        table[one.arm_index(i), other.arm_index(i)] += 1
    assert chi2_contingency(table).pvalue > 0.001, f"arms under two salts are dependent: {table.tolist()}"
    assert table.min() > 2_300, f"every pair of arms holds about a quarter of the users: {table.tolist()}"


# --- the declaration ---


def test_the_declaration_reads_toml_and_json(tmp_path):
    from_toml = load_experiment(write_experiment(tmp_path, TOML))
    as_json = {
        "name": "likes-vs-logged",
        "salt": "2026-12",
        "arms": [{"name": "logged", "ranking": "logged", "share": 0.5}, {"name": "likes", "share": 0.5}],
    }
    from_json = load_experiment(write_experiment(tmp_path, json.dumps(as_json), ".json"))
    assert from_toml.name == from_json.name == "likes-vs-logged"
    assert [arm.name for arm in from_toml.arms] == ["logged", "likes"]
    assert from_json.arms[1].ranking is None, "an arm without ranking serves RANKING"
    assert load_experiment(None) is None, "no path, no experiment"


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        (TOML.replace("share = 0.5\n[[arms]]", "share = 0.6\n[[arms]]"), "add up to 1.1"),
        (TOML.replace('ranking = "likes"', 'ranking = "clicks"'), "ranking must be one of"),
        (TOML.replace('salt = "2026-12"', ""), "missing key 'salt'"),
        (TOML.replace('name = "likes"', 'name = "logged"'), "arm names must differ"),
        ("name = ", "not valid toml"),
    ],
)
def test_a_bad_declaration_is_refused_with_its_reason(tmp_path, text, fragment):
    with pytest.raises(ExperimentError, match=fragment):
        load_experiment(write_experiment(tmp_path, text))


def test_a_missing_experiment_file_is_named(tmp_path):
    with pytest.raises(ExperimentError, match=r"absent\.toml not found"):
        load_experiment(tmp_path / "absent.toml")


# --- the service ---


@pytest.fixture(scope="module")
def tiny_tables(tiny_model):
    return main_script.load_tables(tiny_model, progress=False)


def tiny_database(tiny_tables, path: Path) -> str:
    users, posts, feed = tiny_tables
    url = f"sqlite:///{path}"
    engine = database.make_engine(url)
    get_features_table.write_tables(engine, users=users, posts=posts, feed=feed, progress=False)
    engine.dispose()
    return url


def ids_of(response) -> list[int]:
    assert response.status_code == 200, response.text
    return [item["id"] for item in response.json()]


def test_each_user_is_served_by_their_arm_with_headers_and_health(tiny_model, tiny_tables, tmp_path):
    url = tiny_database(tiny_tables, tmp_path / "ab.db")
    path = write_experiment(tmp_path, TOML)
    experiment = load_experiment(path)
    users = tiny_tables[2]["user_id"].value_counts().index[:12].tolist()
    single = {}
    for ranking in ("logged", "likes"):  # what the single-model service answers under each ranking
        with TestClient(create_app(tiny_model.replace(database_url=url, ranking=ranking))) as client:
            single[ranking] = {u: ids_of(client.get(URL, params={"id": u, "time": WHEN})) for u in users}
            plain = client.get(URL, params={"id": users[0], "time": WHEN})
            assert "X-Arm" not in plain.headers, "without an experiment no experiment headers"
            assert set(client.get("/health").json()) == {"status", "database", "model"}, "/health as before"
    version = sha256_file(tiny_model.model_path)[:12]
    settings = tiny_model.replace(database_url=url, experiment_path=path, impression_log="off")
    with TestClient(create_app(settings)) as client:
        seen = set()
        for user in users:
            response = client.get(URL, params={"id": user, "time": WHEN})
            arm = experiment.arm_of(user).name
            seen.add(arm)
            assert response.headers["X-Experiment"] == "likes-vs-logged"
            assert response.headers["X-Arm"] == arm, f"user {user}"
            assert response.headers["X-Model-Version"] == version
            assert ids_of(response) == single[arm][user], f"user {user} gets the {arm} ranking's answer"
        assert seen == {"logged", "likes"}, "12 users reach both arms"
        health = client.get("/health").json()
    assert health["experiment"] == "likes-vs-logged"
    assert health["arms"] == [
        {"name": "logged", "share": 0.5, "ranking": "logged", "model_version": version},
        {"name": "likes", "share": 0.5, "ranking": "likes", "model_version": version},
    ]
    assert "impressions" not in health, "IMPRESSION_LOG=off"


def test_every_arm_follows_the_tables(tiny_model, tiny_tables, tmp_path):
    url = tiny_database(tiny_tables, tmp_path / "follow.db")
    path = write_experiment(tmp_path, TOML)
    experiment = load_experiment(path)
    users = tiny_tables[2]["user_id"].value_counts().index[:40].tolist()
    settings = tiny_model.replace(database_url=url, experiment_path=path, impression_log="off")
    app = create_app(settings)
    end = tiny_tables[2]["timestamp"].max()  # rows after the feed's end: merged by the next cycle
    when = str((end + pd.Timedelta(hours=1)).floor("s"))
    with TestClient(app) as client:
        for arm in ("logged", "likes"):  # the second arm's follower is not the app's first one
            user = next(u for u in users if experiment.arm_of(u).name == arm)
            top = ids_of(client.get(URL, params={"id": user, "time": when}))[0]
            at = end + pd.Timedelta(minutes=1)
            liked = pd.DataFrame({"timestamp": [at], "user_id": [user], "post_id": [top]})
            append_feed(url, liked.assign(action="like", target=0))
            refresh_once(app)
            after = ids_of(client.get(URL, params={"id": user, "time": when}))
            assert top not in after, f"arm {arm}: a post liked before `time` is excluded after a refresh"
