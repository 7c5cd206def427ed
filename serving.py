"""The recommendation path in memory: one user-tower pass and one product with the item matrix.

Built once from the model file (app lifespan). Per request: user features + the history strictly before
`time` -> UserTower -> scores = ranking_matrix @ [user, 1] -> drop posts liked before `time` -> top-k by
partial sort. No pandas and no database on this path. `refresh()` merges feed rows written after training
into the histories and likes; it builds new arrays and swaps them in one assignment, so requests never
wait. The snapshot holds every user's whole history, so a request at any past time is answered exactly.
"""

from __future__ import annotations

import dataclasses
import json
import threading
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch

from features import Histories, UserFeatures, build_user_histories, lookup, to_seconds, user_features
from model import TwoTower, UserBatch, make_user_batch, two_tower_from_payload


@dataclass
class ServingState:
    """What a refresh replaces as a whole: recent events and all likes per user (histories.likes)."""

    histories: Histories
    watermark: int  # seconds: every feed row before this time has been merged


class Recommender:
    def __init__(self, model: TwoTower, payload: dict[str, Any]):
        serving = payload["serving"]
        self.model = model.eval()
        self.vocabs: dict[str, list[str]] = payload["vocabs"]
        self.age_scaler = tuple(payload["age_scaler"])
        self.post_ids = payload["post_ids"].numpy()
        self.users = UserFeatures(
            serving["user_ids"].numpy(), serving["user_categorical"].numpy(), serving["user_numeric"].numpy()
        )
        with torch.inference_mode():
            self.item_matrix = model.item_embeddings().contiguous()  # also encodes history posts
            # [item embedding, exposure term]: the ranking stays one matrix-vector product
            self.ranking_matrix = model.ranking_item_matrix().contiguous()
        prefix = "history_"
        histories = Histories.from_arrays(
            {k.removeprefix(prefix): v.numpy() for k, v in serving.items() if k.startswith(prefix)}
        )
        self.state = ServingState(histories, int(serving["snapshot_end"]))
        self.post_json: list[bytes | None] = [None] * len(self.post_ids)
        self._refresh_lock = threading.Lock()
        self._user_vector = _trace_user_vector(self.model, self.item_matrix, self.users, histories)

    @classmethod
    def from_payload(cls, payload: dict[str, Any], *, threads: int) -> Recommender:
        torch.set_num_threads(threads)
        return cls(two_tower_from_payload(payload), payload)

    @property
    def user_ids(self) -> np.ndarray:
        return self.users.user_ids

    def user_row(self, user_id: int) -> int:
        """Row of a known user, -1 when the model file has no such user."""
        return int(lookup(self.users.user_ids, np.array([user_id]))[0])

    def static_features(self, user: Any) -> UserFeatures:
        """Features of a user the model file does not hold (an ORM row or any object with the columns)."""
        columns = ("user_id", "gender", "country", "city", "exp_group", "os", "source", "age")
        frame = pd.DataFrame([{name: getattr(user, name) for name in columns}])
        return user_features(frame, self.vocabs, self.age_scaler)

    def scores(self, user_row: int, time: int, *, users: UserFeatures | None = None) -> torch.Tensor:
        """Like logits of every post for one user at `time` (history strictly before it)."""
        state = self.state
        if users is None:
            users, histories, row = self.users, state.histories, user_row
        else:  # a user unknown to the snapshot: static features only, empty history
            histories, row = _EMPTY_HISTORY, 0
        batch = make_user_batch(users, histories, np.array([row]), np.array([time]), self.model.config)
        with torch.inference_mode():
            user = self._user_vector(*_tensors(batch))
            return self.ranking_matrix @ self.model.ranking_user_vector(user[0])

    def recommend(
        self, user_row: int, time: int, limit: int, *, users: UserFeatures | None = None
    ) -> np.ndarray:
        """Post rows of the top-`limit` posts, best first; ties go to the lower post id."""
        scores = self.scores(user_row, time, users=users).numpy().copy()
        if users is None:
            scores[self.state.histories.likes.posts_before(user_row, time)] = -np.inf
        limit = min(limit, len(scores))
        candidates = np.argpartition(-scores, limit - 1)[:limit]
        order = np.lexsort((candidates, -scores[candidates]))
        return candidates[order]

    def set_posts(self, posts: pd.DataFrame) -> int:
        """Keep each post's response JSON (PostGet) in memory, so answers need no database; returns misses."""
        frame = posts.set_index("post_id").reindex(self.post_ids)
        missing = int(frame["text"].isna().sum())
        self.post_json = [
            None if pd.isna(text) else json.dumps({"id": int(pid), "text": text, "topic": topic}).encode()
            for pid, text, topic in zip(self.post_ids, frame["text"], frame["topic"], strict=True)
        ]
        return missing

    def has_all_posts(self) -> bool:
        return all(part is not None for part in self.post_json)

    def response_body(self, rows: np.ndarray) -> bytes | None:
        """The JSON list of PostGet for post rows; None if a post's text is not in memory."""
        parts = [self.post_json[row] for row in rows]
        return None if any(part is None for part in parts) else b"[" + b",".join(parts) + b"]"

    def refresh(self, new_rows: pd.DataFrame) -> int:
        """Merge feed rows (timestamp >= watermark) into the histories; returns how many were new.

        Rows at exactly the watermark second may have been merged already: those are dropped here.
        """
        with self._refresh_lock:
            state = self.state
            seconds = to_seconds(new_rows["timestamp"]) if len(new_rows) else np.zeros(0, np.int64)
            fresh = new_rows[seconds >= state.watermark]
            fresh = fresh[~_already_merged(fresh, state, self.users.user_ids, self.post_ids)]
            if fresh.empty:
                return 0
            new = build_user_histories(fresh, self.users.user_ids, self.post_ids)
            histories = state.histories.merge(new)
            watermark = max(state.watermark, int(to_seconds(fresh["timestamp"]).max()))
            self.state = ServingState(histories, watermark)  # one assignment: readers see old or new
            return int(new.n_events)


class _UserVector(torch.nn.Module):
    """UserTower on the item encodings of the history: the one network call of a request."""

    def __init__(self, model: TwoTower, item_matrix: torch.Tensor):
        super().__init__()
        self.users, self.item_matrix = model.users, item_matrix

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        batch = UserBatch(*inputs)
        return self.users(batch, self.item_matrix[batch.hist_post])


def _tensors(batch: UserBatch) -> tuple[torch.Tensor, ...]:
    return tuple(getattr(batch, field.name) for field in dataclasses.fields(batch))


def _trace_user_vector(
    model: TwoTower, item_matrix: torch.Tensor, users: UserFeatures, histories: Histories
) -> torch.nn.Module:
    """The user tower as a frozen TorchScript graph for one (user, time): less Python per request.

    Traced for batches of one, the only size scores() sends; the weights are constants of the graph. If
    tracing fails (an unusual torch build), the eager module serves: same numbers, a little slower.
    """
    eager = _UserVector(model, item_matrix).eval()
    if len(users.user_ids) == 0:
        return eager
    example = make_user_batch(users, histories, np.array([0]), np.array([2**31]), model.config)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            traced = torch.jit.trace(eager, _tensors(example), check_trace=False)
            traced = torch.jit.optimize_for_inference(torch.jit.freeze(traced))
            if not torch.allclose(traced(*_tensors(example)), eager(*_tensors(example)), atol=1e-5):
                return eager
    except Exception:  # tracing is an optimisation only
        return eager
    return traced


_EMPTY_HISTORY = Histories(*(np.zeros(n, dtype) for n, dtype in ((2, np.int64), *[(0, np.int64)] * 5)))
_EMPTY_HISTORY.likes = _EMPTY_HISTORY


def _already_merged(
    fresh: pd.DataFrame, state: ServingState, user_ids: np.ndarray, post_ids: np.ndarray
) -> np.ndarray:
    """Rows of `fresh` equal to an event already merged at the watermark second."""
    histories = state.histories
    at_mark = histories.ev_time == state.watermark
    if not at_mark.any() or fresh.empty:
        return np.zeros(len(fresh), dtype=bool)
    owner = histories.owner()[at_mark]
    merged = pd.DataFrame(
        {
            "user_id": user_ids[owner],
            "post_id": post_ids[histories.ev_post[at_mark]],
            "action": np.where(histories.ev_action[at_mark] == 1, "like", "view"),
            "timestamp": pd.to_datetime(histories.ev_time[at_mark], unit="s"),
        }
    ).drop_duplicates()
    keys = fresh[["user_id", "post_id", "action", "timestamp"]].merge(merged, how="left", indicator=True)
    return (keys["_merge"] == "both").to_numpy()
