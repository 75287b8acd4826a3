#!/usr/bin/env bash
# The part of `make run` that runs with KUBECONFIG pointing at a cluster (see run.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN="$(hack/k8s-bins.sh)"
KUBECTL="$BIN/kubectl"
STATE="${XDG_CACHE_HOME:-$HOME/.cache}/chatgate/run"
mkdir -p "$STATE"
LISTEN="${CHATGATE_LISTEN:-127.0.0.1:8080}"
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT INT TERM

echo "==> installing the ChatService CRD" >&2
"$KUBECTL" apply --server-side -f crds/ >&2
"$KUBECTL" wait --for=condition=Established crd/chatservices.chatgate.dev --timeout=60s >&2

echo "==> starting the operator (log: $STATE/operator.log)" >&2
target/release/chatgate-operator run --http 127.0.0.1:8081 >"$STATE/operator.log" 2>&1 &
pids+=($!)

echo "==> applying examples/chatservice-dev.yaml" >&2
"$KUBECTL" apply -f examples/chatservice-dev.yaml >&2
if ! "$KUBECTL" wait --for=condition=Ready chatservice/chat-dev --timeout=120s >&2; then
  echo "ChatService chat-dev is not Ready yet; see $STATE/operator.log and:" >&2
  "$KUBECTL" describe chatservice chat-dev >&2 || true
fi
"$KUBECTL" get chatservices -o wide >&2

echo "==> starting the chat service on $LISTEN with embedded defaults (log: $STATE/service.log)" >&2
CHATGATE_LISTEN="$LISTEN" CHATGATE_TERMINATION_LOG="$STATE/termination-log" \
  target/release/chatgate-service >"$STATE/service.log" 2>&1 &
pids+=($!)
for _ in $(seq 1 100); do
  if curl -fsS "http://$LISTEN/health/startup" >/dev/null 2>&1; then break; fi
  sleep 0.1
done
curl -sS "http://$LISTEN/health/startup"; echo

cat <<MSG

chatgate is running.
  export KUBECONFIG=$KUBECONFIG
  $KUBECTL get chatservices            # is it serving, and if not, why
  $KUBECTL describe chatservice chat-dev
  curl http://$LISTEN/health/startup    # phases and critical services

$(sed -n '/Development token/,/onopen/p' "$STATE/service.log")

Ctrl-C stops the service, the operator and (if it started one) the local control plane.
MSG
wait -n "${pids[@]}"
