"""Training the networks of model.py: the text autoencoder, the two-tower losses and training loop, the
pointwise metrics the loop monitors. The service never imports this module.

Under torchrun (several processes, torch.distributed initialised) the loop is DistributedDataParallel:
every rank draws the same global batches (one seed) and takes its share of each; the in-batch softmax
gathers every rank's item vectors (torch.distributed.nn.functional.all_gather, which carries gradients
back), so its negatives are the whole global batch; each loss is scaled so that the ranks' averaged
gradients equal the gradient of one process on the whole batch (a test holds them equal).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
import torch.nn.functional as F
from scipy.special import expit
from sklearn.metrics import roc_auc_score
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from features import Dataset, Interactions, NotEnoughDataError, UserFeatures
from histories import Histories
from model import Autoencoder, TwoTower, UserBatch, make_user_batch
from settings import OBJECTIVES, Settings
from times import DAY_SECONDS

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
    with one_thread():  # batches of 256 x 384: a second thread's sync costs more than it brings
        return _train_autoencoder(x, code_dim, hidden_dim, epochs, batch_size, lr, seed, progress)


@contextmanager
def one_thread() -> Iterator[None]:
    """torch's intra-op pool at one thread inside the block (restored after it)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _train_autoencoder(
    x: torch.Tensor,
    code_dim: int,
    hidden_dim: int,
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int,
    progress: bool,
) -> tuple[Autoencoder, np.ndarray, float]:
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


def world() -> tuple[int, int]:
    """(rank, number of ranks) of this training process: (0, 1) unless torchrun started several."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_columns(
    items: torch.Tensor, exposure: torch.Tensor, posts: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """(every rank's item vectors, their exposure terms, their post rows, where this rank's start): the
    in-batch softmax's columns. The vectors and terms keep their gradients back to the rank that
    computed them."""
    rank, size = world()
    if size == 1:
        return items, exposure, posts, 0
    columns = torch.cat(dist_nn.all_gather(torch.cat([items, exposure[:, None]], dim=1)))
    gathered = [torch.empty_like(posts) for _ in range(size)]
    dist.all_gather(gathered, posts)
    return columns[:, :-1], columns[:, -1], torch.cat(gathered), rank * len(posts)


def softmax_scale(n_rows: int, device: torch.device) -> float:
    """Turns a sum of cross-entropies over this rank's rows into its share of the global mean: with
    DDP's average over ranks, the gradient is that of one process over every rank's rows."""
    _, size = world()
    total = torch.tensor(float(n_rows), device=device)  # NCCL reduces CUDA tensors only
    if size > 1:
        dist.all_reduce(total)
    return size / max(float(total), 1.0)


def bce_loss(
    model: TwoTower,
    batch: UserBatch,
    posts: torch.Tensor,
    labels: torch.Tensor,
    history_items: torch.Tensor | None = None,
    post_stats: torch.Tensor | None = None,
) -> torch.Tensor:
    """The original project's objective: pointwise binary cross-entropy on views and their like targets."""
    users, items = model.encode(batch, posts, history_items, post_stats)
    return F.binary_cross_entropy_with_logits((users * items).sum(-1) + model.bias, labels)


def sampled_softmax_loss(
    model: TwoTower,
    batch: UserBatch,
    posts: torch.Tensor,
    log_q: torch.Tensor,
    history_items: torch.Tensor | None = None,
    post_stats: torch.Tensor | None = None,
) -> torch.Tensor:
    """In-batch softmax over liked posts: the other rows' posts are the negatives.

    logQ correction subtracts each post's log sampling frequency (popular posts are over-represented as
    negatives); accidental hits (the same post as another row's positive) are masked out.
    """
    users, items = model.encode(batch, posts, history_items, post_stats)
    exposure = model.exposure_scores(posts, post_stats)
    columns, column_exposure, column_posts, offset = gather_columns(items, exposure, posts)
    post_term = column_exposure - log_q[column_posts]
    logits = model.ranking_user_vector(users) @ model.ranking_columns(columns, post_term).T
    own = offset + torch.arange(len(posts), device=posts.device)
    return in_batch_cross_entropy(logits, posts, own, column_posts) * softmax_scale(len(posts), posts.device)


def in_batch_cross_entropy(
    scores: torch.Tensor, row_posts: torch.Tensor, own: torch.Tensor, column_posts: torch.Tensor
) -> torch.Tensor:
    """Summed cross-entropy of each row's own column (`own`) against the other columns, accidental hits
    (another column showing the row's own post) masked out."""
    columns = torch.arange(len(column_posts), device=scores.device)
    hits = (column_posts[None, :] == row_posts[:, None]) & (columns[None, :] != own[:, None])
    return F.cross_entropy(scores.masked_fill(hits, float("-inf")), own, reduction="sum")


def joint_loss(
    model: TwoTower,
    batch: UserBatch,
    posts: torch.Tensor,
    labels: torch.Tensor,
    log_q: torch.Tensor,
    history_items: torch.Tensor | None = None,
    post_stats: torch.Tensor | None = None,
    *,
    softmax_weight: float = 1.0,
    exposure_weight: float = 1.0,
) -> torch.Tensor:
    """BCE on a batch of views plus an in-batch softmax for its liked views, from one forward pass.

    The softmax rows are the liked views; its candidates are all posts of the batch, which were sampled
    in proportion to how often they are viewed (log_q: the posts' log view frequency, the logQ
    correction). Ranking scores add the exposure term; accidental hits (another column showing the
    row's own post) are masked out. post_stats: each view's post statistics at its time (default: the
    model's).
    """
    users, items = model.encode(batch, posts, history_items, post_stats)
    bce = F.binary_cross_entropy_with_logits((users * items).sum(-1) + model.bias, labels)
    exposure = model.exposure_scores(posts, post_stats)
    # every rank gathers, liked rows or not
    columns, column_exposure, column_posts, offset = gather_columns(items, exposure, posts)
    liked = torch.nonzero(labels > 0.5).squeeze(-1)
    post_term = column_exposure - log_q[column_posts]
    scores = model.ranking_user_vector(users[liked]) @ model.ranking_columns(columns, post_term).T
    softmax = in_batch_cross_entropy(scores, posts[liked], offset + liked, column_posts)
    loss = bce + softmax_weight * softmax * softmax_scale(len(liked), posts.device)
    if exposure_weight > 0:  # what was shown: every view is a positive of the exposure terms alone
        shown = post_term[None, :].expand(len(posts), -1)
        if model.personal_exposure:
            shown = shown + model.user_exposure(users) @ model.item_exposure(columns).T
        own = offset + torch.arange(len(posts), device=posts.device)
        exposure_loss = in_batch_cross_entropy(shown, posts, own, column_posts)
        loss = loss + exposure_weight * exposure_loss * softmax_scale(len(posts), posts.device)
    return loss


def post_log_frequency(post_rows: np.ndarray, n_posts: int) -> torch.Tensor:
    counts = np.bincount(post_rows, minlength=n_posts).astype(np.float64) + 1.0
    return torch.from_numpy(np.log(counts / counts.sum())).float()


class TrainingStep(nn.Module):
    """One step's loss as a module's forward, so that DistributedDataParallel can wrap it: DDP syncs the
    gradients of what its forward used."""

    def __init__(self, model: TwoTower, objective: str, log_q: torch.Tensor, softmax_weight: float):
        super().__init__()
        self.model, self.objective, self.softmax_weight = model, objective, softmax_weight
        self.register_buffer("log_q", log_q)

    def forward(
        self,
        batch: UserBatch,
        posts: torch.Tensor,
        labels: torch.Tensor,
        history_items: torch.Tensor | None = None,
        post_stats: torch.Tensor | None = None,
    ) -> torch.Tensor:
        model, log_q = self.model, self.log_q
        if self.objective == "joint":
            return joint_loss(
                model,
                batch,
                posts,
                labels,
                log_q,
                history_items,
                post_stats,
                softmax_weight=self.softmax_weight,
            )
        if self.objective == "bce":
            return bce_loss(model, batch, posts, labels, history_items, post_stats)
        return self.softmax_weight * sampled_softmax_loss(
            model, batch, posts, log_q, history_items, post_stats
        )


def to_device(batch: UserBatch, device: torch.device) -> UserBatch:
    return UserBatch(*(getattr(batch, f.name).to(device) for f in dataclasses.fields(batch)))


@torch.inference_mode()
def predict(
    model: TwoTower,
    users: UserFeatures,
    histories: Histories,
    samples: Interactions,
    *,
    batch_size: int = 4096,
) -> np.ndarray:
    """Calibrated like logits for every sample (eval mode): sigmoid of them is the like probability."""
    model.eval()
    device = model.bias.device
    out = np.empty(len(samples), dtype=np.float32)
    for start in range(0, len(samples), batch_size):
        part = slice(start, start + batch_size)
        batch = make_user_batch(users, histories, samples.user_rows[part], samples.times[part], model.config)
        posts = torch.from_numpy(samples.post_rows[part]).to(device)
        out[part] = model.calibrated(model(to_device(batch, device), posts)).cpu().numpy()
    return out


ECE_BINS = 15


def expected_calibration_error(labels: np.ndarray, probability: np.ndarray, *, bins: int = ECE_BINS) -> float:
    """Sum over equal-width probability bins of (share of samples) x |mean probability - like rate|."""
    if len(labels) == 0:
        return float("nan")
    which = np.minimum((probability * bins).astype(np.int64), bins - 1)
    gap = np.bincount(which, weights=probability - labels, minlength=bins)  # sum of (p - y) per bin
    return float(np.abs(gap).sum() / max(len(labels), 1))


def pointwise_metrics(labels: np.ndarray, logits: np.ndarray) -> dict[str, float]:
    """ROC-AUC, accuracy at p=0.5, log-loss and expected calibration error of like logits against 0/1
    labels."""
    labels = np.asarray(labels, dtype=np.float64)
    probability = np.clip(1.0 / (1.0 + np.exp(-np.asarray(logits, dtype=np.float64))), 1e-7, 1 - 1e-7)
    has_both = 0 < labels.sum() < len(labels)
    return {
        "roc_auc": float(roc_auc_score(labels, logits)) if has_both else float("nan"),
        "accuracy": float(((probability >= 0.5) == (labels >= 0.5)).mean()),
        "log_loss": float(-(labels * np.log(probability) + (1 - labels) * np.log(1 - probability)).mean()),
        "ece": expected_calibration_error(labels, probability),
    }


def fit_calibration(logits: np.ndarray, labels: np.ndarray, *, iterations: int = 100) -> tuple[float, float]:
    """(scale, bias) minimising the log-loss of sigmoid(scale * logit + bias): Platt scaling, by Newton's
    method with step halving on the two parameters (a convex problem), on the standardised scores.
    Fitted on the validation window, it turns any score into a probability without changing a ranking
    (a score that does not rise with the like rate gets a tiny scale and the mean rate as its bias)."""
    x = np.asarray(logits, dtype=np.float64)
    y = np.asarray(labels, dtype=np.float64)
    assert len(x) == len(y), f"{len(x)} scores for {len(y)} labels"
    if not 0 < y.sum() < len(y):  # nothing to fit (no view, or only one label): leave the scores as they are
        log.warning("calibration skipped: the validation views hold %d likes of %d", int(y.sum()), len(y))
        return 1.0, 0.0
    mean, std = x.mean(), x.std() or 1.0
    design = np.stack([(x - mean) / std, np.ones_like(x)], axis=1)

    def loss(theta: np.ndarray) -> float:
        z = design @ theta
        return float(np.mean(np.logaddexp(0.0, z) - y * z))

    rate = y.mean()
    theta = np.array([0.0, np.log(rate / (1 - rate))])
    current = loss(theta)
    for _ in range(iterations):
        p = expit(design @ theta)
        gradient = design.T @ (p - y) / len(y)
        hessian = (design * (p * (1 - p))[:, None]).T @ design / len(y) + 1e-12 * np.eye(2)
        step = np.linalg.solve(hessian, gradient)
        while loss(theta - step) > current and np.abs(step).max() > 1e-12:
            step /= 2
        theta, previous, current = theta - step, current, loss(theta - step)
        if previous - current < 1e-12:
            break
    if theta[0] <= 0:  # keep the order of the scores (a ranking never flips): the mean rate for all
        return 1e-9 / std, float(np.log(rate / (1 - rate))) - 1e-9 * mean / std
    return float(theta[0]) / std, float(theta[1]) - float(theta[0]) * mean / std


def sample_post_stats(stats_by_day: tuple[int, np.ndarray], samples: Interactions) -> np.ndarray:
    """[n, n_post_stats]: each sample's post statistics at the start of its day, from (day0, table) of
    features.Dataset.post_stats_by_day (samples past the table read its last day)."""
    day0, table = stats_by_day
    day = np.clip((samples.times - day0) // DAY_SECONDS, 0, len(table) - 1)
    return table[day, samples.post_rows]


def _batches(n: int, batch_size: int, rng: np.random.Generator):
    """Endless shuffled index batches over range(n) (a fresh permutation per pass); under torchrun every
    rank draws the same batch (one seed) and keeps its share of it."""
    rank, size = world()
    while True:
        order = rng.permutation(n)
        for start in range(0, n - batch_size + 1, batch_size):
            yield order[start : start + batch_size][rank::size]


# What `validate` (evaluate.validation_score, as main_script passes it) measures: named in the console
# line, the log and the history plot, so that "validation=0.13" says which metric chose the epoch.
# what early stopping maximises, by the ranking the service serves (evaluate.validation_score)
VALIDATION_LABELS = {"likes": "validation minus like log-loss", "logged": "validation NDCG@10"}
MIN_BATCH = 32  # fewer rows per step: the in-batch softmax has almost no negatives, the gradient is noise
MIN_STEPS = 4  # steps per epoch a fitted batch size leaves at least (when the data allows MIN_BATCH)


def fit_batch_size(batch_size: int, n_rows: int, *, ranks: int = 1, what: str = "views") -> int:
    """BATCH_SIZE, or when the training window holds fewer rows than that, the largest power of two that
    leaves MIN_STEPS steps an epoch (at least MIN_BATCH), divisible among the ranks; logged. Fewer than
    MIN_BATCH rows per rank: NotEnoughDataError naming the minimum."""
    if n_rows >= batch_size:
        return batch_size
    minimum = MIN_BATCH * ranks
    if n_rows < minimum:
        raise NotEnoughDataError(
            f"the training window holds {n_rows} {what}, at least {minimum} are needed: import more feed "
            "rows, or lower TEST_DAYS / VAL_DAYS to leave more of the feed for training"
        )
    fitted = max(1 << max((n_rows // MIN_STEPS).bit_length() - 1, 0), minimum)
    fitted -= fitted % ranks
    log.warning(
        "BATCH_SIZE=%d is more than the training window's %d %s: training with batches of %d "
        "(%d steps an epoch); set BATCH_SIZE to choose",
        batch_size,
        n_rows,
        what,
        fitted,
        n_rows // fitted,
    )
    return fitted


@dataclass(frozen=True)
class TrainConfig:
    """How the two towers are trained (model.TwoTowerConfig says what the network is). Built once from
    the settings (from_settings); tests and benches build it with tiny sizes."""

    objective: str = "joint"  # bce | softmax | joint (settings.OBJECTIVES)
    epochs: int = 6
    batch_size: int = 1024  # the global batch: each of N torchrun ranks trains on 1/N
    lr: float = 2e-3
    seed: int = 0
    device: str = "cpu"  # a torch device; main_script.training_device resolves the DEVICE setting
    history_items_every: int = 50  # > 0: histories read item encodings recomputed every N steps
    per_day_stats: bool = True  # each sample reads its post's statistics at the start of its day
    weight_decay: float = 0.1  # AdamW's decoupled weight decay (settings.weight_decay)
    softmax_weight: float = 1.0
    monitor_train: int = 20_000  # training views whose pointwise metrics are logged each epoch
    monitor_val: int = 50_000  # validation views, likewise
    validation_label: str = VALIDATION_LABELS["likes"]  # what `validate` scores, for the log and the plot

    @classmethod
    def from_settings(cls, settings: Settings, **changes: Any) -> TrainConfig:
        """The settings' training values, with `changes` (e.g. device=) on top."""
        values = {
            "objective": settings.objective,
            "epochs": settings.epochs,
            "batch_size": settings.batch_size,
            "lr": settings.learning_rate,
            "seed": settings.seed,
            "history_items_every": settings.history_items_every,
            "weight_decay": settings.weight_decay,
            "validation_label": VALIDATION_LABELS[settings.ranking],
        }
        return cls(**(values | changes))


def _optimisation(
    model: TwoTower, config: TrainConfig, main: Interactions, steps_per_epoch: int
) -> tuple[nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """(the loss as a module, DDP-wrapped under torchrun; AdamW; the one-cycle schedule)."""
    log_q = post_log_frequency(main.post_rows, model.config.n_posts)
    step = TrainingStep(model, config.objective, log_q, config.softmax_weight).to(config.device)
    # joint uses every parameter; softmax leaves the BCE bias out, bce the exposure head (when there is one):
    # DDP must then look for the unused ones rather than wait for their gradients
    unused = config.objective != "joint"
    loss_of = DistributedDataParallel(step, find_unused_parameters=unused) if world()[1] > 1 else step
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=config.lr, total_steps=config.epochs * steps_per_epoch, pct_start=0.1
    )
    return loss_of, optimizer, scheduler


def _monitored(
    model: TwoTower, data: Dataset, monitors: tuple[tuple[str, Interactions | None], ...]
) -> dict[str, float]:
    """The pointwise metrics of the monitored views, as "{train|val}_{metric}"."""
    row = {}
    for name, samples in monitors:
        if samples is not None and len(samples):
            logits = predict(model, data.users, data.histories, samples)
            row |= {
                f"{name}_{key}": value for key, value in pointwise_metrics(samples.labels, logits).items()
            }
    return row


def train_two_tower(
    model: TwoTower,
    data: Dataset,
    config: TrainConfig,
    *,
    validate: Callable[[TwoTower], float] | None = None,
    progress: bool = True,
) -> list[dict[str, float]]:
    """Train in place on config.device; returns one row per epoch (loss, speed, train/val pointwise
    metrics). The model ends on the CPU, in eval mode, with the weights of its best epoch by `validate`.

    objective "bce": pointwise on the training views (with their like targets), an epoch is a pass over
    them. "softmax": in-batch sampled softmax on the liked views, an epoch is a pass over them. "joint":
    both losses on each batch of views (joint_loss), an epoch is a pass over the views; the ranking score
    then adds the model's exposure term (TwoTowerConfig.exposure_head).
    config.monitor_train / monitor_val views (samples of the training and validation windows) have their
    ROC-AUC, accuracy and log-loss logged each epoch (by rank 0 alone under torchrun). validate(model)
    scores the model on the validation window after each epoch (higher is better, logged as
    "validation"); the weights of the best epoch are kept (early stopping; rank 0 alone, which writes
    the model file).
    history_items_every > 0: the histories read the item tower's output for every post, computed
    without gradient every that many steps, and the tower runs on the batch's targets alone (faster;
    0: the history's posts go through the tower, with gradient, at every step).
    per_day_stats: each sample's post statistics are those before the start of its day
    (features.Dataset.post_stats_by_day), so the item tower and the exposure term learn from the
    popularity of the moment, as they are used; else every sample reads the model's post_stats.
    """
    objective, epochs, batch_size, seed = config.objective, config.epochs, config.batch_size, config.seed
    users, histories = data.users, data.histories
    views, likes = data.train_views, data.train_likes
    monitors = (
        ("train", views.sample(config.monitor_train, seed=seed) if config.monitor_train else None),
        ("val", data.val_views.sample(config.monitor_val, seed=seed) if config.monitor_val else None),
    )
    stats_by_day = (data.start, data.post_stats_by_day(data.val_cutoff)) if config.per_day_stats else None
    assert objective in OBJECTIVES, f"unknown objective {objective!r}, expected one of {OBJECTIVES}"
    rank, size = world()
    assert batch_size % size == 0, f"batch_size {batch_size} must divide among the {size} ranks"
    uses_views = objective in ("bce", "joint")
    main = views if uses_views else likes
    what = f"{'views' if uses_views else 'liked views'} (OBJECTIVE={objective})"
    batch_size = fit_batch_size(batch_size, 0 if main is None else len(main), ranks=size, what=what)
    device = torch.device(config.device)
    torch.manual_seed(seed)
    model.to(device)
    steps_per_epoch = len(main) // batch_size  # the same on every rank: the schedule counts global steps
    loss_of, optimizer, scheduler = _optimisation(model, config, main, steps_per_epoch)
    batches = _batches(len(main), batch_size, np.random.default_rng(seed))
    history: list[dict[str, float]] = []
    history_items = None
    best_score, best_state = -float("inf"), None
    for epoch in range(1, epochs + 1):
        model.train()
        started, total_loss = time.perf_counter(), 0.0
        show = progress and rank == 0
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch}/{epochs}", disable=not show, leave=False)
        for step_number in bar:
            if config.history_items_every and step_number % config.history_items_every == 0:
                with torch.no_grad():
                    history_items = model.item_embeddings()
            part = main.subset(next(batches))
            batch = to_device(
                make_user_batch(users, histories, part.user_rows, part.times, model.config), device
            )
            posts, labels = (torch.from_numpy(a).to(device) for a in (part.post_rows, part.labels))
            post_stats = None
            if stats_by_day is not None:
                post_stats = torch.from_numpy(sample_post_stats(stats_by_day, part)).to(device)
            loss = loss_of(batch, posts, labels, history_items, post_stats)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            optimizer.step()
            scheduler.step()
            total_loss += loss.item()
            if step_number % 20 == 0:
                bar.set_postfix(loss=f"{total_loss / (step_number + 1):.4f}")
        seconds = time.perf_counter() - started
        row = {
            "epoch": epoch,
            "loss": total_loss / steps_per_epoch,
            "seconds": seconds,
            "samples_per_s": steps_per_epoch * batch_size / seconds,
        }
        if rank == 0:
            row |= _monitored(model, data, monitors)
        if rank == 0 and validate is not None:
            row["validation"] = validate(model.cpu())  # the evaluation's batches are built on the CPU
            model.to(device)
            if row["validation"] > best_score:
                best_score = row["validation"]
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        history.append(row)
        if show:
            names = {"validation": config.validation_label}
            shown = ", ".join(f"{names.get(k, k)}={v:.4f}" for k, v in row.items() if k != "epoch")
            tqdm.write(f"epoch {epoch}/{epochs}: {shown}")
    if best_state is not None:
        model.load_state_dict(best_state)
        best = max(history, key=lambda r: r["validation"])["epoch"]
        log.info(
            "kept the weights of epoch %d of %d (%s %.4f)", best, epochs, config.validation_label, best_score
        )
    model.cpu()
    model.eval()
    return history
