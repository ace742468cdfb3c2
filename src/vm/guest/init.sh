#!/bin/busybox sh
# /init of Berth's guest initramfs (busybox-static). Loads the kernel modules the guest needs, mounts the
# image's read-only root disk (/dev/vda) under an overlay whose writable half is the scratch disk (/dev/vdb),
# and hands PID 1 to the agent, which chroots each command into that overlay.
# Kernel command line: berth.rootfs=erofs|ext4 (the root disk's file system); berth.marker (print
# BERTH-GUEST-MARKER on the console and power off: the boot floor benchmark).
export PATH=/bin
busybox mount -t proc proc /proc
busybox mount -t sysfs sys /sys
busybox mount -t devtmpfs dev /dev

fail() {
  echo "berth-init: $*" >/dev/console
  poweroff -f
}

rootfs=erofs
for word in $(cat /proc/cmdline); do
  case "$word" in
  berth.marker) echo BERTH-GUEST-MARKER >/dev/console && poweroff -f ;;
  berth.rootfs=*) rootfs="${word#berth.rootfs=}" ;;
  esac
done

for module in $(cat /lib/modules/load-order); do
  insmod "/lib/modules/$module" || fail "insmod $module failed"
done

# Devices appear as their drivers probe them, after insmod returns.
wait_for() {
  tries=0
  while [ ! -e "$1" ]; do
    tries=$((tries + 1))
    [ "$tries" -gt 500 ] && fail "$1 did not appear"
    usleep 10000
  done
}

port=
tries=0
while [ -z "$port" ]; do
  for p in /sys/class/virtio-ports/*; do
    [ -e "$p/name" ] && [ "$(cat "$p/name")" = berth ] && port="/dev/${p##*/}"
  done
  tries=$((tries + 1))
  [ "$tries" -gt 500 ] && fail "no virtio-serial port named berth"
  [ -z "$port" ] && usleep 10000
done
wait_for "$port"
wait_for /dev/vda
wait_for /dev/vdb

mkdir -p /lower /scratch /newroot
case "$rootfs" in
ext4) mount -t ext4 -o ro,noload /dev/vda /lower || fail "cannot mount the root disk (ext4)" ;;
*) mount -t erofs -o ro /dev/vda /lower || fail "cannot mount the root disk (erofs)" ;;
esac
# noinit_itable: no kernel thread zeroing inode tables behind the commands' back (the disk is thrown away).
mount -t ext4 -o noinit_itable /dev/vdb /scratch || fail "cannot mount the scratch disk"
mkdir -p /scratch/upper /scratch/work
mount -t overlay overlay -o lowerdir=/lower,upperdir=/scratch/upper,workdir=/scratch/work /newroot ||
  fail "cannot mount the overlay"
for dir in proc sys dev tmp; do
  [ -d "/newroot/$dir" ] || mkdir -p "/newroot/$dir"
done
chmod 1777 /newroot/tmp
mount -t proc proc /newroot/proc
mount -t sysfs sys /newroot/sys
mount -t devtmpfs dev /newroot/dev
# The guest's own loopback, as a sandboxed action has; any other interface is configured by the worker
# (src/vm/vm-network.ts), and only for an action with a network.
ip link set lo up || fail "cannot bring up the loopback interface"
# The links of a container's /dev (OCI runtime spec) that devtmpfs lacks: bash's process substitution
# (`diff <(a) <(b)`, common in shell tests) opens /dev/fd/N, and many tools write to /dev/stdout.
ln -sfn /proc/self/fd /newroot/dev/fd
ln -sfn /proc/self/fd/0 /newroot/dev/stdin
ln -sfn /proc/self/fd/1 /newroot/dev/stdout
ln -sfn /proc/self/fd/2 /newroot/dev/stderr
exec /bin/berth-agent "$port" /newroot
