#!/usr/bin/env bash
# Builds a Debian bookworm root filesystem with debootstrap, as an ext4 image the guest
# agent boots from, for the workload compatibility test (integration/tests/qemu_workloads.rs).
# Cached outside the work tree, keyed by the sha256 of everything that shapes it (suite,
# mirror, packages, this script's format), so later runs reuse it. Prints the image path.
#
#   scripts/debian-rootfs.sh PACKAGE...
#
# MICROAGENT_DEBIAN_MIRROR overrides the mirror (default http://deb.debian.org/debian);
# the cache lives in $MICROAGENT_CACHE (default /var/lib/microagent/cache as root).
set -euo pipefail

suite=bookworm
mirror=${MICROAGENT_DEBIAN_MIRROR:-http://deb.debian.org/debian}
size=2G
format=1 # bump when the image's layout changes

if [ "$#" = 0 ]; then
  echo "debian-rootfs: usage: $0 PACKAGE..." >&2
  exit 2
fi
packages=$(printf '%s\n' "$@" | sort -u | paste -sd, -)

if [ -n "${MICROAGENT_CACHE:-}" ]; then
  cache=$MICROAGENT_CACHE
elif [ "$(id -u)" = 0 ]; then
  cache=/var/lib/microagent/cache
else
  cache=${XDG_CACHE_HOME:-$HOME/.cache}/microagent
fi
key=$(printf 'suite=%s\nmirror=%s\npackages=%s\nsize=%s\nformat=%s\n' \
  "$suite" "$mirror" "$packages" "$size" "$format" | sha256sum | cut -d' ' -f1)
dest="$cache/debian-rootfs/$key"

if [ -f "$dest/root.img" ]; then
  echo "debian-rootfs: cache hit $dest" >&2
  echo "$dest/root.img"
  exit 0
fi

if [ "$(id -u)" != 0 ]; then
  echo "debian-rootfs: debootstrap needs root (chroot, device nodes, file owners)" >&2
  exit 1
fi
command -v debootstrap >/dev/null || {
  echo "debian-rootfs: debootstrap is missing (scripts/install-deps.sh installs it)" >&2
  exit 1
}

mkdir -p "$cache/debian-rootfs"
# One build per key at a time; a second caller waits and then finds it cached.
exec 9>"$cache/debian-rootfs/.$key.lock"
flock 9
if [ -f "$dest/root.img" ]; then
  echo "debian-rootfs: cache hit $dest (built meanwhile)" >&2
  echo "$dest/root.img"
  exit 0
fi
work=$(mktemp -d "$cache/debian-rootfs/.build-$key.XXXXXX")
trap 'rm -rf "$work"' EXIT

echo "debian-rootfs: debootstrap $suite from $mirror with $packages (several minutes)" >&2
start=$(date +%s)
if ! debootstrap --variant=minbase --include="$packages" "$suite" "$work/tree" "$mirror" \
  >"$work/debootstrap.log" 2>&1; then
  tail -n 20 "$work/debootstrap.log" >&2
  if grep -q "Failed getting release file\|Could not resolve\|Failure trying to run\|Couldn't download" \
    "$work/debootstrap.log"; then
    echo "debian-rootfs: debootstrap could not fetch $suite from $mirror: check the network or set MICROAGENT_DEBIAN_MIRROR" >&2
  else
    echo "debian-rootfs: debootstrap failed (log above)" >&2
  fi
  exit 1
fi
# Apt's package lists and downloaded .debs are not needed in the guest.
rm -rf "$work/tree/var/cache/apt/archives/"*.deb "$work/tree/var/lib/apt/lists/"*
mkdir -p "$work/out"
# stdout carries only the image path: mke2fs says "Creating regular file" there.
mke2fs -q -F -t ext4 -E root_owner=0:0 -d "$work/tree" "$work/out/root.img" "$size" >&2
printf '%s\n' "$packages" >"$work/out/packages"
sync
rm -rf "$dest"
mv "$work/out" "$dest"
echo "debian-rootfs: built in $(($(date +%s) - start)) s -> $dest" >&2
echo "$dest/root.img"
