#!/usr/bin/env bash
# The part of `make run` that runs with KUBECONFIG pointing at the cluster (see
# run.sh): installs the CRD, runs the operator, creates the sample's Secret (a fresh
# JWT secret; the local PostgreSQL's URL when run.sh started one), applies
# examples/chatservice-dev.yaml, waits for Ready and prints how to connect — through
# the router to the ChatService's own pods — and how to try a broken rollout.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN="$(hack/k8s-bins.sh)"
KUBECTL="$BIN/kubectl"
STATE="${XDG_CACHE_HOME:-$HOME/.cache}/chatgate/run"
mkdir -p "$STATE"
ROUTER="${CHATGATE_ROUTER:-}"
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

echo "==> Secret chat-dev-secrets: a fresh JWT secret and the database URL" >&2
jwt_secret="$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')"
"$KUBECTL" create secret generic chat-dev-secrets \
  --from-literal=jwt-secret="$jwt_secret" \
  --from-literal=database-url="${CHATGATE_DEMO_DATABASE_URL:-sqlite::memory:}" \
  --dry-run=client -o yaml | "$KUBECTL" apply -f - >&2

echo "==> applying examples/chatservice-dev.yaml" >&2
"$KUBECTL" apply -f examples/chatservice-dev.yaml >&2
if ! "$KUBECTL" wait --for=condition=Ready chatservice/chat-dev --timeout=180s >&2; then
  echo "ChatService chat-dev is not Ready yet; see $STATE/operator.log and:" >&2
  "$KUBECTL" describe chatservice chat-dev >&2 || true
fi
"$KUBECTL" get chatservices -o wide >&2
"$KUBECTL" get pods -o wide >&2

token="$(CHATGATE_JWT_SECRET="$jwt_secret" target/release/chatgate-cluster --token-for alice)"
if [ -n "$ROUTER" ]; then
  url="ws://$ROUTER/ws"
  where="through the router at $ROUTER, which sends each new connection to a ready pod of Service chat-dev"
else
  url="ws://127.0.0.1:8080/ws"
  where="after: $KUBECTL port-forward service/chat-dev 8080:80"
fi

cat <<MSG

chatgate is running: ChatService chat-dev's pods are real chatgate-service processes,
reached $where.

  export KUBECONFIG=$KUBECONFIG
  $KUBECTL get chatservices            # is it serving, and if not, why
  $KUBECTL describe chatservice chat-dev

Connect as alice (the token is valid on every pod, old and new):
  websocat -H 'Authorization: Bearer $token' $url
  {"type":"user_message","content":"hello"}

Try a broken rollout (the clients above keep being served throughout):
  # 1. roll out a version whose JWT verifier cannot be built (the secret is not a public key)
  $KUBECTL patch chatservice chat-dev --type merge -p '{"spec":{"jwt":{"algorithm":"RS256","secretRef":null,"publicKeyRef":{"name":"chat-dev-secrets","key":"jwt-secret"}}}}'
  # 2. watch it stall, naming the phase and the service; the old pods keep serving
  $KUBECTL get chatservices -w
  # 3. roll back: the broken pod goes away, Ready again; the old pods never stopped serving
  $KUBECTL patch chatservice chat-dev --type merge -p '{"spec":{"jwt":{"algorithm":"HS256","publicKeyRef":null,"secretRef":{"name":"chat-dev-secrets","key":"jwt-secret"}}}}'

Ctrl-C stops the operator and (if it started them) the pods, PostgreSQL and the local control plane.
MSG
wait -n "${pids[@]}"
