"""Training the networks of model.py: the text autoencoder, the two-tower losses and training loop, the
pointwise metrics the loop monitors. The service never imports this module.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score
from torch import nn
from tqdm import tqdm

from features import Histories, Interactions, UserFeatures
from model import Autoencoder, TwoTower, UserBatch, make_user_batch
from settings import OBJECTIVES

log = logging.getLogger(__name__)

# ----------------------------------------------------------------------------- text autoencoder


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
    code_dim: int,
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


# ----------------------------------------------------------------------------- two towers


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
    objective: str,
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int,
    weight_decay: float = 1e-5,
    softmax_weight: float = 1.0,
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
