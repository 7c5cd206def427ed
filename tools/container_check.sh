#!/usr/bin/env bash
# Proves the container: builds the image, runs it with the demo database and model mounted, waits for its
# HEALTHCHECK, asks for readiness and recommendations, and reports the image size.
#
#   tools/container_check.sh [DATA_DIR] [IMAGE]
#     DATA_DIR  folder with demo.db and model.pt (default data/; `make run` or main_script.py makes them)
#     IMAGE     tag to build (default localhost/post-recommender:check)
#   env: BASE_IMAGE       base to build on (default: a local Debian bookworm + python3.11, made by
#                         tools/make_base_image.sh, since registry images cannot be pulled everywhere)
#        TORCH_INDEX_URL  index with the CPU torch wheel (default: one served from TORCH_WHEEL_DIR)
#        TORCH_WHEEL_DIR  folder holding torch-<version>+cpu-cp311-*.whl (default /opt/wheels)
#        TORCH_INDEX_PORT loopback port serving that wheel during the build (default 18765)
#        USER_ID          user to recommend for (default: the latest viewer in the demo feed)
#        HEALTH_TIMEOUT   seconds to wait for health (default 180)
# Needs root, podman and python3 (apt-get install -y podman buildah debootstrap runc curl).
set -euo pipefail

cd "$(dirname "$0")/.."
DATA_DIR=$(realpath -m "${1:-data}")
IMAGE=${2:-localhost/post-recommender:check}
BASE_IMAGE=${BASE_IMAGE:-localhost/debian-bookworm-python:3.11}
TORCH_WHEEL_DIR=${TORCH_WHEEL_DIR:-/opt/wheels}
HEALTH_TIMEOUT=${HEALTH_TIMEOUT:-180}
NAME=post-recommender-check-$$
WORK=$(mktemp -d /var/tmp/container-check.XXXXXX)

die() { echo "FAILED: $*" >&2; exit 1; }
free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
cleanup() {
  status=$?
  if podman container exists "$NAME" 2>/dev/null; then
    [ "$status" = 0 ] || { echo "--- container log (tail)"; podman logs --tail 30 "$NAME" 2>&1 || true; }
    podman rm -f -t 5 "$NAME" >/dev/null 2>&1 || true
  fi
  [ -z "${INDEX_PID:-}" ] || kill "$INDEX_PID" 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

for tool in podman python3 curl; do
  command -v "$tool" >/dev/null || die "$tool missing: apt-get install -y podman buildah debootstrap runc curl"
done
if [ ! -f "$DATA_DIR/demo.db" ] || [ ! -f "$DATA_DIR/model.pt" ]; then
  die "$DATA_DIR needs demo.db and model.pt: python main_script.py demo-data && python main_script.py all"
fi

if [[ $BASE_IMAGE == localhost/* ]] && ! podman image exists "$BASE_IMAGE"; then
  echo "=== building the base image $BASE_IMAGE (debootstrap, about a minute)"
  tools/make_base_image.sh "$BASE_IMAGE" >"$WORK/base.log" 2>&1 || { tail -n 30 "$WORK/base.log"; die "base image"; }
  tail -n 1 "$WORK/base.log"
fi
podman image exists "$BASE_IMAGE" || podman pull "$BASE_IMAGE" || die "no base image $BASE_IMAGE"

# Sandboxed machines: crun refuses a hybrid cgroup v1/v2 host, and the rlimits podman asks for by default
# (1048576) exceed the hard limits of a process without CAP_SYS_RESOURCE. Fall back to runc and the
# current hard limits, through a config of our own rather than the machine's.
if ! probe=$(podman run --rm "$BASE_IMAGE" true 2>&1); then
  echo "podman run with the defaults failed ($probe); retrying with runc and the current ulimits"
  command -v runc >/dev/null || die "the default runtime cannot run here and runc is missing: apt-get install -y runc"
  export CONTAINERS_CONF=$WORK/containers.conf
  cat >"$CONTAINERS_CONF" <<CONF
[containers]
default_ulimits = ["nofile=$(ulimit -Hn):$(ulimit -Hn)", "nproc=4096:4096"]
[engine]
runtime = "runc"
CONF
  probe=$(podman run --rm "$BASE_IMAGE" true 2>&1) || die "podman cannot run a container here: $probe"
fi

# Where PyPI is reached through a TLS-intercepting proxy, only the host's CA bundle trusts it: lend that
# bundle to pip during the build (a mount, so nothing of it lands in the image; Debian's pip reads it).
CA_BUNDLE=${CA_BUNDLE:-${PIP_CERT:-/etc/ssl/certs/ca-certificates.crt}}
ca_mount=()
[ ! -f "$CA_BUNDLE" ] || ca_mount=(-v "$CA_BUNDLE:/etc/ssl/certs/ca-certificates.crt:ro")

# torch from the local wheel: a PEP 503 index (torch plus its dependencies, fetched by pip in the base
# image itself so that they fit its python), kept between runs and served on loopback; the build uses the
# host network. A fixed port, because the URL is part of the torch layer's cache key.
if [ -z "${TORCH_INDEX_URL:-}" ]; then
  version=$(sed -n 's/^torch==//p' requirements-serve.txt)
  index=/var/tmp/torch-index-$version
  if [ ! -d "$index/torch" ]; then
    wheel=$(find "$TORCH_WHEEL_DIR" -maxdepth 1 -name "torch-$version+cpu-cp311-*.whl" | head -n 1)
    [ -n "$wheel" ] || die "no torch-$version+cpu-cp311 wheel in $TORCH_WHEEL_DIR (set TORCH_WHEEL_DIR or TORCH_INDEX_URL)"
    mkdir -p "$WORK/wheels" "$WORK/index"
    cp "$wheel" "$WORK/wheels/"
    podman run --rm --network=host "${ca_mount[@]}" -v "$WORK/wheels:/wheels:Z" "$BASE_IMAGE" sh -c \
      "python3 -m venv /tmp/v && /tmp/v/bin/pip download -q --disable-pip-version-check -d /wheels /wheels/${wheel##*/}"
    for f in "$WORK"/wheels/*.whl; do
      project=$(basename "$f" | cut -d- -f1 | tr 'A-Z_.' 'a-z--')  # PEP 503 normalised name
      mkdir -p "$WORK/index/$project" && mv "$f" "$WORK/index/$project/"
    done
    mv "$WORK/index" "$index"
  fi
  index_port=${TORCH_INDEX_PORT:-18765}
  python3 -m http.server --bind 127.0.0.1 --directory "$index" "$index_port" >"$WORK/index.log" 2>&1 &
  INDEX_PID=$!
  sleep 1
  kill -0 "$INDEX_PID" 2>/dev/null || die "cannot serve the torch index on port $index_port (set TORCH_INDEX_PORT): $(cat "$WORK/index.log")"
  TORCH_INDEX_URL=http://127.0.0.1:$index_port/
fi

echo "=== build $IMAGE on $BASE_IMAGE (torch from $TORCH_INDEX_URL)"
start=$SECONDS
# --format docker: the OCI image format has no HEALTHCHECK.
podman build --format docker --network=host "${ca_mount[@]}" --build-arg "BASE_IMAGE=$BASE_IMAGE" \
  --build-arg "TORCH_INDEX_URL=$TORCH_INDEX_URL" -t "$IMAGE" . >"$WORK/build.log" 2>&1 \
  || { tail -n 40 "$WORK/build.log"; die "podman build"; }
echo "built in $((SECONDS - start)) s"
echo "image size: $(podman image inspect --format '{{.Size}}' "$IMAGE" | awk '{printf "%.0f MB", $1 / 1e6}')"
echo "user: $(podman image inspect --format '{{.Config.User}}' "$IMAGE")"
echo "healthcheck: $(podman image inspect --format '{{.HealthCheck.Test}}' "$IMAGE")"

# A copy of the data owned by the image's user: SQLite writes its journal beside the database, and the
# caller's folder stays untouched.
mkdir -p "$WORK/data"
cp "$DATA_DIR/demo.db" "$DATA_DIR/model.pt" "$WORK/data/"
chown -R 10001:10001 "$WORK/data"
user_id=${USER_ID:-$(python3 -c 'import sqlite3, sys
print(sqlite3.connect(sys.argv[1]).execute("SELECT user_id FROM feed_data ORDER BY timestamp DESC LIMIT 1").fetchone()[0])' "$WORK/data/demo.db")}

# PORT=8080 inside, so the answer also proves that $PORT is honoured.
port=$(free_port)
podman run -d --name "$NAME" -p "127.0.0.1:$port:8080" -e PORT=8080 \
  -e DATABASE_URL=sqlite:////app/data/demo.db -e MODEL_PATH=/app/data/model.pt \
  -v "$WORK/data:/app/data:Z" "$IMAGE" >/dev/null 2>"$WORK/run.err" \
  || die "podman run: $(cat "$WORK/run.err")"

# podman schedules HEALTHCHECKs with systemd timers (without systemd it only logs an error, kept in
# $WORK/run.err): run the image's own check by hand.
echo "=== waiting for the HEALTHCHECK (/health/live), at most $HEALTH_TIMEOUT s"
start=$SECONDS
until podman healthcheck run "$NAME" >/dev/null 2>&1; do
  [ "$(podman inspect --format '{{.State.Running}}' "$NAME")" = true ] || die "the container exited"
  [ $((SECONDS - start)) -lt "$HEALTH_TIMEOUT" ] || die "not healthy after $HEALTH_TIMEOUT s"
  sleep 2
done
echo "healthy after $((SECONDS - start)) s"

base=http://127.0.0.1:$port
echo "GET /health/live -> $(curl -fsS "$base/health/live")"
echo "GET /health -> $(curl -fsS "$base/health")"
url="$base/post/recommendations/?id=$user_id&time=2021-12-20%2012:00:00&limit=3"
echo "GET /post/recommendations/?id=$user_id&time=2021-12-20 12:00:00&limit=3 ->"
recs=$(curl -fsS "$url") || die "recommendations"
# The posts' texts are long: show each with its first 80 characters.
python3 -c 'import json, sys
posts = json.loads(sys.argv[1])
assert posts, "no recommendation"
for p in posts:
    print(json.dumps({**p, "text": p["text"][:80] + "..."}, ensure_ascii=False))' "$recs"
echo "OK: container check passed"
