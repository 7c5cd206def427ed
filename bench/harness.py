"""The one shared harness of the benches: logging, timing summaries, the bench's demo and model, and a
served app to measure (start, stop, its CPU time and memory, load generators).

Nothing here runs by itself; the benches import it (`from bench.harness import ...`) and are run from the
repository root as `python -m bench.NAME`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/bench"  # the bench's full demo
DATA_DIR = ROOT / "data" / "bench"  # the bench's model, truth file and caches (never the demo's)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def load_average() -> float:
    return round(os.getloadavg()[0], 2)


def percentiles_ms(seconds: list[float] | np.ndarray) -> dict[str, float]:
    values = np.asarray(seconds, dtype=np.float64) * 1000.0
    assert len(values) > 0, "no timings to summarise"
    return {
        "p50": round(float(np.percentile(values, 50)), 4),
        "p99": round(float(np.percentile(values, 99)), 4),
        "mean": round(float(values.mean()), 4),
        "max": round(float(values.max()), 4),
        "n": len(values),
    }


# ----------------------------------------------------------------------------- the bench's demo and model


def child_env(*, database_url: str, data_dir: Path, scale: str) -> dict[str, str]:
    """Settings for every child process (main_script.py, uvicorn): the environment wins over .env."""
    env = dict(os.environ)
    env.update(
        DATABASE_URL=database_url,
        DEMO_SCALE=scale,
        GROUND_TRUTH_PATH=str(data_dir / "demo_truth.npz"),
        EMBED_CACHE_DIR=str(data_dir / "embed_cache"),
        MODEL_PATH=str(data_dir / "model.pt"),
        MODEL_CACHE_DIR=str(data_dir / "model_cache"),
        EXPORT_DIR=str(data_dir / "export"),
        EPOCHS="1",
        TRAIN_SAMPLE="300000",
        TORCH_THREADS="1",
        REFRESH_SECONDS="3600",  # no history refresh during the measurement
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        PYTHONUNBUFFERED="1",
    )
    env.pop("MODEL_URL", None)  # the bench trains its own model; a download setting would mask that
    for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "WEB_CONCURRENCY"):
        env.pop(name, None)  # the service as deployed: its own thread discipline, not the caller's
    env.pop("MODEL_SHA256", None)
    return env


def table_counts(database_url: str) -> dict[str, int]:
    """Rows of user_data and post_text_df, and whether feed_data has any row (0 or 1)."""
    from sqlalchemy import inspect, text

    import database

    engine = database.make_engine(database_url)
    try:
        tables = set(inspect(engine).get_table_names())
        counts = {"users": 0, "posts": 0, "feed_any": 0}
        with engine.connect() as conn:
            if "feed_data" in tables:
                counts["feed_any"] = int(
                    conn.execute(text("SELECT 1 FROM feed_data LIMIT 1")).first() is not None
                )
            if "user_data" in tables:
                counts["users"] = int(conn.execute(text("SELECT count(*) FROM user_data")).scalar_one())
            if "post_text_df" in tables:
                counts["posts"] = int(conn.execute(text("SELECT count(*) FROM post_text_df")).scalar_one())
        return counts
    finally:
        engine.dispose()


def run_step(args: list[str], *, env: dict[str, str]) -> float:
    """Run `python main_script.py ARGS` with its output on our stderr; returns the seconds it took."""
    command = [sys.executable, "main_script.py", *args]
    log(f"$ {' '.join(command)}")
    clock = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, env=env, stdout=sys.stderr, stderr=sys.stderr, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"`{' '.join(command)}` failed with exit code {done.returncode}")
    return time.perf_counter() - clock


def ensure_database(database_url: str) -> None:
    """Create the PostgreSQL database of `database_url` when the server lacks it (SQLite files create
    themselves); a server that cannot be reached or refuses stops the bench with one line."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import OperationalError, ProgrammingError

    url = make_url(database_url)
    if url.get_backend_name() != "postgresql":
        return
    server = url.set(drivername="postgresql+psycopg2", database="postgres")
    try:
        admin = create_engine(server, isolation_level="AUTOCOMMIT", connect_args={"connect_timeout": 3})
        with admin.connect() as conn:
            exists = conn.execute(text("SELECT 1 FROM pg_database WHERE datname = :n"), {"n": url.database})
            if exists.first() is None:
                conn.execute(text(f'CREATE DATABASE "{url.database}"'))
                log(f"created database {url.database!r} on {url.host}:{url.port or 5432}")
        admin.dispose()
    except (OperationalError, ProgrammingError) as exc:
        where = url.render_as_string(hide_password=True)
        raise SystemExit(
            f"cannot create or reach {where} ({exc.__class__.__name__}): "
            f"create it yourself (createdb -h {url.host} -U {url.username or 'postgres'} {url.database}) "
            "or pass --database-url"
        ) from None


def build_or_reuse(*, database_url: str, data_dir: Path, scale: str) -> dict[str, object]:
    """Demo tables and the bench model: generated/trained when missing, reused otherwise."""
    import get_model

    ensure_database(database_url)
    env = child_env(database_url=database_url, data_dir=data_dir, scale=scale)
    data_dir.mkdir(parents=True, exist_ok=True)
    model_path = data_dir / "model.pt"
    info: dict[str, object] = {"demo_data_s": None, "train_s": None}
    if table_counts(database_url)["feed_any"]:
        log(f"demo data: reusing the tables in {database_url}")
    else:
        log(f"demo data: feed_data is empty in {database_url}: generating the {scale!r} demo")
        info["demo_data_s"] = round(run_step(["demo-data", "--scale", scale], env=env), 1)
        log(f"demo data: generated in {info['demo_data_s']} s")
    if get_model.usable(model_path):
        log(f"model: reusing {model_path}")
    else:
        log(
            f"model: {model_path} missing or unusable: training it briefly (EPOCHS=1, TRAIN_SAMPLE=300000); "
            "model quality does not change serving latency, the network shape is the same"
        )
        info["train_s"] = round(run_step(["all"], env=env), 1)
        log(f"model: trained in {info['train_s']} s")
    counts = table_counts(database_url)
    info.update(n_users_db=counts["users"], n_posts_db=counts["posts"])
    return info


def read_posts(database_url: str) -> pd.DataFrame:
    """post_text_df as the app's lifespan reads it (for the pre-encoded PostGet JSON)."""
    from sqlalchemy import text

    import database

    engine = database.make_engine(database_url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(text("SELECT post_id, text, topic FROM post_text_df")).all()
    finally:
        engine.dispose()
    return pd.DataFrame(rows, columns=["post_id", "text", "topic"])


# ----------------------------------------------------------------------------- a served app


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_server(
    *,
    env: dict[str, str],
    port: int,
    log_path: Path,
    app: str = "app:app",
    app_dir: Path | None = None,
    access_log: bool = True,
    workers: int = 1,
    timeout_s: float = 300.0,
) -> tuple[subprocess.Popen, float]:
    """Spawn the container's server, `gunicorn app:app` (gunicorn.conf.py: uvicorn workers, preload) with
    N workers; returns it and the seconds until /health said ready."""
    command = [
        sys.executable, "-m", "gunicorn", app, "--bind", f"127.0.0.1:{port}", "--workers", str(workers),
        *([] if access_log else ["--access-logfile", "/dev/null"]),
        *(["--pythonpath", str(app_dir)] if app_dir else []),
    ]  # fmt: skip
    log(f"$ {' '.join(command)}  (log: {log_path})")
    handle = open(log_path, "wb")  # noqa: SIM115  (the server writes into it until it stops)
    clock = time.perf_counter()
    server = subprocess.Popen(command, cwd=ROOT, env=env, stdout=handle, stderr=subprocess.STDOUT)
    handle.close()
    url = f"http://127.0.0.1:{port}/health"
    deadline = clock + timeout_s
    while time.perf_counter() < deadline:
        if server.poll() is not None:
            tail = log_path.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"uvicorn exited with code {server.returncode} during startup:\n{tail}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                health = json.loads(response.read())
            elapsed = time.perf_counter() - clock
            if health.get("model") != "loaded" or health.get("database") != "up":
                stop_server(server)
                raise RuntimeError(f"the server started without its model or database: /health = {health}")
            return server, elapsed
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.05)
    stop_server(server)
    raise RuntimeError(f"/health did not answer within {timeout_s} s: see {log_path}")


def stop_server(server: subprocess.Popen, *, timeout_s: float = 15.0) -> None:
    """SIGTERM (gunicorn's graceful stop: the workers finish and exit), then SIGKILL to the whole tree."""
    if server.poll() is None:
        members = process_tree(server.pid)
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            for pid in members:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            server.wait(timeout=timeout_s)


def process_tree(pid: int) -> list[int]:
    """pid and all its descendants (from /proc/PID/task/*/children)."""
    pids, todo = [], [pid]
    while todo:
        current = todo.pop()
        pids.append(current)
        for task in Path(f"/proc/{current}/task").glob("*"):
            try:
                todo.extend(int(child) for child in (task / "children").read_text().split())
            except OSError:
                continue
    return pids


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of the process tree so far (all threads), from /proc/PID/stat."""
    total = 0
    for member in process_tree(pid):
        try:
            fields = Path(f"/proc/{member}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)
    return total / os.sysconf("SC_CLK_TCK")


def memory_mb(pid: int) -> dict[str, float]:
    """VmRSS (now), VmHWM (peak) and Pss (each shared page divided among the processes mapping it)
    summed over the process tree, in MB."""
    total = {"VmRSS": 0, "VmHWM": 0, "Pss": 0}
    for member in process_tree(pid):
        for source in ("status", "smaps_rollup"):
            try:
                lines = Path(f"/proc/{member}/{source}").read_text().splitlines()
            except OSError:
                continue
            for line in lines:
                key, _, value = line.partition(":")
                if key in total:
                    total[key] += int(value.split()[0])  # kB
    return {
        "rss_mb": round(total["VmRSS"] / 1024, 1),
        "peak_rss_mb": round(total["VmHWM"] / 1024, 1),
        "pss_mb": round(total["Pss"] / 1024, 1),
    }


# ----------------------------------------------------------------------------- load generators

WRK_SCRIPT = """
local paths = {}
for line in io.lines("%(paths_file)s") do paths[#paths + 1] = line end
local counter = 0
request = function()
  counter = counter + 1
  return wrk.format("GET", paths[(counter %% #paths) + 1])
end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH_JSON {"requests": %%d, "duration_s": %%.6f, "p50_ms": %%.4f, "p99_ms": %%.4f, ' ..
    '"mean_ms": %%.4f, "max_ms": %%.4f, "errors": %%d, "non_2xx": %%d}\\n',
    summary.requests, summary.duration / 1e6, latency:percentile(50) / 1000,
    latency:percentile(99) / 1000, latency.mean / 1000, latency.max / 1000,
    e.connect + e.read + e.write + e.timeout, e.status))
end
"""


def run_wrk(*, port: int, paths: list[str], concurrency: int, seconds: float, work_dir: Path) -> dict:
    """wrk with one thread and `concurrency` keep-alive connections, cycling through `paths`."""
    handle, name = tempfile.mkstemp(suffix=".txt", dir=work_dir)
    paths_file = Path(name)
    with os.fdopen(handle, "w") as out:
        out.write("\n".join(paths) + "\n")
    script = work_dir / "bench.lua"
    script.write_text(WRK_SCRIPT % {"paths_file": paths_file})
    command = [
        "wrk", "-t1", f"-c{concurrency}", f"-d{max(1, round(seconds))}s", "--timeout", "10s",
        "-s", str(script), f"http://127.0.0.1:{port}",
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, check=False, timeout=seconds + 60)
    lines = [line for line in done.stdout.splitlines() if line.startswith("BENCH_JSON ")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"wrk failed ({done.returncode}): {done.stdout[-1000:]} {done.stderr[-1000:]}")
    result = json.loads(lines[-1].removeprefix("BENCH_JSON "))
    result["rps"] = result["requests"] / result["duration_s"]
    return result


async def _python_load(port: int, paths: list[str], concurrency: int, seconds: float) -> dict:
    latencies: list[float] = []
    counts = {"errors": 0, "non_2xx": 0, "next": 0}

    async def connection(offset: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        index = offset
        try:
            while time.perf_counter() < deadline:
                path = paths[index % len(paths)]
                index += concurrency
                clock = time.perf_counter()
                writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(
                    int(line.split(b":", 1)[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length:")
                )
                await reader.readexactly(length)
                latencies.append(time.perf_counter() - clock)
                counts["non_2xx"] += not head[9:12].startswith(b"2")
        except (OSError, asyncio.IncompleteReadError, StopIteration):
            counts["errors"] += 1
        finally:
            writer.close()

    start = time.perf_counter()
    deadline = start + seconds
    await asyncio.gather(*(connection(i) for i in range(concurrency)))
    elapsed = time.perf_counter() - start
    stats = percentiles_ms(latencies) if latencies else {"p50": 0.0, "p99": 0.0, "mean": 0.0, "max": 0.0}
    return {
        "requests": len(latencies),
        "duration_s": elapsed,
        "p50_ms": stats["p50"],
        "p99_ms": stats["p99"],
        "mean_ms": stats["mean"],
        "max_ms": stats["max"],
        "errors": counts["errors"],
        "non_2xx": counts["non_2xx"],
        "rps": len(latencies) / elapsed,
    }


def _python_load_child(port: int, paths: list[str], concurrency: int, seconds: float, out) -> None:
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    out.send(asyncio.run(_python_load(port, paths, concurrency, seconds)))
    out.close()


def run_python_client(
    *, port: int, paths: list[str], concurrency: int, seconds: float, work_dir: Path
) -> dict:
    """The asyncio keep-alive client in a separate process, so it never shares the server's CPU time."""
    context = multiprocessing.get_context("spawn")
    receive, send = context.Pipe(duplex=False)
    child = context.Process(target=_python_load_child, args=(port, paths, concurrency, seconds, send))
    child.start()
    send.close()
    if not receive.poll(seconds + 60):
        child.kill()
        raise RuntimeError("the python load client did not report back in time")
    result = receive.recv()
    child.join(timeout=10)
    return result
