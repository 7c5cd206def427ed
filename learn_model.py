"""PyTorch models and their training: the text autoencoder, the two towers, datasets, the training loop
and metrics.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score
from torch import nn
from tqdm import tqdm

from features import (
    LIKE_RATE_PRIOR_VIEWS,
    POST_STAT_NAMES,
    PRIOR_LIKE_RATE,
    RECENCY_BUCKETS,
    Histories,
    Interactions,
    UserFeatures,
    time_features,
)

log = logging.getLogger(__name__)

# --- text autoencoder ---


class Autoencoder(nn.Module):
    """MLP autoencoder of text embeddings: in_dim -> hidden_dim -> code_dim -> hidden_dim -> in_dim.

    The input's per-dimension mean and std are buffers, so `encode` takes raw embeddings and the
    scaling travels with the state_dict. The decoder reconstructs the standardised input.
    """

    def __init__(self, in_dim: int, *, hidden_dim: int = 256, code_dim: int = 128) -> None:
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


def reconstruction_mse(model: Autoencoder, x: torch.Tensor, *, batch_size: int = 4096) -> float:
    """Mean squared error in standardised units, over all rows and dimensions."""
    model.eval()
    total = 0.0
    with torch.inference_mode():
        for start in range(0, len(x), batch_size):
            batch = x[start : start + batch_size]
            total += float(((model(batch) - model.standardise(batch)) ** 2).sum())
    return total / x.numel()


def train_autoencoder(
    embeddings: np.ndarray,
    *,
    code_dim: int = 128,
    hidden_dim: int = 256,
    epochs: int = 30,
    batch_size: int = 256,
    lr: float = 1e-3,
    seed: int = 0,
    progress: bool = True,
) -> tuple[Autoencoder, np.ndarray, float]:
    """Train an autoencoder on embeddings [n, in_dim]; return (model in eval mode, codes [n, code_dim],
    final reconstruction MSE).

    The MSE is in standardised units, where every non-constant input dimension has variance 1, so it
    reads as the fraction of variance left unexplained (0 perfect, 1 no better than the mean); the
    explained variance is logged too. `epochs=0` gives the untrained model, a baseline for the MSE.
    The result depends only on the data and `seed` (on one machine and thread count).
    """
    if embeddings.ndim != 2 or len(embeddings) == 0:
        raise ValueError(f"embeddings must be a non-empty 2-D array [n, dim], got shape {embeddings.shape}")
    if not np.isfinite(embeddings).all():
        raise ValueError("embeddings contain NaN or infinity; check the text embedding step")
    if epochs < 0 or batch_size < 1 or lr <= 0:
        raise ValueError(f"need epochs >= 0, batch_size >= 1 and lr > 0, got {epochs}, {batch_size}, {lr}")
    x = torch.as_tensor(np.ascontiguousarray(embeddings), dtype=torch.float32)

    # fork_rng: seed the initialisation without changing the caller's global torch RNG.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Autoencoder(x.shape[1], hidden_dim=hidden_dim, code_dim=code_dim)
    model.fit_scaling(x)
    shuffle = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)

    with tqdm(range(epochs), desc="autoencoder", unit="epoch", disable=not progress) as bar:
        for _ in bar:
            model.train()
            epoch_loss = 0.0
            for rows in torch.randperm(len(x), generator=shuffle).split(batch_size):
                batch = x[rows]
                loss = nn.functional.mse_loss(model(batch), model.standardise(batch))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                epoch_loss += loss.item() * len(rows)
            bar.set_postfix(loss=f"{epoch_loss / len(x):.4f}")

    model.eval()
    mse = reconstruction_mse(model, x)
    with torch.inference_mode():
        total_variance = float(model.standardise(x).var(dim=0, unbiased=False).mean())
        codes = torch.cat([model.encode(part) for part in x.split(4096)]).numpy()
    explained = 1.0 - mse / total_variance if total_variance > 0 else float("nan")
    log.info(
        "autoencoder %d -> %d: reconstruction MSE %.4f (standardised), explained variance %.1f%%",
        x.shape[1],
        code_dim,
        mse,
        100 * explained,
    )
    return model, codes.astype(np.float32, copy=False), mse


# --- two-tower model ---


@dataclass
class TwoTowerConfig:
    """Everything needed to rebuild the network; saved in the model file beside the weights."""

    n_posts: int
    n_topics: int
    user_cardinalities: list[int]  # vocabulary sizes of features.USER_CATEGORICALS, in order
    text_dim: int = 128
    n_post_stats: int = len(POST_STAT_NAMES)
    n_user_numeric: int = 8  # age, 4 request-time features, log events, log likes, like rate (before t)
    embed_dim: int = 64
    hidden_dim: int = 256
    category_dim: int = 16
    max_history: int = 16  # recent events (views and likes) the transformer reads
    max_likes: int = 8  # and the user's last likes, however old: the long-term taste
    n_layers: int = 1
    n_heads: int = 1  # 2 heads: the same quality on the small demo, ~4% slower training
    ff_dim: int = 128
    dropout: float = 0.0  # MLP dropout: masks cost ~12% of a CPU step; without, the demo scores the same
    n_recency: int = len(RECENCY_BUCKETS) + 1
    use_history: bool = True
    use_text: bool = True
    exposure_head: bool = False  # a per-post "how often is it shown" term, added to the ranking score


@dataclass
class UserBatch:
    """User-tower inputs for a batch of (user, request time) pairs."""

    categorical: torch.Tensor  # int64 [B, n_categoricals]
    numeric: torch.Tensor  # float32 [B, n_user_numeric]
    hist_post: torch.Tensor  # int64 [B, H] post rows
    hist_action: torch.Tensor  # int64 [B, H]
    hist_recency: torch.Tensor  # int64 [B, H]
    hist_mask: torch.Tensor  # bool [B, H], True = a real event


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
    n_events, n_likes = histories.counts_before(user_rows, times)
    like_rate = (n_likes + LIKE_RATE_PRIOR_VIEWS * PRIOR_LIKE_RATE) / (
        n_events - n_likes + LIKE_RATE_PRIOR_VIEWS
    )
    numeric = np.concatenate(
        [
            users.numeric[user_rows],
            time_features(times),
            np.stack([np.log1p(n_events) / 5.0, np.log1p(n_likes) / 3.0, like_rate * 5.0], axis=1),
        ],
        axis=1,
        dtype=np.float32,
    )
    return UserBatch(
        torch.from_numpy(users.categorical[user_rows]),
        torch.from_numpy(numeric),
        torch.from_numpy(posts),
        torch.from_numpy(actions),
        torch.from_numpy(recency),
        torch.from_numpy(mask),
    )


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

    The computation of nn.TransformerEncoderLayer(norm_first=True, dropout=0, activation=relu). At ~25
    tokens on CPU, nn.MultiheadAttention spends much of a training step zero-filling and transposing
    gradients and in a flash-attention kernel made for long sequences; separate q/k/v projections also
    spare the backward pass a concatenation. Full-data training step, one process, alternating: 166 ms
    with torch's layer, 136 ms with this one (README, Performance).
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
        self.static = mlp(static_in, config.hidden_dim, config.embed_dim, config.dropout)
        d = config.embed_dim
        self.n_recency = config.n_recency
        self.event = nn.Embedding(2 * config.n_recency, d)  # (action, recency bucket) pairs: one lookup
        self.position = nn.Parameter(torch.zeros(config.max_history + config.max_likes + 1, d))
        self.summary_token = nn.Parameter(torch.zeros(1, 1, d))  # keeps an empty history well defined
        self.encoder = nn.ModuleList(
            HistoryEncoderLayer(d, config.n_heads, config.ff_dim) for _ in range(config.n_layers)
        )
        self.fuse = nn.Sequential(nn.Linear(2 * d, d), nn.GELU(), nn.Linear(d, d))

    def forward(self, batch: UserBatch, history_items: torch.Tensor) -> torch.Tensor:
        """history_items: [B, H, d] item-tower encodings of the history posts."""
        embedded = [table(batch.categorical[:, i]) for i, table in enumerate(self.categoricals)]
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
        return static + self.fuse(torch.cat([static, pooled], dim=-1))


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
        if config.exposure_head:
            self.exposure_topic = nn.Embedding(config.n_topics, 8)
            self.exposure = nn.Sequential(nn.Linear(8 + config.n_post_stats, 32), nn.GELU(), nn.Linear(32, 1))

    def set_post_features(self, text: np.ndarray, topic: np.ndarray, stats: np.ndarray) -> None:
        assert len(text) == len(topic) == len(stats) == self.config.n_posts, "one feature row per post"
        self.post_text.copy_(torch.as_tensor(text, dtype=torch.float32))
        self.post_topic.copy_(torch.as_tensor(topic, dtype=torch.long))
        self.post_stats.copy_(torch.as_tensor(stats, dtype=torch.float32))

    def exposure_scores(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """The ranking's post-only term (log of how often the feed shows the post); zeros without the head."""
        rows = torch.arange(self.config.n_posts) if rows is None else rows
        if not self.config.exposure_head:
            return torch.zeros(len(rows))
        inputs = torch.cat([self.exposure_topic(self.post_topic[rows]), self.post_stats[rows]], dim=-1)
        return self.exposure(inputs).squeeze(-1)

    def ranking_item_matrix(self) -> torch.Tensor:
        """[n_posts, embed_dim + 1]: item embeddings with the exposure term as a last column.

        ranking score = ranking_item_matrix() @ ranking_user_vector(u) = <u, v> + exposure, so the
        recommendation stays one matrix-vector product.
        """
        return torch.cat([self.item_embeddings(), self.exposure_scores()[:, None]], dim=1)

    @staticmethod
    def ranking_user_vector(users: torch.Tensor) -> torch.Tensor:
        return torch.cat([users, torch.ones(*users.shape[:-1], 1)], dim=-1)

    def item_embeddings(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """ItemTower output for the given post rows (all posts when None)."""
        if rows is None:
            return self.items(self.post_text, self.post_topic, self.post_stats)
        return self.items(self.post_text[rows], self.post_topic[rows], self.post_stats[rows])

    def user_embeddings(self, batch: UserBatch) -> torch.Tensor:
        return self.encode(batch, torch.zeros(0, dtype=torch.long))[0]

    def encode(self, batch: UserBatch, post_rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(user embeddings [B, d], item embeddings of post_rows [n, d]): one item-tower pass over the
        distinct posts of the histories and post_rows together, scattered back to [B, H, d] and [n, d]."""
        if not self.config.use_history:
            return self.users(batch, torch.empty(0)), self.item_embeddings(post_rows)
        n_history = batch.hist_post.numel()
        unique, inverse = torch.unique(torch.cat([batch.hist_post.flatten(), post_rows]), return_inverse=True)
        items = self.item_embeddings(unique)[inverse]
        users = self.users(batch, items[:n_history].view(*batch.hist_post.shape, -1))
        return users, items[n_history:]

    def forward(self, batch: UserBatch, post_rows: torch.Tensor) -> torch.Tensor:
        """Like logits for (user_i, post_i) pairs."""
        users, items = self.encode(batch, post_rows)
        return (users * items).sum(-1) + self.bias


# --- training ---


def bce_loss(model: TwoTower, batch: UserBatch, posts: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The seed's objective: pointwise binary cross-entropy on views and their like targets."""
    return F.binary_cross_entropy_with_logits(model(batch, posts), labels)


def sampled_softmax_loss(
    model: TwoTower, batch: UserBatch, posts: torch.Tensor, log_q: torch.Tensor
) -> torch.Tensor:
    """In-batch softmax over liked posts: the other rows' posts are the negatives.

    logQ correction subtracts each post's log sampling frequency (popular posts are over-represented as
    negatives); accidental hits (the same post as another row's positive) are masked out.
    """
    users, items = model.encode(batch, posts)
    logits = users @ items.T + (model.exposure_scores(posts) - log_q[posts])[None, :]
    same_post = posts[None, :] == posts[:, None]
    logits = logits.masked_fill(same_post & ~torch.eye(len(posts), dtype=torch.bool), float("-inf"))
    return F.cross_entropy(logits, torch.arange(len(posts)))


def joint_loss(
    model: TwoTower,
    batch: UserBatch,
    posts: torch.Tensor,
    labels: torch.Tensor,
    log_q: torch.Tensor,
    *,
    softmax_weight: float = 1.0,
) -> torch.Tensor:
    """BCE on a batch of views plus an in-batch softmax for its liked views, from one forward pass.

    The softmax rows are the liked views; its candidates are all posts of the batch, which were sampled
    in proportion to how often they are viewed (log_q: the posts' log view frequency, the logQ
    correction). Ranking scores add the exposure term; accidental hits (another column showing the
    row's own post) are masked out.
    """
    users, items = model.encode(batch, posts)
    bce = F.binary_cross_entropy_with_logits((users * items).sum(-1) + model.bias, labels)
    liked = torch.nonzero(labels > 0.5).squeeze(-1)
    if len(liked) == 0:
        return bce
    scores = users[liked] @ items.T + (model.exposure_scores(posts) - log_q[posts])[None, :]
    same_post = posts[None, :] == posts[liked][:, None]
    own_column = torch.zeros_like(same_post)
    own_column[torch.arange(len(liked)), liked] = True
    scores = scores.masked_fill(same_post & ~own_column, float("-inf"))
    return bce + softmax_weight * F.cross_entropy(scores, liked)


def post_log_frequency(post_rows: np.ndarray, n_posts: int) -> torch.Tensor:
    counts = np.bincount(post_rows, minlength=n_posts).astype(np.float64) + 1.0
    return torch.from_numpy(np.log(counts / counts.sum())).float()


@torch.inference_mode()
def predict(
    model: TwoTower,
    users: UserFeatures,
    histories: Histories,
    samples: Interactions,
    *,
    batch_size: int = 4096,
) -> np.ndarray:
    """Like logits for every sample (eval mode)."""
    model.eval()
    out = np.empty(len(samples), dtype=np.float32)
    for start in range(0, len(samples), batch_size):
        part = slice(start, start + batch_size)
        batch = make_user_batch(users, histories, samples.user_rows[part], samples.times[part], model.config)
        out[part] = model(batch, torch.from_numpy(samples.post_rows[part])).numpy()
    return out


def pointwise_metrics(labels: np.ndarray, logits: np.ndarray) -> dict[str, float]:
    """ROC-AUC, accuracy at p=0.5 and log-loss of like logits against 0/1 labels."""
    labels = np.asarray(labels, dtype=np.float64)
    probability = np.clip(1.0 / (1.0 + np.exp(-np.asarray(logits, dtype=np.float64))), 1e-7, 1 - 1e-7)
    has_both = 0 < labels.sum() < len(labels)
    return {
        "roc_auc": float(roc_auc_score(labels, logits)) if has_both else float("nan"),
        "accuracy": float(((probability >= 0.5) == (labels >= 0.5)).mean()),
        "log_loss": float(-(labels * np.log(probability) + (1 - labels) * np.log(1 - probability)).mean()),
    }


OBJECTIVES = ("bce", "softmax", "joint")


def _batches(n: int, batch_size: int, rng: np.random.Generator):
    """Endless shuffled index batches over range(n) (a fresh permutation per pass)."""
    while True:
        order = rng.permutation(n)
        for start in range(0, n - batch_size + 1, batch_size):
            yield order[start : start + batch_size]


def train_two_tower(
    model: TwoTower,
    *,
    users: UserFeatures,
    histories: Histories,
    views: Interactions | None = None,
    likes: Interactions | None = None,
    monitor_train: Interactions | None = None,
    monitor_test: Interactions | None = None,
    objective: str = "bce",
    epochs: int = 6,
    batch_size: int = 1024,
    lr: float = 2e-3,
    weight_decay: float = 1e-5,
    softmax_weight: float = 1.0,
    seed: int = 0,
    progress: bool = True,
) -> list[dict[str, float]]:
    """Train in place; returns one row per epoch (loss, speed, train/test pointwise metrics).

    objective "bce": pointwise on `views` (with their like targets), an epoch is a pass over them.
    "softmax": in-batch sampled softmax on `likes`, an epoch is a pass over them.
    "joint": both losses on each batch of views (joint_loss), an epoch is a pass over the views; the
    ranking score then adds the model's exposure term (TwoTowerConfig.exposure_head).
    monitor_train / monitor_test are views whose ROC-AUC, accuracy and log-loss are logged each epoch.
    """
    assert objective in OBJECTIVES, f"unknown objective {objective!r}, expected one of {OBJECTIVES}"
    uses_views, uses_likes = objective in ("bce", "joint"), objective == "softmax"
    assert not uses_views or (views is not None and len(views) > 0), f"objective {objective!r} needs views"
    assert not uses_likes or (likes is not None and len(likes) >= batch_size), (
        f"objective {objective!r} needs at least batch_size={batch_size} likes"
    )
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    main = views if uses_views else likes
    steps_per_epoch = max(len(main) // batch_size, 1)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=lr, total_steps=epochs * steps_per_epoch, pct_start=0.1
    )
    if uses_likes:
        log_q = post_log_frequency(likes.post_rows, model.config.n_posts)
    else:
        log_q = post_log_frequency(views.post_rows, model.config.n_posts)
    view_batches = _batches(len(views), min(batch_size, len(views)), rng) if uses_views else None
    like_batches = _batches(len(likes), batch_size, rng) if uses_likes else None
    history: list[dict[str, float]] = []
    for epoch in range(1, epochs + 1):
        model.train()
        started, total_loss = time.perf_counter(), 0.0
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch}/{epochs}", disable=not progress, leave=False)
        for step in bar:
            loss = torch.zeros(())
            if view_batches is not None:
                part = views.subset(next(view_batches))
                batch = make_user_batch(users, histories, part.user_rows, part.times, model.config)
                posts, labels = torch.from_numpy(part.post_rows), torch.from_numpy(part.labels)
                if objective == "joint":
                    loss = loss + joint_loss(
                        model, batch, posts, labels, log_q, softmax_weight=softmax_weight
                    )
                else:
                    loss = loss + bce_loss(model, batch, posts, labels)
            if like_batches is not None:
                part = likes.subset(next(like_batches))
                batch = make_user_batch(users, histories, part.user_rows, part.times, model.config)
                loss = loss + softmax_weight * sampled_softmax_loss(
                    model, batch, torch.from_numpy(part.post_rows), log_q
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            optimizer.step()
            scheduler.step()
            total_loss += loss.item()
            if step % 20 == 0:
                bar.set_postfix(loss=f"{total_loss / (step + 1):.4f}")
        seconds = time.perf_counter() - started
        row = {
            "epoch": epoch,
            "loss": total_loss / steps_per_epoch,
            "seconds": seconds,
            "samples_per_s": steps_per_epoch * batch_size / seconds,
        }
        for name, samples in (("train", monitor_train), ("test", monitor_test)):
            if samples is not None and len(samples):
                logits = predict(model, users, histories, samples)
                row |= {
                    f"{name}_{key}": value for key, value in pointwise_metrics(samples.labels, logits).items()
                }
        history.append(row)
        if progress:
            shown = ", ".join(f"{k}={v:.4f}" for k, v in row.items() if k not in ("epoch",))
            tqdm.write(f"epoch {epoch}/{epochs}: {shown}")
    model.eval()
    return history
