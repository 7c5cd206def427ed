"""The model file: atomic writes, safe loading, and one clear error for every way it can be wrong."""

from __future__ import annotations

import dataclasses
import hashlib
import http.server
import os
import socket
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from features import UserFeatures
from get_model import (
    FORMAT,
    FeedSnapshot,
    ModelFile,
    ModelFileError,
    get_model,
    load_model_file,
    save_model_file,
)
from histories import Histories
from model import TwoTowerConfig
from settings import Settings


def payload() -> ModelFile:
    """A model file with every field, small: weights "w", three posts, no users."""
    return ModelFile(
        config=TwoTowerConfig(n_posts=3, n_topics=2, user_cardinalities=[2], text_dim=4, max_history=2),
        state_dict={"w": torch.arange(6.0)},
        autoencoder_dims={"in_dim": 8, "hidden_dim": 4, "code_dim": 4},
        autoencoder_state={},
        user_tower_onnx=b"onnx",
        vocabs={"topic": ["<unk>", "movie"]},
        age_scaler=(30.0, 10.0),
        stats_scaler=(np.zeros(5, np.float32), np.ones(5, np.float32)),
        post_stat_names=("a", "b", "c", "d", "e"),
        post_ids=np.arange(3),
        text_encoder="encoder",
        encoder_key="encoder;128",
        objective="joint",
        train_size=0,
        data_window={},
        metrics={},
        history=[],
        snapshot=FeedSnapshot(
            start=0,
            end=1,
            feed_rows=0,
            users=UserFeatures(
                np.zeros(0, np.int64), np.zeros((0, 1), np.int64), np.zeros((0, 1), np.float32)
            ),
            histories=Histories.empty(0),
        ),
    )


def same(a: object, b: object) -> bool:
    """Deep equality over dataclasses, containers, arrays and tensors."""
    if dataclasses.is_dataclass(a):
        return type(a) is type(b) and all(
            same(getattr(a, f.name), getattr(b, f.name)) for f in dataclasses.fields(a)
        )
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, np.ndarray | torch.Tensor):
        return np.array_equal(np.asarray(a), np.asarray(b))
    return a == b


class Evil:
    def __reduce__(self):
        return (os.system, ("touch pwned_marker",))


def test_round_trip_with_weights_only(tmp_path):
    path = save_model_file(payload(), tmp_path / "model.pt")
    loaded = load_model_file(path)
    assert torch.equal(loaded.state_dict["w"], torch.arange(6.0))
    assert same(loaded, dataclasses.replace(payload(), created=loaded.created)), "every field round-trips"
    assert not list(tmp_path.glob(".model.pt.*")), "temporary file left behind"


def test_failed_write_keeps_the_previous_file(tmp_path, monkeypatch):
    path = save_model_file(payload(), tmp_path / "model.pt")
    before = path.read_bytes()

    def crash(*_args, **_kwargs):
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        save_model_file(dataclasses.replace(payload(), metrics={"new": 1.0}), path)
    assert path.read_bytes() == before
    assert not list(tmp_path.glob(".model.pt.*"))


def test_missing_file(tmp_path):
    with pytest.raises(ModelFileError, match="not found"):
        load_model_file(tmp_path / "nope.pt")


def test_truncated_file(tmp_path):
    path = save_model_file(payload(), tmp_path / "model.pt")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ModelFileError, match="corrupt or truncated"):
        load_model_file(path)


def test_other_format_version(tmp_path):
    path = tmp_path / "old.pt"
    torch.save({"state_dict": {}, "format": "post-recommender/2"}, path)
    with pytest.raises(ModelFileError, match=f"format 'post-recommender/2', expected '{FORMAT}': retrain"):
        load_model_file(path)


def test_pickle_with_code_is_refused_and_never_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pt"
    torch.save({"format": FORMAT, "payload": Evil()}, path)
    with pytest.raises(ModelFileError, match="refusing to load"):
        load_model_file(path)
    assert not (tmp_path / "pwned_marker").exists(), "the pickle's code ran"


def test_wrong_checksum(tmp_path):
    path = save_model_file(payload(), tmp_path / "model.pt")
    with pytest.raises(ModelFileError, match="does not match MODEL_SHA256"):
        load_model_file(path, sha256="0" * 64)


@pytest.fixture
def file_server(tmp_path):
    served = tmp_path / "served"
    served.mkdir()
    handler = lambda *a, **k: http.server.SimpleHTTPRequestHandler(*a, directory=served, **k)  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield served, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_download_verifies_checksum_and_caches(tmp_path, file_server):
    served, base = file_server
    path = save_model_file(payload(), served / "model.pt")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    settings = Settings(
        model_path=tmp_path / "absent.pt",
        model_url=f"{base}/model.pt",
        model_sha256=digest,
        model_cache_dir=tmp_path / "cache",
    )
    loaded = get_model(settings)
    assert np.array_equal(loaded.post_ids, np.arange(3))
    assert (tmp_path / "cache" / f"{digest}.pt").is_file()

    bad = settings.replace(model_sha256="f" * 64, model_cache_dir=tmp_path / "cache2")
    with pytest.raises(ModelFileError, match="expected"):
        get_model(bad)
    assert not any((tmp_path / "cache2").iterdir()), "a file that failed its checksum was kept"


def test_unreachable_url_is_a_clear_error(tmp_path):
    settings = Settings(
        model_path=tmp_path / "absent.pt",
        model_url="http://127.0.0.1:9/model.pt",
        model_sha256="a" * 64,
        model_cache_dir=tmp_path / "cache",
    )
    with pytest.raises(ModelFileError, match="could not download"):
        get_model(settings)


def test_settings_require_checksum_with_url():
    with pytest.raises(ValueError, match="MODEL_SHA256"):
        Settings(model_url="http://example.invalid/model.pt")
    assert Path(Settings().model_path).name == "model.pt"


@pytest.mark.parametrize(
    "answer",
    [
        b"NOT-HTTP garbage\r\n\r\n",  # http.client.BadStatusLine
        b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\npartial body",  # IncompleteRead mid-body
    ],
)
def test_any_download_failure_is_one_model_file_error_and_leaves_no_partial_file(tmp_path, answer):
    """A malformed HTTP answer used to escape as http.client.BadStatusLine and leave a .part file."""
    listener = socket.create_server(("127.0.0.1", 0))

    def answer_once() -> None:
        connection, _ = listener.accept()
        with connection:
            connection.recv(65536)
            connection.sendall(answer)

    threading.Thread(target=answer_once, daemon=True).start()
    settings = Settings(
        model_path=tmp_path / "absent.pt",
        model_url=f"http://127.0.0.1:{listener.getsockname()[1]}/model.pt",
        model_sha256="a" * 64,
        model_cache_dir=tmp_path / "cache",
    )
    try:
        with pytest.raises(ModelFileError, match="could not download the model file") as caught:
            get_model(settings)
    finally:
        listener.close()
    assert "\n" not in str(caught.value), "one line"
    assert not any((tmp_path / "cache").iterdir()), "a partial download was left in the cache"
