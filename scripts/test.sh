#!/usr/bin/env bash
# Install everything, lint, and run the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$SECONDS
bash scripts/setup.sh
echo "setup: $((SECONDS - start)) s"
# Cache byte-code for the modules the tests import (in .venv/pycache, not beside the sources): this shell and CI set
# PYTHONDONTWRITEBYTECODE, and the install skips pip's byte-compilation of all 2 GB of site-packages (80 s of CPU),
# so without a cache every process the tests start would compile torch and transformers again.
unset PYTHONDONTWRITEBYTECODE
export PYTHONPYCACHEPREFIX="$PWD/.venv/pycache"
.venv/bin/ruff check elasticlm tests bench
# One worker per core (pytest-xdist; tests/conftest.py gives each worker one torch thread), idle workers steal
# queued tests so the long end-to-end tests do not leave a core idle at the end.
.venv/bin/python -m pytest -n auto --dist worksteal --durations=10 "$@"
echo "setup + lint + tests: $((SECONDS - start)) s"
