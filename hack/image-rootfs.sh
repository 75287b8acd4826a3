#!/usr/bin/env bash
# Lays out the root filesystem of a chatgate image: the binary, exactly the shared
# libraries it loads (from ldd), a CA bundle for outbound TLS, a passwd entry for
# the non-root user 65532, and empty /tmp, /proc and /dev mount points. Nothing
# else: no shell, no package manager. `make image` and the Containerfile both use it,
# so both produce the same layout.
#
# Usage: hack/image-rootfs.sh BINARY ROOTFS   (ROOTFS must not exist yet)
set -euo pipefail

binary="$1"
rootfs="$2"
name="$(basename "$binary")"
ca_bundle="${CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}"

[ -x "$binary" ] || { echo "image-rootfs: $binary is not an executable; build it first" >&2; exit 1; }
[ ! -e "$rootfs" ] || { echo "image-rootfs: $rootfs exists; give a new directory" >&2; exit 1; }
[ -s "$ca_bundle" ] || {
  echo "image-rootfs: no CA bundle at $ca_bundle; install it (apt-get install ca-certificates) or set CA_BUNDLE" >&2
  exit 1
}

install -d -m 0755 "$rootfs"/{usr/local/bin,etc/ssl/certs,proc,dev,sys,home/nonroot}
install -d -m 1777 "$rootfs/tmp"
install -m 0755 "$binary" "$rootfs/usr/local/bin/$name"
install -m 0644 "$ca_bundle" "$rootfs/etc/ssl/certs/ca-certificates.crt"

# Every library the dynamic loader resolves for the binary, at the path it asks
# for, plus the loader itself. A static binary has none and gets none.
while read -r lib; do
  [ -n "$lib" ] || continue
  install -D -m 0755 "$(readlink -f "$lib")" "$rootfs$lib"
done < <(ldd "$binary" 2>/dev/null | awk '/=> \//{print $3} /^[ \t]*\/[^ ]*ld-linux/{print $1}' | sort -u)

cat >"$rootfs/etc/passwd" <<'PASSWD'
root:x:0:0:root:/root:/sbin/nologin
nonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin
PASSWD
cat >"$rootfs/etc/group" <<'GROUP'
root:x:0:
nonroot:x:65532:
GROUP
# Without this glibc would still look in /etc/hosts, then DNS; saying so keeps the
# resolver's behaviour independent of the C library's defaults.
echo 'hosts: files dns' >"$rootfs/etc/nsswitch.conf"
chmod 0644 "$rootfs"/etc/{passwd,group,nsswitch.conf}
