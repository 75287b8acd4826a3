#!/usr/bin/env bash
# Pushes the images `make image` built (target/images) to REGISTRY, tagged with the
# version and the git revision, and prints each pushed reference with its digest.
# Builds the images first when they are missing. Registry credentials are crane's:
# `crane auth login`, or a docker config.json (DOCKER_CONFIG).
#
# Usage: REGISTRY=host[:port]/path hack/image-push.sh
set -euo pipefail
cd "$(dirname "$0")/.."
registry="${REGISTRY:-}"
if [ -z "$registry" ]; then
  echo "image-push: set REGISTRY, e.g. make image-push REGISTRY=ghcr.io/your-org" >&2
  exit 2
fi
registry="${registry%/}"
out=target/images
for name in chatgate-service chatgate-operator; do
  if [ ! -f "$out/$name/index.json" ]; then
    hack/image.sh "$out" >/dev/null
    break
  fi
done
crane="$(hack/image-tools.sh)/crane"
revision="$(git rev-parse HEAD 2>/dev/null || echo unknown)"
for name in chatgate-service chatgate-operator; do
  layout="$out/$name"
  version="$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["manifests"][0]["annotations"]["org.opencontainers.image.ref.name"])' "$layout/index.json")"
  built_from="$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["annotations"]["org.opencontainers.image.revision"])' \
    "$layout/blobs/sha256/$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["manifests"][0]["digest"][7:])' "$layout/index.json")")"
  if [ "$built_from" != "$revision" ]; then
    echo "image-push: $layout was built from $built_from, but HEAD is $revision; run make image first" >&2
    exit 1
  fi
  "$crane" push "$layout" "$registry/$name:$version" >/dev/null
  "$crane" tag "$registry/$name:$version" "$revision" >/dev/null
  digest="$("$crane" digest "$registry/$name:$version")"
  echo "$registry/$name:$version $digest"
  echo "$registry/$name:$revision $digest"
done
