"""Faults the service and pipeline must survive: the database going away, bad model files, a killed training.

The database faults run on PostgreSQL only (SQLite cannot go down): the app talks to it through a small
TCP proxy written here, which the tests stop (new connections refused, live ones cut), black-hole
(connections accepted, never answered) and start again on the same port.
"""

from __future__ import annotations

import functools
import hashlib
import http.server
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import suppress
from datetime import datetime, timedelta
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from fixtures_model import copy_tables, demo_tables, free_port, trained_demo
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session

import database
import main_script
from app import create_app
from get_model import FORMAT, ModelFileError, load_model_file
from table_feed import Feed

ROOT = Path(__file__).resolve().parent.parent
LATER = datetime(2022, 1, 5, 12, 0, 0)  # after the demo's feed: every user's whole history counts


@pytest.fixture(scope="session")
def demo(tmp_path_factory):
    return trained_demo(tmp_path_factory.getbasetemp() / "trained_demo")


@pytest.fixture(scope="module")
def ids(demo):
    users, posts, _feed = demo_tables(demo)
    return {"user": int(users["user_id"].iloc[0]), "post": int(posts["post_id"].iloc[0])}


def table_paths(ids) -> list[str]:
    user, post = ids["user"], ids["post"]
    return [f"/user/{user}", f"/post/{post}", f"/user/{user}/feed", f"/post/{post}/feed"]


def recommendations(user: int, *, limit: int = 5) -> str:
    return f"/post/recommendations/?id={user}&time={LATER:%Y-%m-%d %H:%M:%S}&limit={limit}"


# --- the database goes away (PostgreSQL behind a proxy) -----------------------------------------------


class TcpProxy:
    """127.0.0.1:port -> target. stop() refuses new connections and cuts live ones; start() listens again."""

    def __init__(self, target: tuple[str, int]):
        self.target = target
        self.port = free_port()
        self.blackhole = False  # accept connections but never forward a byte
        self._listener: socket.socket | None = None
        self._live: set[socket.socket] = set()
        self._lock = threading.Lock()

    def start(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", self.port))  # SO_REUSEADDR: same port again
        threading.Thread(target=self._accept, args=(self._listener,), daemon=True).start()

    def stop(self) -> None:
        if self._listener is not None:
            with suppress(OSError):
                self._listener.shutdown(socket.SHUT_RDWR)  # wakes the accept() below
            self._listener.close()
            self._listener = None
        self.cut()

    def cut(self) -> None:
        """Kill every live connection, as a server crash or a network reset would."""
        with self._lock:
            live, self._live = self._live, set()
        for sock in live:
            with suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            with self._lock:
                self._live.add(client)
            if self.blackhole:
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                self._live.add(upstream)
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        with suppress(OSError):
            while data := source.recv(65536):
                sink.sendall(data)
        with suppress(OSError):
            sink.shutdown(socket.SHUT_WR)


@pytest.fixture
def pg_url(demo, postgres_url):
    copy_tables(demo, postgres_url)
    return postgres_url


@pytest.fixture
def proxy(pg_url):
    target = make_url(pg_url)
    tcp = TcpProxy((target.host or "127.0.0.1", target.port or 5432))
    tcp.start()
    yield tcp
    tcp.stop()


def through(proxy: TcpProxy, url: str) -> str:
    return make_url(url).set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)


def assert_unavailable(response) -> None:
    assert response.status_code == 503, (
        f"{response.request.url}: {response.status_code} {response.text[:300]}"
    )
    assert response.headers["content-type"] == "application/json"
    assert set(response.json()) == {"detail"} and "database" in response.json()["detail"]
    assert "Traceback" not in response.text and "psycopg2" not in response.text, "internals leaked"


def three_keys(health: dict) -> tuple[str, str, str]:
    """/health's status, database and model (refresh failures, when any, are reported beside them)."""
    return health["status"], health["database"], health["model"]


def test_database_down_while_serving(demo, pg_url, proxy, ids):
    # The refresh fails while the database is down; REFRESH_FAILURES_DEGRADED high: this test is about
    # the database's state in /health (tests/test_own_data.py covers a failing refresh).
    settings = demo.replace(database_url=through(proxy, pg_url), refresh_seconds=0.2)
    app = create_app(settings.replace(refresh_failures_degraded=1000))
    with TestClient(app) as client:
        before = {path: client.get(path).json() for path in table_paths(ids)}
        top = client.get(recommendations(ids["user"])).json()
        assert len(top) == 5, top

        proxy.stop()
        for path in table_paths(ids):
            assert_unavailable(client.get(path))
        assert client.get(recommendations(ids["user"])).json() == top, "recommendations come from memory"
        assert_unavailable(client.get(recommendations(10**9)))  # unknown to the model: only the DB can tell
        assert three_keys(client.get("/health").json()) == ("degraded", "down", "loaded")
        time.sleep(0.5)  # the feed refresher fails a few times meanwhile

        proxy.start()
        assert three_keys(client.get("/health").json()) == ("ok", "up", "loaded")
        assert {path: client.get(path).json() for path in table_paths(ids)} == before
        assert client.get(recommendations(10**9)).status_code == 404

        # The refresher survived the outage: a like written now drops that post from the recommendations.
        liked = top[0]["id"]
        direct = database.make_engine(pg_url)  # not through the proxy
        with Session(direct) as session:
            session.add(
                Feed(timestamp=LATER - timedelta(hours=1), user_id=ids["user"], post_id=liked, action="like")
            )
            session.commit()
        direct.dispose()
        deadline = time.monotonic() + 15
        while liked in [p["id"] for p in client.get(recommendations(ids["user"])).json()]:
            assert time.monotonic() < deadline, "a feed row written after the outage never reached serving"
            time.sleep(0.2)


def test_database_503_is_documented(demo):
    spec = create_app(demo).openapi()
    paths = {path: ops for path, ops in spec["paths"].items() if not path.startswith("/health")}
    undocumented = [path for path, ops in paths.items() if "503" not in ops["get"]["responses"]]
    assert not undocumented, f"503 missing from {undocumented}"


def test_database_unreachable_at_startup_then_back(demo, pg_url, proxy, ids):
    """Starts degraded: health says so, table endpoints and recommendations answer 503 (the post texts live
    in the database, not in the model file); once the database is back everything answers, no restart."""
    proxy.stop()
    app = create_app(demo.replace(database_url=through(proxy, pg_url)))
    with TestClient(app) as client:
        assert client.get("/health").json() == {"status": "degraded", "database": "down", "model": "loaded"}
        for path in [*table_paths(ids), recommendations(ids["user"])]:
            assert_unavailable(client.get(path))

        proxy.start()
        assert client.get("/health").json()["status"] == "ok"
        for path in [*table_paths(ids), recommendations(ids["user"])]:
            assert client.get(path).status_code == 200, path


def test_recommendations_survive_an_outage_after_starting_without_database(demo, pg_url, proxy, ids):
    proxy.stop()
    app = create_app(demo.replace(database_url=through(proxy, pg_url), refresh_seconds=0))
    with TestClient(app) as client:
        proxy.start()
        assert client.get(recommendations(ids["user"])).status_code == 200
        proxy.stop()
        assert client.get(recommendations(ids["user"])).status_code == 200


def test_a_hanging_database_gives_an_answer_in_seconds(demo, pg_url, proxy):
    app = create_app(demo.replace(database_url=through(proxy, pg_url)))
    with TestClient(app) as client:
        assert client.get("/health").json()["database"] == "up"
        proxy.blackhole = True
        proxy.cut()
        answers: list[dict] = []
        asking = threading.Thread(target=lambda: answers.append(client.get("/health").json()), daemon=True)
        asking.start()
        asking.join(timeout=6)
        in_time = list(answers)
        proxy.stop()  # releases a request still waiting, so the app can shut down
        asking.join(timeout=10)
    assert in_time, "/health did not answer within 6 s"
    assert in_time[0]["database"] == "down"


# --- model file faults at startup (SQLite; the database is not the point here) ------------------------


def settings_with_model(demo, tmp_path, **changes):
    return demo.replace(model_path=tmp_path / "model.pt", model_cache_dir=tmp_path / "cache", **changes)


def test_no_model_file_starts_without_recommendations(demo, tmp_path, ids):
    with TestClient(create_app(settings_with_model(demo, tmp_path))) as client:
        assert client.get("/health").json() == {"status": "ok", "database": "up", "model": "absent"}
        response = client.get(recommendations(ids["user"]))
        assert response.status_code == 503 and "no model loaded" in response.json()["detail"]
        assert client.get(f"/user/{ids['user']}").status_code == 200, "table endpoints work without a model"


def test_model_url_unreachable_stops_startup(demo, tmp_path):
    settings = settings_with_model(
        demo, tmp_path, model_url=f"http://127.0.0.1:{free_port()}/model.pt", model_sha256="0" * 64
    )
    with (
        pytest.raises(ModelFileError, match="could not download the model file"),
        TestClient(create_app(settings)),
    ):
        pass
    assert not any((tmp_path / "cache").glob("*")), "a partial download was left behind"


def test_truncated_model_file_stops_startup(demo, tmp_path):
    data = demo.model_path.read_bytes()
    (tmp_path / "model.pt").write_bytes(data[: len(data) // 2])
    with (
        pytest.raises(ModelFileError, match="corrupt or truncated"),
        TestClient(create_app(settings_with_model(demo, tmp_path))),
    ):
        pass


class FileServer:
    """A local HTTP server for one folder (MODEL_URL tests)."""

    def __init__(self, folder: Path):
        handler = functools.partial(QuietHandler, directory=str(folder))
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def served_model(demo, tmp_path):
    folder = tmp_path / "served"
    folder.mkdir()
    shutil.copy(demo.model_path, folder / "model.pt")
    server = FileServer(folder)
    yield f"{server.url}/model.pt", hashlib.sha256(demo.model_path.read_bytes()).hexdigest()
    server.httpd.shutdown()
    server.httpd.server_close()


def test_model_url_with_the_right_checksum_serves(demo, tmp_path, served_model, ids):
    url, sha256 = served_model
    settings = settings_with_model(demo, tmp_path, model_url=url, model_sha256=sha256)
    with TestClient(create_app(settings)) as client:
        assert client.get(recommendations(ids["user"])).status_code == 200
    assert (tmp_path / "cache" / f"{sha256}.pt").read_bytes() == demo.model_path.read_bytes()


def test_model_url_with_a_wrong_checksum_stops_startup(demo, tmp_path, served_model):
    url, sha256 = served_model
    wrong = sha256[::-1]
    settings = settings_with_model(demo, tmp_path, model_url=url, model_sha256=wrong)
    with (
        pytest.raises(ModelFileError, match=f"has SHA-256 {sha256}, expected {wrong}"),
        TestClient(create_app(settings)),
    ):
        pass
    assert not any((tmp_path / "cache").glob("*")), "the file that failed its checksum was kept"


def test_tampered_cached_download_stops_startup(demo, tmp_path, served_model):
    url, sha256 = served_model
    cached = tmp_path / "cache" / f"{sha256}.pt"
    cached.parent.mkdir()
    data = bytearray(demo.model_path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte
    cached.write_bytes(bytes(data))
    settings = settings_with_model(demo, tmp_path, model_url=url, model_sha256=sha256)
    with pytest.raises(ModelFileError, match="does not match MODEL_SHA256"), TestClient(create_app(settings)):
        pass


def test_model_sha256_checks_a_local_file_too(demo, tmp_path):
    shutil.copy(demo.model_path, tmp_path / "model.pt")
    settings = settings_with_model(demo, tmp_path, model_sha256="0" * 64)
    with pytest.raises(ModelFileError, match="does not match MODEL_SHA256"), TestClient(create_app(settings)):
        pass


class RunsCode:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_model_file_with_code_is_refused_without_running_it(demo, tmp_path):
    marker = tmp_path / "code_ran"
    torch.save({"format": FORMAT, "config": RunsCode(marker)}, tmp_path / "model.pt")
    with (
        pytest.raises(ModelFileError, match="something other than tensors"),
        TestClient(create_app(settings_with_model(demo, tmp_path))),
    ):
        pass
    assert not marker.exists(), "loading the model file ran code from it"
    torch.load(tmp_path / "model.pt", weights_only=False)  # the control: an unsafe load does run it
    assert marker.exists(), "the test's payload is not live, so the check above proves nothing"


def test_uvicorn_exits_nonzero_on_a_truncated_model(demo, tmp_path):
    data = demo.model_path.read_bytes()
    (tmp_path / "model.pt").write_bytes(data[: len(data) // 3])
    env = {
        **os.environ,
        "DATABASE_URL": demo.db_url,
        "MODEL_PATH": str(tmp_path / "model.pt"),
        "MODEL_URL": "",
        "MODEL_SHA256": "",
        "HF_HUB_OFFLINE": "1",
    }
    port = str(free_port())
    done = subprocess.run(
        [sys.executable, "-m", "uvicorn", "app:app", "--host", "127.0.0.1", "--port", port],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode != 0
    assert f"model file {tmp_path / 'model.pt'} is corrupt or truncated" in done.stderr, done.stderr
    assert "Application startup failed" in done.stderr and "Uvicorn running" not in done.stderr


# --- training killed mid-epoch -----------------------------------------------------------------------


def pipeline_env(folder: Path, **overrides: str) -> dict[str, str]:
    """The environment `python main_script.py all` runs with: a tiny, short training inside `folder`."""
    env = {
        "DATABASE_URL": f"sqlite:///{folder / 'demo.db'}",
        "MODEL_PATH": str(folder / "model.pt"),
        "EMBED_CACHE_DIR": str(folder / "embed_cache"),
        "GROUND_TRUTH_PATH": str(folder / "no_truth.npz"),
        "MODEL_URL": "",
        "MODEL_SHA256": "",
        "BATCH_SIZE": "256",
        "TRAIN_SAMPLE": "4000",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    return env | overrides


def test_training_killed_mid_epoch_keeps_the_previous_model(demo, tmp_path, monkeypatch):
    copy_tables(demo, f"sqlite:///{tmp_path / 'demo.db'}")
    shutil.copytree(demo.embed_cache_dir, tmp_path / "embed_cache")  # no re-embedding: straight to training
    shutil.copy(demo.model_path, tmp_path / "model.pt")
    previous = (tmp_path / "model.pt").read_bytes()

    command = [sys.executable, str(ROOT / "main_script.py"), "all"]
    training = subprocess.Popen(
        command,
        cwd=tmp_path,
        env=os.environ | pipeline_env(tmp_path, EPOCHS="50"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    progress = bytearray()  # tqdm redraws with \r, so read bytes, not lines

    def read_progress() -> None:
        while chunk := training.stderr.read1(4096):
            progress.extend(chunk)

    reader = threading.Thread(target=read_progress)
    reader.start()
    mid_epoch = re.compile(rb"epoch 1/50: +\d+%\|[^|]*\| *[1-9]\d*/\d+")  # at least one step done
    deadline = time.monotonic() + 180
    try:
        while not mid_epoch.search(progress):
            tail = progress[-2000:].decode(errors="replace")
            assert training.poll() is None, f"training ended before it was killed:\n{tail}"
            assert time.monotonic() < deadline, f"no epoch progress in 180 s:\n{tail}"
            time.sleep(0.05)
    finally:
        training.send_signal(signal.SIGKILL)  # mid-epoch; at once if the wait above failed
        training.wait(timeout=30)
        reader.join()
    assert training.returncode == -signal.SIGKILL

    assert (tmp_path / "model.pt").read_bytes() == previous, "the previous model file changed"
    assert not list(tmp_path.glob(".model.pt.*")), "a temporary model file was left behind"

    # The rerun, in process to save an interpreter start: the same CLI entry point and environment.
    for name, value in pipeline_env(tmp_path, EPOCHS="1").items():
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(tmp_path)
    assert main_script.main(["--quiet", "all"]) == 0
    model_file = load_model_file(tmp_path / "model.pt")
    assert (tmp_path / "model.pt").read_bytes() != previous, "the rerun did not write a new model"
    assert len(model_file.history) == 1
    assert not list(tmp_path.glob(".model.pt.*"))
