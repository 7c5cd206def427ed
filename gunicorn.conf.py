"""gunicorn's settings for the service (read from this folder): `gunicorn app:app`, the container's command.

Workers are uvicorn's ASGI workers; gunicorn starts WEB_CONCURRENCY of them (its own variable) and binds
0.0.0.0:$PORT. The app's modules are imported once, in the master, before the workers are forked
(preload), and the master's objects are frozen out of the garbage collector's reach: the workers then
share the imported libraries' pages (torch alone is ~140 MB) instead of each holding a copy, since no
collection writes to them. Each worker runs the lifespan itself: it maps the model file (pages shared
with the other workers) and follows the tables, adding only its private delta.
"""

import gc
import os

bind = f"0.0.0.0:{os.environ.get('PORT', '8000')}"
worker_class = "uvicorn_worker.UvicornWorker"
preload_app = True
accesslog = "-"  # one line per request on stdout, as uvicorn does by default
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
