"""Several workers, one truth: `gunicorn app:app` with two workers answers a request identically from
either worker, before and after a refresh that merged a new like (each worker follows the tables
itself). The test holds one keep-alive connection per worker (it finds which worker accepted which
connection in /proc) and asks the same question on each.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from conftest import ROOT, append_feed
from fixtures_model import copy_tables, demo_tables, free_port, trained_demo

from times import format_time


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return trained_demo(tmp_path_factory.getbasetemp() / "trained_demo")


def worker_pids(master: int) -> list[int]:
    return [int(pid) for pid in Path(f"/proc/{master}/task/{master}/children").read_text().split()]


def socket_inodes(pid: int) -> set[str]:
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    return inodes


def server_side_inode(server_port: int, client_port: int) -> str | None:
    """The inode of the accepted socket of the connection from client_port (/proc/net/tcp, IPv4)."""
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote = fields[1], fields[2]
        if int(local.split(":")[1], 16) == server_port and int(remote.split(":")[1], 16) == client_port:
            return fields[9]
    return None


def connections_per_worker(port: int, master: int, *, want: int = 2, tries: int = 60) -> dict[int, object]:
    """One open keep-alive connection accepted by each worker: {worker pid: HTTPConnection}."""
    found: dict[int, http.client.HTTPConnection] = {}
    spare = []
    for _ in range(tries):
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        connection.request("GET", "/health/live")
        connection.getresponse().read()
        client_port = connection.sock.getsockname()[1]
        inode = server_side_inode(port, client_port)
        owner = next((pid for pid in worker_pids(master) if inode in socket_inodes(pid)), None)
        if owner is not None and owner not in found:
            found[owner] = connection
        else:
            spare.append(connection)
        if len(found) == want:
            break
    for connection in spare:
        connection.close()
    return found


def ask(connection: http.client.HTTPConnection, path: str) -> bytes:
    connection.request("GET", path)
    response = connection.getresponse()
    body = response.read()
    assert response.status == 200, body[:300]
    return body


def test_two_workers_answer_identically_before_and_after_a_refresh(demo, tmp_path):
    url = f"sqlite:///{tmp_path / 'live.db'}"
    copy_tables(demo, url)
    _users, _posts, feed = demo_tables(demo)
    port = free_port()
    env = os.environ | {
        "DATABASE_URL": url,
        "MODEL_PATH": str(demo.model_path),
        "REFRESH_SECONDS": "0.5",
        "HF_HUB_OFFLINE": "1",
    }
    server = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "app:app", "--workers", "2", "--bind", f"127.0.0.1:{port}"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    pass
                if len(worker_pids(server.pid)) == 2:
                    break
            except OSError:
                pass
            assert server.poll() is None and time.monotonic() < deadline, "gunicorn did not start"
            time.sleep(0.2)
        connections = connections_per_worker(port, server.pid)
        assert len(connections) == 2, f"could not reach both workers: {list(connections)}"
        user = int(feed["user_id"].value_counts().index[0])
        moment = pd.Timestamp(feed["timestamp"].max()) + pd.Timedelta(hours=2)
        path = f"/post/recommendations/?id={user}&time={format_time(int(moment.timestamp()))}&limit=10"
        path = path.replace(" ", "%20")
        before = {pid: ask(connection, path) for pid, connection in connections.items()}
        assert len(set(before.values())) == 1, "the workers disagree before any change"
        top = json.loads(next(iter(before.values())))[0]["id"]

        append_feed(
            url,
            pd.DataFrame(
                {
                    "timestamp": [moment - pd.Timedelta(hours=1)] * 2,
                    "user_id": [user] * 2,
                    "post_id": [top] * 2,
                    "action": ["view", "like"],
                    "target": [1, 0],
                }
            ),
        )
        deadline = time.monotonic() + 30
        while True:  # both workers follow the tables on their own, each within a few cycles
            after = {pid: ask(connection, path) for pid, connection in connections.items()}
            if all(top not in [post["id"] for post in json.loads(body)] for body in after.values()):
                break
            assert time.monotonic() < deadline, "a worker never merged the new like"
            time.sleep(0.3)
        assert len(set(after.values())) == 1, "the workers answer differently after the refresh"
        for connection in connections.values():
            connection.close()
    finally:
        server.terminate()
        server.wait(timeout=30)
