#!/usr/bin/env bash
# `make bench`: the chatgate service against the FastAPI peer (bench/peer) and a
# bare axum ping/pong baseline, driven by the same load generator on this machine in
# one run; prints the table of figures and service/peer ratios against the targets.
#
# Sets up, once, a virtualenv for the peer outside the repository
# (${XDG_CACHE_HOME:-~/.cache}/chatgate/peer-venv), builds the service and the
# generator in release mode, and passes any arguments to the generator
# (`hack/bench.sh --json`, `hack/bench.sh --ping-seconds 10`; see `--help`).
# The last report is also written as JSON to target/bench/last.json.
# `hack/bench.sh --replicas` measures two pods of the service on one PostgreSQL
# instead (fan-out delay, events relayed, round trips): target/bench/replicas.json.
set -euo pipefail
cd "$(dirname "$0")/.."

CARGO=${CARGO:-cargo}
TARGET_DIR=${CARGO_TARGET_DIR:-target}
PEER_DIR=$(realpath -m "${BENCH_PEER_DIR:-bench/peer}")
VENV=${BENCH_PEER_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/chatgate/peer-venv}
PEER_PACKAGES=(fastapi 'uvicorn[standard]' pyjwt websockets)

say() { printf '%s\n' "$*" >&2; }

peer_venv_ready() {
    "$VENV/bin/python" -c 'import fastapi, uvicorn, jwt, websockets, uvloop, httptools' 2>/dev/null
}

if [[ ! -f "$PEER_DIR/fastapi_ws.py" ]]; then
    say "bench: the FastAPI peer is not at $PEER_DIR/fastapi_ws.py (set BENCH_PEER_DIR)"
    exit 1
fi

if ! peer_venv_ready; then
    say "bench: creating the peer's virtualenv in $VENV (first run only)"
    mkdir -p "$(dirname "$VENV")"
    if ! python3 -m venv "$VENV" 2>/dev/null; then
        # Debian splits venv/ensurepip into its own package.
        if command -v apt-get >/dev/null && [[ $(id -u) == 0 ]]; then
            apt-get install -y -qq python3-venv >/dev/null
            rm -rf "$VENV"
            python3 -m venv "$VENV"
        else
            say "bench: python3 -m venv failed; install python3-venv"
            exit 1
        fi
    fi
    "$VENV/bin/pip" install --quiet --disable-pip-version-check "${PEER_PACKAGES[@]}"
    peer_venv_ready
fi

say "bench: building the generator, the baseline and chatgate-service (release)"
"$CARGO" build --release --quiet -p chatgate-bench
SERVICE_ARGS=()
if "$CARGO" build --release --quiet -p chatgate-service --bin chatgate-service; then
    SERVICE_ARGS=(--service-bin "$TARGET_DIR/release/chatgate-service")
else
    say "bench: WARNING chatgate-service did not build; its column stays empty"
fi

# Thousands of sockets on each side; the generator raises its own soft limit too,
# and the servers it starts inherit it.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

REVISION=$(git describe --always --dirty 2>/dev/null || echo unknown)
mkdir -p "$TARGET_DIR/bench"
JSON_OUT="$TARGET_DIR/bench/last.json"
if [[ " $* " == *" --replicas "* ]]; then
    # Two pods on one PostgreSQL (the server binaries come from hack/postgres.sh).
    CHATGATE_POSTGRES_BIN=${CHATGATE_POSTGRES_BIN:-$(hack/postgres.sh)}
    export CHATGATE_POSTGRES_BIN
    JSON_OUT="$TARGET_DIR/bench/replicas.json"
fi
exec "$TARGET_DIR/release/chatgate-bench" \
    "${SERVICE_ARGS[@]}" \
    --peer-uvicorn "$VENV/bin/uvicorn" \
    --peer-app-dir "$PEER_DIR" \
    --baseline-bin "$TARGET_DIR/release/chatgate-bench-baseline" \
    --json-out "$JSON_OUT" \
    --revision "$REVISION" \
    "$@"
