#!/usr/bin/env bash
# `make run`: the whole product on one machine. Uses the cluster the current
# kubeconfig points at when it answers; otherwise starts the local platform — the
# project's control plane (built from Go modules into a cache outside the
# repository), a node whose Pods run as real processes from chatgate's images, a
# PostgreSQL server, and a router on 127.0.0.1:8080 playing kube-proxy for the
# sample's Service. Then hack/run-demo.sh installs the CRD, runs the operator,
# applies the sample ChatService and prints what to try. Ctrl-C stops everything.
set -euo pipefail
cd "$(dirname "$0")/.."
ROUTER="${CHATGATE_ROUTER:-127.0.0.1:8080}"
echo "==> building chatgate (release)" >&2
cargo build --quiet --release -p chatgate-service -p chatgate-operator -p chatgate-tests --bins
exec target/release/chatgate-cluster --reuse-existing --nodes 0 --run-pods --postgres \
  --route "default/chat-dev=$ROUTER" -- hack/run-demo.sh
