#!/usr/bin/env bash
# Install everything, lint, and run the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check elasticlm tests bench
.venv/bin/python -m pytest --durations=10 "$@"
