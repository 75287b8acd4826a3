#!/usr/bin/env bash
# Makes sure PostgreSQL's server binaries are on this machine (the multi-pod and
# store tests run a real server) and prints their directory.
#
# Found: $CHATGATE_POSTGRES_BIN, /usr/lib/postgresql/<major>/bin, or PATH.
# Absent: installs Debian's `postgresql` package (needs root and apt-get).
#
# Usage: hack/postgres.sh
set -euo pipefail

log() { printf '[postgres %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

has_server() {
  local d="$1" b
  for b in postgres initdb pg_ctl pg_isready psql; do [ -x "$d/$b" ] || return 1; done
}

find_bin() {
  local d
  if [ -n "${CHATGATE_POSTGRES_BIN:-}" ]; then
    has_server "$CHATGATE_POSTGRES_BIN" && { echo "$CHATGATE_POSTGRES_BIN"; return 0; }
    log "CHATGATE_POSTGRES_BIN=$CHATGATE_POSTGRES_BIN has no server binaries"
    return 1
  fi
  for d in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -t/ -k4 -n -r); do
    has_server "$d" && { echo "$d"; return 0; }
  done
  d="$(dirname "$(command -v postgres 2>/dev/null || echo /nonexistent/postgres)")"
  has_server "$d" && { echo "$d"; return 0; }
  return 1
}

if bin="$(find_bin)"; then
  echo "$bin"
  exit 0
fi

if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  log "no PostgreSQL server binaries; installing Debian's postgresql package"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >&2
  # The package's post-install creates and starts a cluster; the tests never use it.
  apt-get install -y -qq --no-install-recommends postgresql >&2
  if command -v pg_lsclusters >/dev/null; then
    pg_lsclusters -h 2>/dev/null | while read -r ver name _; do
      pg_ctlcluster "$ver" "$name" stop >/dev/null 2>&1 || true
    done
  fi
  if bin="$(find_bin)"; then
    echo "$bin"
    exit 0
  fi
fi

log "no PostgreSQL server binaries (postgres, initdb, pg_ctl, pg_isready, psql) found."
log "install them (Debian/Ubuntu: sudo apt-get install postgresql) or set CHATGATE_POSTGRES_BIN to their directory"
exit 1
