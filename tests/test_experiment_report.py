"""The experiment report's arithmetic on a hand-made log (both databases), the command, and the sample
ratio mismatch check catching a broken assignment."""

from __future__ import annotations

import json
from datetime import datetime, timedelta

import numpy as np
import pandas as pd
import pytest
from sqlalchemy.orm import Session

import main_script
from experiment_report import attributed_likes, experiment_report, parse_window, run_report
from experiments import Arm, Experiment, bucket
from table_feed import Feed
from table_recommendation_log import RecommendationLog

T0 = datetime(2021, 12, 1, 12, 0, 0)
DECLARED = Experiment("e", "salt", (Arm("A", 0.5), Arm("B", 0.5)))
# (user, arm, seconds after T0, posts shown)
IMPRESSIONS = [
    (1, "A", 0, "10,11,12"),
    (1, "A", 7200, "13"),
    (2, "A", 0, "10"),
    (3, "B", 0, "20"),
    (3, "B", 600, "20"),
    (4, "B", 0, "21,22"),
]
# (user, post, seconds after T0) and whether it counts
LIKES = [
    (1, 11, 60, True),  # shown at 0, liked a minute later
    (1, 13, 7230, True),  # the second impression's post
    (1, 99, 10, False),  # never shown
    (1, 12, 4000, False),  # shown, but liked after the 1 h window
    (2, 10, -5, False),  # liked before it was shown
    (3, 20, 700, True),  # shown twice (0 and 600): counts once, for the later impression
    (4, 21, 100, True),
    (4, 22, 200, True),
    (9, 10, 30, False),  # a user outside the experiment
]


def fill(engine) -> None:
    with Session(engine) as session:
        session.add_all(
            RecommendationLog(
                served_at=T0,
                request_time=T0 + timedelta(seconds=at),
                user_id=user,
                experiment="e",
                arm=arm,
                model_version="abc",
                post_ids=posts,
            )
            for user, arm, at, posts in IMPRESSIONS
        )
        session.add(
            RecommendationLog(
                served_at=T0,
                request_time=T0,
                user_id=1,
                experiment="other",
                arm="A",
                model_version="",
                post_ids="11",
            )
        )
        session.add_all(
            Feed(timestamp=T0 + timedelta(seconds=at), user_id=user, post_id=post, action="like", target=None)
            for user, post, at, _ in LIKES
        )
        session.commit()


def test_the_report_on_a_hand_made_log_gives_the_known_numbers(engine, tmp_path):
    fill(engine)
    report = run_report(engine, experiment="e", declared=DECLARED, window=3600, plot=tmp_path / "daily.png")
    a, b = report["arms"]["A"], report["arms"]["B"]
    assert (a["users"], a["impressions"], a["likes"]) == (2, 3, 2), a
    assert (b["users"], b["impressions"], b["likes"]) == (2, 3, 3), b
    assert a["likes_per_impression"]["value"] == pytest.approx(2 / 3)
    assert a["likes_per_user"]["value"] == pytest.approx(1.0)
    assert b["likes_per_impression"]["value"] == pytest.approx(1.0)
    assert b["likes_per_user"]["value"] == pytest.approx(1.5)
    low, high = a["likes_per_impression"]["ci"]
    assert 0 <= low <= 2 / 3 <= high <= 1, "the interval holds the estimate"
    lift = report["comparisons"]["B vs A"]["likes_per_impression"]
    assert lift["lift"] == pytest.approx(0.5) and lift["difference"] == pytest.approx(1 / 3)
    assert 0 < lift["p_value"] <= 1
    assert report["srm"]["users"] == [2, 2] and not report["srm"]["mismatch"]
    assert (tmp_path / "daily.png").read_bytes()[:4] == b"\x89PNG", "the per-day plot"


def test_each_like_is_attributed_once_to_the_latest_impression_that_showed_it():
    impressions = pd.DataFrame(
        [(user, at, [int(p) for p in posts.split(",")]) for user, _, at, posts in IMPRESSIONS],
        columns=["user_id", "request_time", "post_ids"],
    )
    likes = pd.DataFrame([like[:3] for like in LIKES], columns=["user_id", "post_id", "seconds"])
    assert attributed_likes(impressions, likes, 3600).tolist() == [1, 1, 0, 0, 1, 2]


def test_the_command_prints_the_report_as_json(engine, db_url, monkeypatch, capsys):
    fill(engine)
    monkeypatch.setenv("DATABASE_URL", db_url)
    monkeypatch.delenv("EXPERIMENT_PATH", raising=False)
    assert main_script.main(["experiment-report", "--experiment", "e", "--window", "1h", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["arms"]["B"]["likes"] == 3 and report["window_seconds"] == 3600
    assert main_script.main(["experiment-report", "--experiment", "nothing"]) == 2
    assert "no impression of experiment 'nothing'" in capsys.readouterr().err


def test_the_window_accepts_units():
    assert [parse_window(v) for v in ("90", "90s", "30m", "1h", "2d")] == [90, 90, 1800, 3600, 172800]
    with pytest.raises(ValueError, match="positive duration"):
        parse_window("soon")


def simulated_log(experiment: Experiment, users: int = 2000) -> pd.DataFrame:
    """One impression per user, the arm from the experiment's assignment; the same like rate in every arm."""
    arms = [experiment.arm_of(user).name for user in range(users)]
    return pd.DataFrame(
        {"user_id": np.arange(users), "request_time": 0, "arm": arms, "post_ids": [[1]] * users}
    )


@pytest.mark.parametrize("shares", [(0.5, 0.5), (0.7, 0.3)])
def test_a_correct_assignment_passes_the_sample_ratio_check(shares):
    declared = Experiment("e", "salt", (Arm("A", shares[0]), Arm("B", shares[1])))
    log = simulated_log(declared)
    likes = np.random.default_rng(0).binomial(1, 0.3, len(log))
    report = experiment_report(log, likes, arms=["A", "B"], shares=declared.shares, bootstrap=200)
    assert not report["srm"]["mismatch"], report["srm"]


def test_an_unbalanced_assignment_is_flagged(monkeypatch):
    # the bug: a cut at 0.6 instead of the declared 0.5, so arm A gets 60% of the users
    monkeypatch.setattr(Experiment, "arm_index", lambda self, user: int(bucket(self.salt, user) >= 0.6))
    log = simulated_log(DECLARED)
    likes = np.random.default_rng(0).binomial(1, 0.3, len(log))
    report = experiment_report(log, likes, arms=["A", "B"], shares=DECLARED.shares, bootstrap=200)
    assert report["srm"]["mismatch"], f"60/40 declared 50/50 must be flagged: {report['srm']}"
    assert report["srm"]["p_value"] < 1e-6
