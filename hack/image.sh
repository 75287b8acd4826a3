#!/usr/bin/env bash
# Builds the OCI images of chatgate-service and chatgate-operator from the release
# binaries, with no container daemon: the root filesystem from hack/image-rootfs.sh,
# one layer and the image config assembled by umoci, each written as an OCI image
# layout (target/images/NAME/) and as that layout in a tar (target/images/NAME.tar,
# what `docker load`, `podman load`, `skopeo` and `crane` read). Prints the digests.
#
# Reproducible: every timestamp is the commit's time (SOURCE_DATE_EPOCH overrides),
# tar entries are sorted with numeric root ownership, gzip is deterministic, and the
# binaries are built with the checkout's path remapped, so two builds of one commit
# give the same digests.
#
# Usage: hack/image.sh [OUT_DIR]    (default target/images)
#
# CHATGATE_IMAGE_FROM=DIR packs the chatgate-service and chatgate-operator binaries
# already in DIR (stripped copies) instead of building release ones: what the tests
# use with the binaries `cargo test` built, so a test run compiles the workspace
# once. Images for people to run come from the default, release path.
set -euo pipefail
cd "$(dirname "$0")/.."
root="$PWD"
out="${1:-target/images}"
case "$out" in /*) ;; *) out="$root/$out" ;; esac
source_url="${IMAGE_SOURCE:-https://github.com/chatgate/chatgate}"
tools="$(hack/image-tools.sh)"
umoci="$tools/umoci"

log() { printf '[image %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

revision="$(git rev-parse HEAD 2>/dev/null || echo unknown)"
epoch="${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct 2>/dev/null || echo 0)}"
created="$(date -u -d "@$epoch" +%Y-%m-%dT%H:%M:%SZ)"

if [ -n "${CHATGATE_IMAGE_FROM:-}" ]; then
  bin_dir="$CHATGATE_IMAGE_FROM"
  log "packing the binaries in $bin_dir (stripped copies; no build)"
else
  # Its own target directory: the remapped paths are part of the build's flags, and
  # sharing target/release would rebuild everything whenever `cargo build --release`
  # and `make image` alternate.
  export CARGO_TARGET_DIR="$root/target/image-build"
  export RUSTFLAGS="${RUSTFLAGS:-} --remap-path-prefix=$root=/chatgate --remap-path-prefix=${CARGO_HOME:-$HOME/.cargo}=/cargo"
  log "building the release binaries (cargo build --release --locked)"
  start=$(date +%s)
  cargo build --release --locked -p chatgate-service -p chatgate-operator --bins >&2
  log "binaries built in $(($(date +%s) - start)) s"
  bin_dir="$CARGO_TARGET_DIR/release"
fi

mkdir -p "$out"
# Two builds into one directory at once would interleave their files.
exec 8>"$out/.lock"
flock 8
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

for name in chatgate-service chatgate-operator; do
  binary="$bin_dir/$name"
  if [ -n "${CHATGATE_IMAGE_FROM:-}" ]; then
    # A test build carries its debug info; the image does not need it.
    mkdir -p "$work/stripped"
    strip -o "$work/stripped/$name" "$binary"
    binary="$work/stripped/$name"
  fi
  # The version the binary itself reports, so the labels cannot disagree with it.
  version="$("$binary" --version | awk '{print $2}')"
  rootfs="$work/$name-rootfs"
  hack/image-rootfs.sh "$binary" "$rootfs"
  tar --sort=name --mtime="@$epoch" --owner=0 --group=0 --numeric-owner \
    --format=posix --pax-option=exthdr.name=%d/PaxHeaders/%f,delete=atime,delete=ctime \
    -C "$rootfs" -cf "$work/$name-layer.tar" .

  layout="$work/$name"
  "$umoci" init --layout "$layout"
  "$umoci" new --image "$layout:$version"
  "$umoci" raw add-layer --image "$layout:$version" --compress gzip \
    --history.created "$created" --history.created_by "hack/image.sh" \
    --history.comment "$name $version" "$work/$name-layer.tar"
  labels=(
    "org.opencontainers.image.title=$name"
    "org.opencontainers.image.source=$source_url"
    "org.opencontainers.image.revision=$revision"
    "org.opencontainers.image.version=$version"
    "org.opencontainers.image.created=$created"
    "org.opencontainers.image.licenses=Apache-2.0"
  )
  config_args=(--created "$created" --os linux --architecture amd64
    --config.user 65532:65532 --config.workingdir / --config.entrypoint "/usr/local/bin/$name"
    --config.env PATH=/usr/local/bin --no-history)
  for label in "${labels[@]}"; do
    config_args+=(--config.label "$label" --manifest.annotation "$label")
  done
  if [ "$name" = chatgate-service ]; then config_args+=(--config.exposedports 8080/tcp); fi
  "$umoci" config --image "$layout:$version" "${config_args[@]}"
  "$umoci" gc --layout "$layout"

  rm -rf "${out:?}/$name" "$out/$name.tar"
  cp -r "$layout" "$out/$name"
  tar --sort=name --mtime="@$epoch" --owner=0 --group=0 --numeric-owner --format=posix \
    --pax-option=exthdr.name=%d/PaxHeaders/%f,delete=atime,delete=ctime \
    -C "$layout" -cf "$out/$name.tar" .
  digest="$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["manifests"][0]["digest"])' "$layout/index.json")"
  compressed="$(du -b --apparent-size -s "$layout/blobs" | cut -f1)"
  unpacked="$(du -b --apparent-size -s "$rootfs" | cut -f1)"
  printf '%s %s %s compressed=%s unpacked=%s\n' "$name" "$version" "$digest" \
    "$(numfmt --to=si --suffix=B "$compressed")" "$(numfmt --to=si --suffix=B "$unpacked")"
done
