#!/usr/bin/env bash
# Builds the Kubernetes binaries the tests and `make run` use (etcd, kube-apiserver,
# kube-controller-manager, kube-scheduler, kubectl, kwok, helm) from the Go module
# proxy into a per-version cache outside the repository, and reuses them later.
#
# Usage: hack/k8s-bins.sh            # build what is missing, print the bin dir
#        K8S_VERSION=1.35.4 hack/k8s-bins.sh
set -euo pipefail

K8S_VERSION="${K8S_VERSION:-1.35.4}"
KWOK_VERSION="${KWOK_VERSION:-0.8.0}"
HELM_VERSION="${HELM_VERSION:-4.3.1}"
CACHE_ROOT="${CHATGATE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/chatgate}"
DIR="$CACHE_ROOT/k8s-$K8S_VERSION"
BIN="$DIR/bin"
MINOR="$(echo "$K8S_VERSION" | cut -d. -f2)"
STAGING_VERSION="v0.${K8S_VERSION#1.}"

# The checksum database is not reachable from every build machine; the module
# proxy is, and it serves immutable versions.
export GOSUMDB="${GOSUMDB:-off}"
export GOFLAGS="${GOFLAGS:-} -mod=mod"
export GOTOOLCHAIN=local

log() { printf '[k8s-bins %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

want=(etcd kube-apiserver kube-controller-manager kube-scheduler kubectl kwok helm)
# kwok's node and pod lifecycles: fast pod and node stages, plus a node heartbeat
# backed by a Lease so kube-controller-manager never marks the fake nodes NotReady.
stages=(node/fast/node-initialize.yaml node/heartbeat-with-lease/node-heartbeat-with-lease.yaml
  pod/fast/pod-ready.yaml pod/fast/pod-complete.yaml pod/fast/pod-delete.yaml)

all_present() {
  local b s
  for b in "${want[@]}"; do [ -x "$BIN/$b" ] || return 1; done
  for s in "${stages[@]}"; do [ -f "$DIR/kwok-stages/$(basename "$s")" ] || return 1; done
}

if all_present; then
  echo "$BIN"
  exit 0
fi
mkdir -p "$BIN" "$DIR/wrapper"
# Two runs at once (a test binary and `make cluster`) would build the same thing
# twice on a small machine: the second waits for the first, then finds it done.
exec 9>"$DIR/.build.lock"
if ! flock -n 9; then
  log "another build holds $DIR/.build.lock; waiting for it"
  flock 9
fi
if all_present; then
  echo "$BIN"
  exit 0
fi
missing=()
for b in "${want[@]}"; do [ -x "$BIN/$b" ] || missing+=("$b"); done
if [ ${#missing[@]} -gt 0 ]; then
  log "building ${missing[*]} for Kubernetes v$K8S_VERSION into $BIN (first run only; takes minutes)"
fi
start=$(date +%s)

staging=(api apiextensions-apiserver apimachinery apiserver cli-runtime client-go
  cloud-provider cluster-bootstrap code-generator component-base component-helpers
  controller-manager cri-api cri-client csi-translation-lib dynamic-resource-allocation
  endpointslice externaljwt kms kube-aggregator kube-controller-manager kube-proxy
  kube-scheduler kubectl kubelet metrics mount-utils pod-security-admission
  sample-apiserver sample-cli-plugin sample-controller)
if [ "$MINOR" -ge 36 ]; then staging+=(cri-streaming streaming); fi

needs_wrapper=0
for b in etcd kube-apiserver kube-controller-manager kube-scheduler kubectl; do
  [ -x "$BIN/$b" ] || needs_wrapper=1
done

if [ "$needs_wrapper" = 1 ]; then
  W="$DIR/wrapper"
  if [ ! -f "$W/.resolved" ]; then
    log "resolving k8s.io/kubernetes v$K8S_VERSION and ${#staging[@]} staging modules at $STAGING_VERSION"
    {
      echo "module chatgate.dev/k8s-wrapper"
      echo
      echo "go 1.25"
      echo
      echo "require k8s.io/kubernetes v$K8S_VERSION"
      echo
      echo "replace ("
      for m in "${staging[@]}"; do echo "	k8s.io/$m => k8s.io/$m $STAGING_VERSION"; done
      echo ")"
    } >"$W/go.mod"
    cat >"$W/tools.go" <<'GO'
//go:build tools

// Package tools pins the commands this wrapper module builds.
package tools

import (
	_ "go.etcd.io/etcd/server/v3"
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kube-controller-manager"
	_ "k8s.io/kubernetes/cmd/kube-scheduler"
	_ "k8s.io/kubernetes/cmd/kubectl"
)
GO
    (cd "$W" && go mod tidy -e >&2)
    touch "$W/.resolved"
  fi
  ld="-s -w -X k8s.io/component-base/version.gitVersion=v$K8S_VERSION -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=$MINOR -X k8s.io/client-go/pkg/version.gitVersion=v$K8S_VERSION -X k8s.io/client-go/pkg/version.gitMajor=1 -X k8s.io/client-go/pkg/version.gitMinor=$MINOR"
  for b in kube-apiserver kube-controller-manager kube-scheduler kubectl; do
    if [ ! -x "$BIN/$b" ]; then
      t=$(date +%s); log "go build $b"
      (cd "$W" && go build -trimpath -ldflags "$ld" -o "$BIN/$b.tmp" "k8s.io/kubernetes/cmd/$b" && mv "$BIN/$b.tmp" "$BIN/$b")
      log "built $b in $(( $(date +%s) - t ))s"
    fi
  done
  if [ ! -x "$BIN/etcd" ]; then
    t=$(date +%s); log "go build etcd"
    (cd "$W" && go build -trimpath -ldflags "-s -w" -o "$BIN/etcd.tmp" go.etcd.io/etcd/server/v3 && mv "$BIN/etcd.tmp" "$BIN/etcd")
    log "built etcd in $(( $(date +%s) - t ))s"
  fi
fi

if [ ! -x "$BIN/kwok" ]; then
  t=$(date +%s); log "go install kwok v$KWOK_VERSION"
  GOBIN="$BIN" go install -trimpath -ldflags "-s -w" "sigs.k8s.io/kwok/cmd/kwok@v$KWOK_VERSION"
  log "built kwok in $(( $(date +%s) - t ))s"
fi

# kwok's stage files ship in its module, which `go install` left in the module cache.
mod="$(go env GOMODCACHE)/sigs.k8s.io/kwok@v$KWOK_VERSION"
[ -d "$mod" ] || go mod download "sigs.k8s.io/kwok@v$KWOK_VERSION"
rm -rf "$DIR/kwok-stages"
mkdir -p "$DIR/kwok-stages"
for s in "${stages[@]}"; do cp "$mod/kustomize/stage/$s" "$DIR/kwok-stages/"; done
chmod -R u+w "$DIR/kwok-stages"

if [ ! -x "$BIN/helm" ]; then
  t=$(date +%s); log "go install helm v$HELM_VERSION"
  major="${HELM_VERSION%%.*}"
  GOBIN="$BIN" go install -trimpath -ldflags "-s -w" "helm.sh/helm/v$major/cmd/helm@v$HELM_VERSION"
  log "built helm in $(( $(date +%s) - t ))s"
fi

log "all binaries ready in $(( $(date +%s) - start ))s; cache size $(du -sh "$DIR" | cut -f1)"
echo "$BIN"
