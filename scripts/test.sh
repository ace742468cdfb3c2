#!/usr/bin/env bash
# Installs what the tests need, then runs the code checks and the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh --test
npm run check --silent
npm test
