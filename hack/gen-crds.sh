#!/usr/bin/env bash
# Regenerates the ChatService CRD from the Rust types (never edit the YAML by hand):
# crds/ for `kubectl apply`, and the chart's crds/ for `helm install`.
#
# Usage: hack/gen-crds.sh          # write both files
#        hack/gen-crds.sh --check  # fail if the committed files are stale (CI)
set -euo pipefail
cd "$(dirname "$0")/.."

targets=(crds/chatservices.chatgate.dev.yaml charts/chatgate-operator/crds/chatservices.chatgate.dev.yaml)
tmp="$(mktemp)"
trap 'rm -f "$tmp"' EXIT

# The command prints the generated-by line itself (operator/src/crd.rs, manifest).
# Built with the workspace's features (as `make test` builds it), not `-p`'s, so the
# dependencies compiled for the tests are reused.
cargo build --quiet --workspace --bins
"${CARGO_TARGET_DIR:-target}/debug/chatgate-operator" crd >"$tmp"

if [[ "${1:-}" == "--check" ]]; then
  stale=0
  for t in "${targets[@]}"; do
    if ! diff -u "$t" "$tmp" >/dev/null 2>&1; then
      echo "stale: $t (run hack/gen-crds.sh)" >&2
      diff -u "$t" "$tmp" >&2 || true
      stale=1
    fi
  done
  exit "$stale"
fi

for t in "${targets[@]}"; do
  mkdir -p "$(dirname "$t")"
  cp "$tmp" "$t"
  echo "wrote $t"
done
