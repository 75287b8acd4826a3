#!/usr/bin/env bash
# Builds the monitoring tools from the Go module proxy into the cache outside the
# repository, and prints their directory:
#   promtool           checks and unit-tests charts/chatgate-operator/files/alerts.yaml,
#                      and parses the dashboard's queries (`promtool --experimental promql format`)
#   prometheus         the server, for tests that scrape real pods (built without the web
#                      UI's assets; the API and /metrics work)
#   chatgate-dashlint  lints Grafana dashboards (hack/prom-tools/main.go: the Grafana
#                      Foundation SDK's strict decoding plus dashboard-linter-style rules)
# All three come from hack/prom-tools (one go.mod pinning Prometheus and the SDK); the
# cache entry is keyed by that module's files, so an edit rebuilds it.
#
# Usage: hack/prom-tools.sh          # build when missing, print the bin dir
set -euo pipefail

SRC="$(cd "$(dirname "$0")/prom-tools" && pwd)"
CACHE_ROOT="${CHATGATE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/chatgate}"
FILES=(go.mod go.sum main.go tools.go)
# Prometheus with only the service discoveries the tests and the shipped scrape
# configuration use (Kubernetes; file is always in): every cloud's SDK left out makes
# the build several minutes shorter.
TAGS="remove_all_sd,enable_kubernetes_sd"
KEY="$( (cd "$SRC" && cat "${FILES[@]}"; echo "$TAGS") | sha256sum | cut -c1-16)"
DIR="$CACHE_ROOT/tools/prom-tools-$KEY"
BIN="$DIR/bin"
TOOLS=(promtool prometheus chatgate-dashlint)

# As in hack/k8s-bins.sh: the proxy serves immutable versions, the checksum database
# is not reachable from every build machine, and the local Go is the one to use.
export GOSUMDB="${GOSUMDB:-off}"
export GOFLAGS="${GOFLAGS:-} -mod=mod -buildvcs=false"
export GOTOOLCHAIN=local

log() { printf '[prom-tools %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

all_present() {
  local t
  for t in "${TOOLS[@]}"; do [ -x "$BIN/$t" ] || return 1; done
}

if all_present; then
  echo "$BIN"
  exit 0
fi
mkdir -p "$BIN"
exec 9>"$DIR/.build.lock"
if ! flock -n 9; then
  log "another build holds $DIR/.build.lock; waiting for it"
  flock 9
fi
if ! all_present; then
  start=$(date +%s)
  log "building ${TOOLS[*]} into $BIN (first run only; takes minutes)"
  # Built from a copy, so the build never writes into the repository.
  work="$(mktemp -d)"
  trap 'rm -rf "$work"' EXIT
  (cd "$SRC" && cp "${FILES[@]}" "$work/")
  ld="-s -w"
  (
    cd "$work"
    go build -trimpath -ldflags "$ld" -o "$BIN/chatgate-dashlint.tmp" .
    mkdir -p "$work/out"
    go build -trimpath -tags "$TAGS" -ldflags "$ld" -o "$work/out/" \
      github.com/prometheus/prometheus/cmd/promtool github.com/prometheus/prometheus/cmd/prometheus
    mv "$work/out/promtool" "$BIN/promtool"
    mv "$work/out/prometheus" "$BIN/prometheus"
    mv "$BIN/chatgate-dashlint.tmp" "$BIN/chatgate-dashlint"
  )
  log "built ${TOOLS[*]} in $(( $(date +%s) - start ))s"
fi
echo "$BIN"
