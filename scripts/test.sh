#!/usr/bin/env bash
# The README's second command: set up, then run every check and the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh dev
export PATH="$PWD/.venv/bin:$PWD/.tools/bin:$PATH"
export HELM_CACHE_HOME="$PWD/.tools/helm/cache" HELM_CONFIG_HOME="$PWD/.tools/helm/config" HELM_DATA_HOME="$PWD/.tools/helm/data"
step() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }
step "ruff (lint, format)";      ruff check . && ruff format --check .
step "mypy --strict";            mypy
step "import contracts";         lint-imports
step "hadolint";                 hadolint Dockerfile
step "pytest";                   pytest "$@"
