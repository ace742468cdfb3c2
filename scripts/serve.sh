#!/usr/bin/env bash
# Installs what Berth needs and starts the farm on its embedded defaults
# (gRPC on 127.0.0.1:8980, data under ~/.cache/berth). Extra arguments go to `berth serve`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec node dist/src/cli/main.js serve "$@"
