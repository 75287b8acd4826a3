#!/usr/bin/env bash
# Builds the container-image tools from the Go module proxy into a cache outside the
# repository, once per machine, and prints their directory:
#   umoci     assembles and unpacks OCI image layouts without a daemon (make image,
#             the image tests, the test node agent)
#   crane     registry I/O: push, pull, digest (make image-push, the push test)
#   registry  the CNCF distribution registry, served on loopback by the push test
#
# Usage: hack/image-tools.sh      # build what is missing, print the bin dir
set -euo pipefail

UMOCI_VERSION="${UMOCI_VERSION:-v0.6.0}"
CRANE_VERSION="${CRANE_VERSION:-v0.22.1}"
REGISTRY_VERSION="${REGISTRY_VERSION:-v3.1.2}"
CACHE_ROOT="${CHATGATE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/chatgate}"
DIR="$CACHE_ROOT/image-tools"
BIN="$DIR/bin"
STAMP="umoci=$UMOCI_VERSION crane=$CRANE_VERSION registry=$REGISTRY_VERSION"

export GOSUMDB="${GOSUMDB:-off}"
export GOFLAGS="${GOFLAGS:-} -mod=mod"
export GOTOOLCHAIN=local

log() { printf '[image-tools %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

all_present() {
  [ "$(cat "$DIR/versions" 2>/dev/null)" = "$STAMP" ] || return 1
  local b
  for b in umoci crane registry; do [ -x "$BIN/$b" ] || return 1; done
}

if all_present; then
  echo "$BIN"
  exit 0
fi
mkdir -p "$BIN" "$DIR/umoci-module"
exec 9>"$DIR/.build.lock"
if ! flock -n 9; then
  log "another build holds $DIR/.build.lock; waiting for it"
  flock 9
fi
if all_present; then
  echo "$BIN"
  exit 0
fi
if ! command -v go >/dev/null; then
  log "go is not installed; install Go 1.24 or newer (apt-get install golang-go, or go.dev/dl) and run again"
  exit 1
fi
rm -f "$DIR/versions"
start=$(date +%s)

# umoci's go.mod carries a replace directive, which `go install pkg@version` refuses;
# a wrapper module that repeats it builds the same program.
log "building umoci $UMOCI_VERSION"
W="$DIR/umoci-module"
cat >"$W/go.mod" <<MOD
module chatgate.dev/image-tools

go 1.24.0

require github.com/opencontainers/umoci $UMOCI_VERSION

replace github.com/vbatts/go-mtree => github.com/cyphar/go-mtree v0.0.0-20250928235313-918fa724e2fe
MOD
cat >"$W/tools.go" <<'GO'
//go:build tools

package tools

import _ "github.com/opencontainers/umoci/cmd/umoci"
GO
(cd "$W" && go mod tidy >/dev/null 2>&1 && go build -o "$BIN/umoci" github.com/opencontainers/umoci/cmd/umoci)

log "building crane $CRANE_VERSION"
GOBIN="$BIN" go install "github.com/google/go-containerregistry/cmd/crane@$CRANE_VERSION"

log "building the distribution registry $REGISTRY_VERSION"
GOBIN="$BIN" go install "github.com/distribution/distribution/v3/cmd/registry@$REGISTRY_VERSION"

echo "$STAMP" >"$DIR/versions"
log "done in $(($(date +%s) - start)) s"
echo "$BIN"
