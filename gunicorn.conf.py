"""gunicorn's settings for the service (read from this folder): `gunicorn app:app`, the container's command.

Workers are uvicorn's ASGI workers; gunicorn starts WEB_CONCURRENCY of them (one per CPU core when it
is unset) and binds 0.0.0.0:$PORT. The app's modules are imported once, in the master, before the
workers are forked (preload), and the master's objects are frozen out of the garbage collector's reach:
the workers then share the imported libraries' pages (torch alone is ~140 MB) instead of each holding a
copy, since no collection writes to them. Each worker runs the lifespan itself: it maps the model file
(pages shared with the other workers) and follows the tables, adding only its private delta.

Threads: one worker per core, each with TORCH_THREADS (default 1) threads in its compute pools. OpenMP
and OpenBLAS read their thread counts from the environment when they load, which is during the preload
below, so the variables are set here first (unless the operator set them); the lifespan limits the
pools again (serving.limit_threads), for `uvicorn app:app` and any library loaded later.
"""

import gc
import os

from settings import Settings

_settings = Settings()  # the environment and .env, as the app reads them
for _name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_name, str(_settings.torch_threads))

bind = f"0.0.0.0:{os.environ.get('PORT', '8000')}"
worker_class = "uvicorn_worker.UvicornWorker"
# gunicorn's own default is 1 worker; a worker is single-threaded compute, so one per core the process
# may run on (the affinity mask: a container's cpuset)
workers = _settings.web_concurrency or len(os.sched_getaffinity(0)) or 1
preload_app = True
accesslog = "-" if _settings.access_log else None  # on: one line per request on stdout, as uvicorn does
graceful_timeout = 20
timeout = (
    180  # a worker is silent until its startup ends: at a million posts the FAISS index alone takes ~30 s
)


def when_ready(server: object) -> None:  # gunicorn calls it in the master, after the preload
    gc.freeze()


def child_exit(server: object, worker: object) -> None:  # gunicorn calls it in the master
    """A dead worker's metric files stop counting as live (prometheus-client's multiprocess mode)."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(worker.pid)  # type: ignore[attr-defined]
