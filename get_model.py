"""The model file: what it holds (ModelFile), finding it (locally or by download, checksum-verified),
writing it atomically and loading it safely.

One format, `FORMAT`, and one class that owns its keys: `ModelFile.to_payload()` turns it into tensors
and plain containers (str, int, float, list, dict), so it loads with `torch.load(weights_only=True)` and
can never execute code; `ModelFile.from_payload()` reads them back (a file of another format is refused
with one line: retrain it). It describes itself: the network config and weights, vocabularies, scalers,
post ids, metrics, data window, the text encoder's name and the autoencoder (so posts that appear after
training can be scored), the user tower as an ONNX graph, and the serving snapshot (every user's events
and likes up to the end of the training feed). The service loads it memory-mapped: the snapshot's arrays
stay pages of the file that every worker process shares (from_payload keeps views, never copies).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import pickle
import sys
import tempfile
import urllib.request
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import numpy as np
import torch

from features import UserFeatures
from histories import Histories
from model import Autoencoder, TwoTower, TwoTowerConfig
from settings import Settings

FORMAT = "post-recommender/6"
CHUNK = 1 << 20
Module = TypeVar("Module", bound=torch.nn.Module)


class ModelFileError(RuntimeError):
    """The model file is missing, corrupt, unsafe, of another version, or failed its checksum."""


@dataclass(frozen=True)
class FeedSnapshot:
    """The events the model was trained on, kept for serving: every user's history up to `end`."""

    start: int  # seconds: the first event of the training feed
    end: int  # one past its last event
    feed_rows: int  # rows of feed_data the training read
    users: UserFeatures  # static features of every user of the training tables
    histories: Histories  # their events, user rows as in `users`
    # where the training read stood in the feed's change log (changelog.LogPosition.to_dict), None
    # without a log: a service starts following the log exactly there
    log_position: dict[str, Any] | None = None


@dataclass(frozen=True)
class ModelFile:
    """Everything the model file holds, by name. The only code that knows the file's keys is
    to_payload / from_payload; every reader uses these attributes."""

    FORMAT: ClassVar[str] = FORMAT
    config: TwoTowerConfig
    state_dict: dict[str, torch.Tensor]  # TwoTower weights and buffers (post features, calibration)
    autoencoder_dims: dict[str, int]  # in_dim, hidden_dim, code_dim of the text autoencoder
    autoencoder_state: dict[str, torch.Tensor]
    user_tower_onnx: bytes  # the user tower as an ONNX graph (model.user_tower_onnx), for the service
    vocabs: dict[str, list[str]]  # user categoricals and "topic", each with its unknown bucket first
    age_scaler: tuple[float, float]
    stats_scaler: tuple[np.ndarray, np.ndarray]  # mean, std of the post statistics
    post_stat_names: tuple[str, ...]
    post_ids: np.ndarray  # int64, the item matrix's rows
    text_encoder: str  # the Hugging Face name or path of the text encoder (site-packages stripped)
    encoder_key: str  # get_post_embeddings.encoder_key: which stored embeddings fit the autoencoder
    objective: str
    train_size: int
    data_window: dict[str, str]  # start, cutoff, end as 'YYYY-mm-dd HH:MM:SS'
    metrics: dict[str, Any]  # the evaluation report (evaluate.evaluate_model)
    history: list[dict[str, float]]  # one row per epoch
    snapshot: FeedSnapshot
    created: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))

    def two_tower(self) -> TwoTower:
        """The trained TwoTower, in eval mode."""

        def build() -> TwoTower:
            model = TwoTower(self.config)
            model.load_state_dict(self.state_dict)
            return model

        return _rebuilt(build).eval()

    def text_autoencoder(self) -> Autoencoder:
        """The text autoencoder, in eval mode: raw text embeddings -> the codes the item tower reads
        (posts that appear after training go through it)."""

        def build() -> Autoencoder:
            dims = self.autoencoder_dims
            model = Autoencoder(dims["in_dim"], hidden_dim=dims["hidden_dim"], code_dim=dims["code_dim"])
            model.load_state_dict(self.autoencoder_state)
            return model

        return _rebuilt(build).eval()

    def to_payload(self) -> dict[str, Any]:
        """Tensors and plain containers only (what torch.load(weights_only=True) reads back)."""
        snapshot = self.snapshot
        return {
            "format": FORMAT,
            "created": self.created,
            "config": dataclasses.asdict(self.config),
            "state_dict": self.state_dict,
            "autoencoder": {**self.autoencoder_dims, "state_dict": self.autoencoder_state},
            "user_tower_onnx": torch.from_numpy(np.frombuffer(self.user_tower_onnx, np.uint8).copy()),
            "vocabs": self.vocabs,
            "age_scaler": list(self.age_scaler),
            "stats_scaler": {"mean": _tensor(self.stats_scaler[0]), "std": _tensor(self.stats_scaler[1])},
            "post_stat_names": list(self.post_stat_names),
            "post_ids": _tensor(self.post_ids),
            "text_encoder": self.text_encoder,
            "encoder_key": self.encoder_key,
            "objective": self.objective,
            "train_size": self.train_size,
            "data_window": self.data_window,
            "metrics": self.metrics,
            "history": self.history,
            "snapshot": {
                "start": snapshot.start,
                "end": snapshot.end,
                "feed_rows": snapshot.feed_rows,
                "user_ids": _tensor(snapshot.users.user_ids),
                "user_categorical": _tensor(snapshot.users.categorical),
                "user_numeric": _tensor(snapshot.users.numeric),
                **{f"history_{k}": _tensor(v) for k, v in snapshot.histories.to_arrays().items()},
                **({} if snapshot.log_position is None else {"log_position": snapshot.log_position}),
            },
        }

    @classmethod
    def from_payload(cls, payload: dict[str, Any], *, source: str = "the model file") -> ModelFile:
        """The ModelFile of a loaded payload (arrays are views of its tensors: nothing is copied, so a
        memory-mapped file stays shared); another format, or a missing key, is one ModelFileError."""
        if not isinstance(payload, dict) or payload.get("format") != FORMAT:
            found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
            raise ModelFileError(
                f"{source} has format {found!r}, expected {FORMAT!r}: retrain it with `python main_script.py`"
            )
        try:
            saved = payload["snapshot"]
            arrays = {
                k.removeprefix("history_"): v.numpy() for k, v in saved.items() if k.startswith("history_")
            }
            autoencoder = dict(payload["autoencoder"])
            return cls(
                config=TwoTowerConfig(**payload["config"]),
                state_dict=payload["state_dict"],
                autoencoder_state=autoencoder.pop("state_dict"),
                autoencoder_dims=autoencoder,
                user_tower_onnx=payload["user_tower_onnx"].numpy().tobytes(),
                vocabs=payload["vocabs"],
                age_scaler=tuple(payload["age_scaler"]),
                stats_scaler=(
                    payload["stats_scaler"]["mean"].numpy(),
                    payload["stats_scaler"]["std"].numpy(),
                ),
                post_stat_names=tuple(payload["post_stat_names"]),
                post_ids=payload["post_ids"].numpy(),
                text_encoder=payload["text_encoder"],
                encoder_key=payload["encoder_key"],
                objective=payload["objective"],
                train_size=int(payload["train_size"]),
                data_window=payload["data_window"],
                metrics=payload["metrics"],
                history=payload["history"],
                snapshot=FeedSnapshot(
                    start=int(saved["start"]),
                    end=int(saved["end"]),
                    feed_rows=int(saved["feed_rows"]),
                    users=UserFeatures(
                        *(saved[k].numpy() for k in ("user_ids", "user_categorical", "user_numeric"))
                    ),
                    histories=Histories.from_arrays(arrays),
                    log_position=saved.get("log_position"),  # absent in files written before the log
                ),
                created=payload["created"],
            )
        except (KeyError, TypeError, AttributeError) as exc:
            raise _does_not_fit(source, exc) from exc


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


def save_model_file(model_file: ModelFile, path: Path) -> Path:
    """Write atomically: a temporary file in the same folder, fsync, then rename over `path`.

    A crash at any point leaves either the previous file or the new one, never a half-written file.
    """
    payload = model_file.to_payload()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as out:
            torch.save(payload, out)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp_name, 0o644)  # mkstemp makes 0600; a container's non-root user must read it
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return path


def load_model_file(path: Path, *, sha256: str = "", mmap: bool = False) -> ModelFile:
    """Load and check a model file; any problem raises ModelFileError with one clear message.

    mmap=True maps the tensors from the file instead of reading them (the service: its large read-only
    arrays are then shared by every process that maps the same file)."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"model file {path} not found: train one with `python main_script.py`")
    if sha256 and sha256_file(path) != sha256.lower():
        raise ModelFileError(f"model file {path} does not match MODEL_SHA256: refusing to load it")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        raise ModelFileError(
            f"model file {path} holds something other than tensors and plain data; refusing to load it "
            f"({str(exc).splitlines()[0][:200]})"
        ) from exc
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as exc:
        raise ModelFileError(f"model file {path} is corrupt or truncated ({exc.__class__.__name__})") from exc
    return ModelFile.from_payload(payload, source=f"model file {path}")


def download(url: str, dest: Path, sha256: str, *, timeout: float = 60.0) -> Path:
    """Stream `url` into dest, verify its SHA-256, then move it into place atomically."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    handle, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    try:
        received = 0
        with os.fdopen(handle, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as response:
            expected = int(response.headers.get("Content-Length") or -1)
            while block := response.read(CHUNK):
                digest.update(block)
                out.write(block)
                received += len(block)
        if expected >= 0 and received != expected:  # read(n) returns short, it does not raise
            raise ModelFileError(
                f"could not download the model file from {url}: the connection closed after {received:,} "
                f"of {expected:,} bytes"
            )
        if digest.hexdigest() != sha256.lower():
            raise ModelFileError(f"download from {url} has SHA-256 {digest.hexdigest()}, expected {sha256}")
        os.chmod(tmp_name, 0o644)
        os.replace(tmp_name, dest)
    except BaseException as exc:  # whatever broke (HTTP, socket, disk, ^C): no partial file stays
        Path(tmp_name).unlink(missing_ok=True)
        if isinstance(exc, ModelFileError) or not isinstance(exc, Exception):
            raise
        reason = str(exc).splitlines()[0][:200] if str(exc) else ""
        raise ModelFileError(
            f"could not download the model file from {url}: {exc.__class__.__name__} {reason}".rstrip()
        ) from exc
    return dest


def resolve_model_file(settings: Settings) -> tuple[Path, str]:
    """(path, expected sha256 or "") of the model file: MODEL_PATH if present, else the MODEL_URL cache."""
    if settings.model_path.is_file():
        return settings.model_path, settings.model_sha256  # a pinned checksum binds a local file too
    if not settings.model_url:
        raise ModelFileError(
            f"model file {settings.model_path} not found and MODEL_URL is not set: "
            "train one with `python main_script.py`"
        )
    cached = settings.model_cache_dir / f"{settings.model_sha256.lower()}.pt"
    if not cached.is_file():
        download(settings.model_url, cached, settings.model_sha256)
    return cached, settings.model_sha256


def get_model(settings: Settings) -> ModelFile:
    """Find (or download) and load the configured model file."""
    path, sha256 = resolve_model_file(settings)
    return load_model_file(path, sha256=sha256)


def usable(path: Path, *, sha256: str = "") -> bool:
    """Whether `path` holds a model file this code can serve (a missing one, or one of an older format,
    is not: the caller trains a new one); the reason goes to stderr."""
    try:
        load_model_file(path, sha256=sha256).two_tower()
        return True
    except ModelFileError as exc:
        print(f"{exc}: training a new one", file=sys.stderr)
        return False


def _tensor(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.require(array, requirements=["C", "W"]))  # a mapped array is copied


def _rebuilt(build: Callable[[], Module]) -> Module:
    """build(), with a model file that does not fit this code reported as one ModelFileError."""
    try:
        return build()
    except (TypeError, RuntimeError, KeyError) as exc:
        raise _does_not_fit("the model file", exc) from exc


def _does_not_fit(source: str, exc: Exception) -> ModelFileError:
    reason = (
        f"{exc.__class__.__name__}: {str(exc).splitlines()[0][:160]}" if str(exc) else exc.__class__.__name__
    )
    return ModelFileError(
        f"{source} does not fit this version of the code ({reason}): retrain it with `python main_script.py`"
    )
