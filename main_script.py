"""The offline pipeline: demo data, CSV import, text embeddings, two-tower training, evaluation, export.

`python main_script.py` runs every stage from the settings (.env / environment): embed the post texts,
compress them with the autoencoder, build histories, train, evaluate, and write the model file the
service loads. Each stage is also a subcommand; `python main_script.py SUBCOMMAND --help` explains it.
`torchrun --nproc_per_node=N main_script.py train` (or `all`) trains with DistributedDataParallel on N
processes (gloo on CPU, NCCL on CUDA); rank 0 evaluates and writes the model file, the others nothing.
"""

from __future__ import annotations

import sys

if __name__ == "__main__":  # parse the arguments before the imports below: --help answers at once
    import cli

    sys.exit(cli.main())

import argparse
import json
import logging
import math
import os
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
from sqlalchemy import delete, insert, inspect, select
from sqlalchemy.exc import DBAPIError

import changelog
import database
import demo_data
import experiment_report
import experiments
import get_features_table
import get_model
from evaluate import METRIC_KEYS, ONLINE_K, calibrate, evaluate_model, validation_score
from features import (
    POST_STAT_NAMES,
    USER_CATEGORICALS,
    Dataset,
    NotEnoughDataError,
    UserFeatures,
    build_dataset,
    split_windows,
    thin_windows,
)
from fingerprint import tables_fingerprint
from get_features_table import TABLES
from get_model import FeedSnapshot, ModelFile, ModelFileError, save_model_file
from get_post_embeddings import embed_posts, encoder_key, resolve_encoder
from histories import Histories
from learn_model import VALIDATION_LABELS, TrainConfig, train_autoencoder, train_two_tower, world
from model import (
    Autoencoder,
    TwoTower,
    TwoTowerConfig,
    make_user_batch,
    user_tower_onnx,
)
from settings import Settings, describe
from table_feed import Feed
from table_post_embedding import PostEmbedding, clean_text, text_key
from times import format_time, parse_time, to_seconds

log = logging.getLogger("pipeline")


class NoDataError(RuntimeError):
    """The database lacks the three tables, or they are empty."""


@dataclass
class TrainResult:
    model: TwoTower
    data: Dataset
    metrics: dict[str, dict[str, float]]
    history: list[dict[str, float]]
    model_file: ModelFile | None  # None on the ranks other than 0 under torchrun: they write nothing
    seconds: dict[str, float]


def training_device(setting: str) -> torch.device:
    """DEVICE: auto picks CUDA when this machine has it; under torchrun each rank takes its local GPU."""
    use_cuda = setting == "cuda" or (setting == "auto" and torch.cuda.is_available())
    if not use_cuda:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("DEVICE=cuda, but torch sees no CUDA device on this machine")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))


def start_ranks(device: torch.device) -> bool:
    """Join torchrun's process group (its environment names the rendezvous); False without torchrun."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return True


# ----------------------------------------------------------------------------- stages


def make_demo_data(settings: Settings, *, scale: str | None = None, progress: bool = True) -> dict[str, int]:
    """Generate the demo tables into DATABASE_URL and the generator's truth file beside them."""
    scale = scale or settings.demo_scale
    demo = demo_data.generate(scale, seed=settings.seed, progress=progress)
    engine = database.make_engine(settings.db_url)
    try:
        counts = get_features_table.write_tables(
            engine, users=demo.users, posts=demo.posts, feed=demo.feed, progress=progress
        )
        changelog.install(engine)  # the service follows the feed through it (refresh.py)
    finally:
        engine.dispose()
    if settings.ground_truth_path is not None:  # GROUND_TRUTH_PATH= (empty): no truth file
        demo.truth.save(settings.ground_truth_path)
    return counts


def demo_data_present(settings: Settings) -> bool:
    engine = database.make_engine(settings.db_url)
    try:
        if not inspect(engine).has_table("feed_data"):
            return False
        with engine.connect() as conn:
            return conn.execute(select(Feed.user_id).limit(1)).first() is not None
    finally:
        engine.dispose()


def load_tables(
    settings: Settings, *, progress: bool = True
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    fix = "run `python main_script.py demo-data` or `python main_script.py import-csv ...` first"
    engine = database.make_engine(settings.db_url)
    where = engine.url.render_as_string(hide_password=True)
    try:
        existing = set(inspect(engine).get_table_names())
        missing = [name for name in TABLES if name not in existing]
        if missing:
            raise NoDataError(f"{where} has no table {', '.join(missing)}: {fix}")
        users, posts = (get_features_table.read_table(engine, name, progress=progress) for name in TABLES[:2])
        feed = changelog.read_feed(engine, progress=progress)  # with its position in the change log
    finally:
        engine.dispose()
    if feed.empty or users.empty or posts.empty:
        raise NoDataError(f"the tables in {where} are empty: {fix}")
    return users, posts, drop_future_rows(feed, now=time.time())


FUTURE_HORIZON_SECONDS = 86_400  # a feed row dated more than a day past the clock is a wrong clock


def drop_future_rows(feed: pd.DataFrame, *, now: float) -> pd.DataFrame:
    """The feed without rows dated after the clock (plus FUTURE_HORIZON_SECONDS), with a warning that
    counts them: one row from a writer with a wrong clock would make the snapshot end years ahead (every
    real row then late) and leave the evaluation windows empty (NaN metrics)."""
    ahead = to_seconds(feed["timestamp"]) > now + FUTURE_HORIZON_SECONDS
    if not ahead.any():
        return feed
    latest = format_time(int(to_seconds(feed["timestamp"][ahead]).max()))
    log.warning(
        "feed_data: %d rows dated after the clock (the latest %s) are left out of training; fix their "
        "timestamps and retrain to use them",
        int(ahead.sum()),
        latest,
    )
    kept = feed[~ahead].reset_index(drop=True)
    kept.attrs = dict(feed.attrs)  # the change log position the rows were read at
    return kept


def load_truth(
    settings: Settings, tables: tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]
) -> demo_data.GroundTruth | None:
    """The demo generator's truth when its file exists and was generated with these very tables, else
    None (no oracle, no online value): a truth file left by the demo never judges other data."""
    path = settings.ground_truth_path
    if path is None or not path.is_file():
        return None
    truth = demo_data.GroundTruth.load(path)
    if not truth.tables:  # a file from before truth files named their tables: no way to tell
        log.warning(
            "note: %s names no tables (written by an older version): ignored (no oracle, no online value); "
            "run `main_script.py demo-data` again to regenerate the demo with its truth",
            path,
        )
        return None
    if truth.tables != tables_fingerprint(*tables):
        log.warning(
            "note: %s is the demo generator's truth of other tables: ignored (no oracle, no online value); "
            "set GROUND_TRUTH_PATH= (empty) to silence this",
            path,
        )
        return None
    return truth


def evaluate_with_settings(
    settings: Settings,
    model: TwoTower,
    data: Dataset,
    tables: tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame],
    *,
    progress: bool = True,
) -> dict[str, dict]:
    """evaluate_model as the settings ask (ranking, seed), with the demo's truth when it is these tables'."""
    return evaluate_model(
        model,
        data,
        truth=load_truth(settings, tables),
        feed=tables[2],
        ranking=settings.ranking,
        seed=settings.seed,
        progress=progress,
    )


def embed_stage(settings: Settings, posts: pd.DataFrame, *, progress: bool = True) -> np.ndarray:
    """Transformer embeddings of the post texts in post_id order (cached: reruns embed only new texts)."""
    ordered = posts.sort_values("post_id")
    return embed_posts(
        ordered["post_id"].to_numpy(),
        ordered["text"].tolist(),
        encoder=settings.text_encoder,
        cache_dir=settings.embed_cache_dir,
        batch_size=settings.embed_batch_size,
        max_length=settings.embed_max_length,
        progress=progress,
    )


def sync_post_embeddings(settings: Settings, *, progress: bool = True) -> int:
    """Embed every post text of post_text_df that post_embedding lacks (for its current text and the
    TEXT_ENCODER) and store the vectors; returns how many it wrote. This is how posts published after
    training reach the service, which reads the vectors at its next refresh. Cached texts cost nothing."""
    key = encoder_key(settings.text_encoder, max_length=settings.embed_max_length)
    engine = database.make_engine(settings.db_url)
    try:
        PostEmbedding.__table__.create(engine, checkfirst=True)
        posts = get_features_table.read_table(engine, "post_text_df", columns=["post_id", "text"])
        with engine.connect() as conn:
            stored = conn.execute(
                select(PostEmbedding.post_id, PostEmbedding.text_sha256).where(PostEmbedding.encoder == key)
            ).all()
        posts["text_sha256"] = [text_key(clean_text(text)) for text in posts["text"]]
        current = pd.DataFrame(stored, columns=["post_id", "text_sha256"]).astype({"post_id": "int64"})
        todo = posts.merge(current, how="left", on=["post_id", "text_sha256"], indicator=True)
        todo = todo[todo.pop("_merge") == "left_only"]
        if todo.empty:
            return 0
        vectors = embed_posts(
            todo["post_id"].to_numpy(),
            todo["text"].tolist(),
            encoder=settings.text_encoder,
            cache_dir=settings.embed_cache_dir,
            batch_size=settings.embed_batch_size,
            max_length=settings.embed_max_length,
            progress=progress,
        )
        rows = [
            {
                "post_id": int(pid),
                "text_sha256": sha,
                "encoder": key,
                "vector": vector.astype("<f4").tobytes(),
            }
            for pid, sha, vector in zip(todo["post_id"], todo["text_sha256"], vectors, strict=True)
        ]
        with engine.begin() as conn:  # one transaction: the service sees all of them or none
            for start in range(0, len(rows), 1000):
                ids = [row["post_id"] for row in rows[start : start + 1000]]
                conn.execute(
                    delete(PostEmbedding).where(PostEmbedding.post_id.in_(ids), PostEmbedding.encoder == key)
                )
            conn.execute(insert(PostEmbedding), rows)
        return len(rows)
    finally:
        engine.dispose()


def follow_post_embeddings(
    settings: Settings, *, every: float, cycles: int | None = None, progress: bool = False
) -> None:
    """sync_post_embeddings every `every` seconds until stopped (or `cycles` times); a database that
    does not answer is logged and tried again at the next turn, the job does not stop."""
    turn = 0
    while cycles is None or turn < cycles:
        turn += 1
        try:
            print(
                f"embed-posts: {sync_post_embeddings(settings, progress=progress)} embeddings written",
                flush=True,
            )
        except DBAPIError as exc:
            print(
                f"embed-posts: database error ({exc.__class__.__name__}); trying again in {every:g} s",
                flush=True,
            )
        if cycles is None or turn < cycles:
            time.sleep(every)


def make_dataset(
    settings: Settings, users: pd.DataFrame, posts: pd.DataFrame, feed: pd.DataFrame, **fitted: Any
) -> Dataset:
    """The tables split and featurised under the settings' test window, sample and seed; `fitted` passes
    a trained model's vocabularies and scalers on (features.build_dataset)."""
    return build_dataset(
        users,
        posts,
        feed,
        test_days=settings.test_days,
        val_days=settings.val_days,
        train_sample=settings.train_sample,
        seed=settings.seed,
        **fitted,
    )


def new_model(
    settings: Settings,
    data: Dataset,
    codes: np.ndarray,
    *,
    objective: str | None = None,
    use_history: bool = True,
    use_text: bool = True,
) -> TwoTower:
    """An untrained TwoTower sized for `data`, holding the post features (text codes, topic, stats)."""
    objective = objective or settings.objective
    torch.manual_seed(settings.seed)
    config = TwoTowerConfig(
        n_posts=len(data.post_ids),
        n_topics=len(data.vocabs["topic"]),
        user_cardinalities=[len(data.vocabs[name]) for name in USER_CATEGORICALS],
        text_dim=settings.text_dim,
        max_history=settings.max_history,
        max_likes=settings.max_likes,
        profile_dim=settings.profile_dim,
        like_pool=settings.like_pool,
        use_history=use_history,
        use_text=use_text,
        exposure_head=objective == "joint",
    )
    model = TwoTower(config)
    model.set_post_features(codes, data.post_topic, data.post_stats)
    return model


def train_stage(
    settings: Settings,
    *,
    tables: tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame] | None = None,
    use_history: bool = True,
    use_text: bool = True,
    evaluate: bool = True,
    progress: bool = True,
) -> TrainResult:
    """Features on the training window, the autoencoder, the two towers, the evaluation, the model file."""
    seconds: dict[str, float] = {}
    clock = time.perf_counter()
    users, posts, feed = tables if tables is not None else load_tables(settings, progress=progress)
    seconds["load"] = time.perf_counter() - clock
    # Too short a feed for TEST_DAYS + VAL_DAYS stops here, with one line, before minutes of embedding.
    split_windows(feed, test_days=settings.test_days, val_days=settings.val_days)

    clock = time.perf_counter()
    rank, _ = world()
    if rank != 0:  # rank 0 embeds first (and fills the cache); the others then read it
        dist.barrier()
    embeddings = embed_stage(settings, posts, progress=progress and rank == 0)
    if rank == 0 and dist.is_initialized():
        dist.barrier()
    seconds["embed"] = time.perf_counter() - clock

    clock = time.perf_counter()
    autoencoder, codes, reconstruction = train_autoencoder(
        embeddings, code_dim=settings.text_dim, seed=settings.seed, progress=progress
    )
    seconds["autoencoder"] = time.perf_counter() - clock

    clock = time.perf_counter()
    data = make_dataset(settings, users, posts, feed)
    seconds["features"] = time.perf_counter() - clock
    for warning in thin_windows(data) if rank == 0 else []:
        log.warning("warning: %s", warning)

    model = new_model(settings, data, codes, use_history=use_history, use_text=use_text)
    clock = time.perf_counter()
    config = TrainConfig.from_settings(settings, device=str(training_device(settings.device)))
    history = train_two_tower(
        model,
        data,
        config,
        validate=partial(validation_score, data=data, ranking=settings.ranking),
        progress=progress,
    )
    seconds["train"] = time.perf_counter() - clock
    if rank != 0:
        return TrainResult(model, data, {}, history, None, seconds)

    clock = time.perf_counter()
    scale, bias = calibrate(model, data)
    log.info("calibration on the validation views: P(like) = sigmoid(%.3f * logit %+.3f)", scale, bias)
    metrics: dict[str, dict] = {}
    if evaluate:
        metrics = evaluate_with_settings(settings, model, data, (users, posts, feed), progress=progress)
    metrics.setdefault("model", {})["autoencoder_mse"] = reconstruction
    seconds["evaluate"] = time.perf_counter() - clock

    train_size = len(data.train_likes) if settings.objective == "softmax" else len(data.train_views)
    model_file = build_model_file(
        settings,
        model,
        autoencoder,
        data,
        feed,
        metrics=metrics,
        history=history,
        train_size=train_size,
    )
    return TrainResult(model, data, metrics, history, model_file, seconds)


def build_model_file(
    settings: Settings,
    model: TwoTower,
    autoencoder: Autoencoder,
    data: Dataset,
    feed: pd.DataFrame,
    *,
    metrics: dict[str, dict[str, float]],
    history: list[dict[str, float]],
    train_size: int,
) -> ModelFile:
    """The model file's content. Post statistics and histories are refreshed to the end of the feed."""
    end = int(to_seconds(feed["timestamp"]).max()) + 1
    histories = data.histories  # every event of the feed already, both sides of the cutoff
    # The statistics at the end, from the histories: the service recomputes them the same way as the
    # feed moves on (serving.post_statistics_at), so a refresh with no new rows changes nothing.
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["post_stats"] = torch.tensor(data.post_stats_at(end))
    return ModelFile(
        config=model.config,
        state_dict=state,
        autoencoder_dims={
            "in_dim": autoencoder.in_dim,
            "hidden_dim": autoencoder.hidden_dim,
            "code_dim": autoencoder.code_dim,
        },
        autoencoder_state=autoencoder.state_dict(),
        user_tower_onnx=user_tower_onnx(model),
        vocabs=data.vocabs,
        age_scaler=data.age_scaler,
        stats_scaler=data.stats_scaler,
        post_stat_names=POST_STAT_NAMES,
        post_ids=data.post_ids,
        text_encoder=resolve_encoder(settings.text_encoder).rsplit("/site-packages/", 1)[-1],
        encoder_key=encoder_key(settings.text_encoder, max_length=settings.embed_max_length),
        objective=settings.objective,
        train_size=train_size,
        data_window={name: format_time(getattr(data, name)) for name in ("start", "cutoff", "end")},
        metrics=metrics,
        history=history,
        snapshot=FeedSnapshot(
            start=data.start,
            end=end,
            feed_rows=len(feed),
            users=data.users,
            histories=histories,
            log_position=feed.attrs.get("log_position"),
        ),
    )


def history_paths(model_path: Path) -> tuple[Path, Path, Path]:
    """The history files of a model file, beside it and named after it (data/model.pt ->
    data/model.history.csv, .json, .png): a run with another MODEL_PATH never overwrites them."""
    stem = model_path.with_suffix("")
    return tuple(stem.with_name(f"{stem.name}.history.{kind}") for kind in ("csv", "json", "png"))


def kept_epoch(history: list[dict[str, float]]) -> int | None:
    """The epoch whose weights train_two_tower kept: the first best on validation (None without one)."""
    scored = [row for row in history if "validation" in row]
    return int(max(scored, key=lambda row: row["validation"])["epoch"]) if scored else None


def history_figure(history: list[dict[str, float]], metric: str = VALIDATION_LABELS["likes"]) -> Any:
    """The matplotlib figure of the history: losses, the validation metric that chooses the kept epoch,
    ROC-AUC; the kept epoch marked on each panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    frame = pd.DataFrame(history)
    kept = kept_epoch(history)
    # Loss (training; validation log-loss beside it), the metric that chooses the kept epoch, ROC-AUC.
    # No accuracy panel: at a ~10% like rate it sits at the majority-class rate and tells nothing.
    panels = (
        ("loss", [("loss", "training loss"), ("val_log_loss", "validation log-loss")]),
        (f"{metric} (chooses the epoch)", [("validation", metric)]),
        ("ROC-AUC", [("train_roc_auc", "training"), ("val_roc_auc", "validation")]),
    )
    figure, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for axis, (title, series) in zip(axes, panels, strict=True):
        for column, label in series:
            if column in frame:
                axis.plot(frame["epoch"], frame[column], marker="o", label=label)
        if kept is not None:
            axis.axvline(kept, color="grey", linestyle="--", label=f"kept: epoch {kept}")
        axis.set_xlabel("epoch")
        axis.set_title(title)
        axis.legend()
    figure.tight_layout()
    return figure


def write_history(
    history: list[dict[str, float]], model_path: Path, metric: str = VALIDATION_LABELS["likes"]
) -> list[Path]:
    """Per-epoch history as CSV, JSON and a PNG plot (history_figure), beside the model file."""
    import matplotlib.pyplot as plt

    model_path.parent.mkdir(parents=True, exist_ok=True)
    csv_path, json_path, png_path = history_paths(model_path)
    pd.DataFrame(history).to_csv(csv_path, index=False)
    json_path.write_text(json.dumps(history, indent=2))
    figure = history_figure(history, metric)
    figure.savefig(png_path, dpi=110)
    plt.close(figure)
    return [csv_path, json_path, png_path]


def summary_table(metrics: dict[str, dict]) -> str:
    """The report as Markdown: offline metrics of every ranker, then (demo data) the online value."""
    names = [name for name in metrics if name not in ("protocol", "online")]
    lines = ["| metric | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for key in METRIC_KEYS:
        cells = [metrics[name].get(key, math.nan) for name in names]
        lines.append(f"| {key} | " + " | ".join(f"{value:.4f}" for value in cells) + " |")
    for window, report in metrics.get("online", {}).items():
        rankers = [name for name in report if name != "users"]
        users = int(report["users"]["count"])
        lines += ["", f"online value, {window} cutoff ({users} users): expected likes of the top {ONLINE_K}"]
        lines += ["| ranking | likes | 95% interval | share of the ceiling |", "|---|---|---|---|"]
        for name in rankers:
            value, (low, high) = report[name][f"likes@{ONLINE_K}"], report[name][f"likes@{ONLINE_K}_ci"]
            lines.append(f"| {name} | {value:.4f} | [{low:.4f}, {high:.4f}] | {report[name]['share']:.2f} |")
    return "\n".join(lines)


@torch.inference_mode()
def user_embeddings_at(
    model: TwoTower, users: UserFeatures, histories: Histories, time: int, *, chunk: int = 4096
) -> np.ndarray:
    """[n_users, embed_dim]: every user's embedding at `time` (history strictly before it)."""
    item_matrix = model.item_embeddings()
    out = [np.zeros((0, item_matrix.shape[1]), np.float32)]
    for start in range(0, len(users.user_ids), chunk):
        rows = np.arange(start, min(start + chunk, len(users.user_ids)))
        batch = make_user_batch(users, histories, rows, np.full(len(rows), time), model.config)
        out.append(model.users(batch, item_matrix[batch.hist_post]).numpy())
    return np.concatenate(out)


def export_embeddings(settings: Settings, out_dir: Path) -> dict[str, Path]:
    """User embeddings (at the end of the model's data) and post embeddings of the model, as CSV."""
    model_file = get_model.get_model(settings)
    model, snapshot = model_file.two_tower(), model_file.snapshot
    out_dir.mkdir(parents=True, exist_ok=True)
    post_path, user_path = out_dir / "post_embeddings.csv", out_dir / "user_embeddings.csv"
    with torch.inference_mode():
        post_table = pd.DataFrame(model.item_embeddings().numpy()).add_prefix("e")
    post_table.insert(0, "post_id", model_file.post_ids)
    post_table.to_csv(post_path, index=False)
    user_table = pd.DataFrame(
        user_embeddings_at(model, snapshot.users, snapshot.histories, snapshot.end)
    ).add_prefix("e")
    user_table.insert(0, "user_id", snapshot.users.user_ids)
    user_table.to_csv(user_path, index=False)
    return {"posts": post_path, "users": user_path}


# ----------------------------------------------------------------------------- command line


def run_all(settings: Settings, *, progress: bool = True) -> TrainResult:
    result = train_stage(settings, progress=progress)
    if result.model_file is None:  # a rank other than 0: rank 0 writes the model file
        return result
    save_model_file(result.model_file, settings.model_path)
    written = write_history(result.history, settings.model_path, VALIDATION_LABELS[settings.ranking])
    print(f"\nmodel file: {settings.model_path}  (history: {', '.join(str(p) for p in written)})")
    print(f"data window: {result.model_file.data_window}  objective: {settings.objective}")
    print("time (s): " + ", ".join(f"{k}={v:.1f}" for k, v in result.seconds.items()))
    print(summary_table(result.metrics))
    return result


def build_parser() -> argparse.ArgumentParser:
    """The command line (cli.py: light, so that --help answers before the libraries above load)."""
    import cli

    return cli.build_parser()


def dataset_of_model(
    settings: Settings, model_file: ModelFile, tables: tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]
) -> Dataset:
    """The tables split and featurised with a saved model's vocabularies and scalers (its exact inputs)."""
    return make_dataset(
        settings,
        *tables,
        vocabs=model_file.vocabs,
        age_scaler=model_file.age_scaler,
        stats_scaler=model_file.stats_scaler,
    )


def evaluate_saved(settings: Settings, *, progress: bool = True) -> dict[str, dict[str, float]]:
    """Re-run the evaluation of the saved model file on the current database (same split and protocol)."""
    model_file = get_model.get_model(settings)
    users, posts, feed = load_tables(settings, progress=progress)
    data = dataset_of_model(settings, model_file, (users, posts, feed))
    model = model_file.two_tower()  # evaluate_model sets the statistics of each window's cutoff
    return evaluate_with_settings(settings, model, data, (users, posts, feed), progress=progress)


def run_demo_data(settings: Settings, args: argparse.Namespace, progress: bool) -> int:
    settings = settings.replace(**({"seed": args.seed} if args.seed is not None else {}))
    if args.if_missing and demo_data_present(settings):
        print("demo data present: skipping (drop --if-missing to regenerate)")
        return 0
    clock = time.perf_counter()
    counts = make_demo_data(settings, scale=args.scale, progress=progress)
    truth = settings.ground_truth_path or "not written (GROUND_TRUTH_PATH is empty)"
    print(f"wrote {counts} in {time.perf_counter() - clock:.1f} s; truth: {truth}")
    return 0


def run_import_csv(settings: Settings, args: argparse.Namespace, progress: bool) -> int:
    engine = database.make_engine(settings.db_url)
    counts = get_features_table.import_csv(
        engine, users=args.users, posts=args.posts, feed=args.feed, replace=args.replace, progress=progress
    )
    changelog.install(engine)  # the service follows the feed through it (refresh.py)
    print(f"imported {counts}")
    return 0


def run_change_log(settings: Settings, args: argparse.Namespace, progress: bool) -> int:
    engine = database.make_engine(settings.db_url)
    try:
        created = changelog.install(engine)
    finally:
        engine.dispose()
    if created:
        print(
            f"change log {changelog.LOG_TABLE} and its triggers on feed_data created; retrain "
            "(`python main_script.py`) so that the model file records its position in it"
        )
    else:
        print(f"change log {changelog.LOG_TABLE} already in place")
    return 0


def run_embed(settings: Settings, args: argparse.Namespace, progress: bool) -> int:
    engine = database.make_engine(settings.db_url)
    posts = get_features_table.read_table(engine, "post_text_df")
    vectors = embed_stage(settings, posts, progress=progress)
    print(f"{len(vectors)} posts embedded: {vectors.shape[1]}-D, cache in {settings.embed_cache_dir}")
    return 0


def run_embed_posts(settings: Settings, args: argparse.Namespace, progress: bool) -> int:
    if args.every:
        follow_post_embeddings(settings, every=args.every, progress=progress)
    else:
        print(f"embed-posts: {sync_post_embeddings(settings, progress=progress)} embeddings written")
    return 0


def run_training(settings: Settings, args: argparse.Namespace, progress: bool) -> int:
    """`all` and `train`: every stage, under torchrun on every rank (rank 0 writes the model file)."""
    if getattr(args, "if_missing", False) and get_model.usable(
        settings.model_path, sha256=settings.model_sha256
    ):
        print(f"model file {settings.model_path} present: skipping training")
        return 0
    overrides = {"objective": getattr(args, "objective", None), "epochs": getattr(args, "epochs", None)}
    settings = settings.replace(**{k: v for k, v in overrides.items() if v is not None})
    distributed = start_ranks(training_device(settings.device))
    try:
        if world()[0] == 0:
            print("settings: " + ", ".join(f"{k}={v}" for k, v in describe(settings)))
        run_all(settings, progress=progress)
    finally:
        if distributed:
            dist.destroy_process_group()
    return 0


def run_evaluate(settings: Settings, args: argparse.Namespace, progress: bool) -> int:
    metrics = evaluate_saved(settings, progress=progress)
    print(json.dumps(metrics) if args.json else summary_table(metrics))
    return 0


def run_export_embeddings(settings: Settings, args: argparse.Namespace, progress: bool) -> int:
    paths = export_embeddings(settings, args.out or settings.export_dir)
    print(f"wrote {paths['posts']} and {paths['users']}")
    return 0


def run_experiment_report(settings: Settings, args: argparse.Namespace, progress: bool) -> int:
    declared = experiments.load_experiment(settings.experiment_path)
    name = args.experiment or (declared.name if declared else None)
    if name is None:
        print("error: name the experiment: --experiment NAME, or EXPERIMENT_PATH", file=sys.stderr)
        return 2
    try:  # cli.py keeps these as text: parsing them needs the libraries it does not load
        window = experiment_report.parse_window(args.window)
        since = None if args.since is None else parse_time(args.since)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    engine = database.make_engine(settings.db_url)
    try:
        report = experiment_report.run_report(
            engine,
            experiment=name,
            declared=declared,
            window=window,
            since=since,
            plot=args.plot,
            seed=args.seed,
        )
    except LookupError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        engine.dispose()
    print(json.dumps(report) if args.json else experiment_report.format_report(report))
    if report["srm"]["mismatch"]:
        print("error: sample ratio mismatch (see above)", file=sys.stderr)
    return 0


def run_command(args: argparse.Namespace) -> int:
    """Run the parsed command (cli.main parses, then imports this module); errors of the data, the
    model file or the settings end as one line on stderr and exit code 2, not a traceback."""
    try:
        return globals()[args.run](Settings(), args, not args.quiet)
    except (
        get_features_table.TableValidationError,
        get_features_table.TablesHoldRowsError,
        ModelFileError,
        FileNotFoundError,
        NoDataError,
        NotEnoughDataError,
        experiments.ExperimentError,
    ) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    import cli

    return cli.main(argv)


if __name__ == "__main__":
    sys.exit(main())
