#!/usr/bin/env bash
# Builds the MicroVM guest into DIR (default ~/.cache/berth/vm, Berth's worker.vm.dir), idempotently:
#   vmlinux          the uncompressed kernel of Debian's linux-image-amd64 (boots about twice as fast as the
#                    bzImage under TCG); the package is downloaded and unpacked into DIR, never installed
#   initramfs.cpio   busybox-static, init (src/vm/guest/init.sh), berth-agent (src/vm/guest/agent.c, static),
#                    berth-start-dockerd and berth-relay (init-dockerd=true), and the kernel modules the guest
#                    needs, in load order
#   guest.json       what src/vm/guest-assets.ts reads: kernel release and file names; written last
# A second run with the same kernel package and the same sources does nothing.
set -euo pipefail
src="$(cd "$(dirname "$0")/.." && pwd)/src/vm/guest"
dir="${1:-$HOME/.cache/berth/vm}"
mkdir -p "$dir/debs"
dir="$(cd "$dir" && pwd)"

# The modules the guest loads; their dependencies come from modules.dep. crc32c_generic is what ext4 and
# erofs ask the crypto API for (there is no modprobe helper in the guest to load it on demand). 9p carries an
# action's input root in and its outputs out (a share of the host's directory, see src/vm/vm-runner.ts).
modules=(virtio_pci virtio_blk virtio_console crc32c_generic ext4 erofs overlay 9pnet_virtio 9p virtio_net)
# What Docker's daemon needs for bridged container networks (init-dockerd=true), loaded only when one starts
# (src/vm/guest/start-dockerd.sh): each module costs every boot time under TCG.
docker_modules=(bridge br_netfilter veth nf_tables nft_compat nft_chain_nat nft_masq xt_conntrack xt_MASQUERADE
  xt_addrtype xt_nat xt_tcpudp xt_mark nf_nat nf_conntrack)

package="$(apt-cache depends linux-image-amd64 | sed -n 's/^ *Depends: \(linux-image-[^ ]*-amd64\)$/\1/p' | head -1)"
[[ -n "$package" ]] || { echo "guest-assets: linux-image-amd64 names no kernel package" >&2; exit 1; }
stamp="$package $(cat "$0" "$src/init.sh" "$src/agent.c" "$src/relay.c" "$src/start-dockerd.sh" /bin/busybox | sha256sum | cut -c1-16)"
if [[ -f "$dir/guest.json" && -f "$dir/stamp" && "$(cat "$dir/stamp")" == "$stamp" ]]; then
  exit 0
fi

work="$(mktemp -d "$dir/.build.XXXXXX")"
trap 'rm -rf "$work"' EXIT
deb="$(ls "$dir/debs/$package"_*.deb 2>/dev/null | head -1 || true)"
if [[ -z "$deb" ]]; then
  (cd "$work" && apt-get download -q "$package" 2>&1 | grep -v '^W: Download is performed unsandboxed' >&2 || true)
  mv "$work/$package"_*.deb "$dir/debs/"
  deb="$(ls "$dir/debs/$package"_*.deb | head -1)"
fi
dpkg -x "$deb" "$work/kernel"
release="$(ls "$work/kernel/lib/modules")"
moddir="$work/kernel/lib/modules/$release"
busybox depmod -b "$work/kernel" "$release"

# vmlinuz is a bzImage holding an xz stream: the uncompressed kernel starts at xz's magic.
offset="$(LC_ALL=C grep -obUaP '\xfd7zXZ\x00' "$work/kernel/boot/vmlinuz-$release" | head -1 | cut -d: -f1 || true)"
[[ -n "$offset" ]] || { echo "guest-assets: no xz stream in vmlinuz-$release" >&2; exit 1; }
# (tail is cut short by a SIGPIPE once xz has read the whole stream; the padding after it is not needed.)
{ tail -c "+$((offset + 1))" "$work/kernel/boot/vmlinuz-$release" || true; } | xz -dc --single-stream >"$work/vmlinux"

root="$work/initramfs"
mkdir -p "$root"/{bin,dev,proc,sys,lib/modules}
cp /bin/busybox "$root/bin/busybox"
for applet in $(busybox --list); do
  [[ -e "$root/bin/$applet" ]] || ln -s busybox "$root/bin/$applet"
done
install -m 0755 "$src/init.sh" "$root/init"
gcc -static -Os -Wall -Wextra -Werror -o "$root/bin/berth-agent" "$src/agent.c"
strip "$root/bin/berth-agent"
gcc -static -Os -Wall -Wextra -Werror -o "$root/bin/berth-relay" "$src/relay.c"
strip "$root/bin/berth-relay"
install -m 0755 "$src/start-dockerd.sh" "$root/bin/berth-start-dockerd"

# Dependencies first, each module once (modules.dep lists a module's whole dependency closure).
declare -A loaded=()
order=()
add_module() {
  local path="$1" line dep
  [[ -n "${loaded[$path]:-}" ]] && return
  line="$(grep -m1 "^$path:" "$moddir/modules.dep")"
  for dep in ${line#*:}; do add_module "$dep"; done
  loaded[$path]=1
  order+=("$path")
}
for name in "${modules[@]}"; do
  path="$(grep -m1 -E "/$name\.ko:" "$moddir/modules.dep" | cut -d: -f1)"
  [[ -n "$path" ]] || { echo "guest-assets: kernel $release has no module $name" >&2; exit 1; }
  add_module "$path"
done
# Each module is copied without its appended signature (strip rewrites the ELF file and drops it): checking
# it is emulated work at every boot under TCG (about 0.5 s of the modules' 1 s here), and it guards nothing
# in a guest whose root may load any module anyway; the package itself was verified by apt.
copy_modules() {
  local list="$1" path
  for path in "${order[@]}"; do
    cp "$moddir/$path" "$root/lib/modules/$(basename "$path")"
    strip --strip-debug "$root/lib/modules/$(basename "$path")"
    basename "$path" >>"$root/lib/modules/$list"
  done
}
copy_modules load-order
# Docker's modules after the boot's (those already loaded are skipped: add_module remembers them).
order=()
for name in "${docker_modules[@]}"; do
  path="$(grep -m1 -E "/$name\.ko:" "$moddir/modules.dep" | cut -d: -f1)"
  [[ -n "$path" ]] || { echo "guest-assets: kernel $release has no module $name" >&2; exit 1; }
  add_module "$path"
done
copy_modules docker-load-order

(cd "$root" && find . -print0 | LC_ALL=C sort -z | cpio --null -o -H newc --owner 0:0 --quiet) >"$work/initramfs.cpio"
mv "$work/vmlinux" "$dir/vmlinux"
mv "$work/initramfs.cpio" "$dir/initramfs.cpio"
printf '{"kernelRelease":"%s","kernel":"vmlinux","initramfs":"initramfs.cpio","modules":"%s"}\n' \
  "$release" "${modules[*]}" >"$work/guest.json"
mv "$work/guest.json" "$dir/guest.json"
echo "$stamp" >"$dir/stamp"
echo "guest-assets: kernel $release, $(du -h "$dir/initramfs.cpio" | cut -f1) initramfs in $dir"
