#!/usr/bin/env bash
# Installs everything Berth needs on Debian 12 (run as root), idempotently,
# then builds it. `--test` adds what the test suite and benchmarks need.
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(protobuf-compiler curl util-linux zstd bubblewrap attr slirp4netns qemu-system-x86 qemu-utils erofs-utils busybox-static cpio gcc libc6-dev)
if [[ "${1:-}" == "--test" ]]; then
  packages+=(bazel-bootstrap gcc docker-registry apache2-utils umoci skopeo busybox-static debootstrap docker.io python3-grpcio openssl buildstream bash-static)
fi

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]} > 0)); then
  echo "installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get -o DPkg::Lock::Timeout=900 update -q
  apt-get -o DPkg::Lock::Timeout=900 install -y -q --no-install-recommends "${missing[@]}"
fi

if [[ ! -d node_modules ]] || [[ package-lock.json -nt node_modules/.package-lock.json ]]; then
  # The lock file lists every platform's optional packages (Biome's), so `npm ci` installs
  # exactly what it locks and never rewrites it.
  npm ci --no-audit --no-fund
fi
npm run build --silent

# The MicroVM guest (Debian's kernel, unpacked, not installed; an initramfs with Berth's agent) into
# worker.vm.dir's default; `scripts/guest-assets.sh DIR` builds it elsewhere.
scripts/guest-assets.sh "${BERTH_VM_DIR:-$HOME/.cache/berth/vm}"
