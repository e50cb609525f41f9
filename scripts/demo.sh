#!/usr/bin/env bash
# The README's first command: set up, then run the demo (see `kubemtls demo --help`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh demo
exec .venv/bin/kubemtls demo "$@"
