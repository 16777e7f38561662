#!/usr/bin/env bash
# Refresh requirements/dev.lock, the exact versions the test environment installs (scripts/setup.sh).
# Run it on purpose, after scripts/test_latest.sh has said the newest releases pass; then run
# scripts/test.sh on a fresh clone and commit the lock with the versions that moved named in the message.
#
#   bash scripts/lock.sh              # newest versions that the ranges in pyproject.toml admit
#   bash scripts/lock.sh -P transformers==5.24.0   # move one package (pip-compile's --upgrade-package)
#
# The lock is resolved by pip-tools (pip-compile) for this machine's Python (3.11) against the CPU build of torch
# in requirements/torch-cpu.in; the package's own requirements stay ranges, so users keep their CUDA torch.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TOOLS=${LOCK_TOOLS_VENV:-${TMPDIR:-/tmp}/elasticlm-pip-tools}
if [ ! -x "$TOOLS/bin/pip-compile" ]; then
  "$PYTHON" -m venv "$TOOLS"
  "$TOOLS/bin/pip" install --quiet --disable-pip-version-check "pip-tools>=7.4"
fi
upgrade=(--upgrade)
if [ "$#" -gt 0 ]; then upgrade=(); fi  # -P pkg==ver moves one package and keeps the rest
"$TOOLS/bin/pip-compile" --quiet "${upgrade[@]}" "$@" \
  --extra dev --extra hf --extra plot --extra serve --extra lmeval --extra gguf \
  --constraint requirements/torch-cpu.in --allow-unsafe --strip-extras --no-emit-index-url --no-emit-find-links \
  --output-file requirements/dev.lock pyproject.toml
echo "requirements/dev.lock: $(grep -c '==' requirements/dev.lock) pinned packages"
