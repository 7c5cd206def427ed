"""The model file: find it (locally or by download, checksum-verified), write it atomically, load it safely.

One format, `FORMAT`: a dict of tensors and plain containers (str, int, float, list, dict), so it
loads with `torch.load(weights_only=True)` and can never execute code. It describes itself: the
network config, vocabularies, scalers, post features, metrics, data window, the text encoder's name and
the autoencoder (so posts that appear after training can be scored) travel with the weights, plus the
serving snapshot (every user's events and likes up to the end of the training feed). The service loads
it memory-mapped: the snapshot's arrays stay pages of the file that every worker process shares.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import tempfile
import urllib.request
import zipfile
from pathlib import Path
from typing import Any

import torch

from settings import Settings

FORMAT = "post-recommender/5"
REQUIRED_KEYS = (
    "format",
    "config",
    "state_dict",
    "autoencoder",
    "user_tower_onnx",
    "vocabs",
    "post_ids",
    "metrics",
    "data_window",
    "serving",
)
CHUNK = 1 << 20


class ModelFileError(RuntimeError):
    """The model file is missing, corrupt, unsafe, of another version, or failed its checksum."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


def save_model_file(payload: dict[str, Any], path: Path) -> Path:
    """Write atomically: a temporary file in the same folder, fsync, then rename over `path`.

    A crash at any point leaves either the previous file or the new one, never a half-written file.
    """
    assert payload.get("format") == FORMAT, f"payload format must be {FORMAT!r}"
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


def load_model_file(path: Path, *, sha256: str = "", mmap: bool = False) -> dict[str, Any]:
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
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise ModelFileError(f"model file {path} has format {found!r}, expected {FORMAT!r}: retrain it")
    missing = [key for key in REQUIRED_KEYS if key not in payload]
    if missing:
        raise ModelFileError(f"model file {path} lacks {missing}: retrain it")
    return payload


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


def get_model(settings: Settings) -> dict[str, Any]:
    """Find (or download) and load the configured model file."""
    path, sha256 = resolve_model_file(settings)
    return load_model_file(path, sha256=sha256)
