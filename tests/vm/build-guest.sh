#!/usr/bin/env bash
# Assembles the guest that tests/tests/vm.rs and bench/vm_resume.py boot under QEMU: Debian's
# kernel (the package linux-image-amd64 depends on, fetched with `apt-get download`), and an
# initramfs holding busybox-static (the userland and the devbox's service, httpd), the given
# burrow-agent with the shared libraries it links, two kernel modules (the e1000 NIC and
# qemu_fw_cfg, through which the test hands over the agent's configuration) and tests/vm/init.
#
#   bash tests/vm/build-guest.sh AGENT [CACHE_DIR]     # CACHE_DIR: target/vm-guest
#
# Prints `kernel=PATH` and `initramfs=PATH`. Cached: the kernel is fetched once into CACHE_DIR;
# the initramfs is assembled again only when one of its inputs changed (a new agent build, this
# script, the init, busybox, the libraries). Two runs at once take turns on a lock.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"

agent="${1:?usage: build-guest.sh AGENT [CACHE_DIR]}"
cache="${2:-$here/../../target/vm-guest}"
[ -x "$agent" ] || { echo "build-guest.sh: no executable agent at $agent" >&2; exit 1; }
mkdir -p "$cache"
cache="$(cd "$cache" && pwd)"
exec 9>"$cache/.lock"
flock 9

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

# busybox must be the static one: the guest has no libraries of its own for it.
busybox="$(command -v busybox || true)"
if [ -z "$busybox" ] || ldd "$busybox" >/dev/null 2>&1; then
  echo "build-guest.sh: needs a static busybox (Debian: apt-get install busybox-static)" >&2
  exit 1
fi

# The kernel and its two modules, kept in $cache/kernel; the .deb is not kept.
kernel_dir="$cache/kernel"
if [ ! -f "$kernel_dir/vmlinuz" ]; then
  package() { apt-cache depends --important linux-image-amd64 2>/dev/null | awk '/Depends:/ { print $2; exit }'; }
  name="$(package)"
  download="$cache/download"
  rm -rf "$download" && mkdir -p "$download"
  # A machine whose package lists are missing or stale (a newer kernel replaced the listed one on
  # the mirror) gets them refreshed once.
  if [ -z "$name" ] || ! (cd "$download" && apt-get download -q "$name" >&2 2>/dev/null); then
    echo "build-guest.sh: refreshing the package lists (apt-get update)" >&2
    as_root apt-get update -q >&2
    name="$(package)"
    [ -n "$name" ] || { echo "build-guest.sh: apt knows no linux-image-amd64" >&2; exit 1; }
    (cd "$download" && apt-get download -q "$name") >&2
  fi
  deb="$(ls "$download"/*.deb)"
  rm -rf "$kernel_dir.new" && mkdir -p "$kernel_dir.new"
  dpkg-deb --fsys-tarfile "$deb" | tar -x -C "$kernel_dir.new" --wildcards \
    './boot/vmlinuz-*' '*/drivers/net/ethernet/intel/e1000/e1000.ko' '*/drivers/firmware/qemu_fw_cfg.ko'
  mv "$kernel_dir.new"/boot/vmlinuz-* "$kernel_dir.new/vmlinuz"
  # The kernel uncompressed, an ELF that QEMU boots directly (PVH): under TCG the kernel's own
  # xz decompressor takes about 5 s of the boot. Its payload starts at xz's magic; xz complains
  # of the data after it, which is not the kernel's.
  offset="$(LC_ALL=C grep -obUaP '\xfd7zXZ\x00' "$kernel_dir.new/vmlinuz" | head -n 1 | cut -d: -f1)"
  if [ -n "$offset" ]; then
    tail -c +"$((offset + 1))" "$kernel_dir.new/vmlinuz" | xz -dc > "$kernel_dir.new/vmlinux" 2>/dev/null || true
    [ "$(head -c 4 "$kernel_dir.new/vmlinux" | od -An -tx1 | tr -d ' \n')" = 7f454c46 ] \
      || rm -f "$kernel_dir.new/vmlinux"
  fi
  find "$kernel_dir.new" -name '*.ko' -exec mv {} "$kernel_dir.new" \;
  rm -rf "$kernel_dir.new/boot" "$kernel_dir.new/lib" "$kernel_dir.new/usr"
  echo "$name" > "$kernel_dir.new/package"
  rm -rf "$kernel_dir" "$download"
  mv "$kernel_dir.new" "$kernel_dir"
fi

# The agent's shared libraries and their loader, as ldd resolves them on this machine.
mapfile -t libs < <(ldd "$agent" | awk '/=> \// { print $3 } /^\t\// { print $1 }')

initramfs="$cache/initramfs.cpio"
stamp="$(cat "$agent" "$here/init" "$here/build-guest.sh" "$busybox" "$kernel_dir/package" "${libs[@]}" | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$cache/initramfs.stamp" 2>/dev/null)" != "$stamp" ] || [ ! -f "$initramfs" ]; then
  stage="$cache/stage"
  rm -rf "$stage"
  mkdir -p "$stage"/{bin,dev,proc,sys,tmp,run,etc,lib/modules,usr/bin}
  cp "$busybox" "$stage/bin/busybox"
  ln -s busybox "$stage/bin/sh"
  cp "$here/init" "$stage/init"
  chmod 0755 "$stage/init"
  cp "$kernel_dir"/*.ko "$stage/lib/modules/"
  # Line tables are no use in the guest and make up most of the release binary.
  strip -o "$stage/usr/bin/burrow-agent" "$agent" 2>/dev/null || cp "$agent" "$stage/usr/bin/burrow-agent"
  for lib in "${libs[@]}"; do
    mkdir -p "$stage$(dirname "$lib")"
    cp -L "$lib" "$stage$lib"
  done
  (cd "$stage" && find . | LC_ALL=C sort | "$busybox" cpio -o -H newc -R 0:0 2>/dev/null) > "$initramfs.new"
  mv "$initramfs.new" "$initramfs"
  echo "$stamp" > "$cache/initramfs.stamp"
  rm -rf "$stage"
fi
if [ -f "$kernel_dir/vmlinux" ]; then
  echo "kernel=$kernel_dir/vmlinux"
else
  echo "kernel=$kernel_dir/vmlinuz"
fi
echo "initramfs=$initramfs"
