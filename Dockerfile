# The recommendation service: Python 3.11, CPU-only torch, numeric non-root user, PORT from the environment.
#
#   docker build -t post-recommender .
#   docker run -p 8000:8000 -e DATABASE_URL=postgresql://USER:PASSWORD@HOST:5432/DB post-recommender
#
# The model: data/model.pt is baked into the image when it exists at build time (train it first with
# `python main_script.py`); otherwise set MODEL_URL + MODEL_SHA256 and the service downloads it once
# into MODEL_CACHE_DIR (checksum-verified) at startup, or mount a file at MODEL_PATH.
#
# Build arguments:
#   BASE_IMAGE       any Debian-like image with python3.11 and its venv module. The default is the official
#                    slim image pinned by tag and multi-arch digest; where no registry can be reached,
#                    tools/make_base_image.sh builds a local one (see tools/container_check.sh).
#   TORCH_INDEX_URL  a PEP 503 index holding the CPU torch wheel and its dependencies.
#   TORCH_VERSION    must equal the torch pin in requirements-serve.txt (the build checks it).
# Podman/buildah: build with `--format docker`, or the OCI format drops the HEALTHCHECK.
ARG BASE_IMAGE=python:3.11.15-slim-bookworm@sha256:d29f48a31a8b408ed19272ca1e7b10ebae13b240a27e862d3d4217c528e2e0c3
FROM ${BASE_IMAGE}

ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG TORCH_VERSION=2.13.0

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PORT=8000 \
    MODEL_PATH=/app/data/model.pt \
    MODEL_CACHE_DIR=/var/cache/recommender \
    TORCH_THREADS=1

WORKDIR /app

# A venv rather than the base's site-packages: the same steps then work on the official image (python in
# /usr/local) and on plain Debian (whose system python refuses pip installs, PEP 668).
# torch alone first: the largest layer, which a change to the other requirements then leaves cached. Only
# TORCH_INDEX_URL is searched, so the PyPI wheel of the same version (with CUDA, gigabytes) cannot win.
RUN python3 -m venv "$VIRTUAL_ENV" \
    && pip install --index-url "$TORCH_INDEX_URL" "torch==$TORCH_VERSION"

# The rest of the runtime from PyPI. The installed 2.13.0+cpu satisfies the torch==2.13.0 pin, so pip keeps
# it; the grep stops a build whose TORCH_VERSION disagrees with the file (pip would then fetch CUDA torch).
COPY requirements-serve.txt .
RUN grep -qx "torch==$TORCH_VERSION" requirements-serve.txt \
    && pip install -r requirements-serve.txt

# A numeric uid/gid (USER below), so that runtimes enforcing runAsNonRoot can verify it. The user may write
# only the data folder (SQLite, if used) and the model cache.
RUN groupadd --gid 10001 app \
    && useradd --uid 10001 --gid 10001 --create-home --shell /usr/sbin/nologin app \
    && mkdir -p /app/data /var/cache/recommender \
    && chown 10001:10001 /app/data /var/cache/recommender

# The code (.dockerignore lets in only *.py, requirements-serve.txt and data/model.pt).
COPY *.py ./

# The model, when data/model.pt exists in the build context. requirements-serve.txt is listed only so that
# the COPY has a source when there is no model (the classic builder fails on an empty wildcard);
# --chown because the pipeline writes the model file with mode 0600.
COPY --chown=10001:10001 requirements-serve.txt data/model.pt* /app/data/
RUN rm /app/data/requirements-serve.txt

USER 10001:10001
EXPOSE 8000

# Liveness only (/health/live touches neither database nor model): a database outage must not get the
# container restarted. Readiness is GET /health. urllib, because the image has no curl; any error or
# non-2xx answer raises, and python then exits 1 (unhealthy).
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health/live' % os.environ.get('PORT', '8000'), timeout=4)"]

# gunicorn with uvicorn workers (gunicorn.conf.py): binds 0.0.0.0:$PORT, starts WEB_CONCURRENCY workers
# (default: one per CPU core) that share the imported libraries and the memory-mapped model file;
# PID 1, gets SIGTERM.
CMD ["gunicorn", "app:app"]
