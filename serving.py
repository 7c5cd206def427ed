"""The recommendation path in memory, and the live state it reads.

A Recommender holds the model and one ServingState. The state reads events in two layers: the snapshot
of the model file (every user's events up to the end of the training feed, memory-mapped and never
written, so worker processes share its pages) and a delta: the feed rows the refresh (refresh.py) has
read from the tables since, late ones included. Beside them: users and posts that appeared after
training, and the post statistics at the latest event. `Recommender.apply(changes)` builds the next
state and swaps it in with one assignment, so a request reads one whole state, never a half-built one.

Per request: user features + the history strictly before `time` (both layers) -> the user tower (ONNX
Runtime, inference.py) -> scores = ranking_matrix @ user vector -> drop posts liked before `time` and posts
gone from post_text_df -> the top `limit`, ties to the lower post id. No pandas, no database and no
per-operation torch dispatch on this path.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import threadpoolctl
import torch

from features import (
    RECENT_DAYS,
    UserFeatures,
    encode,
    lookup,
    post_stats_from_counts,
    user_features,
    window_days,
)
from get_features_table import COLUMNS
from get_model import FeedSnapshot, ModelFile
from histories import ACTION_LIKE, RECENCY_BUCKETS, Histories, LayeredHistories, histories_from_rows
from inference import OnnxUserTower, RequestInputs
from model import TwoTowerConfig, numeric_inputs, ranked_columns
from times import DAY_SECONDS

FUTURE_TOLERANCE_SECONDS = DAY_SECONDS  # a row dated further past the clock moves no watermark or statistics

# ----------------------------------------------------------------------------- data structures


@dataclass(frozen=True)
class FeedRows:
    """Feed rows as arrays. The delta keeps every row a refresh read, also those naming a user or post
    the service does not know yet: they join the histories when that user or post appears."""

    seconds: np.ndarray  # int64
    user_id: np.ndarray  # int64
    post_id: np.ndarray  # int64
    is_like: np.ndarray  # bool

    def __len__(self) -> int:
        return len(self.seconds)

    @classmethod
    def empty(cls) -> FeedRows:
        return cls(*(np.zeros(0, np.int64) for _ in range(3)), np.zeros(0, bool))

    @classmethod
    def from_frame(cls, frame: pd.DataFrame) -> FeedRows:
        """From columns seconds, user_id, post_id, is_like."""
        return cls(*(frame[name].to_numpy(dtype) for name, dtype in zip(_COLUMNS, _DTYPES, strict=True)))

    def to_frame(self) -> pd.DataFrame:
        return pd.DataFrame({name: getattr(self, name) for name in _COLUMNS})

    def concat(self, other: FeedRows) -> FeedRows:
        if not len(other):
            return self
        return FeedRows(*(np.concatenate([getattr(self, n), getattr(other, n)]) for n in _COLUMNS))

    def select(self, keep: np.ndarray) -> FeedRows:
        return FeedRows(*(getattr(self, name)[keep] for name in _COLUMNS))

    def without(self, gone: FeedRows) -> FeedRows:
        """These rows less `gone` (a multiset difference: each row of `gone` takes away one equal row)."""
        if not len(gone) or not len(self):
            return self
        keys = list(_COLUMNS)
        frame = self.to_frame()
        nth = frame.groupby(keys, sort=False).cumcount().to_numpy()  # 0, 1, ... among equal rows
        drop = gone.to_frame().value_counts(keys).rename("drop")
        limit = frame.join(drop, on=keys)["drop"].fillna(0).to_numpy()
        return self.select(nth >= limit)


_COLUMNS = ("seconds", "user_id", "post_id", "is_like")
_DTYPES = (np.int64, np.int64, np.int64, bool)


@dataclass(frozen=True)
class Changes:
    """What one refresh read from the tables; every part may be empty."""

    rows: FeedRows = dataclasses.field(default_factory=FeedRows.empty)  # feed rows not merged before
    removed: FeedRows = dataclasses.field(default_factory=FeedRows.empty)  # rows deleted from the table
    # (those merged since the snapshot leave the delta; the snapshot's own wait for the next training)
    users: pd.DataFrame | None = None  # user_data rows of users the state lacks
    posts: pd.DataFrame | None = None  # new posts: post_id, text, topic, vector (raw text embedding)
    texts: pd.DataFrame | None = None  # post_id, text, topic of known posts (their response JSON)
    live_post_ids: np.ndarray | None = None  # every post_id of post_text_df now


@dataclass(frozen=True)
class Snapshot:
    """The model file's events (read-only) and what the post statistics need of them, computed once."""

    users: UserFeatures
    histories: Histories
    start: int  # seconds: the first event of the training feed
    end: int  # one past its last event
    feed_rows: int  # rows of feed_data the training read
    views: np.ndarray  # per snapshot post row, over the whole snapshot
    likes: np.ndarray
    recent: np.ndarray  # int32: the snapshot's events of its last RECENT_DAYS, in time order (indices
    # into histories): the recent-window statistics at any later time
    log_position: dict[str, Any] | None = None  # where the training read stood in the change log

    @classmethod
    def of(cls, saved: FeedSnapshot, n_posts: int) -> Snapshot:
        """The model file's snapshot and the per-post counts over it."""
        histories, end = saved.histories, saved.end
        is_like = histories.ev_action == ACTION_LIKE
        likes = np.bincount(histories.ev_post, weights=is_like, minlength=n_posts).astype(np.int64)
        views = np.bincount(histories.ev_post, minlength=n_posts) - likes
        recent = np.flatnonzero(histories.ev_time >= end - RECENT_DAYS * DAY_SECONDS).astype(np.int32)
        return cls(
            users=saved.users,
            histories=histories,
            start=saved.start,
            end=end,
            feed_rows=saved.feed_rows,
            views=views,
            likes=likes,
            recent=recent[np.argsort(histories.ev_time[recent], kind="stable")],
            log_position=saved.log_position,
        )


@dataclass(frozen=True)
class ServingState:
    """Everything a request reads, replaced as a whole by each refresh."""

    users: UserFeatures  # the snapshot's users, then users added since (rows in that order)
    user_index: tuple[np.ndarray, np.ndarray]  # (sorted user ids, their rows): lookups
    histories: LayeredHistories  # the snapshot's events and the delta's, read as one
    rows: FeedRows  # every feed row merged since the snapshot
    post_ids: np.ndarray  # int64, per post row: the snapshot's posts, then posts added since
    post_index: tuple[np.ndarray, np.ndarray]
    post_text: torch.Tensor  # [n_posts, text_dim] text codes
    post_topic: torch.Tensor  # [n_posts]
    live: np.ndarray  # bool per post row: in post_text_df at the last look (only these are recommended)
    post_json: tuple[bytes | None, ...]  # each post's PostGet JSON, None while its text is not in memory
    ranking_matrix: np.ndarray  # float32 [n_posts, ranking width]: item embeddings first (model.py)
    search: ExactSearch | FaissSearch  # top-k over the ranking matrix
    stats_time: int  # the post statistics hold events before this time (one past the latest)
    item_dim: int  # the item embeddings' width: the first columns of the ranking matrix

    @property
    def item_matrix(self) -> np.ndarray:
        return self.ranking_matrix[:, : self.item_dim]

    @property
    def gone(self) -> np.ndarray:
        """Post rows no longer in post_text_df (never recommended)."""
        return _gone(self.live)

    def user_row(self, user_id: int) -> int:
        """Row of a user the state knows, -1 otherwise."""
        return int(_rows_of(self.user_index, np.array([user_id]))[0])

    def post_rows(self, post_ids: np.ndarray) -> np.ndarray:
        return _rows_of(self.post_index, post_ids)

    def response_body(self, rows: np.ndarray) -> bytes | None:
        """The JSON list of PostGet for post rows; None if a post's text is not in memory."""
        parts = [self.post_json[row] for row in rows]
        return None if any(part is None for part in parts) else b"[" + b",".join(parts) + b"]"

    def texts_missing(self) -> np.ndarray:
        """post_ids whose text is not in memory (the database was down when they were read)."""
        return self.post_ids[[part is None for part in self.post_json]]


class ExactSearch:
    """Top-k by one product with the whole ranking matrix: exact, and the fastest up to large catalogues."""

    def __init__(self, matrix: np.ndarray):
        self.matrix = matrix

    def top(self, query: np.ndarray, k: int, excluded: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(rows, scores) of the k best rows for `query` outside `excluded`, best first (fewer when
        fewer are left)."""
        scores = self.matrix @ query
        scores[excluded] = -np.inf
        best = torch.topk(torch.from_numpy(scores), min(k, len(scores))).indices.numpy()
        best = best[np.isfinite(scores[best])]
        if len(best) == k:  # topk picks among rows tied at the cut arbitrarily: hand them all back, so
            best = np.flatnonzero(scores >= scores[best].min())  # the caller's order (post id) decides
        return best, scores[best]


class FaissSearch:
    """Top-k through a FAISS inverted-file index (inner product over the same vectors, so the scores
    are the exact ones of the rows it returns), for catalogues where a full product is slow. It asks
    for more than k, enough to cover the exclusions, and asks again for more when too few are left."""

    def __init__(self, matrix: np.ndarray, *, threads: int, previous: FaissSearch | None = None):
        import faiss  # only for large catalogues: the service starts without it otherwise

        limit_threads(threads)  # faiss brings its own OpenBLAS and OpenMP, loaded just now
        self.threads = threads
        n, width = matrix.shape
        if previous is not None and previous.trained_for * 2 >= n:  # a refresh: keep the lists' centroids
            self.empty, self.trained_for = previous.empty, previous.trained_for
        else:
            lists = max(int(4 * np.sqrt(n)), 1)
            self.empty = faiss.IndexIVFFlat(
                faiss.IndexFlatIP(width), width, lists, faiss.METRIC_INNER_PRODUCT
            )
            sample = np.random.default_rng(0).choice(n, min(n, 64 * lists), replace=False)
            self.empty.train(np.ascontiguousarray(matrix[np.sort(sample)]))
            self.empty.nprobe = max(lists // 32, min(lists, 48))  # 3% of the lists, at least 48
            self.trained_for = n
        self.index = faiss.clone_index(self.empty)
        self.index.nprobe = self.empty.nprobe
        self.index.add(np.ascontiguousarray(matrix))
        self.n = n

    def top(self, query: np.ndarray, k: int, excluded: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        import faiss

        # OpenMP's thread count is per calling thread: a request in a worker thread (not the one that
        # built the index) would otherwise start a team of one thread per core
        faiss.omp_set_num_threads(self.threads)
        wanted = k + len(excluded)
        while True:
            scores, rows = self.index.search(query[None, :].astype(np.float32), min(wanted, self.n))
            rows, scores = rows[0], scores[0]
            keep = (rows >= 0) & ~np.isin(rows, excluded)
            if keep.sum() >= k or wanted >= self.n or (rows < 0).any():
                return rows[keep][:k], scores[keep][:k]
            wanted *= 4


def make_search(
    matrix: np.ndarray, *, faiss_min_posts: int, threads: int, previous: object = None
) -> ExactSearch | FaissSearch:
    """The exact product below faiss_min_posts posts (settings.FAISS_MIN_POSTS), FAISS at and above;
    a FAISS index built before (`previous`) lends its trained lists."""
    if len(matrix) < faiss_min_posts:
        return ExactSearch(matrix)
    earlier = previous if isinstance(previous, FaissSearch) else None
    return FaissSearch(matrix, threads=threads, previous=earlier)


# ----------------------------------------------------------------------------- the recommender


class Recommender:
    """The model of a model file, serving one ServingState at a time (see the module docstring)."""

    def __init__(
        self,
        model_file: ModelFile,
        *,
        threads: int = 1,
        faiss_min_posts: int = 50_000,
        ranking: str = "likes",
    ):
        limit_threads(threads)
        self.threads, self.faiss_min_posts = threads, faiss_min_posts
        self.ranking = ranking
        self.ranked = ranked_columns(model_file.config, ranking)  # the columns the ranking reads
        self.model = model = model_file.two_tower()
        self.autoencoder = model_file.text_autoencoder()
        self.vocabs = model_file.vocabs
        self.age_scaler = model_file.age_scaler
        self.stats_scaler = model_file.stats_scaler
        self.encoder_key = model_file.encoder_key
        self.snapshot = snapshot = Snapshot.of(model_file.snapshot, len(model_file.post_ids))
        post_ids = model_file.post_ids
        with torch.inference_mode():
            ranking_matrix = model.ranking_item_matrix().numpy()
        self.state = ServingState(
            users=snapshot.users,
            user_index=_index(snapshot.users.user_ids),
            histories=LayeredHistories(snapshot.histories, Histories.empty(len(snapshot.users.user_ids))),
            rows=FeedRows.empty(),
            post_ids=post_ids,
            post_index=_index(post_ids),
            post_text=model.post_text,
            post_topic=model.post_topic,
            live=np.ones(len(post_ids), dtype=bool),
            post_json=(None,) * len(post_ids),
            ranking_matrix=ranking_matrix,
            search=self._search(ranking_matrix),
            stats_time=snapshot.end,
            item_dim=model.config.embed_dim,
        )
        self._apply_lock = threading.Lock()  # one refresh at a time builds on the current state
        self._user_tower = OnnxUserTower(model_file.user_tower_onnx, model.config, threads=threads)

    @property
    def user_ids(self) -> np.ndarray:
        return self.state.users.user_ids

    @property
    def post_ids(self) -> np.ndarray:
        return self.state.post_ids

    # --- serving ---

    def recommend(
        self,
        state: ServingState,
        user_row: int,
        time: int,
        limit: int,
        *,
        users: UserFeatures | None = None,
        histories: Histories | LayeredHistories | None = None,
    ) -> np.ndarray:
        """Post rows of the top-`limit` posts for a user at `time`, best first: only posts in
        post_text_df, never one the user liked before `time`, so fewer than `limit` when that few are
        left. `users`/`histories` serve a user the state does not hold (newcomer())."""
        query = self.query(state, user_row, time, users=users, histories=histories)
        histories = state.histories if histories is None else histories
        excluded = np.concatenate([histories.likes.posts_before(user_row, time), state.gone])
        rows, scores = state.search.top(query, limit, excluded)
        return rows[np.lexsort((state.post_ids[rows], -scores))][:limit]  # ties: the lower post id

    def scores(
        self,
        state: ServingState,
        user_row: int,
        time: int,
        *,
        users: UserFeatures | None = None,
        histories: Histories | LayeredHistories | None = None,
    ) -> np.ndarray:
        """Ranking scores (float32, a new array) of every post row for one user at `time`."""
        query = self.query(state, user_row, time, users=users, histories=histories)
        return state.ranking_matrix[:, self.ranked] @ query

    def query(
        self,
        state: ServingState,
        user_row: int,
        time: int,
        *,
        users: UserFeatures | None = None,
        histories: Histories | LayeredHistories | None = None,
    ) -> np.ndarray:
        """The ranking user vector: ranking_matrix[:, ranked] @ query is every post's ranking score."""
        users = state.users if users is None else users
        histories = state.histories if histories is None else histories
        inputs = request_inputs(users, histories, user_row, time, self.model.config)
        return self._user_tower(inputs, state.item_matrix[inputs.posts])[self.ranked]

    def newcomer(self, state: ServingState, user: Any) -> tuple[UserFeatures, Histories]:
        """Features and history of a user in user_data that the state does not hold yet (an ORM row or
        any object with the columns): the feed rows already merged for them, so they are served exactly
        like a known user, exclusions included, until the next refresh adds them."""
        row = {column: getattr(user, column) for column in COLUMNS["user_data"]}
        features = user_features(pd.DataFrame([row]), self.vocabs, self.age_scaler)
        mine = state.rows.select(state.rows.user_id == features.user_ids[0])
        post_rows = state.post_rows(mine.post_id)
        known = post_rows >= 0
        events = histories_from_rows(
            np.zeros(known.sum(), np.int64), post_rows[known], mine.seconds[known], mine.is_like[known], 1
        )
        return features, events

    # --- following the tables ---

    def apply(self, changes: Changes) -> ServingState:
        """Build the state that includes `changes` and swap it in; returns it."""
        with self._apply_lock:
            state = self.state
            posts = self._with_posts(state, changes)
            users, user_index = state.users, state.user_index
            if changes.users is not None and len(changes.users):
                users = _concat_users(users, user_features(changes.users, self.vocabs, self.age_scaler))
                user_index = _index(users.user_ids)
            kept = state.rows.without(changes.removed)
            rows = kept.concat(changes.rows)
            histories, stats_time, ranking_matrix = state.histories, state.stats_time, state.ranking_matrix
            grown = len(posts["post_ids"]) > len(state.post_ids) or len(users.user_ids) > len(
                state.users.user_ids
            )
            if len(changes.rows) or len(kept) < len(state.rows) or grown:
                delta = _delta_histories(rows, user_index, len(users.user_ids), posts["post_index"])
                histories = LayeredHistories(self.snapshot.histories, delta)
                stats_time = max(state.stats_time, latest_plausible(rows.seconds) + 1)
                ranking_matrix = self._ranking_matrix(posts, delta, stats_time, rows)
            search = state.search
            if ranking_matrix is not state.ranking_matrix:
                search = self._search(ranking_matrix, previous=search)
            self.state = dataclasses.replace(
                state,
                users=users,
                user_index=user_index,
                histories=histories,
                rows=rows,
                ranking_matrix=ranking_matrix,
                search=search,
                stats_time=stats_time,
                **posts,
            )
            return self.state

    def _search(self, ranking_matrix: np.ndarray, previous: object = None) -> ExactSearch | FaissSearch:
        """The top-k search over the ranked columns of the ranking matrix."""
        return make_search(
            np.ascontiguousarray(ranking_matrix[:, self.ranked]),
            faiss_min_posts=self.faiss_min_posts,
            threads=self.threads,
            previous=previous,
        )

    def _with_posts(self, state: ServingState, changes: Changes) -> dict[str, Any]:
        """The post fields of the next state: new posts appended, liveness and texts updated."""
        post_ids, post_index = state.post_ids, state.post_index
        text, topic, json_parts = state.post_text, state.post_topic, list(state.post_json)
        new = changes.posts
        if new is not None and len(new):
            new = new[~np.isin(new["post_id"].to_numpy(), post_ids)]
        if new is not None and len(new):
            with torch.inference_mode():
                codes = self.autoencoder.encode(
                    torch.from_numpy(np.stack(new["vector"].to_list()).astype(np.float32))
                )
            post_ids = np.concatenate([post_ids, new["post_id"].to_numpy(np.int64)])
            post_index = _index(post_ids)
            text = torch.cat([text, codes])
            topic = torch.cat([topic, torch.from_numpy(encode(new["topic"], self.vocabs["topic"]))])
            json_parts += [None] * len(new)
        for frame in (changes.texts, new):
            if frame is not None and len(frame):
                rows = _rows_of(post_index, frame["post_id"].to_numpy())
                for row, pid, body, name in zip(
                    rows, frame["post_id"], frame["text"], frame["topic"], strict=True
                ):
                    if row >= 0:
                        json_parts[row] = json.dumps({"id": int(pid), "text": body, "topic": name}).encode()
        if changes.live_post_ids is not None:
            live = np.isin(post_ids, changes.live_post_ids)
        else:  # posts added without a look at the table: live, as they were just read from it
            live = np.concatenate([state.live, np.ones(len(post_ids) - len(state.live), bool)])
        return {
            "post_ids": post_ids,
            "post_index": post_index,
            "post_text": text,
            "post_topic": topic,
            "live": live,
            "post_json": tuple(json_parts),
        }

    def _ranking_matrix(self, posts: dict[str, Any], delta: Histories, at: int, rows: FeedRows) -> np.ndarray:
        """The ranking matrix with every post's statistics at `at`, through the item tower."""
        first = min(self.snapshot.start, int(rows.seconds.min())) if len(rows) else self.snapshot.start
        stats = post_statistics_at(self.snapshot, delta, len(posts["post_ids"]), at=at, first=first)
        mean, std = self.stats_scaler
        scaled = torch.from_numpy(((stats - mean) / std).astype(np.float32))
        with torch.inference_mode():
            return self.model.ranking_rows(posts["post_text"], posts["post_topic"], scaled).numpy()


def post_statistics_at(
    snapshot: Snapshot, delta: Histories, n_posts: int, *, at: int, first: int
) -> np.ndarray:
    """[n_posts, 5] raw post statistics at `at` over the snapshot's events and the delta's: what
    features.post_counts + post_stats_from_counts give on all events, from counts kept per layer."""
    views, likes, recent_views, recent_likes = (np.zeros(n_posts, np.int64) for _ in range(4))
    n_snapshot = len(snapshot.views)
    views[:n_snapshot] += snapshot.views
    likes[:n_snapshot] += snapshot.likes
    seconds = snapshot.histories.ev_time[snapshot.recent]
    window = snapshot.recent[
        np.searchsorted(seconds, at - RECENT_DAYS * DAY_SECONDS) : np.searchsorted(seconds, at)
    ]
    post_rows = snapshot.histories.ev_post[window]
    is_like = snapshot.histories.ev_action[window] == ACTION_LIKE
    recent_views += np.bincount(post_rows[~is_like], minlength=n_posts)
    recent_likes += np.bincount(post_rows[is_like], minlength=n_posts)
    delta_like = delta.ev_action == ACTION_LIKE
    delta_recent = (delta.ev_time >= at - RECENT_DAYS * DAY_SECONDS) & (delta.ev_time < at)
    for counts, keep in (
        (views, ~delta_like),
        (likes, delta_like),
        (recent_views, ~delta_like & delta_recent),
        (recent_likes, delta_like & delta_recent),
    ):
        counts += np.bincount(delta.ev_post[keep], minlength=n_posts)
    return post_stats_from_counts(
        views, likes, recent_views, recent_likes, window_days=window_days(first, at)
    )


# ----------------------------------------------------------------------------- helpers


def limit_threads(threads: int) -> None:
    """At most `threads` threads in every compute pool of this process: OpenBLAS and OpenMP
    (threadpoolctl: numpy's, torch's and faiss's copies), torch's intra- and inter-op pools. ONNX
    Runtime's pool is set per session (inference.OnnxUserTower).

    Why: a request's products are far too small to gain from a second thread, and the pools' idle
    threads spin waiting for work; with one worker per core they steal the CPU of the other workers.
    A plain call, not a `with` block: the limits must outlive it. OpenBLAS's limit is process-wide
    (but once the main thread has set it, OpenBLAS ignores a setting made in any other thread);
    OpenMP's holds for the calling thread (the event loop's, where the lifespan and the async
    endpoints run) and for threads started later only through OMP_NUM_THREADS, which gunicorn.conf.py
    sets before the libraries load; torch applies its own setting in each thread it computes in.
    """
    threadpoolctl.threadpool_limits(limits=threads)
    torch.set_num_threads(threads)
    with contextlib.suppress(RuntimeError):  # torch allows it once, before its inter-op pool starts
        torch.set_num_interop_threads(threads)


def latest_plausible(seconds: np.ndarray) -> int:
    """The latest of these event times that is not beyond the clock (plus FUTURE_TOLERANCE_SECONDS); a
    writer whose clock runs years ahead must not make every other row look old."""
    plausible = seconds[seconds <= time.time() + FUTURE_TOLERANCE_SECONDS]
    return int(plausible.max(initial=np.iinfo(np.int64).min // 2))


def _index(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    order = np.argsort(ids, kind="stable")
    return ids[order], order


def _rows_of(index: tuple[np.ndarray, np.ndarray], ids: np.ndarray) -> np.ndarray:
    sorted_ids, order = index
    positions = lookup(sorted_ids, ids)
    return np.where(positions >= 0, order[np.maximum(positions, 0)], -1) if len(order) else positions


def _gone(live: np.ndarray) -> np.ndarray:
    return np.flatnonzero(~live)


def _concat_users(users: UserFeatures, more: UserFeatures) -> UserFeatures:
    return UserFeatures(
        *(
            np.concatenate([getattr(users, n), getattr(more, n)])
            for n in ("user_ids", "categorical", "numeric")
        )
    )


def _delta_histories(
    rows: FeedRows,
    user_index: tuple[np.ndarray, np.ndarray],
    n_users: int,
    post_index: tuple[np.ndarray, np.ndarray],
) -> Histories:
    """The merged rows as Histories over every user row; rows of unknown users or posts wait."""
    user_rows, post_rows = _rows_of(user_index, rows.user_id), _rows_of(post_index, rows.post_id)
    known = (user_rows >= 0) & (post_rows >= 0)
    return histories_from_rows(
        user_rows[known], post_rows[known], rows.seconds[known], rows.is_like[known], n_users
    )


def request_inputs(
    users: UserFeatures,
    histories: Histories | LayeredHistories,
    user_row: int,
    time: int,
    config: TwoTowerConfig,
) -> RequestInputs:
    """The user tower's inputs for one (user, time): what model.make_user_batch gathers for a batch,
    for one request and without padding (a test holds the two equal)."""
    times, posts, actions, n_events, n_likes = histories.recent(user_row, time, config.max_history)
    slots = config.max_history - len(times) + np.arange(len(times))
    if config.max_likes and histories.likes is not None:
        like_times, like_posts, like_actions, _, _ = histories.likes.recent(user_row, time, config.max_likes)
        end = config.max_history + config.max_likes
        slots = np.concatenate([slots, end - len(like_times) + np.arange(len(like_times))])
        times, posts, actions = (
            np.concatenate(pair)
            for pair in ((times, like_times), (posts, like_posts), (actions, like_actions))
        )
    numeric = numeric_inputs(
        users.numeric[user_row : user_row + 1], np.array([time]), np.array([n_events]), np.array([n_likes])
    )
    return RequestInputs(
        categorical=users.categorical[user_row],
        numeric=numeric[0],
        posts=posts.astype(np.int64),
        actions=actions.astype(np.int64),
        recency=np.searchsorted(RECENCY_BUCKETS, time - times, side="right"),
        slots=slots,
    )
