#!/bin/busybox sh
# berth-start-dockerd: starts Docker's daemon from the action's image inside a Berth guest VM (init-dockerd=true)
# and waits until it answers. Run by the worker in the agent's own root (busybox), as root, before the action's
# command; the daemon keeps running for the VM's life (a recycled VM keeps it, with its images).
#
# Environment (set by the worker, src/vm/guest-dockerd.ts):
#   BERTH_DOCKERD_TIMEOUT  seconds the daemon has to answer
#   BERTH_DOCKERD_TCP      1: the daemon also listens on TCP port 2375 (enable-dockerd-tcp)
#   BERTH_DOCKERD_CONFIG   the daemon's configuration (daemon.json: insecure registries, mirrors)
#   BERTH_DOCKERD_RELAYS   lines "LISTEN_ADDRESS PORT GATEWAY_PORT NAME": a registry the farm uses, reached by
#                          berth-relay through the worker's forward; NAME (or -) is added to /etc/hosts
#   BERTH_DOCKERD_GATEWAY  the guest's gateway (the worker's namespace, where its forwards listen)
# Exit: 0 once the daemon answers (stdout: "bridge", or "host <why>" when it runs without its own bridge);
# 3 the image has no dockerd; 4 it did not answer in time; anything else a failed setup. stderr says why.
export PATH=/bin
root=/newroot
image_path=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

dockerd=
for candidate in /usr/bin/dockerd /usr/sbin/dockerd /usr/local/bin/dockerd; do
  if [ -f "$root$candidate" ] || [ -L "$root$candidate" ]; then
    dockerd=$candidate
    break
  fi
done
[ -n "$dockerd" ] || { echo "the image has no dockerd (looked for /usr/bin, /usr/sbin and /usr/local/bin/dockerd)" >&2; exit 3; }

# Bridged container networks need these; without them the daemon runs with the VM's network only.
missing=
for module in $(cat /lib/modules/docker-load-order); do
  name="${module%.ko}"
  grep -q "^$name " /proc/modules || insmod "/lib/modules/$module" 2>/dev/null || missing="$missing $name"
done

set -e
mkdir -p "$root/sys/fs/cgroup"
grep -q " $root/sys/fs/cgroup " /proc/mounts || mount -t cgroup2 cgroup2 "$root/sys/fs/cgroup"
# overlay2 cannot stack on the overlay that is the VM's root: Docker's data lives on the scratch disk itself.
mkdir -p /scratch/docker "$root/var/lib/docker" "$root/etc/docker"
grep -q " $root/var/lib/docker " /proc/mounts || mount --bind /scratch/docker "$root/var/lib/docker"
printf '%s\n' "$BERTH_DOCKERD_CONFIG" >"$root/etc/docker/berth-daemon.json"
printf '%s\n' "${BERTH_DOCKERD_RELAYS:-}" | while read -r address port gateway_port name; do
  [ -n "$address" ] || continue
  [ "$name" = - ] || echo "$address $name" >>"$root/etc/hosts"
  case "$address" in 127.*) ;; *) ip addr add "$address/32" dev lo ;; esac
  setsid /bin/berth-relay "$address" "$port" "$BERTH_DOCKERD_GATEWAY" "$gateway_port" </dev/null >/dev/null 2>&1 &
done
set +e

in_image() { env -i PATH="$image_path" HOME=/root chroot "$root" "$@"; }

start() {
  args="--host=unix:///var/run/docker.sock --config-file=/etc/docker/berth-daemon.json"
  [ "${BERTH_DOCKERD_TCP:-0}" = 1 ] && args="$args --host=tcp://0.0.0.0:2375"
  [ "$1" = host ] && args="$args --iptables=false --ip-masq=false --bridge=none"
  : >/scratch/dockerd.log
  # shellcheck disable=SC2086
  setsid env -i PATH="$image_path" HOME=/root chroot "$root" "$dockerd" $args </dev/null >>/scratch/dockerd.log 2>&1 &
  pid=$!
}

# A child that ended stays a zombie until this shell reaps it: gone, for this purpose.
alive() { [ -r "/proc/$1/status" ] && ! grep -q '^State:[[:space:]]*Z' "/proc/$1/status"; }

# Waits for the daemon; 0 when it answers, 1 when it ended, 2 past the deadline.
wait_ready() {
  while :; do
    # (the image's /var/run is a link to /run, which only the image's root resolves: ask its docker client)
    if in_image docker version >/dev/null 2>&1; then return 0; fi
    alive "$pid" || return 1
    now=$(cut -d. -f1 /proc/uptime)
    [ "$now" -lt "$deadline" ] || return 2
    usleep 100000
  done
}

deadline=$(($(cut -d. -f1 /proc/uptime) + BERTH_DOCKERD_TIMEOUT))
mode=bridge
why=
if [ -n "$missing" ]; then
  mode=host
  why="the guest kernel lacks$missing"
fi
start "$mode"
wait_ready
outcome=$?
if [ "$outcome" = 1 ] && [ "$mode" = bridge ]; then
  why="its bridge failed: $(tail -n 1 /scratch/dockerd.log)"
  mode=host
  start host
  wait_ready
  outcome=$?
fi
case "$outcome" in
0) if [ "$mode" = bridge ]; then echo bridge; else echo "host $why"; fi ;;
1) echo "dockerd exited before it answered; its log ends: $(tail -n 5 /scratch/dockerd.log)" >&2; exit 5 ;;
*) kill -9 "$pid" 2>/dev/null
   echo "dockerd did not answer within $BERTH_DOCKERD_TIMEOUT s; docker version says: $(in_image docker version 2>&1 | tail -n 3); its log ends: $(tail -n 5 /scratch/dockerd.log)" >&2
   exit 4 ;;
esac
