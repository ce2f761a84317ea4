#!/usr/bin/env bash
# Prepares the L1 kernel of the nested rig (integration/src/nested.rs): Debian's stock
# kernel package, whose kvm-amd offers a real /dev/kvm inside QEMU's emulated AMD SVM.
# Only the kernel image and the modules the rig loads are kept, in a cache outside the
# work tree keyed by the package's name and version. A cache hit costs nothing.
#
#   scripts/nested-kernel.sh          prepare (or reuse) and print the cache directory
#   scripts/nested-kernel.sh --path   print where the current cache directory is
set -euo pipefail

# Same rule as the CLI (cli/src/home.rs) and scripts/build-kernel.sh.
if [ -n "${MICROAGENT_HOME:-}" ]; then
  home=$MICROAGENT_HOME
elif [ "$(id -u)" = 0 ]; then
  home=/var/lib/microagent
else
  home=${XDG_DATA_HOME:-$HOME/.local/share}/microagent
fi
current="$home/nested/current"

if [ "${1:-}" = "--path" ]; then
  echo "$current"
  exit 0
fi

# Load order matters: each module needs the ones before it.
modules=(irqbypass kvm ccp kvm-amd
         virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci
         9pnet 9pnet_virtio netfs fscache 9p)

# linux-image-amd64 names the current 6.1 kernel package (linux-image-6.1.0-N-amd64).
pkg=$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/{print $2; exit}')
if [ -z "$pkg" ]; then
  apt-get update -qq
  pkg=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-[0-9]/{print $2; exit}')
fi
[ -n "$pkg" ] || { echo "nested kernel: apt knows no linux-image-amd64 kernel package" >&2; exit 1; }
version=$(apt-cache show "$pkg" | awk '/^Version:/{print $2; exit}')
dest="$home/nested/${pkg}_${version}"

if [ -f "$dest/vmlinuz" ]; then
  echo "nested kernel: cache hit $dest" >&2
else
  mkdir -p "$home/nested"
  work=$(mktemp -d "$home/nested/.prepare.XXXXXX")
  trap 'rm -rf "$work"' EXIT
  echo "nested kernel: fetching $pkg $version" >&2
  (cd "$work" && apt-get download -q "$pkg" >/dev/null 2>&1) \
    || { echo "nested kernel: apt-get download $pkg failed" >&2; exit 1; }
  dpkg-deb -x "$work"/*.deb "$work/x"
  release=${pkg#linux-image-}
  out="$work/out"
  mkdir -p "$out/modules"
  cp "$work/x/boot/vmlinuz-$release" "$out/vmlinuz"
  for m in "${modules[@]}"; do
    ko=$(find "$work/x/lib/modules/$release" -name "$m.ko" -print -quit)
    [ -n "$ko" ] || { echo "nested kernel: module $m.ko is not in $pkg" >&2; exit 1; }
    cp "$ko" "$out/modules/"
    echo "$m" >>"$out/modules/order"
  done
  echo "$pkg $version" >"$out/package"
  sync
  rm -rf "$dest"
  mv "$out" "$dest"
  echo "nested kernel: prepared $dest" >&2
fi
ln -sfn "$(basename "$dest")" "$current.tmp"
mv -T "$current.tmp" "$current"
echo "$current"
