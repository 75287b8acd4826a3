#!/usr/bin/env bash
# cargo-deny, the supply-chain check of `make lint` and `make deny` (deny.toml:
# licenses, banned and duplicate crates, sources, advisories). Installed from
# crates.io (`cargo install --locked`, the pinned version below) into the cache
# outside the repository on first use, as the other tools are; a version change
# installs beside the old one.
#
# Usage: hack/cargo-deny.sh          # install when missing, print the binary's path
#        hack/cargo-deny.sh check    # run the checks (below)
#
# Advisories. The check against the RustSec advisory database needs the database,
# which cargo-deny clones from github.com. The build machines cannot reach
# github.com, and no registry they reach (crates.io, PyPI, npm, the Go module
# proxy, Debian) publishes the database, so it cannot be installed like the tools.
# `check` therefore runs the advisories check only when a copy is at hand:
#   CHATGATE_ADVISORY_DB=DIR    a checkout of https://github.com/rustsec/advisory-db
#                               (a git clone: cargo-deny dates it by its last fetch
#                               or clone and refuses one over 90 days old), used as
#                               it is, offline, never fetched or updated;
#   CHATGATE_ADVISORY_DB=fetch  where github.com is reachable: cargo-deny clones or
#                               updates the database in its own cache ($CARGO_HOME).
# Without it, `check` runs bans, licenses and sources, and says on stderr that
# advisories were skipped and why. deny.toml says the same.
set -euo pipefail
cd "$(dirname "$0")/.."

VERSION=0.20.2
CACHE_ROOT="${CHATGATE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/chatgate}"
DIR="$CACHE_ROOT/tools/cargo-deny-$VERSION"
BIN="$DIR/bin/cargo-deny"
# Where cargo-deny looks for the database of deny.toml's `db-urls` (the default,
# RustSec) under its `db-path`: the URL's last segment and its XxHash64, fixed for
# a given URL and cargo-deny version.
DB_DIR_NAME=advisory-db-3157b0e258782691

log() { printf '[cargo-deny %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

install() {
  [ -x "$BIN" ] && return
  mkdir -p "$DIR"
  exec 9>"$DIR/.build.lock"
  if ! flock -n 9; then
    log "another install holds $DIR/.build.lock; waiting for it"
    flock 9
  fi
  if [ ! -x "$BIN" ]; then
    local start
    start=$(date +%s)
    log "installing cargo-deny $VERSION into $DIR (first run only; takes minutes)"
    cargo install --quiet --locked "cargo-deny@$VERSION" --root "$DIR"
    log "installed cargo-deny in $(( $(date +%s) - start ))s"
  fi
  exec 9>&-
}

# Every check, advisories from the copy of the database in $1 and nothing fetched:
# deny.toml with `db-path` pointing at a directory that holds only that copy.
check_with_db() {
  local db
  if [ ! -d "$1/crates" ]; then
    log "CHATGATE_ADVISORY_DB=$1 is not a checkout of the RustSec advisory database (no crates/ in it)"
    exit 2
  fi
  db="$(cd "$1" && pwd)"
  WORK="$(mktemp -d)"
  trap 'rm -rf "$WORK"' EXIT
  mkdir "$WORK/dbs"
  ln -s "$db" "$WORK/dbs/$DB_DIR_NAME"
  sed "/^\[advisories\]\$/a db-path = \"$WORK/dbs\"" deny.toml >"$WORK/deny.toml"
  grep -q '^db-path = ' "$WORK/deny.toml" || { log "deny.toml has no [advisories] table"; exit 2; }
  log "advisories: checking against the database in $db (not fetched)"
  # --offline keeps cargo-deny from fetching the database (and crates: fetch them first).
  cargo fetch --locked --quiet
  "$BIN" --offline --locked --config "$WORK/deny.toml" check
}

install
case "${1:-}" in
  "")
    echo "$BIN"
    ;;
  check)
    db="${CHATGATE_ADVISORY_DB:-}"
    if [ "$db" = fetch ]; then
      exec "$BIN" --locked check
    elif [ -n "$db" ]; then
      check_with_db "$db"
    else
      log "advisories: SKIPPED. cargo-deny clones the RustSec advisory database from github.com,"
      log "which the build machines cannot reach, and no registry they reach publishes it."
      log "Set CHATGATE_ADVISORY_DB to a clone of it (or to 'fetch' where github.com is"
      log "reachable) to check advisories too. Checking bans, licenses and sources."
      exec "$BIN" --locked check bans licenses sources
    fi
    ;;
  *)
    echo "usage: $0 [check]" >&2
    exit 2
    ;;
esac
