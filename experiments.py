"""A/B experiments: the declaration (a small TOML or JSON file named by EXPERIMENT_PATH), the arms and
the assignment of users to arms.

```toml
name = "likes-vs-logged"
salt = "2026-12-likes"          # a new salt re-draws every user, independently of any other salt
[[arms]]
name = "logged"                 # the first arm is the control: the report's lifts are against it
ranking = "logged"              # a ranking variant of the model file (RANKING)...
share = 0.5
[[arms]]
name = "likes"
ranking = "likes"
model_path = "data/model.pt"    # ...and/or a model file of its own (default: MODEL_PATH)
share = 0.5
```

Assignment is stateless: the SHA-256 of "salt:user_id" read as a uniform number in [0, 1), cut by the
arms' cumulative shares. Every worker, replica and restart computes the same arm for a user, nothing is
stored, and two experiments with different salts split users independently of each other.

Alternative (documented, not built): assign by `user_data.exp_group`, the column the users' table
already carries. It is stable too, but its groups are fixed once for all experiments (every experiment
splits the same users the same way, so one experiment's effect leaks into the next) and the service
would need each user's row at request time; the salted hash needs neither.
"""

from __future__ import annotations

import hashlib
import json
import math
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from settings import RANKINGS

SHARE_TOLERANCE = 1e-6  # the shares must add up to 1 within this


class ExperimentError(ValueError):
    """The experiment file is missing or does not declare a valid experiment (one clear message)."""


@dataclass(frozen=True)
class Arm:
    name: str
    share: float
    model_path: Path | None = None  # None: the service's MODEL_PATH
    ranking: str | None = None  # None: the service's RANKING


@dataclass(frozen=True)
class Experiment:
    name: str
    salt: str
    arms: tuple[Arm, ...]

    def __post_init__(self) -> None:
        names = [arm.name for arm in self.arms]
        if len(self.arms) < 2:
            raise ExperimentError(
                f"experiment {self.name!r} needs at least two arms, it has {len(self.arms)}"
            )
        if len(set(names)) != len(names):
            raise ExperimentError(f"experiment {self.name!r}: arm names must differ, got {names}")
        total = sum(arm.share for arm in self.arms)
        if abs(total - 1.0) > SHARE_TOLERANCE:
            raise ExperimentError(f"experiment {self.name!r}: the arms' shares add up to {total}, not 1")

    @property
    def shares(self) -> np.ndarray:
        return np.array([arm.share for arm in self.arms])

    def arm_index(self, user_id: int) -> int:
        """The index of the user's arm (deterministic, stateless)."""
        return int(np.searchsorted(self._cuts, bucket(self.salt, user_id), side="right"))

    def arm_of(self, user_id: int) -> Arm:
        return self.arms[self.arm_index(user_id)]

    @property
    def _cuts(self) -> np.ndarray:
        # the upper bounds of the first n-1 arms; the last arm takes the rest, so rounding never
        # leaves a bucket without an arm
        return np.cumsum(self.shares)[:-1]


def bucket(salt: str, user_id: int) -> float:
    """A uniform number in [0, 1) for (salt, user): the first 8 bytes of SHA-256("salt:user_id")."""
    digest = hashlib.sha256(f"{salt}:{int(user_id)}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def load_experiment(path: Path | None) -> Experiment | None:
    """The experiment declared in `path` (TOML, or JSON when the name ends in .json); None for no path."""
    if path is None or str(path) == "":
        return None
    path = Path(path)
    if not path.is_file():
        raise ExperimentError(f"experiment file {path} not found (EXPERIMENT_PATH)")
    try:
        raw = json.loads(path.read_text()) if path.suffix == ".json" else tomllib.loads(path.read_text())
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ExperimentError(
            f"experiment file {path} is not valid {path.suffix[1:] or 'TOML'}: {exc}"
        ) from exc
    return experiment_from_dict(raw, source=str(path))


def experiment_from_dict(raw: object, *, source: str = "the experiment") -> Experiment:
    if not isinstance(raw, dict):
        raise ExperimentError(f"{source}: expected a table with name, salt and arms")
    for key in ("name", "salt", "arms"):
        if key not in raw:
            raise ExperimentError(f"{source}: missing key {key!r}")
    name, salt, arms = raw["name"], raw["salt"], raw["arms"]
    if not isinstance(name, str) or not name or not isinstance(salt, str) or not salt:
        raise ExperimentError(f"{source}: name and salt must be non-empty strings")
    if not isinstance(arms, list):
        raise ExperimentError(f"{source}: arms must be a list of tables")
    return Experiment(name=name, salt=salt, arms=tuple(_arm(arm, i, source) for i, arm in enumerate(arms)))


def _arm(raw: object, index: int, source: str) -> Arm:
    where = f"{source}: arm {index + 1}"
    if not isinstance(raw, dict):
        raise ExperimentError(f"{where} must be a table (name, share, model_path and/or ranking)")
    unknown = set(raw) - {"name", "share", "model_path", "ranking"}
    if unknown:
        raise ExperimentError(f"{where}: unknown keys {sorted(unknown)}")
    name, share = raw.get("name"), raw.get("share")
    if not isinstance(name, str) or not name:
        raise ExperimentError(f"{where}: name must be a non-empty string")
    if isinstance(share, bool) or not isinstance(share, int | float) or not (0 < share <= 1):
        raise ExperimentError(f"{where} ({name}): share must be a number in (0, 1], got {share!r}")
    ranking = raw.get("ranking")
    if ranking is not None and ranking not in RANKINGS:
        raise ExperimentError(f"{where} ({name}): ranking must be one of {RANKINGS}, got {ranking!r}")
    model_path = raw.get("model_path")
    if model_path is not None and (not isinstance(model_path, str) or not model_path):
        raise ExperimentError(f"{where} ({name}): model_path must be a path string")
    return Arm(
        name=name,
        share=float(share),
        model_path=Path(model_path) if model_path else None,
        ranking=ranking,
    )


def srm_p_value(users: np.ndarray, shares: np.ndarray) -> tuple[float, float]:
    """(chi-square statistic, p-value) of the users per arm against the declared shares."""
    from scipy.stats import chi2

    users = np.asarray(users, dtype=np.float64)
    expected = np.asarray(shares, dtype=np.float64) * users.sum()
    if users.sum() == 0:
        return 0.0, 1.0
    statistic = float(((users - expected) ** 2 / expected).sum())
    p = float(chi2.sf(statistic, df=len(users) - 1))
    return statistic, p if math.isfinite(p) else 0.0


@dataclass(frozen=True)
class ServedArm:
    """One arm as a service worker serves it: its recommender (and the follower that keeps it fresh),
    and the model file's version (the first 12 hex digits of its SHA-256)."""

    arm: Arm
    recommender: Any  # serving.Recommender (not imported here: this module stays light)
    follower: Any  # refresh.TableFollower
    version: str

    @property
    def headers(self) -> dict[str, str]:
        return {"X-Arm": self.arm.name, "X-Model-Version": self.version}
