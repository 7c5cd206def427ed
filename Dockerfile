# The recommendation service: python:3.11-slim, CPU-only torch, non-root, PORT from the environment.
#
#   docker build -t post-recommender .
#   docker run -p 8000:8000 -e DATABASE_URL=postgresql://USER:PASSWORD@HOST:5432/DB post-recommender
#
# The model: data/model.pt is baked into the image when it exists at build time (train it first with
# `python main_script.py`); otherwise set MODEL_URL + MODEL_SHA256 and the service downloads it once
# into MODEL_CACHE_DIR (checksum-verified) at startup, or mount a file at MODEL_PATH.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    TOKENIZERS_PARALLELISM=false \
    PORT=8000 \
    MODEL_PATH=/app/data/model.pt \
    MODEL_CACHE_DIR=/var/cache/recommender \
    TORCH_THREADS=1

WORKDIR /app

# Dependencies first (a layer that survives code changes). torch comes from the PyTorch CPU index: the
# PyPI wheel would pull the CUDA libraries (gigabytes). requirements.txt pins torch==2.13.0 too, which
# the installed 2.13.0+cpu satisfies, so the second pip keeps it.
COPY requirements.txt .
RUN pip install --index-url https://download.pytorch.org/whl/cpu torch==2.13.0 \
    && pip install -r requirements.txt

# A non-root user; it may write only the data folder (SQLite default, if used) and the model cache.
RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin app \
    && mkdir -p /app/data /var/cache/recommender \
    && chown app:app /app/data /var/cache/recommender

# The code (.dockerignore keeps out .venv, data, tests, bench, .env, .git and caches).
COPY *.py ./

# The model, when data/model.pt exists in the build context. requirements.txt is listed only so that
# the COPY has a source when there is no model (the classic builder fails on an empty wildcard);
# --chown because the pipeline writes the model file with mode 0600.
COPY --chown=app:app requirements.txt data/model.pt* /app/data/
RUN rm /app/data/requirements.txt

USER app
EXPOSE 8000

HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD python -c "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('PORT', '8000'), timeout=4)" || exit 1

# sh -c so that ${PORT} expands (PaaS convention); exec so that uvicorn is PID 1 and gets SIGTERM.
# Worker processes: WEB_CONCURRENCY (uvicorn's --workers default); each loads its own copy of the model.
CMD ["sh", "-c", "exec uvicorn app:app --host 0.0.0.0 --port ${PORT:-8000}"]
