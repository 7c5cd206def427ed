"""The networks: the text autoencoder and the two towers, their config and their inputs. A library: the
service and the training pipeline both import it; the losses and the training loops live apart, in
learn_model.py, and the model file that carries a trained one in get_model.py.

like logit(user, post) = <u, v> + bias, u = UserTower(user, history before t), v = ItemTower(post);
ranking score = <u, v> + <A u, B v> + exposure(post) = ranking_item_matrix() @ ranking_user_vector(u):
the like logit's part and what the feed shows (a personal and a per-post exposure term), one product.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from features import LIKE_RATE_PRIOR_VIEWS, POST_STAT_NAMES, PRIOR_LIKE_RATE, UserFeatures, time_features
from histories import RECENCY_BUCKETS, Histories

# ----------------------------------------------------------------------------- config and inputs


@dataclass
class TwoTowerConfig:
    """Everything needed to rebuild the network; saved in the model file beside the weights."""

    n_posts: int
    n_topics: int
    user_cardinalities: list[int]  # vocabulary sizes of features.USER_CATEGORICALS, in order
    text_dim: int  # size of the autoencoder's text code (settings.TEXT_DIM)
    max_history: int  # recent events (views and likes) the transformer reads (settings.MAX_HISTORY)
    max_likes: int = 16  # and the user's last likes, however old: the long-term taste (settings.MAX_LIKES)
    n_post_stats: int = len(POST_STAT_NAMES)
    n_user_numeric: int = 8  # age, 4 request-time features, log events, log likes, like rate (before t)
    embed_dim: int = 64
    hidden_dim: int = 256
    category_dim: int = 16
    n_layers: int = 1
    n_heads: int = 1
    ff_dim: int = 128
    dropout: float = 0.0  # MLP dropout; its masks cost CPU time and bought no quality on the demo
    n_recency: int = len(RECENCY_BUCKETS) + 1
    use_history: bool = True
    use_text: bool = True
    exposure_head: bool = False  # a per-post "how often is it shown" term, added to the ranking score
    exposure_dim: int = 16  # with the exposure head: a personal one too, <A u, B v> (0 = per post only)
    profile_dim: int = 0  # > 0: the user tower also reads the user's profile (TwoTower.profile), this wide
    like_pool: bool = False  # the user vector adds a learned decaying sum of the last likes' item vectors


@dataclass
class UserBatch:
    """User-tower inputs for a batch of (user, request time) pairs."""

    categorical: torch.Tensor  # int64 [B, n_categoricals]
    numeric: torch.Tensor  # float32 [B, n_user_numeric]
    hist_post: torch.Tensor  # int64 [B, H] post rows
    hist_action: torch.Tensor  # int64 [B, H]
    hist_recency: torch.Tensor  # int64 [B, H]
    hist_mask: torch.Tensor  # bool [B, H], True = a real event
    # every event before each time (the profile): its batch row, post row and action, flat [N]
    profile_owner: torch.Tensor = dataclasses.field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    profile_post: torch.Tensor = dataclasses.field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    profile_action: torch.Tensor = dataclasses.field(default_factory=lambda: torch.zeros(0, dtype=torch.long))


def ranked_columns(config: TwoTowerConfig, ranking: str) -> slice:
    """The columns of the ranking matrix and the ranking user vector that a ranking reads (settings.RANKING):
    "likes" the like logit's <u, v> alone, so posts come in the order of the calibrated like probability;
    "logged" all of them, <u, v> + <A u, B v> + exposure, which also predicts what the old feed showed."""
    assert ranking in ("likes", "logged"), f"unknown ranking {ranking!r}: likes or logged"
    return slice(0, config.embed_dim) if ranking == "likes" else slice(None)


def make_user_batch(
    users: UserFeatures,
    histories: Histories,
    user_rows: np.ndarray,
    times: np.ndarray,
    config: TwoTowerConfig,
) -> UserBatch:
    """Gather the user-tower inputs; every history input holds only events strictly before each time."""
    user_rows = np.asarray(user_rows, dtype=np.int64)
    times = np.asarray(times, dtype=np.int64)
    posts, actions, recency, mask = histories.window(user_rows, times, config.max_history)
    if config.max_likes and histories.likes is not None:
        windows = zip(
            (posts, actions, recency, mask),
            histories.likes.window(user_rows, times, config.max_likes),
            strict=True,
        )
        posts, actions, recency, mask = (np.concatenate(pair, axis=1) for pair in windows)
    numeric = numeric_inputs(users.numeric[user_rows], times, *histories.counts_before(user_rows, times))
    profile = histories.events_before(user_rows, times) if config.profile_dim else ()
    return UserBatch(
        torch.from_numpy(users.categorical[user_rows]),
        torch.from_numpy(numeric),
        torch.from_numpy(posts),
        torch.from_numpy(actions),
        torch.from_numpy(recency),
        torch.from_numpy(mask),
        *(torch.from_numpy(part) for part in profile),
    )


def numeric_inputs(
    static: np.ndarray, times: np.ndarray, n_events: np.ndarray, n_likes: np.ndarray
) -> np.ndarray:
    """[n, n_user_numeric] float32: the static numerics, the request time's features and the user's
    activity before it (events, likes, like rate shrunk towards a prior)."""
    n_events, n_likes = np.asarray(n_events, np.float64), np.asarray(n_likes, np.float64)
    width = static.shape[1]
    out = np.empty((len(times), width + 7), dtype=np.float32)
    out[:, :width] = static
    out[:, width : width + 4] = time_features(times)
    out[:, width + 4] = np.log1p(n_events) / 5.0
    out[:, width + 5] = np.log1p(n_likes) / 3.0
    like_rate = (n_likes + LIKE_RATE_PRIOR_VIEWS * PRIOR_LIKE_RATE) / (
        n_events - n_likes + LIKE_RATE_PRIOR_VIEWS
    )
    out[:, width + 6] = like_rate * 5.0
    return out


# ----------------------------------------------------------------------------- networks


class Autoencoder(nn.Module):
    """MLP autoencoder of text embeddings: in_dim -> hidden_dim -> code_dim -> hidden_dim -> in_dim.

    The input's per-dimension mean and std are buffers, so `encode` takes raw embeddings and the
    scaling travels with the state_dict. The decoder reconstructs the standardised input.
    """

    def __init__(self, in_dim: int, *, hidden_dim: int = 256, code_dim: int) -> None:
        super().__init__()
        self.in_dim, self.hidden_dim, self.code_dim = in_dim, hidden_dim, code_dim
        self.register_buffer("mean", torch.zeros(in_dim))
        self.register_buffer("std", torch.ones(in_dim))
        self.encoder = nn.Sequential(
            nn.Linear(in_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, code_dim)
        )
        self.decoder = nn.Sequential(
            nn.Linear(code_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, in_dim)
        )

    def fit_scaling(self, x: torch.Tensor) -> None:
        """Set mean/std from the data; a constant dimension keeps std 1 rather than dividing by zero."""
        std = x.std(dim=0, unbiased=False)
        self.mean.copy_(x.mean(dim=0))
        self.std.copy_(torch.where(std > 1e-6, std, torch.ones_like(std)))

    def standardise(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Codes [n, code_dim] of raw embeddings [n, in_dim]."""
        return self.encoder(self.standardise(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Reconstruction of the standardised input."""
        return self.decoder(self.encode(x))


def mlp(in_dim: int, hidden_dim: int, out_dim: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(in_dim, hidden_dim),
        nn.GELU(),
        *([nn.Dropout(dropout)] if dropout else []),
        nn.Linear(hidden_dim, hidden_dim // 2),
        nn.GELU(),
        nn.Linear(hidden_dim // 2, out_dim),
    )


class ItemTower(nn.Module):
    """Post text code + topic + post statistics -> embed_dim."""

    def __init__(self, config: TwoTowerConfig):
        super().__init__()
        self.use_text = config.use_text
        self.topic = nn.Embedding(config.n_topics, config.category_dim)
        in_dim = config.category_dim + config.n_post_stats + (config.text_dim if config.use_text else 0)
        self.net = mlp(in_dim, config.hidden_dim, config.embed_dim, config.dropout)

    def forward(self, text: torch.Tensor, topic: torch.Tensor, stats: torch.Tensor) -> torch.Tensor:
        parts = [self.topic(topic), stats] + ([text] if self.use_text else [])
        return self.net(torch.cat(parts, dim=-1))


class HistoryEncoderLayer(nn.Module):
    """A pre-norm transformer encoder layer over [B, T, d] history tokens, in plain batched matmuls.

    The computation of nn.TransformerEncoderLayer(norm_first=True, dropout=0, activation=relu) (a test
    holds them equal). At ~25 tokens on CPU, nn.MultiheadAttention spends much of a training step
    zero-filling and transposing gradients and in a flash-attention kernel made for long sequences;
    separate q/k/v projections also spare the backward pass a concatenation (README, Performance).
    """

    def __init__(self, dim: int, n_heads: int, ff_dim: int):
        super().__init__()
        assert dim % n_heads == 0, f"embed_dim {dim} must be a multiple of n_heads {n_heads}"
        self.n_heads, self.head_dim = n_heads, dim // n_heads
        self.attention_norm, self.ff_norm = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.query, self.key, self.value = (nn.Linear(dim, dim) for _ in range(3))
        self.out = nn.Linear(dim, dim)
        self.ff = nn.Sequential(nn.Linear(dim, ff_dim), nn.ReLU(), nn.Linear(ff_dim, dim))

    def forward(self, x: torch.Tensor, key_bias: torch.Tensor) -> torch.Tensor:
        """x [B, T, d]; key_bias [B, 1, 1, T]: 0 for a real token, -inf for padding (never all -inf)."""
        b, t, d = x.shape
        normed = self.attention_norm(x)
        q, k, v = (
            projection(normed).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
            for projection in (self.query, self.key, self.value)
        )  # each [B, heads, T, head_dim]
        weights = torch.softmax(q @ k.transpose(-1, -2) * self.head_dim**-0.5 + key_bias, dim=-1)
        x = x + self.out((weights @ v).transpose(1, 2).reshape(b, t, d))
        return x + self.ff(self.ff_norm(x))


class UserTower(nn.Module):
    """Static features MLP fused with a transformer over the item encodings of the user's history."""

    def __init__(self, config: TwoTowerConfig):
        super().__init__()
        self.use_history = config.use_history
        self.categoricals = nn.ModuleList(
            nn.Embedding(n, config.category_dim) for n in config.user_cardinalities
        )
        static_in = config.category_dim * len(config.user_cardinalities) + config.n_user_numeric
        self.profile_dim = config.profile_dim
        if config.profile_dim:
            self.profile = nn.Sequential(
                nn.LayerNorm(2 * config.text_dim), nn.Linear(2 * config.text_dim, config.profile_dim)
            )
        self.static = mlp(static_in + config.profile_dim, config.hidden_dim, config.embed_dim, config.dropout)
        d = config.embed_dim
        self.n_recency = config.n_recency
        self.event = nn.Embedding(2 * config.n_recency, d)  # (action, recency bucket) pairs: one lookup
        self.position = nn.Parameter(torch.zeros(config.max_history + config.max_likes + 1, d))
        self.summary_token = nn.Parameter(torch.zeros(1, 1, d))  # keeps an empty history well defined
        self.encoder = nn.ModuleList(
            HistoryEncoderLayer(d, config.n_heads, config.ff_dim) for _ in range(config.n_layers)
        )
        self.fuse = nn.Sequential(nn.Linear(2 * d, d), nn.GELU(), nn.Linear(d, d))
        self.max_history, self.like_pool = config.max_history, config.like_pool and config.max_likes > 0
        if self.like_pool:  # weights of the likes window's slots, oldest first: a decay 0.8 to start from
            decay = 0.8 ** torch.arange(config.max_likes - 1, -1, -1, dtype=torch.float32)
            self.like_weights = nn.Parameter(0.2 * decay)
            self.like_map = nn.Linear(d, d, bias=False)
            nn.init.eye_(self.like_map.weight)

    def forward(
        self, batch: UserBatch, history_items: torch.Tensor, profile: torch.Tensor | None = None
    ) -> torch.Tensor:
        """history_items: [B, H, d] item-tower encodings of the history posts; profile: [B, 2 text_dim]
        (TwoTower.profile), with config.profile_dim."""
        embedded = [table(batch.categorical[:, i]) for i, table in enumerate(self.categoricals)]
        if self.profile_dim:
            assert profile is not None, "this user tower reads the user's profile: pass profile="
            embedded.append(self.profile(profile))
        static = self.static(torch.cat([*embedded, batch.numeric], dim=-1))
        if not self.use_history:
            return static
        tokens = history_items + self.event(batch.hist_action * self.n_recency + batch.hist_recency)
        tokens = torch.cat([self.summary_token.expand(len(tokens), -1, -1), tokens], dim=1)
        tokens = tokens + self.position[: tokens.shape[1]]
        mask = torch.cat([torch.ones_like(batch.hist_mask[:, :1]), batch.hist_mask], dim=1)
        key_bias = torch.zeros(mask.shape, dtype=tokens.dtype).masked_fill(~mask, float("-inf"))
        encoded = tokens
        for layer in self.encoder:
            encoded = layer(encoded, key_bias[:, None, None, :])
        weights = mask.unsqueeze(-1).to(encoded.dtype)
        pooled = (encoded * weights).sum(1) / weights.sum(1)
        user = static + self.fuse(torch.cat([static, pooled], dim=-1))
        if self.like_pool:  # what the last likes say about the next one: their item vectors, decaying
            likes = history_items[:, self.max_history :] * batch.hist_mask[:, self.max_history :, None]
            user = user + self.like_map((likes * self.like_weights[None, :, None]).sum(1))
        return user


class TwoTower(nn.Module):
    """score(user, post) = <UserTower(user, history), ItemTower(post)> + bias, a like logit.

    The post features are buffers, so the model file carries them and item_embeddings() needs no input.
    """

    def __init__(self, config: TwoTowerConfig):
        super().__init__()
        self.config = config
        self.items = ItemTower(config)
        self.users = UserTower(config)
        self.bias = nn.Parameter(torch.zeros(()))
        self.register_buffer("post_text", torch.zeros(config.n_posts, config.text_dim))
        self.register_buffer("post_topic", torch.zeros(config.n_posts, dtype=torch.long))
        self.register_buffer("post_stats", torch.zeros(config.n_posts, config.n_post_stats))
        # (scale, bias) fitted on the validation window: P(like) = sigmoid(scale * logit + bias)
        self.register_buffer("calibration", torch.tensor([1.0, 0.0]))
        if config.exposure_head:
            self.exposure_topic = nn.Embedding(config.n_topics, 8)
            # No bias on the last layer: a constant added to every post changes no softmax and no ranking,
            # so it would get no gradient (and Adam would move it on rounding noise alone).
            self.exposure = nn.Sequential(
                nn.Linear(8 + config.n_post_stats, 32), nn.GELU(), nn.Linear(32, 1, bias=False)
            )
        # What the feed shows a user follows their taste as well (not only what they like): the personal
        # exposure <A u, B v> lets the like logit <u, v> and the ranking score part where they differ.
        self.personal_exposure = config.exposure_head and config.exposure_dim > 0
        if self.personal_exposure:
            self.user_exposure = nn.Linear(config.embed_dim, config.exposure_dim, bias=False)
            self.item_exposure = nn.Linear(config.embed_dim, config.exposure_dim, bias=False)

    def set_post_features(self, text: np.ndarray, topic: np.ndarray, stats: np.ndarray) -> None:
        assert len(text) == len(topic) == len(stats) == self.config.n_posts, "one feature row per post"
        self.post_text.copy_(torch.as_tensor(text, dtype=torch.float32))
        self.post_topic.copy_(torch.as_tensor(topic, dtype=torch.long))
        self.post_stats.copy_(torch.as_tensor(stats, dtype=torch.float32))

    def exposure_scores(
        self, rows: torch.Tensor | None = None, stats: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The ranking's post-only term (log of how often the feed shows the post); zeros without the head.
        stats: the rows' post statistics (default: the model's post_stats)."""
        rows = torch.arange(self.config.n_posts) if rows is None else rows
        return self._exposure(self.post_topic[rows], self.post_stats[rows] if stats is None else stats)

    def _exposure(self, topic: torch.Tensor, stats: torch.Tensor) -> torch.Tensor:
        if not self.config.exposure_head:
            return torch.zeros(len(topic), device=stats.device)
        return self.exposure(torch.cat([self.exposure_topic(topic), stats], dim=-1)).squeeze(-1)

    def ranking_item_matrix(self) -> torch.Tensor:
        """[n_posts, ranking_width]: item embeddings v, the personal exposure's B v, the exposure term.

        ranking score = ranking_item_matrix() @ ranking_user_vector(u) = <u, v> + <A u, B v> + exposure,
        so the recommendation stays one matrix-vector product.
        """
        return self.ranking_rows(self.post_text, self.post_topic, self.post_stats)

    def ranking_rows(self, text: torch.Tensor, topic: torch.Tensor, stats: torch.Tensor) -> torch.Tensor:
        """ranking_item_matrix() for any posts given by their features (text codes, topic, statistics):
        how the service scores posts that appeared after training, and statistics that moved since."""
        return self.ranking_columns(self.items(text, topic, stats), self._exposure(topic, stats))

    def ranking_columns(self, items: torch.Tensor, post_term: torch.Tensor) -> torch.Tensor:
        """Item embeddings [n, d] and a per-post term [n] -> ranking rows [n, ranking_width]."""
        parts = [items, self.item_exposure(items)] if self.personal_exposure else [items]
        return torch.cat([*parts, post_term[:, None]], dim=1)

    def ranking_user_vector(self, users: torch.Tensor) -> torch.Tensor:
        """User embeddings [..., d] -> [..., ranking_width]: [u, A u, 1]."""
        parts = [users, self.user_exposure(users)] if self.personal_exposure else [users]
        return torch.cat([*parts, torch.ones(*users.shape[:-1], 1, device=users.device)], dim=-1)

    def item_embeddings(
        self, rows: torch.Tensor | None = None, stats: torch.Tensor | None = None
    ) -> torch.Tensor:
        """ItemTower output for the given post rows (all posts when None), with their statistics `stats`
        (default: the model's post_stats; training gives each sample's statistics at its own time)."""
        if rows is None:
            rows = torch.arange(self.config.n_posts, device=self.post_text.device)
        stats = self.post_stats[rows] if stats is None else stats
        return self.items(self.post_text[rows], self.post_topic[rows], stats)

    def user_embeddings(self, batch: UserBatch) -> torch.Tensor:
        return self.encode(batch, torch.zeros(0, dtype=torch.long))[0]

    def encode(
        self,
        batch: UserBatch,
        post_rows: torch.Tensor,
        history_items: torch.Tensor | None = None,
        post_stats: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(user embeddings [B, d], item embeddings of post_rows [n, d]): one item-tower pass over the
        distinct posts of the histories and post_rows together, scattered back to [B, H, d] and [n, d].
        With history_items (a table [n_posts, d], e.g. the item tower's output a few steps ago, without
        gradient) the history reads that table and the tower runs over post_rows' posts alone. With
        post_stats ([n, n_post_stats], each post row's statistics at its sample's time) the tower runs
        over post_rows one by one, and over the history's distinct posts with the model's statistics."""
        if post_stats is not None:
            items = self.item_embeddings(post_rows, post_stats)
            if not self.config.use_history:
                return self._users(batch, torch.empty(0)), items
            if history_items is None:
                unique, inverse = torch.unique(batch.hist_post, return_inverse=True)
                return self._users(batch, self.item_embeddings(unique)[inverse]), items
            return self._users(batch, history_items[batch.hist_post]), items
        if not self.config.use_history:
            return self._users(batch, torch.empty(0)), self.item_embeddings(post_rows)
        if history_items is not None:
            unique, inverse = torch.unique(post_rows, return_inverse=True)
            return self._users(batch, history_items[batch.hist_post]), self.item_embeddings(unique)[inverse]
        n_history = batch.hist_post.numel()
        unique, inverse = torch.unique(torch.cat([batch.hist_post.flatten(), post_rows]), return_inverse=True)
        items = self.item_embeddings(unique)[inverse]
        users = self._users(batch, items[:n_history].view(*batch.hist_post.shape, -1))
        return users, items[n_history:]

    def profile(self, batch: UserBatch) -> torch.Tensor | None:
        """[B, 2 text_dim]: the mean text code of the posts each user viewed before the batch's time, and
        of those they liked (zeros where none): the whole history in two vectors, which says more about
        a taste than the last events do (what the feed showed follows taste too). None without it."""
        if not self.config.profile_dim:
            return None
        n, width = len(batch.categorical), self.config.text_dim
        slot = batch.profile_owner * 2 + batch.profile_action
        sums = torch.zeros(2 * n, width, device=self.post_text.device)
        sums.index_add_(0, slot, self.post_text[batch.profile_post])
        counts = torch.bincount(slot, minlength=2 * n).clamp(min=1)
        return (sums / counts[:, None]).view(n, 2 * width)

    def _users(self, batch: UserBatch, history_items: torch.Tensor) -> torch.Tensor:
        return self.users(batch, history_items, self.profile(batch))

    def calibrated(self, logits: torch.Tensor) -> torch.Tensor:
        """Raw like logits (what training fits) -> calibrated ones, whose sigmoid is the like probability;
        monotone (scale > 0), so no ranking changes."""
        return logits * self.calibration[0] + self.calibration[1]

    def forward(self, batch: UserBatch, post_rows: torch.Tensor) -> torch.Tensor:
        """Raw like logits for (user_i, post_i) pairs (calibrated() turns them into probabilities)."""
        users, items = self.encode(batch, post_rows)
        return (users * items).sum(-1) + self.bias


# ----------------------------------------------------------------------------- export


class _OnnxUserTower(nn.Module):
    """UserTower with the batch's fields as separate inputs and the history's item encodings given; its
    output is the ranking user vector (ranking_item_matrix() @ it = the posts' ranking scores)."""

    def __init__(self, model: TwoTower):
        super().__init__()
        self.model = model

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        *fields, history_items, profile = inputs
        return self.model.ranking_user_vector(self.model.users(UserBatch(*fields), history_items, profile))


ONNX_INPUTS = (
    "categorical",
    "numeric",
    "hist_post",
    "hist_action",
    "hist_recency",
    "hist_mask",
    "history_items",
    "profile",
)


def user_tower_onnx(model: TwoTower) -> bytes:
    """The user tower as an ONNX graph (weights inside) for one request: batch 1, the padded history
    window. The service runs it with ONNX Runtime (inference.py); exporting needs the `onnx` package,
    which the pipeline has and the service does not."""
    import io
    import warnings

    config = model.config
    width = config.max_history + config.max_likes
    example = (
        torch.zeros(1, len(config.user_cardinalities), dtype=torch.long),
        torch.zeros(1, config.n_user_numeric),
        *(torch.zeros(1, width, dtype=torch.long) for _ in range(3)),
        torch.zeros(1, width, dtype=torch.bool),
        torch.zeros(1, width, config.embed_dim),
        torch.zeros(1, 2 * config.text_dim),
    )
    graph = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's notes on shapes fixed at batch 1
        torch.onnx.export(
            _OnnxUserTower(model).eval(),
            example,
            graph,
            dynamo=False,
            input_names=list(ONNX_INPUTS),
            output_names=["user"],
            opset_version=17,
        )
    return graph.getvalue()
