#!/usr/bin/env bash
# `make run`: the whole product on one machine. Uses the cluster the current
# kubeconfig points at when it answers, or else starts the project's local control
# plane (built from Go modules into a cache outside the repository). Then installs
# the CRD, runs the operator, applies the sample ChatService, runs the chat service
# with embedded defaults, and prints what to try. Ctrl-C stops everything.
set -euo pipefail
cd "$(dirname "$0")/.."
echo "==> building chatgate (release)" >&2
cargo build --quiet --release -p chatgate-service -p chatgate-operator -p chatgate-tests --bins
exec target/release/chatgate-cluster --reuse-existing -- hack/run-demo.sh
