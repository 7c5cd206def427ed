"""Thread discipline: a service worker starts with at most TORCH_THREADS threads in each compute pool
(OpenBLAS, OpenMP, torch, ONNX Runtime), both in-process (the lifespan under the test client) and in a
real `gunicorn app:app` worker with the default environment, which also starts one worker per core.

Why it matters: a request's products are tiny, so a second thread never helps, while idle pool threads
spin waiting for work and take the core another worker needs (2 workers gave 0.93x one worker's
throughput with the pools at their defaults).
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import threadpoolctl
import torch
from conftest import ROOT
from fastapi import FastAPI
from fastapi.testclient import TestClient
from fixtures_model import free_port

from app import create_app

# the same app plus two probes that report the pools from inside the worker: one async (the event
# loop's thread, where the lifespan and the recommendations run), one sync (a worker thread)
PROBE_APP = """
import os

import threadpoolctl
import torch
from fastapi import Request

from app import create_app

app = create_app()


def spinning(options) -> str | None:
    try:
        return options.get_session_config_entry("session.intra_op.allow_spinning")
    except RuntimeError:  # not set: ONNX Runtime's default, which spins
        return None


def pools(request: Request) -> dict:
    session = request.app.state.recommender._user_tower.session
    options = session.get_session_options()
    return {
        "pid": os.getpid(),
        "pools": [
            {"api": p["internal_api"], "file": p["filepath"], "threads": p["num_threads"]}
            for p in threadpoolctl.threadpool_info()
        ],
        "torch": torch.get_num_threads(),
        "onnx": [options.intra_op_num_threads, options.inter_op_num_threads],
        "spinning": spinning(options),
    }


@app.get("/probe/async")
async def probe_async(request: Request) -> dict:
    return pools(request)


@app.get("/probe/sync")
def probe_sync(request: Request) -> dict:
    return pools(request)
"""


def spinning(options: object) -> str | None:
    try:
        return options.get_session_config_entry("session.intra_op.allow_spinning")
    except RuntimeError:  # not set: ONNX Runtime's default, which spins
        return None


def pool_report(app: FastAPI) -> dict:
    """What PROBE_APP's endpoint reports, for an app in this process (called in the loop's thread)."""
    options = app.state.recommender._user_tower.session.get_session_options()
    return {
        "frozen": gc.get_freeze_count(),
        "pools": [
            {"api": p["internal_api"], "file": p["filepath"], "threads": p["num_threads"]}
            for p in threadpoolctl.threadpool_info()
        ],
        "torch": torch.get_num_threads(),
        "onnx": [options.intra_op_num_threads, options.inter_op_num_threads],
        "spinning": spinning(options),
    }


def assert_limited(report: dict, threads: int, where: str) -> None:
    for pool in report["pools"]:
        assert pool["threads"] <= threads, (
            f"{where}: {pool['api']} ({pool['file']}) has {pool['threads']} threads"
        )
    assert {pool["api"] for pool in report["pools"]} >= {"openblas", "openmp"}, (
        f"{where}: threadpoolctl found no OpenBLAS/OpenMP pool: {report['pools']}"
    )
    assert report["torch"] <= threads, f"{where}: torch runs {report['torch']} threads"
    assert report["onnx"][0] <= threads and report["onnx"][1] == 1, f"{where}: ONNX Runtime {report['onnx']}"
    assert report["spinning"] == "0", f"{where}: ONNX Runtime's idle threads spin"


def widen_pools(threads: int) -> None:
    """OpenBLAS and torch at `threads` threads, set from a thread other than the main one: OpenBLAS
    ignores other threads' settings once the main thread has made one, so the lifespan (run by the test
    client in its own thread) could not narrow them again; uvicorn and gunicorn run it in the main
    thread."""
    worker = threading.Thread(target=threadpoolctl.threadpool_limits, kwargs={"limits": threads})
    worker.start()
    worker.join()
    torch.set_num_threads(threads)


def test_the_lifespan_limits_every_pool_of_its_worker(tiny_model):
    settings = tiny_model.replace(torch_threads=1)
    before = torch.get_num_threads()
    widen_pools(4)  # wider than the setting, as the defaults (one per core): the lifespan narrows them
    try:
        app = create_app(settings)
        with TestClient(app) as client:
            response = client.get("/post/recommendations/", params={"id": 200, "time": "2021-12-20 12:00:00"})
            assert response.status_code in (200, 404), response.text
            report = client.portal.call(pool_report, app)
    finally:
        torch.set_num_threads(before)
    assert_limited(report, 1, "the lifespan's thread")
    assert report["frozen"] > 0, "the lifespan left what it loaded to the garbage collector's scans"


def probe(port: int, path: str, deadline: float, server: subprocess.Popen) -> dict:
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
                return json.loads(response.read())
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            assert server.poll() is None, f"gunicorn exited with {server.returncode}"
            assert time.monotonic() < deadline, f"{path} did not answer"
            time.sleep(0.2)


def test_gunicorn_starts_one_worker_per_core_each_with_one_thread_per_pool(tiny_model, tmp_path):
    (tmp_path / "probe_app.py").write_text(PROBE_APP)
    port = free_port()
    env = {
        name: value
        for name, value in os.environ.items()  # the default environment: none of the thread variables
        if name not in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "WEB_CONCURRENCY")
        and name not in ("TORCH_THREADS", "ACCESS_LOG")
    }
    env |= {
        "DATABASE_URL": tiny_model.db_url,
        "MODEL_PATH": str(tiny_model.model_path),
        "REFRESH_SECONDS": "0",
        "HF_HUB_OFFLINE": "1",
    }
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gunicorn",
            "probe_app:app",
            "--pythonpath",
            str(tmp_path),
            "--bind",
            f"127.0.0.1:{port}",
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 120
        reports = [probe(port, path, deadline, server) for path in ("/probe/async", "/probe/sync")]
        workers = Path(f"/proc/{server.pid}/task/{server.pid}/children").read_text().split()
        assert len(workers) == len(os.sched_getaffinity(0)), f"{len(workers)} workers, not one per core"
    finally:
        server.terminate()
        server.wait(timeout=30)
    for report, where in zip(reports, ("the event loop", "a worker thread"), strict=True):
        assert_limited(report, 1, f"gunicorn worker {report['pid']}, {where}")
