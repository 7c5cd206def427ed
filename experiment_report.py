"""The experiment report: what each arm's recommendations earned, with intervals that can be trusted.

`python main_script.py experiment-report [--experiment NAME] [--since TIME] [--window 1h] [--json]
[--plot PATH]` reads the experiment's rows of recommendation_log (on its index by experiment and request
time) and the likes of feed_data from the first impression to the last plus the window (on the index by
timestamp). A like counts for an impression when the same user likes one of the shown posts within
the attribution window after the request's `time`; a like that several impressions could claim goes to
the latest of them, so no like is counted twice.

Per arm: users, impressions, likes per impression and likes per user. The user is the unit of
randomisation, so the 95% intervals come from a bootstrap over users (a user's impressions are
resampled together: their likes are correlated). Each other arm is compared with the first (the
control): the difference, the relative lift, their 95% bootstrap intervals and a two-sided p-value
(normal, with the bootstrap's standard error). The sample ratio mismatch check compares the users per
arm with the declared shares (chi-square): a mismatch means the assignment or the logging is broken,
and then no other number of the report can be trusted, so it is flagged loudly.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy.stats import norm
from sqlalchemy import Engine, select

from experiments import Experiment, srm_p_value
from table_feed import Feed
from table_recommendation_log import RecommendationLog, parse_post_ids
from times import DAY_SECONDS, format_time, to_seconds

SRM_ALPHA = 0.001  # the usual threshold: a mismatch this unlikely by chance means something is broken
BOOTSTRAP = 2000  # resamples of users
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": DAY_SECONDS}


def parse_window(value: str) -> int:
    """'90s', '30m', '1h', '2d' or plain seconds -> seconds (argparse's type: ValueError says why)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", value)
    if not match or float(match.group(1)) <= 0:
        raise ValueError(f"window {value!r}: expected a positive duration like 90s, 30m, 1h or 2d")
    return int(float(match.group(1)) * _UNITS[match.group(2) or "s"])


# ----------------------------------------------------------------------------- reading


def read_impressions(engine: Engine, experiment: str, *, since: int | None = None) -> pd.DataFrame:
    """The experiment's impressions: user_id, request_time (seconds), arm, post_ids (lists). The log
    is written at least once: a batch whose commit was acknowledged to nobody (the connection cut at that
    moment) is written again, so rows equal in every column, served_at to the microsecond, count once."""
    log = RecommendationLog
    query = select(log.served_at, log.user_id, log.request_time, log.arm, log.post_ids).where(
        log.experiment == experiment
    )
    if since is not None:
        query = query.where(log.request_time >= pd.Timestamp(since, unit="s").to_pydatetime())
    with engine.connect() as conn:
        frame = pd.DataFrame(conn.execute(query.order_by(log.request_time)).all(), columns=_IMPRESSION)
    frame = frame.drop_duplicates(ignore_index=True).drop(columns="served_at")
    frame["request_time"] = to_seconds(frame["request_time"]) if len(frame) else np.zeros(0, np.int64)
    frame["post_ids"] = frame["post_ids"].map(parse_post_ids)
    return frame


_IMPRESSION = ["served_at", "user_id", "request_time", "arm", "post_ids"]


def read_likes(engine: Engine, start: int, end: int) -> pd.DataFrame:
    """Likes with start <= timestamp < end: user_id, post_id, seconds (a range on the timestamp index)."""
    query = select(Feed.user_id, Feed.post_id, Feed.timestamp).where(
        Feed.action == "like",
        Feed.timestamp >= pd.Timestamp(start, unit="s").to_pydatetime(),
        Feed.timestamp < pd.Timestamp(end, unit="s").to_pydatetime(),
    )
    with engine.connect() as conn:
        frame = pd.DataFrame(conn.execute(query).all(), columns=["user_id", "post_id", "timestamp"])
    frame["seconds"] = to_seconds(frame["timestamp"]) if len(frame) else np.zeros(0, np.int64)
    return frame.drop(columns="timestamp")


def attributed_likes(impressions: pd.DataFrame, likes: pd.DataFrame, window: int) -> np.ndarray:
    """Per impression (row order), the likes of its shown posts by its user within `window` seconds
    after its request time; a like several impressions could claim counts for the latest of them."""
    counts = np.zeros(len(impressions), np.int64)
    if not len(impressions) or not len(likes):
        return counts
    shown = (
        impressions.assign(impression=np.arange(len(impressions)))[
            ["impression", "user_id", "request_time", "post_ids"]
        ]
        .explode("post_ids")
        .rename(columns={"post_ids": "post_id"})
        .dropna(subset=["post_id"])
        .astype({"post_id": np.int64})
    )
    liked = likes.assign(like=np.arange(len(likes)))  # equal like rows stay distinct likes
    pairs = shown.merge(liked, on=["user_id", "post_id"])
    delay = pairs["seconds"] - pairs["request_time"]
    pairs = pairs[(delay >= 0) & (delay < window)]
    latest = pairs.sort_values("request_time", kind="stable").drop_duplicates("like", keep="last")
    np.add.at(counts, latest["impression"].to_numpy(), 1)
    return counts


# ----------------------------------------------------------------------------- statistics


@dataclass(frozen=True)
class UserTotals:
    """Per user of one arm: impressions and attributed likes."""

    impressions: np.ndarray
    likes: np.ndarray

    @classmethod
    def of(cls, frame: pd.DataFrame) -> UserTotals:
        per_user = frame.groupby("user_id").agg(impressions=("likes", "size"), likes=("likes", "sum"))
        return cls(per_user["impressions"].to_numpy(np.float64), per_user["likes"].to_numpy(np.float64))

    def replicates(self, rng: np.random.Generator, n: int, *, chunk: int = 50) -> dict[str, np.ndarray]:
        """Bootstrap replicates over users of likes per impression and likes per user."""
        users = len(self.impressions)
        per_impression, per_user = np.empty(n), np.empty(n)
        for start in range(0, n, chunk):
            # how often each user is drawn in each replicate: a multinomial, as resampling users does
            weights = rng.multinomial(users, np.full(users, 1.0 / users), size=min(chunk, n - start))
            likes, shown = weights @ self.likes, weights @ self.impressions
            per_impression[start : start + len(weights)] = likes / np.maximum(shown, 1)
            per_user[start : start + len(weights)] = likes / users
        return {"likes_per_impression": per_impression, "likes_per_user": per_user}

    def point(self) -> dict[str, float]:
        return {
            "likes_per_impression": float(self.likes.sum() / max(self.impressions.sum(), 1)),
            "likes_per_user": float(self.likes.mean()) if len(self.likes) else math.nan,
        }


METRICS = ("likes_per_impression", "likes_per_user")


def interval(values: np.ndarray) -> list[float]:
    return [float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))]


def compare(
    control: dict[str, float], treatment: dict[str, float], boot_c: np.ndarray, boot_t: np.ndarray
) -> dict[str, Any]:
    """Difference and relative lift (treatment against control) with 95% intervals and a p-value."""
    difference = treatment - control
    boot_difference = boot_t - boot_c
    se = float(boot_difference.std(ddof=1))
    p_value = float(2 * norm.sf(abs(difference) / se)) if se > 0 else (1.0 if difference == 0 else 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        boot_lift = boot_t / boot_c - 1
    return {
        "difference": difference,
        "difference_ci": interval(boot_difference),
        "lift": treatment / control - 1 if control else math.nan,
        "lift_ci": interval(boot_lift[np.isfinite(boot_lift)]) if np.isfinite(boot_lift).any() else None,
        "p_value": p_value,
    }


def experiment_report(
    impressions: pd.DataFrame,
    likes_per_impression: np.ndarray,
    *,
    arms: list[str],
    shares: np.ndarray,
    seed: int = 0,
    bootstrap: int = BOOTSTRAP,
) -> dict[str, Any]:
    """The report (a JSON-able dict) of impressions with their attributed likes; `arms` in declared
    order, the first the control, `shares` their declared traffic shares."""
    frame = impressions.assign(likes=likes_per_impression)
    unknown = sorted(set(frame["arm"]) - set(arms))
    assert not unknown, f"the log holds arms the declaration lacks: {unknown}"
    rng = np.random.default_rng(seed)
    per_arm, boots = {}, {}
    for arm in arms:
        mine = frame[frame["arm"] == arm]
        totals = UserTotals.of(mine)
        point = totals.point()
        boots[arm] = totals.replicates(rng, bootstrap) if len(totals.impressions) else None
        per_arm[arm] = {
            "users": len(totals.impressions),
            "impressions": int(totals.impressions.sum()),
            "likes": int(totals.likes.sum()),
            **{
                key: {"value": point[key], "ci": interval(boots[arm][key]) if boots[arm] else None}
                for key in METRICS
            },
        }
    control = arms[0]
    comparisons = {}
    for arm in arms[1:]:
        if boots[arm] is None or boots[control] is None:
            continue
        comparisons[f"{arm} vs {control}"] = {
            key: compare(
                per_arm[control][key]["value"],
                per_arm[arm][key]["value"],
                boots[control][key],
                boots[arm][key],
            )
            for key in METRICS
        }
    users = np.array([per_arm[arm]["users"] for arm in arms])
    statistic, p_value = srm_p_value(users, shares)
    return {
        "arms": per_arm,
        "comparisons": comparisons,
        "srm": {
            "users": users.tolist(),
            "shares": [float(s) for s in shares],
            "chi_square": statistic,
            "p_value": p_value,
            "mismatch": bool(p_value < SRM_ALPHA),
        },
    }


def daily(
    impressions: pd.DataFrame,
    likes_per_impression: np.ndarray,
    arms: list[str],
    *,
    seed: int = 0,
    bootstrap: int = 400,
) -> pd.DataFrame:
    """Per (day of the request time, arm): likes per impression with its 95% bootstrap interval."""
    frame = impressions.assign(likes=likes_per_impression, day=impressions["request_time"] // DAY_SECONDS)
    rng = np.random.default_rng(seed)
    rows = []
    for (day, arm), mine in frame.groupby(["day", "arm"], sort=True):
        if arm not in arms:
            continue
        totals = UserTotals.of(mine)
        boot = totals.replicates(rng, bootstrap)["likes_per_impression"]
        low, high = interval(boot)
        value = totals.point()["likes_per_impression"]
        rows.append(
            {"day": format_time(day * DAY_SECONDS)[:10], "arm": arm, "value": value, "low": low, "high": high}
        )
    return pd.DataFrame(rows, columns=["day", "arm", "value", "low", "high"])


def plot_daily(table: pd.DataFrame, path: Path, *, title: str) -> Path:
    """A PNG of likes per impression per day, one line per arm, its 95% intervals as error bars."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(8, 4.5))
    for offset, (arm, rows) in enumerate(table.groupby("arm", sort=False)):
        x = np.arange(len(rows)) + 0.08 * offset  # side by side, so the bars do not hide each other
        errors = [rows["value"] - rows["low"], rows["high"] - rows["value"]]
        axes.errorbar(x, rows["value"], yerr=errors, marker="o", capsize=3, label=arm)
        axes.set_xticks(np.arange(len(rows)), rows["day"], rotation=30, ha="right")
    axes.set_ylabel("likes per impression (95% CI)")
    axes.set_title(title)
    axes.legend()
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


# ----------------------------------------------------------------------------- the command


def run_report(
    engine: Engine,
    *,
    experiment: str,
    declared: Experiment | None,
    window: int,
    since: int | None = None,
    plot: Path | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Read, attribute and report (the experiment-report command); `declared` gives the arms' order and
    shares when it is the same experiment, else the arms are the logged ones in name order, equal shares."""
    impressions = read_impressions(engine, experiment, since=since)
    if not len(impressions):
        raise LookupError(f"recommendation_log holds no impression of experiment {experiment!r}")
    if declared is not None and declared.name == experiment:
        arms, shares = [arm.name for arm in declared.arms], declared.shares
    else:
        arms = sorted(impressions["arm"].unique())
        shares = np.full(len(arms), 1.0 / len(arms))
    start = int(impressions["request_time"].min())
    likes = read_likes(engine, start, int(impressions["request_time"].max()) + window)
    counts = attributed_likes(impressions, likes, window)
    report = experiment_report(impressions, counts, arms=arms, shares=shares, seed=seed)
    report |= {"experiment": experiment, "window_seconds": window, "since": format_time(since or start)}
    if plot is not None:
        report["plot"] = str(plot_daily(daily(impressions, counts, arms, seed=seed), plot, title=experiment))
    return report


def format_report(report: dict[str, Any]) -> str:
    """The report as text for a terminal."""
    lines = [f"experiment {report['experiment']}: likes within {report['window_seconds']} s of an impression"]
    srm = report["srm"]
    if srm["mismatch"]:
        lines += [
            "",
            "!" * 78,
            f"!!! SAMPLE RATIO MISMATCH: users per arm {srm['users']} against shares {srm['shares']}",
            f"!!! (chi-square {srm['chi_square']:.1f}, p = {srm['p_value']:.2g}): the assignment or the",
            "!!! logging is broken; do not trust the numbers below",
            "!" * 78,
            "",
        ]
    lines.append(f"{'arm':<16}{'users':>8}{'impr.':>9}{'likes':>8}  {'likes/impression':<28}likes/user")
    for arm, row in report["arms"].items():
        cells = [_with_ci(row[key], ".4f") for key in METRICS]
        lines.append(
            f"{arm:<16}{row['users']:>8}{row['impressions']:>9}{row['likes']:>8}  {cells[0]:<28}{cells[1]}"
        )
    for name, metrics in report["comparisons"].items():
        for key in METRICS:
            c = metrics[key]
            lift_ci = "[{:+.1%}, {:+.1%}]".format(*c["lift_ci"]) if c["lift_ci"] else "[n/a]"
            lines.append(
                f"{name}, {key}: difference {c['difference']:+.4f} "
                f"[{c['difference_ci'][0]:+.4f}, {c['difference_ci'][1]:+.4f}], "
                f"lift {c['lift']:+.1%} {lift_ci}, p = {c['p_value']:.2g}"
            )
    verdict = "MISMATCH" if srm["mismatch"] else "ok"
    lines.append(
        f"sample ratio: users {srm['users']}, shares {srm['shares']}, p = {srm['p_value']:.3g} ({verdict})"
    )
    if "plot" in report:
        lines.append(f"plot: {report['plot']}")
    return "\n".join(lines)


def _with_ci(cell: dict[str, Any], spec: str) -> str:
    if cell["ci"] is None:
        return f"{cell['value']:{spec}}"
    return f"{cell['value']:{spec}} [{cell['ci'][0]:{spec}}, {cell['ci'][1]:{spec}}]"
