#!/usr/bin/env bash
# A new user's first try with their own data, from a fresh clone of this repository's HEAD:
# 50 users / 30 posts / 2,000 feed rows written as CSV, the malformed-file cases (each must end in one
# `error: ...` line, exit code 2), import-csv into a fresh database (and its refusal to replace rows
# without --replace), `main_script.py` with default settings (the demo's truth file left in data/),
# then the service: /health, recommendations (ISO 8601 time, and no time), /docs, /metrics.
# Any traceback at any step fails the check. SQLite, then PostgreSQL (a scratch database).
#
#   tools/own_data_check.sh                      # both databases
#   BACKENDS=sqlite tools/own_data_check.sh      # one
#   PY=/path/to/venv/bin/python PG_URL=postgresql://postgres@127.0.0.1:5432/test tools/own_data_check.sh
# Not part of `make test` (minutes: two trainings).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PY:-$ROOT/.venv/bin/python}
PG_URL=${PG_URL:-postgresql://postgres@127.0.0.1:5432/test}
BACKENDS=${BACKENDS:-sqlite postgresql}
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
WORK=$(mktemp -d /tmp/own_data_check.XXXXXX)
SERVER_PID=""
PG_DB="own_check_$$"

cleanup() {
    if [ -n "$SERVER_PID" ]; then kill "$SERVER_PID" 2>/dev/null || true; fi
    if [[ " $BACKENDS " == *" postgresql "* ]]; then
        "$PY" - "$PG_URL" "$PG_DB" <<'EOF' 2>/dev/null || true
import sys
from sqlalchemy import create_engine, text
engine = create_engine(sys.argv[1].replace("postgresql://", "postgresql+psycopg2://", 1), isolation_level="AUTOCOMMIT")
with engine.connect() as conn:
    conn.execute(text(f'DROP DATABASE IF EXISTS "{sys.argv[2]}"'))
EOF
    fi
}
trap cleanup EXIT

fail() { echo "FAIL: $*" >&2; exit 1; }

# run NAME EXPECTED_CODE CMD...: run in the clone, keep stdout/stderr, fail on a traceback or another code
run() {
    local name=$1 expected=$2
    shift 2
    local code=0
    (cd "$CLONE" && "$@") >"$LOGS/$name.out" 2>"$LOGS/$name.err" || code=$?
    if grep -q "Traceback" "$LOGS/$name.out" "$LOGS/$name.err"; then
        tail -20 "$LOGS/$name.err" >&2
        fail "$name: a traceback"
    fi
    [ "$code" = "$expected" ] || { tail -20 "$LOGS/$name.err" >&2; fail "$name: exit code $code, expected $expected"; }
}

# one_line_error NAME: the step's stderr, progress bars aside, is one `error: ...` line
one_line_error() {
    local lines
    lines=$(grep -v -e '^\s*$' -e 'it/s\]' -e 's/it\]' "$LOGS/$1.err" || true)
    [ "$(printf '%s\n' "$lines" | wc -l)" = 1 ] && [[ "$lines" == error:* ]] || fail "$1: not one error line: $lines"
    echo "  $1: $lines"
}

CLONE="$WORK/clone"
git clone -q "$ROOT" "$CLONE"
echo "fresh clone of $(git -C "$ROOT" rev-parse --short HEAD) in $CLONE; python: $PY"
started=$SECONDS

for backend in $BACKENDS; do
    step_started=$SECONDS
    LOGS="$WORK/logs-$backend"
    mkdir -p "$LOGS"
    rm -rf "$CLONE/data" "$CLONE/.env"
    if [ "$backend" = sqlite ]; then
        DB_URL="sqlite:///data/own.db"
    else
        "$PY" - "$PG_URL" "$PG_DB" <<'EOF'
import sys
from sqlalchemy import create_engine, text
engine = create_engine(sys.argv[1].replace("postgresql://", "postgresql+psycopg2://", 1), isolation_level="AUTOCOMMIT")
with engine.connect() as conn:
    conn.execute(text(f'DROP DATABASE IF EXISTS "{sys.argv[2]}"'))
    conn.execute(text(f'CREATE DATABASE "{sys.argv[2]}"'))
EOF
        DB_URL="${PG_URL%/*}/$PG_DB"
    fi
    # The user's settings: their database, their model file; the rest at its default.
    printf 'DATABASE_URL=%s\nMODEL_PATH=data/own/model.pt\n' "$DB_URL" >"$CLONE/.env"
    echo "== $backend: $DB_URL"

    # The demo's truth file left in data/ (a user who ran the demo first): it must not judge their data.
    run demo-truth 0 "$PY" demo_data.py --scale tiny --out data/demo_csv
    cp "$CLONE/data/demo_csv/demo_truth.npz" "$CLONE/data/demo_truth.npz"

    run help 0 "$PY" main_script.py --help
    run csv 0 "$PY" tests/fixtures_own.py own_csv
    CSV=(--users own_csv/users.csv --posts own_csv/posts.csv --feed own_csv/feed.csv)

    # Malformed files: one line each, exit code 2, nothing written.
    mkdir -p "$CLONE/bad"
    sed '3s/,view,0$/,view,/' "$CLONE/own_csv/feed.csv" >"$CLONE/bad/null_target.csv"
    awk -F, 'NR>1 && $4=="like" && !done {sub(/,like,$/, ",like,1"); done=1} {print}' \
        "$CLONE/own_csv/feed.csv" >"$CLONE/bad/like_target_1.csv"
    sed '5s/^2021-10-0[0-9] [0-9:]*/yesterday/' "$CLONE/own_csv/feed.csv" >"$CLONE/bad/timestamp.csv"
    sed '2s/^\([0-9]*\),[01],/\1,7,/' "$CLONE/own_csv/users.csv" >"$CLONE/bad/gender.csv"
    cut -d, -f1,2 "$CLONE/own_csv/posts.csv" >"$CLONE/bad/no_topic.csv"
    for case in null_target like_target_1 timestamp; do
        run "bad-$case" 2 "$PY" main_script.py --quiet import-csv --users own_csv/users.csv \
            --posts own_csv/posts.csv --feed "bad/$case.csv"
        one_line_error "bad-$case"
    done
    run bad-gender 2 "$PY" main_script.py import-csv --users bad/gender.csv --posts own_csv/posts.csv \
        --feed own_csv/feed.csv --quiet
    one_line_error bad-gender
    run bad-no_topic 2 "$PY" main_script.py import-csv --users own_csv/users.csv --posts bad/no_topic.csv \
        --feed own_csv/feed.csv
    one_line_error bad-no_topic

    run import 0 "$PY" main_script.py --quiet import-csv "${CSV[@]}"
    run import-again 2 "$PY" main_script.py --quiet import-csv "${CSV[@]}"
    one_line_error import-again
    run import-replace 0 "$PY" main_script.py import-csv "${CSV[@]}" --replace --quiet

    train_started=$SECONDS
    run train 0 "$PY" main_script.py --quiet
    grep -q "truth of other tables: ignored" "$LOGS/train.err" || fail "train: no note about the demo's truth file"
    for file in model.pt model.history.csv model.history.json model.history.png; do
        [ -f "$CLONE/data/own/$file" ] || fail "train: data/own/$file missing"
    done
    [ ! -e "$CLONE/data/history.png" ] || fail "train: wrote data/history.png"
    echo "  trained in $((SECONDS - train_started)) s"

    port=$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    (cd "$CLONE" && exec "$PY" -m uvicorn app:app --port "$port") >"$LOGS/serve.out" 2>"$LOGS/serve.err" &
    SERVER_PID=$!
    for _ in $(seq 1 120); do
        curl -sf "http://127.0.0.1:$port/health" >/dev/null 2>&1 && break
        sleep 1
    done
    user=$(sed -n 2p "$CLONE/own_csv/users.csv" | cut -d, -f1)
    base="http://127.0.0.1:$port"
    curl -sf "$base/health" >"$LOGS/health.json" || fail "serve: /health"
    curl -sf "$base/post/recommendations/?id=$user&time=2021-10-31T12:00:00&limit=3" >"$LOGS/rec_t.json" \
        || fail "serve: recommendations with an ISO 8601 time"
    curl -sf "$base/post/recommendations/?id=$user&limit=3" >"$LOGS/rec_now.json" \
        || fail "serve: recommendations without time"
    # (to files first: `curl | grep -q` fails under pipefail when grep stops reading early)
    curl -sf "$base/docs" >"$LOGS/docs.html" || fail "serve: /docs"
    grep -q "/static-offline-docs/swagger-ui-bundle.js" "$LOGS/docs.html" || fail "serve: /docs loads a CDN"
    curl -sf "$base/static-offline-docs/swagger-ui-bundle.js" >/dev/null || fail "serve: the Swagger UI bundle"
    curl -sf "$base/metrics" >"$LOGS/metrics.txt" || fail "serve: /metrics"
    grep -q "^recommendations_served_total 2.0" "$LOGS/metrics.txt" || fail "serve: /metrics counts"
    kill "$SERVER_PID"
    wait "$SERVER_PID" 2>/dev/null || true
    SERVER_PID=""
    if grep -q "Traceback" "$LOGS/serve.out" "$LOGS/serve.err"; then fail "serve: a traceback"; fi
    echo "  /health $(cat "$LOGS/health.json")"
    echo "  recommendations: $(head -c 160 "$LOGS/rec_t.json")..."
    echo "== $backend: passed in $((SECONDS - step_started)) s"
done
echo "own data check passed in $((SECONDS - started)) s (logs in $WORK)"
