#!/usr/bin/env bash
# Builds `chatgate-status` (hack/status-check: kstatus and Argo CD's Lua health-check
# runner, as Flux, Helm 4 and Argo CD read a ChatService) from the Go module proxy into
# the cache outside the repository, and prints the binary's path. The cache entry is
# keyed by the tool's sources, so an edit rebuilds it; the Kubernetes binaries'
# module (hack/k8s-bins.sh) is separate and never touched.
#
# Usage: hack/status-check.sh          # build when missing, print the path
set -euo pipefail

SRC="$(cd "$(dirname "$0")/status-check" && pwd)"
CACHE_ROOT="${CHATGATE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/chatgate}"
KEY="$(cat "$SRC/go.mod" "$SRC/go.sum" "$SRC/main.go" | sha256sum | cut -c1-16)"
DIR="$CACHE_ROOT/tools/status-check-$KEY"
BIN="$DIR/chatgate-status"

# As in hack/k8s-bins.sh: the proxy serves immutable versions, the checksum database
# is not reachable from every build machine, and the local Go is the one to use.
export GOSUMDB="${GOSUMDB:-off}"
export GOFLAGS="${GOFLAGS:-} -mod=mod -buildvcs=false"
export GOTOOLCHAIN=local

log() { printf '[status-check %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

if [ -x "$BIN" ]; then
  echo "$BIN"
  exit 0
fi
mkdir -p "$DIR"
exec 9>"$DIR/.build.lock"
flock 9
if [ ! -x "$BIN" ]; then
  start=$(date +%s)
  log "building chatgate-status (kstatus, gopher-lua) into $DIR (first run only)"
  # Built from a copy, so the build never writes into the repository.
  work="$(mktemp -d)"
  trap 'rm -rf "$work"' EXIT
  cp "$SRC/go.mod" "$SRC/go.sum" "$SRC/main.go" "$work/"
  (cd "$work" && go build -trimpath -ldflags "-s -w" -o "$BIN.tmp" . && mv "$BIN.tmp" "$BIN")
  log "built chatgate-status in $(( $(date +%s) - start ))s"
fi
echo "$BIN"
