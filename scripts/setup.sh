#!/usr/bin/env bash
# Create .venv (if missing) and install elasticlm with its test tools. Safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
# The CPU build of torch lies on local disk here; a bare `torch` requirement would pull a
# multi-GB CUDA build. Installing the pin first makes the project's range a no-op.
.venv/bin/python -m pip install --quiet --disable-pip-version-check "torch==${TORCH_VERSION:-2.13.0}"
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".[dev]"
