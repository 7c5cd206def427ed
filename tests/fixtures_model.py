"""A tiny trained demo for the reliability tests (fuzz, faults, bad data): plain functions, no fixtures.

`trained_demo(folder)` writes the tiny demo tables into a SQLite file in `folder` and trains a model on
them with the real pipeline (one short epoch on a 4,000-view sample), once per folder and process, so
every test module that asks for the same folder shares one build. `copy_tables` puts the same rows into
another database (PostgreSQL, or a scratch SQLite file a test may modify).
"""

from __future__ import annotations

import socket
from pathlib import Path

import pandas as pd

import database
import get_features_table
import main_script
from settings import Settings

FAST_TRAINING = {"epochs": 1, "batch_size": 256, "train_sample": 4_000}
_built: dict[Path, Settings] = {}
_tables: dict[Path, tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]] = {}


def demo_settings(folder: Path, **overrides: object) -> Settings:
    values: dict[str, object] = {
        "database_url": f"sqlite:///{folder / 'demo.db'}",
        "demo_scale": "tiny",
        "ground_truth_path": folder / "truth.npz",
        "embed_cache_dir": folder / "embed_cache",
        "model_path": folder / "model.pt",
        "model_cache_dir": folder / "model_cache",
        "export_dir": folder / "export",
        "refresh_seconds": 0.0,
        **FAST_TRAINING,
    }
    return Settings(**(values | overrides))


def trained_demo(folder: Path) -> Settings:
    """Settings of the tiny demo in `folder`: its SQLite tables and a model file trained on them."""
    folder = Path(folder)
    if folder not in _built:
        folder.mkdir(parents=True, exist_ok=True)
        settings = demo_settings(folder)
        main_script.make_demo_data(settings, scale="tiny", progress=False)
        main_script.run_all(settings, progress=False)
        _built[folder] = settings
    return _built[folder]


def demo_tables(settings: Settings) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """(users, posts, feed) of the demo database, read once."""
    key = settings.model_path.parent
    if key not in _tables:
        engine = database.make_engine(settings.db_url)
        try:
            _tables[key] = tuple(get_features_table.read_table(engine, t) for t in get_features_table.TABLES)
        finally:
            engine.dispose()
    return _tables[key]


def copy_tables(settings: Settings, url: str) -> None:
    """Replace the three tables of the database at `url` with the demo's rows."""
    users, posts, feed = demo_tables(settings)
    engine = database.make_engine(url)
    try:
        get_features_table.write_tables(engine, users=users, posts=posts, feed=feed, progress=False)
    finally:
        engine.dispose()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
